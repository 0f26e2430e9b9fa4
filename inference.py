"""Predict the eval set with a trained run (its folds and its model on every person, --fold full, averaged),
or single photos.

    python inference.py --run WORK/runs/single --crops WORK/crops --tta flip --answers DATA/eval/answers.csv
    python inference.py --run WORK/runs/single --image photo1.jpg photo2.png [--embedding WORK/submission_embedding.npz]

Writes RUN/test_logits.npz (image ids, 18-class and per-task log-probabilities) and
RUN/submission.csv (ImageID,ans in info.csv order). With --answers: RUN/scores.json, a per-class
F1 table, RUN/test_confusion.png, and the score line as the last line printed. --embed draws a
t-SNE of the penultimate features coloured by age band (RUN/embed.png).
--image with --embedding: dlib's face embedding of the photo's crop (faceembed.py) votes on gender and age beside
the run's models, through the stacker ensemble.py --embeddings saved (stacking.py), as it did for the eval set;
where ensemble.py --face found the fine-tuned networks' vote better on each image on its own, the stacker names
them and train_face.py's networks vote instead (those that voted on the eval set: foldfull.pt, else the folds').
Every setting the model needs (backbone, image size, heads) comes from its checkpoint.
2-core CPU: the 2,100 bench eval images x 5 folds with flip TTA in about 4 minutes at 128 px.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import faceembed
import stacking
from batches import gather, normalise
from common import (
    InputError,
    class_name,
    keep_freed_memory,
    load_crops,
    make_env,
    positive_int,
    run_main,
    save_csv,
    save_figure,
    save_json,
    split_class,
)
from faces import background_remover, crop_settings, crop_square, face_detector, load_rgb, prepare_face
from model import average_views, load_models, predict
from rawdata import read_answers
from scores import per_class_table, plot_confusions, save_logprobs, score_line, scores

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", required=True, help="run folder written by a train_*.py script")
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py output (reads eval.csv, eval_u8.npy)")
parser.add_argument("--tta", choices=["none", "flip", "flip+shift"], default="flip", help="test-time augmentation")
parser.add_argument("--answers", default=None, help="CSV with ImageID,ans (extra columns allowed): score against it")
parser.add_argument("--image", nargs="+", default=None, help="predict these photos instead of the eval set")
parser.add_argument(
    "--embedding",
    default=None,
    help="the ensemble's _embedding.npz: dlib's embedding of the photo votes on gender and age",
)
parser.add_argument("--embed", action="store_true", help="t-SNE plot of penultimate features (RUN/embed.png)")
parser.add_argument("--use-folds", default="all", help="folds to average: all, cv (not full), or e.g. 0,1,2,3,4,full")
parser.add_argument("--batch-size", type=positive_int, default=256)
parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")


def predict_images(paths, models, env, crops_dir, tta, stacker=None):
    """--image: prepare each photo as preprocess.py did (its settings from a crop's PNG), predict, print.
    With a stacker (--embedding), the embedding of the crop votes on gender and age beside the models."""
    settings, _ = crop_settings(crops_dir)
    face_models = faceembed.load_models(faceembed.model_folder()) if stacker else None
    tuned = stacking.tuned_named(stacker) if stacker else None
    detector = face_detector()
    bg = background_remover(settings["bg_model"], settings["bg_size"]) if settings["bg"] == "rembg" else None
    size = models[0].cfg.img_size
    for path in paths:
        rgb, err = load_rgb(path)
        if err:
            raise InputError(f"{path}: {err}")
        crop, info = prepare_face(rgb, detector, bg, settings["size"], settings["margin"], settings["detect_size"],
                                  settings["min_conf"], settings["bg_context"])  # fmt: skip
        small = crop_square(crop, (0, 0, crop.shape[1], crop.shape[0]), size)
        images = torch.from_numpy(small[None].copy())
        views = average_views(
            [predict(m, images, torch.arange(1), env, mean, std, 1, tta) for _, m, mean, std, _ in models]
        )
        vote = ""
        if stacker:
            views, found = stacking.vote_on_photo(stacker, face_models, views, crop, tuned)
            vote = " | " + stacking.vote_note(stacker, tuned, found)
        p = {k: np.exp(v[0]) for k, v in views.items()}
        c = int(p["label"].argmax())
        m, g, a = split_class(c)
        face = "face found" if info["face_found"] else "no face found: fallback crop"
        mask, gender, age = ("wear", "incorrect", "not wear")[m], ("male", "female")[g], ("<30", "30-59", ">=60")[a]
        print(f"{path}: class {c} ({class_name(c)}) p={p['label'][c]:.2f} | mask {mask} {p['mask'][m]:.2f}, "
              f"gender {gender} {p['gender'][g]:.2f}, age {age} {p['age'][a]:.2f} | {face}{vote}")  # fmt: skip


def embed_plot(models, images, rows, env, true_band, path):
    """t-SNE of the first fold's penultimate features, coloured by age band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    _, model, mean, std, _ = models[0]
    rows = rows[: min(len(rows), 2000)]
    features = []
    with torch.no_grad():
        for i in range(0, len(rows), 256):
            x = normalise(gather(images, rows[i : i + 256]), env, mean, std)
            with env.autocast():
                features.append(model.backbones[model.uses.get("age", "shared")](x).float().cpu())
    xy = TSNE(n_components=2, init="pca", random_state=0).fit_transform(torch.cat(features).numpy())
    fig, ax = plt.subplots(figsize=(7, 6))
    for band, name in enumerate(("<30", "30-59", ">=60")):
        sel = true_band[: len(xy)] == band
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=name)
    ax.set(title="t-SNE of penultimate features (age backbone), coloured by age band", xticks=[], yticks=[])
    ax.legend()
    save_figure(fig, path)


