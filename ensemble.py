"""Combine several runs' predictions; weigh them by out-of-fold macro F1; report whether it helped.

    python ensemble.py --runs WORK/runs/single WORK/runs/multi WORK/runs/coord --weights f1 \
        --out WORK/submission.csv --answers DATA/eval/answers.csv

Members are run folders (their test_logits.npz and fold*/oof.npz) or bare logits .npz files.
--weights f1 | equal | opt | 0.5,0.3,0.2 ; --method soft (mean probabilities) | hard (votes);
--per-task takes the argmax of each task and recombines, instead of the joint 18-class argmax;
--adjust adds log-prior offsets fitted on the out-of-fold predictions for macro F1, one per age band
(--adjust-by age) or per class (class); cross-validated over persons, applied only if they help out of fold.
Writes OUT (ImageID,ans), OUT with .json (the report) and _logits.npz beside it. Seconds.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from common import (
    DataError,
    class_id,
    load_logprobs,
    read_answers,
    run_main,
    save_csv,
    save_json,
    save_logprobs,
    score_line,
    scores,
    split_class,
)

VIEWS = ("label", "mask", "gender", "age")

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--runs", nargs="+", required=True, help="run folders or logits .npz files")
parser.add_argument("--weights", default="f1", help="f1 | equal | opt | comma-separated numbers, one per member")
parser.add_argument("--method", choices=["soft", "hard"], default="soft", help="mean probabilities, or votes")
parser.add_argument("--per-task", action="store_true", help="argmax per task, then recombine into 18 classes")
parser.add_argument("--adjust", action="store_true", help="log-prior offsets for macro F1, fitted out of fold")
parser.add_argument("--adjust-by", choices=["age", "class"], default="age",
                    help="one offset per age band, shared by mask and gender (3), or one per class (18)")  # fmt: skip
parser.add_argument("--out", default="WORK/submission.csv", help="submission to write")
parser.add_argument("--answers", default=None, help="CSV with ImageID,ans: score members and ensemble")
parser.add_argument("--seed", type=int, default=0, help="for the person split of the out-of-fold checks")


# ---- members -----------------------------------------------------------------------
def load_member(path):
    """{name, test: logits dict or None, oof: logits dict (with label) or None}"""
    path = Path(path)
    if path.is_file():
        return dict(name=path.stem, test=load_logprobs(path), oof=None)
    if not path.is_dir():
        raise DataError(f"--runs {path}: neither a run folder nor a logits file")
    test = load_logprobs(path / "test_logits.npz") if (path / "test_logits.npz").is_file() else None
    parts = [load_logprobs(f) for f in sorted(path.glob("fold[0-9]*/oof.npz"))]
    oof = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    if test is None and oof is None:
        raise DataError(f"--runs {path}: no test_logits.npz (run inference.py) and no fold*/oof.npz")
    return dict(name=path.name, test=test, oof=oof)


def aligned(members, part, ids=None, strict=True):
    """Each member's views of `part` in one row order. strict: every member must have every id."""
    have = [m[part] for m in members]
    if any(h is None for h in have):
        missing = next(m["name"] for m in members if m[part] is None)
        raise DataError(f"member {missing} has no {'test_logits.npz' if part == 'test' else 'out-of-fold predictions'}")
    if ids is None:
        ids = have[0]["image_id"]
        if not strict:  # out of fold: the images every member validated on
            common = set(ids).intersection(*(set(h["image_id"]) for h in have[1:]))
            ids = np.array([i for i in ids if i in common])
    out = []
    for m, h in zip(members, have):
        pos = pd.Series(np.arange(len(h["image_id"])), index=h["image_id"])
        missing = [i for i in ids if i not in pos.index]
        if missing:
            raise DataError(f"member {m['name']}: {len(missing)} {part} image(s) missing, e.g. {missing[0]}")
        if strict and len(h["image_id"]) != len(ids):
            extra = sorted(set(h["image_id"]) - set(ids))[:1]
            raise DataError(f"member {m['name']}: {part} images not in the others', e.g. {extra[0]}")
        order = pos.loc[ids].to_numpy()
        views = {k: h[f"logp_{k}"][order] for k in VIEWS}
        views["label_true"] = h["label"][order] if "label" in h else None
        out.append(views)
    return ids, out


