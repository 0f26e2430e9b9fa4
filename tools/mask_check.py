"""Score a trained run's mask state on masks it has never seen: the held-out set of tools/render_masks.py.

    python tools/render_masks.py --data ../shared/bench/utkmask --out WORK/heldout_masks
    python tools/mask_check.py --run WORK/runs/single --heldout WORK/heldout_masks

Crops the held-out images as the run's training crops were made (preprocess.py --splits eval into
HELDOUT/crops, with the settings recorded in a crop of the run's --crops folder; a rerun reuses them),
predicts them with the run's models as inference.py does (folds averaged, --tta), and prints:

  recall of each mask state   of the images whose true state is S, the share predicted S
  per placement               the same for wear, below_nose, chin (the two wrong ones) and none
  wear vs incorrect           of the images whose true state is wear or incorrect (every masked image), the
                              share whose predicted state is the true one; a masked face read as `not wear`
                              counts as wrong. render_masks.py draws as many of each, so this is also the mean
                              of the two recalls
  mask macro F1               F1 over the three states, averaged

A predicted state is the mask part of the 18-class argmax, as inference.py's mask_f1. The last line reads
`mask_f1=0.XXXX wear_vs_incorrect=0.XXXX`. Writes, beside the run: RUN/mask_check.json (every figure, per
shape and texture too), RUN/mask_check.png (confusions of the states and of the placements) and
RUN/mask_check_logits.npz (the predictions, as inference.py's test_logits.npz). --name changes the prefix.
2-core CPU: cropping 1,500 images with rembg takes about 4 minutes once, predicting them 1 minute per 5 folds.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # common.py lives in the repository root
from common import (  # noqa: E402
    MASK_STATES,
    InputError,
    keep_freed_memory,
    load_crops,
    make_env,
    positive_int,
    run_main,
    save_figure,
    save_json,
    split_class,
)
from model import average_views, load_models, predict  # noqa: E402
from scores import save_logprobs, scores  # noqa: E402

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", required=True, help="a trained run folder (fold*/best.pt)")
parser.add_argument("--heldout", default="WORK/heldout_masks", help="render_masks.py output (eval/ inside)")
parser.add_argument("--crops", default=None, help="the run's training crops, to copy settings of (default: its config)")
parser.add_argument("--tta", choices=["none", "flip", "flip+shift"], default="flip", help="as inference.py")
parser.add_argument("--use-folds", default="all", help="as inference.py: all, cv, or e.g. 0,1,full")
parser.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="preprocess.py processes")
parser.add_argument("--name", default="mask_check", help="prefix of the files written beside the run")
parser.add_argument("--batch-size", type=positive_int, default=256)
parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")

PLACEMENTS = ("wear", "below_nose", "chin", "none")


# ---- crop the held-out set as the run's crops were made -------------------------------
def crop_settings(run, crops):
    """preprocess.py flags that made the run's training crops, read from one crop's PNG text."""
    from PIL import Image

    if crops is None:
        config = Path(run) / "config.json"
        crops = json.loads(config.read_text()).get("crops") if config.is_file() else None
        if crops is None:
            raise InputError(f"--run {run}: no config.json naming its crops: pass --crops")
    made = next(Path(crops).glob("train/*/*.png"), None) if Path(crops).is_dir() else None
    if made is None:
        raise InputError(f"--crops {crops}: no training crops there to copy the settings of (pass --crops)")
    with Image.open(made) as im:
        settings = json.loads(im.text.get("maskcls", "{}")).get("settings")
    if not settings:
        raise InputError(f"{made}: no crop settings recorded (made by an older preprocess.py?)")
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def crop_heldout(heldout, flags, workers):
    out = Path(heldout) / "crops"
    cmd = [sys.executable, str(REPO / "preprocess.py"), "--data", str(heldout), "--out", str(out),
           "--splits", "eval", "--workers", str(workers), *flags]  # fmt: skip
    print("crop:", " ".join(cmd[1:]))
    if subprocess.run(cmd).returncode != 0:
        raise InputError(f"preprocess.py failed on {heldout} (its message is above)")
    return out


# ---- the figures -------------------------------------------------------------------
def recall(true, pred, where):
    return round(float((pred[where] == true[where]).mean()), 4) if where.any() else float("nan")


def mask_figures(answers, pred_state):
    """Every figure the check prints, from the true rows (answers, in prediction order) and predicted states."""
    from sklearn.metrics import confusion_matrix, f1_score

    true = answers["mask"].to_numpy()
    masked = true < 2
    out = dict(
        n_images=len(true),
        recall={s: recall(true, pred_state, true == k) for k, s in enumerate(MASK_STATES)},
        wear_vs_incorrect=recall(true, pred_state, masked),
        mask_f1=round(float(f1_score(true, pred_state, average="macro", labels=range(3), zero_division=0)), 4),
        confusion=confusion_matrix(true, pred_state, labels=range(3)).tolist(),  # rows: true state
    )
    placement = answers["placement"].to_numpy()
    out["recall_by_placement"] = {p: recall(true, pred_state, placement == p) for p in PLACEMENTS}
    for column in ("shape", "texture"):  # masked images only: how each drawn kind is read
        kinds = answers[column].fillna("").to_numpy()
        out[f"accuracy_by_{column}"] = {k: recall(true, pred_state, masked & (kinds == k))
                                         for k in sorted(set(kinds[masked]))}  # fmt: skip
    return out


def plot(figures, answers, pred_state, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ConfusionMatrixDisplay(np.array(figures["confusion"]), display_labels=MASK_STATES).plot(ax=a, colorbar=False)
    a.set_title(f"mask state (row: true)\nF1 {figures['mask_f1']:.3f}, wear vs incorrect "
                f"{figures['wear_vs_incorrect']:.3f}")  # fmt: skip
    by = pd.crosstab(pd.Categorical(answers["placement"], PLACEMENTS), pd.Categorical(pred_state, range(3)),
                     dropna=False).to_numpy()  # fmt: skip
    b.imshow(by, cmap="Blues")
    for (i, j), n in np.ndenumerate(by):
        b.text(j, i, str(n), ha="center", va="center", color="white" if n > by.max() / 2 else "black")
    b.set_yticks(range(len(PLACEMENTS)), PLACEMENTS)
    b.set_xticks(range(3), MASK_STATES)
    b.set(title="drawn placement (row) -> predicted state", xlabel="predicted", ylabel="")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main():
    args = parser.parse_args()
    heldout, run = Path(args.heldout), Path(args.run)
    answers_path = heldout / "eval" / "answers.csv"
    if not answers_path.is_file():
        raise InputError(f"--heldout {heldout}: no eval/answers.csv (make it with tools/render_masks.py)")
    answers = pd.read_csv(answers_path, dtype={"ImageID": str, "person_id": str}).set_index("ImageID")
    if not {"ans", "mask", "placement"} <= set(answers.columns):
        raise InputError(f"{answers_path}: needs columns ans, mask, placement (written by tools/render_masks.py)")
    env = make_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.precision)
    keep_freed_memory(env.device)
    models = load_models(run, env, args.use_folds)  # before the crops: a bad run fails in a second
    crops = crop_heldout(heldout, crop_settings(run, args.crops), args.workers)

    # ---- predict, as inference.py does ----
    index, cache = load_crops(crops, "eval", models[0].cfg.img_size)
    images, rows = torch.from_numpy(cache), torch.arange(len(index))
    views = average_views(
        [predict(m.model, images, rows, env, m.mean, m.std, args.batch_size, args.tta) for m in models]
    )
    ids = index["image_id"].to_numpy()
    save_logprobs(run / f"{args.name}_logits.npz", ids, views)
    answers = answers.loc[ids]
    pred_state = split_class(views["label"].argmax(-1))[0]

    # ---- score ----
    figures = mask_figures(answers, pred_state)
    label = answers["ans"].to_numpy()
    true = dict(zip(("mask", "gender", "age"), split_class(label)), label=label)
    figures["all_scores"] = scores(views, true)  # gender and age are the real persons' labels
    figures.update(run=str(run), heldout=str(heldout), tta=args.tta, folds=[m.name for m in models])
    save_json(figures, run / f"{args.name}.json")
    plot(figures, answers, pred_state, run / f"{args.name}.png", f"{run} on {heldout} ({len(ids)} images)")
    print(f"{run} ({len(models)} model(s), tta {args.tta}) on {heldout}: {len(ids)} images")
    print("recall by state:     " + "  ".join(f"{k} {v:.3f}" for k, v in figures["recall"].items()))
    print("recall by placement: " + "  ".join(f"{k} {v:.3f}" for k, v in figures["recall_by_placement"].items()))
    print("masked, by shape:    " + "  ".join(f"{k} {v:.3f}" for k, v in figures["accuracy_by_shape"].items()))
    print(f"wear vs incorrect: {figures['wear_vs_incorrect']:.3f} correct; wrote {run / args.name}.json and .png")
    print(f"mask_f1={figures['mask_f1']:.4f} wear_vs_incorrect={figures['wear_vs_incorrect']:.4f}")


if __name__ == "__main__":
    run_main(main)