def main():
    args = parser.parse_args()
    stacker = None
    if args.embedding:  # before the models load: a missing file or dlib fails in one line, at once
        if not args.image:
            raise InputError("--embedding votes on --image photos (the eval set's: ensemble.py --embeddings)")
        if not Path(args.embedding).is_file():
            raise InputError(f"--embedding {args.embedding}: not found (ensemble.py --embeddings writes it)")
        stacker = stacking.load_stacker(args.embedding)
        faceembed.model_folder()
    env = make_env(precision=args.precision)
    keep_freed_memory(env.device)  # batches of 256 without page faults: 2x the images/s on CPU
    run = Path(args.run)
    models = load_models(run, env, args.use_folds)
    img_size = models[0].cfg.img_size
    print(f"{run}: {len(models)} model(s) ({', '.join(m.name for m in models)}), {models[0].cfg.backbone} "
          f"at {img_size} px, tta {args.tta}")  # fmt: skip
    if args.image:
        predict_images(args.image, models, env, args.crops, args.tta, stacker)
        return

    # ---- predict the eval set ----
    index, cache = load_crops(args.crops, "eval", img_size)
    images = torch.from_numpy(cache)
    rows = torch.arange(len(index))
    per_fold = []
    for name, model, mean, std, _ in models:
        per_fold.append(predict(model, images, rows, env, mean, std, args.batch_size, args.tta))
        print(f"  {name}: predicted {len(index)} images")
    views = average_views(per_fold)
    save_logprobs(run / "test_logits.npz", index["image_id"].to_numpy(), views)
    pred = views["label"].argmax(-1)
    save_csv(pd.DataFrame(dict(ImageID=index["image_id"], ans=pred)), run / "submission.csv")
    print(f"wrote {run / 'test_logits.npz'} and {run / 'submission.csv'}")

    # ---- score ----
    true = None
    if args.answers:
        answers = read_answers(args.answers)
        missing = set(index["image_id"]) - set(answers.index)
        if missing:
            raise InputError(f"{args.answers}: no answer for {len(missing)} eval image(s), e.g. {sorted(missing)[0]}")
        label = answers.loc[index["image_id"]].to_numpy()
        true = dict(zip(("mask", "gender", "age"), split_class(label)), label=label)
    if args.embed:
        band = true["age"] if true else views["age"].argmax(-1)
        embed_plot(models, images, rows, env, band, run / "embed.png")
        print(f"wrote {run / 'embed.png'}")
    if true:
        s = scores(views, true)
        table = per_class_table(pred, label)
        print(table.to_string(index=False))
        save_json(dict(s, tta=args.tta, folds=[m.name for m in models], per_class=table.to_dict("records")),
                  run / "scores.json")  # fmt: skip
        plot_confusions(pred, label, run / "test_confusion.png", "eval")
        print(score_line(s))


if __name__ == "__main__":
    run_main(main)