# ---- combining --------------------------------------------------------------------
def combine(views, weights, method):
    """Weighted soft (probability mean) or hard (vote) combination, as log-probabilities per view.
    Hard votes tie-break on the soft probabilities, then on the lower class: deterministic."""
    w = np.asarray(weights, dtype=np.float64)
    soft = {k: sum(wi * np.exp(v[k]) for wi, v in zip(w, views)) for k in VIEWS}
    if method == "soft":
        return {k: np.log(soft[k] + 1e-12) for k in VIEWS}
    out = {}
    for k in VIEWS:
        votes = sum(wi * np.eye(v[k].shape[1])[v[k].argmax(1)] for wi, v in zip(w, views))
        out[k] = np.log(votes + 1e-6 * soft[k] + 1e-12)
    return out


def predictions(views, per_task, offsets=None):
    if per_task:
        return np.asarray(class_id(views["mask"].argmax(1), views["gender"].argmax(1), views["age"].argmax(1)))
    return (views["label"] + (0 if offsets is None else offsets)).argmax(1)


def macro_f1(labels, pred):
    from sklearn.metrics import f1_score

    return float(f1_score(labels, pred, average="macro", labels=range(18), zero_division=0))


OFFSET_GRID = np.linspace(-1.5, 1.5, 13)


def fit_offsets(logp, labels, shared_by, grid=OFFSET_GRID, passes=2):
    """Log-prior offsets by coordinate ascent on macro F1: class c gets offset number shared_by[c].
    One per age band fits 3 numbers instead of 18 from the same images: per class, two runs of one
    recipe got different offsets, and both did worse out of fold (EXPERIMENTS.md)."""
    b = np.zeros(shared_by.max() + 1)
    best = macro_f1(labels, (logp + b[shared_by]).argmax(1))
    for _ in range(passes):
        for g in range(len(b)):
            for v in grid:
                trial = b.copy()
                trial[g] = v
                f = macro_f1(labels, (logp + trial[shared_by]).argmax(1))
                if f > best + 1e-9:
                    best, b = f, trial
    return b[shared_by]


def person_folds(ids, n_splits, seed):
    """(fit, check) row indices of the out-of-fold images, folds by person (id 'person/shot')."""
    from sklearn.model_selection import GroupKFold

    persons = np.array([str(i).split("/")[0] for i in ids])
    n_splits = min(n_splits, len(set(persons)))
    if n_splits < 2:
        raise DataError("the out-of-fold predictions cover one person: too few to cross-validate on")
    return list(GroupKFold(n_splits, shuffle=True, random_state=seed).split(persons, groups=persons))


def fit_weights(oof_views, labels, args, f1_weights):
    """--weights opt: random search on the simplex for OOF macro F1, guarded: chosen on one half of
    the persons and checked on the other; kept only if it beats F1 weighting out of sample."""
    rng = np.random.default_rng(args.seed)
    candidates = [f1_weights, np.full(len(f1_weights), 1 / len(f1_weights))] + list(
        rng.dirichlet(np.ones(len(f1_weights)), 200)
    )

    def f1_of(w, sel):
        v = combine([{k: x[k][sel] for k in VIEWS} for x in oof_views], w, args.method)
        return macro_f1(labels[sel], predictions(v, args.per_task))

    held_opt, held_f1 = [], []
    for fit, check in person_folds(args.oof_ids, 2, args.seed):
        best = max(candidates, key=lambda w: f1_of(w, fit))
        held_opt.append(f1_of(best, check))
        held_f1.append(f1_of(f1_weights, check))
    everything = np.ones(len(labels), bool)
    chosen = max(candidates, key=lambda w: f1_of(w, everything))
    kept = np.mean(held_opt) > np.mean(held_f1)
    note = f"opt weights held-out F1 {np.mean(held_opt):.4f} vs f1 weights {np.mean(held_f1):.4f}: " + (
        "kept" if kept else "not better out of sample, using f1 weights"
    )
    return (chosen if kept else f1_weights), note


