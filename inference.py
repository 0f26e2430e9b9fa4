"""Predict the eval set with a trained run (its folds and its model on every person, --fold full, averaged),
or single photos.

    python inference.py --run WORK/runs/single --crops WORK/crops --tta flip --answers DATA/eval/answers.csv
    python inference.py --run WORK/runs/single --image photo1.jpg photo2.png

Writes RUN/test_logits.npz (image ids, 18-class and per-task log-probabilities) and
RUN/submission.csv (ImageID,ans in info.csv order). With --answers: RUN/scores.json, a per-class
F1 table, RUN/test_confusion.png, and the score line as the last line printed. --embed draws a
t-SNE of the penultimate features coloured by age band (RUN/embed.png).
Every setting the model needs (backbone, image size, heads) comes from its checkpoint.
2-core CPU: the 2,100 bench eval images x 5 folds with flip TTA in about 4 minutes at 128 px.
"""

import argparse
import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import (
    TASKS,
    DataError,
    background_remover,
    build_model,
    class_name,
    crop_square,
    face_detector,
    gather,
    keep_freed_memory,
    load_checkpoint,
    load_crops,
    load_rgb,
    machine,
    normalise,
    own_backbones,
    plot_confusions,
    positive_int,
    predict,
    prepare_face,
    read_answers,
    run_main,
    save_csv,
    save_json,
    save_logprobs,
    score_line,
    scores,
    split_class,
)

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", required=True, help="run folder written by a train_*.py script")
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py output (reads eval.csv, eval_u8.npy)")
parser.add_argument("--tta", choices=["none", "flip", "flip+shift"], default="flip", help="test-time augmentation")
parser.add_argument("--answers", default=None, help="CSV with ImageID,ans (extra columns allowed): score against it")
parser.add_argument("--image", nargs="+", default=None, help="predict these photos instead of the eval set")
parser.add_argument("--embed", action="store_true", help="t-SNE plot of penultimate features (RUN/embed.png)")
parser.add_argument("--use-folds", default="all", help="folds to average: all, cv (not full), or e.g. 0,1,2,3,4,full")
parser.add_argument("--batch-size", type=positive_int, default=256)
parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")


# ---- model: rebuilt from each checkpoint's own config ------------------------------
FoldModel = namedtuple("FoldModel", "name model mean std cfg")  # cfg: the checkpoint's training flags


def load_models(run, env, use_folds="all"):
    """A run's fold*/best.pt as FoldModels. use_folds: all, cv (the cross-validation folds, which have
    val images: not foldfull, the model on every person) or names such as 0,1,full."""
    paths = sorted(Path(run).glob("fold*/best.pt"))
    if use_folds == "cv":
        paths = [p for p in paths if p.parent.name != "foldfull"]
    elif use_folds != "all":
        wanted = {f"fold{k.strip()}" for k in use_folds.split(",")}
        paths = [p for p in paths if p.parent.name in wanted]
    if not paths:
        which = "of a cross-validation fold " if use_folds == "cv" else ""
        raise DataError(f"--run {run}: no fold*/best.pt {which}inside (train first)")
    models = []
    for path in paths:
        state = load_checkpoint(path)
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise DataError(f"{path}: not a maskcls checkpoint (no model/config inside)")
        cfg = argparse.Namespace(**state["config"])
        cfg.pretrained = "none"  # the weights come from the checkpoint
        weights = state["model"]
        head_sizes = {}  # the head layout is read off the weights: heads.<name>.fc[.N].weight
        for key, value in weights.items():
            if key.startswith("heads.") and key.endswith(".weight"):
                head_sizes[key.split(".")[1]] = value.shape[0]
        model, mean, std = build_model(cfg, head_sizes, env, own_backbones(cfg), getattr(cfg, "age_hidden", 0))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise DataError(f"{path}: weights do not fit the model its config describes ({str(e)[:150]})") from None
        if not ("label" in head_sizes or set(TASKS) <= set(head_sizes)):
            raise DataError(f"{path}: heads {sorted(head_sizes)} are neither an 18-way head nor mask/gender/age")
        models.append(FoldModel(path.parent.name, model.eval(), mean, std, cfg))
    sizes = {m.cfg.img_size for m in models}
    if len(sizes) > 1:
        raise DataError(f"--run {run}: folds were trained at different image sizes {sorted(sizes)}")
    return models


def average(views_list):
    """Mean of probabilities over folds, back to log-probabilities."""
    return {k: np.log(np.mean([np.exp(v[k]) for v in views_list], axis=0) + 1e-12) for k in views_list[0]}


