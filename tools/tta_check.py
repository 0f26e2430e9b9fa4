"""Check test-time augmentation out of fold: each fold's best model predicts its own validation images again
under each TTA, and the run's out-of-fold predictions are scored per TTA.

    python tools/tta_check.py --run WORK/runs/single --crops WORK/crops --folds WORK/folds.csv

The trainers' oof.npz is of the plain image, so this is how to choose inference.py --tta by cross-validation.
Prints, per TTA: out-of-fold macro F1, the F1 with one offset per age band fitted on other persons (as
ensemble.py --adjust checks it) and the log-loss. Writes nothing. On the bench set flip beat none on every run
and flip+shift added nothing (EXPERIMENTS.md).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # common.py lives in the repository root
from batches import fold_of_images, task_targets  # noqa: E402
from common import InputError, keep_freed_memory, load_crops, make_env, positive_int, run_main, split_class  # noqa: E402
from ensemble import offsets_cv  # noqa: E402
from model import load_models, predict  # noqa: E402
from scores import macro_f1  # noqa: E402

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", required=True, help="a trained run folder (fold*/best.pt)")
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py output")
parser.add_argument("--folds", default="WORK/folds.csv", help="split.py output the run was trained on")
parser.add_argument(
    "--tta",
    nargs="+",
    default=["none", "flip", "flip+shift"],
    choices=["none", "flip", "flip+shift"],
    help="to compare",
)
parser.add_argument("--seed", type=int, default=0, help="the person folds of the offsets' check")
parser.add_argument("--batch-size", type=positive_int, default=256)


def main():
    args = parser.parse_args()
    env = make_env()
    keep_freed_memory(env.device)
    models = load_models(args.run, env, "cv")  # foldfull, the model on every person, has no val images
    index, cache = load_crops(args.crops, "train", models[0].cfg.img_size)
    images = torch.from_numpy(cache)
    fold_of = fold_of_images(index, args.folds)
    labels = task_targets(index, 60)["label"].numpy()  # true bands, as every score
    shared_by = split_class(np.arange(18))[2]

    print(f"{'tta':12s} {'oof F1':>8s} {'offsets (cv)':>13s} {'log-loss':>9s}  ({len(models)} folds)")
    for tta in args.tta:
        rows, logp = [], []
        for name, model, mean, std, _ in tqdm(models, desc=tta, leave=False):
            fold_rows = torch.as_tensor(np.flatnonzero(fold_of == int(name.removeprefix("fold"))))
            if not len(fold_rows):
                raise InputError(f"--folds {args.folds}: no images in {name}: not the folds the run was trained on")
            rows.append(fold_rows.numpy())
            logp.append(predict(model, images, fold_rows, env, mean, std, args.batch_size, tta)["label"])
        rows, logp = np.concatenate(rows), np.concatenate(logp)
        y, ids = labels[rows], index["image_id"].to_numpy()[rows]
        with_offsets, _ = offsets_cv(logp, y, ids, shared_by, args.seed)
        nll = -logp[np.arange(len(y)), y].mean()
        print(f"{tta:12s} {macro_f1(y, logp.argmax(1)):8.4f} {with_offsets:13.4f} {nll:9.5f}")


if __name__ == "__main__":
    run_main(main)