def main():
    args = parser.parse_args()
    members = [load_member(p) for p in args.runs]
    names = [m["name"] for m in members]
    has_oof = all(m["oof"] is not None for m in members)
    test_ids, test_views = aligned(members, "test")  # a member without test predictions fails before the fits

    # ---- out-of-fold: each member's F1, and the weights ----
    report = dict(members=[], method=args.method, per_task=args.per_task)
    oof_f1 = [None] * len(members)
    if has_oof:
        oof_ids, oof_views = aligned(members, "oof", strict=False)
        labels = oof_views[0]["label_true"]
        args.oof_ids = oof_ids
        oof_f1 = [macro_f1(labels, predictions(v, args.per_task)) for v in oof_views]
    if args.weights in ("f1", "opt"):
        if not has_oof:
            raise DataError(f"--weights {args.weights} needs out-of-fold predictions (run folders with fold*/oof.npz)")
        weights = np.array(oof_f1) / np.sum(oof_f1)
    elif args.weights == "equal":
        weights = np.full(len(members), 1 / len(members))
    else:
        try:
            weights = np.array([float(w) for w in args.weights.split(",")])
        except ValueError:
            raise DataError(f"--weights {args.weights}: f1, equal, opt or numbers") from None
        if len(weights) != len(members) or (weights < 0).any() or weights.sum() == 0:
            raise DataError(f"--weights {args.weights}: need {len(members)} non-negative numbers, not all zero")
        weights = weights / weights.sum()
    if args.weights == "opt":
        weights, note = fit_weights(oof_views, labels, args, weights)
        report["opt_note"] = note
        print(note)
    weights = weights / weights.sum()

    offsets = None
    if has_oof:
        combined = combine(oof_views, weights, args.method)
        ens_oof = macro_f1(labels, predictions(combined, args.per_task))
        report.update(oof_images=len(labels), ensemble_oof_macro_f1=round(ens_oof, 4))
        if args.adjust:
            if args.per_task:
                raise DataError("--adjust works on the joint 18-class view: leave out --per-task")
            shared_by = split_class(np.arange(18))[2] if args.adjust_by == "age" else np.arange(18)

            def fit(rows):
                return fit_offsets(combined["label"][rows], labels[rows], shared_by)

            # 5 folds by person, 3 times: for a gain this small one split in two halves is too noisy
            # (it said no where these 15 fits say yes: EXPERIMENTS.md)
            cv_f1 = []
            for repeat in range(3):
                held = np.empty(len(labels), dtype=int)
                for fit_rows, check in person_folds(oof_ids, 5, args.seed + repeat):
                    held[check] = (combined["label"][check] + fit(fit_rows)).argmax(1)
                cv_f1.append(macro_f1(labels, held))
            cv_with = float(np.mean(cv_f1))
            applied = cv_with > ens_oof
            offsets = fit(slice(None)) if applied else None  # now on every image
            report["adjust"] = dict(by=args.adjust_by, oof_f1_without=round(ens_oof, 4),
                                    oof_f1_with_cross_validated=round(cv_with, 4), applied=bool(applied),
                                    offsets=None if offsets is None else offsets.round(3).tolist())  # fmt: skip
            print(f"adjust: out-of-fold F1 {ens_oof:.4f} -> {cv_with:.4f} (cross-validated over persons): "
                  + ("applied" if applied else "not applied"))  # fmt: skip
    for name, f, w in zip(names, oof_f1, weights):
        report["members"].append(dict(name=name, oof_macro_f1=None if f is None else round(f, 4), weight=round(w, 4)))
        print(f"  {name:24s} weight {w:.3f}" + ("" if f is None else f"  oof macro F1 {f:.4f}"))
    if has_oof:
        print(f"  {'ensemble':24s}              oof macro F1 {report['ensemble_oof_macro_f1']:.4f} "
              f"(best member {max(oof_f1):.4f}, {len(labels)} images)")  # fmt: skip

    # ---- test predictions ----
    combined = combine(test_views, weights, args.method)
    pred = predictions(combined, args.per_task, offsets)
    out = Path(args.out)
    save_csv(pd.DataFrame(dict(ImageID=test_ids, ans=pred)), out)
    save_logprobs(out.with_name(out.stem + "_logits.npz"), test_ids, combined)
    if args.answers:
        answers = read_answers(args.answers)
        missing = [i for i in test_ids if i not in answers.index]
        if missing:
            raise DataError(f"{args.answers}: no answer for {len(missing)} image(s), e.g. {missing[0]}")
        label = answers.loc[test_ids].to_numpy()
        true = dict(zip(("mask", "gender", "age"), split_class(label)), label=label)
        report["test_members"] = {n: scores(v, true) for n, v in zip(names, test_views)}
        for n, s in report["test_members"].items():
            print(f"  {n:24s} test {score_line(s)}")
        shown = dict(combined)
        if args.per_task or offsets is not None:  # score what was submitted
            shown["label"] = np.log(np.eye(18)[pred] + 1e-12)
        report["test"] = scores(shown, true)
    save_json(report, out.with_suffix(".json"))
    print(f"wrote {out}, {out.with_suffix('.json')}")
    if args.answers:
        print(score_line(report["test"]))


if __name__ == "__main__":
    run_main(main)