def per_class_table(views, true):
    from sklearn.metrics import precision_recall_fscore_support

    pred = views["label"].argmax(-1)
    p, r, f, n = precision_recall_fscore_support(true["label"], pred, labels=range(18), zero_division=0)
    return pd.DataFrame(dict(cls=range(18), name=[class_name(c) for c in range(18)], precision=p.round(3),
                             recall=r.round(3), f1=f.round(3), support=n))  # fmt: skip


def predict_images(paths, models, env, crops_dir, tta):
    """--image: prepare each photo as preprocess.py did (its settings from a crop's PNG), predict, print."""
    from PIL import Image

    settings = dict(size=256, bg="rembg", bg_model="u2netp", bg_size=192, bg_context=0.25, margin=0.6,
                    detect_size=128, min_conf=0.9)  # fmt: skip
    made = next(Path(crops_dir).glob("eval/*.png"), None) if Path(crops_dir).is_dir() else None
    if made:
        with Image.open(made) as im:
            settings.update(json.loads(im.text.get("maskcls", "{}")).get("settings", {}))
    detector = face_detector()
    bg = background_remover(settings["bg_model"], settings["bg_size"]) if settings["bg"] == "rembg" else None
    size = models[0].cfg.img_size
    for path in paths:
        rgb, err = load_rgb(path)
        if err:
            raise DataError(f"{path}: {err}")
        crop, info = prepare_face(rgb, detector, bg, settings["size"], settings["margin"], settings["detect_size"],
                                  settings["min_conf"], settings["bg_context"])  # fmt: skip
        crop = crop_square(crop, (0, 0, crop.shape[1], crop.shape[0]), size)
        images = torch.from_numpy(crop[None].copy())
        views = average([predict(m, images, torch.arange(1), env, mean, std, 1, tta) for _, m, mean, std, _ in models])
        p = {k: np.exp(v[0]) for k, v in views.items()}
        c = int(p["label"].argmax())
        m, g, a = split_class(c)
        face = "face found" if info["face_found"] else "no face found: fallback crop"
        mask, gender, age = ("wear", "incorrect", "not wear")[m], ("male", "female")[g], ("<30", "30-59", ">=60")[a]
        print(f"{path}: class {c} ({class_name(c)}) p={p['label'][c]:.2f} | mask {mask} {p['mask'][m]:.2f}, "
              f"gender {gender} {p['gender'][g]:.2f}, age {age} {p['age'][a]:.2f} | {face}")  # fmt: skip


def embed_plot(models, images, rows, env, true_band, path):
    """t-SNE of the first fold's penultimate features, coloured by age band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from common import save_figure

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
    env = machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.precision)
    keep_freed_memory(env.device)  # batches of 256 without page faults: 2x the images/s on CPU
    run = Path(args.run)
    models = load_models(run, env, args.use_folds)
    img_size = models[0].cfg.img_size
    print(f"{run}: {len(models)} model(s) ({', '.join(m.name for m in models)}), {models[0].cfg.backbone} "
          f"at {img_size} px, tta {args.tta}")  # fmt: skip
    if args.image:
        predict_images(args.image, models, env, args.crops, args.tta)
        return

    # ---- predict the eval set ----
    index, cache = load_crops(args.crops, "eval", img_size)
    images = torch.from_numpy(cache)
    rows = torch.arange(len(index))
    per_fold = []
    for name, model, mean, std, _ in models:
        per_fold.append(predict(model, images, rows, env, mean, std, args.batch_size, args.tta))
        print(f"  {name}: predicted {len(index)} images")
    views = average(per_fold)
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
            raise DataError(f"{args.answers}: no answer for {len(missing)} eval image(s), e.g. {sorted(missing)[0]}")
        label = answers.loc[index["image_id"]].to_numpy()
        true = dict(zip(("mask", "gender", "age"), split_class(label)), label=label)
    if args.embed:
        band = true["age"] if true else views["age"].argmax(-1)
        embed_plot(models, images, rows, env, band, run / "embed.png")
        print(f"wrote {run / 'embed.png'}")
    if true:
        s = scores(views, true)
        table = per_class_table(views, true)
        print(table.to_string(index=False))
        save_json(dict(s, tta=args.tta, folds=[m.name for m in models], per_class=table.to_dict("records")),
                  run / "scores.json")  # fmt: skip
        plot_confusions(views, true, run / "test_confusion.png", "eval")
        print(score_line(s))


if __name__ == "__main__":
    run_main(main)
