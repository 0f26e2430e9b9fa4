"""Combine several runs' predictions; weigh them by out-of-fold macro F1; report whether it helped.

    python ensemble.py --runs WORK/runs/single WORK/runs/multi WORK/runs/coord --weights f1 \
        --out WORK/submission.csv --answers DATA/eval/answers.csv

Members are run folders (their test_logits.npz and fold*/oof.npz) or bare logits .npz files.
--weights f1 | equal | opt | 0.5,0.3,0.2 ; --method soft (mean probabilities) | hard (votes);
--per-task takes the argmax of each task and recombines, instead of the joint 18-class argmax;
--adjust adds log-prior offsets fitted on the out-of-fold predictions for macro F1, one per age band
(--adjust-by age) or per class (class); cross-validated over persons, applied only if they help out of fold.
--group-shots finds the shots of one person among the images (shots.py: by the unmasked top of the face) and
gives them one gender and age: averaged over the person's shots; applied only if it helps out of fold.
--embeddings stacks embed.py's face embedding beside the models: a logistic regression from the embedding to
gender and age band votes beside the models, with a weight (stacking.py); both fitted on other persons out of
fold. Two ways are tried: each image's own embedding, and (with --group-shots) the embedding of the unmasked
shot each image was grouped with. --face does the same with train_face.py's fine-tuned network (its votes are
out of fold already). The best of those tried is applied if it beats the rule without it, out of fold, and
knows more of gender and age than their shares do (positive nats: a vote surer than it is right is left out).
Writes OUT (ImageID,ans), OUT with .json (the report), and beside it _logits.npz and _oof.csv: the rule's
decision for every training image, out of fold (what train_*.py --pseudo reads), and _oof_confusion.png: those
decisions against the training labels, class by class; with --answers, the submission's per-class table (printed,
and in the report) and _confusion.png; with --embeddings,
_embedding.npz: the image way's stacker fitted on every training image, applied or not, with its out-of-fold F1
(what inference.py --image --embedding reads); with --face it names the fine-tuned networks where their image way
beat the regression's, and one photo gets their vote. Seconds to a minute.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

import faceembed
import stacking
from common import InputError, class_id, run_main, save_csv, save_json, split_class
from rawdata import read_answers
from scores import load_logprobs, macro_f1, per_class_table, plot_confusions, save_logprobs, score_line, scores
from shots import grouped, oof_groups, person_images, person_of, shot_groups

VIEWS = ("label", "mask", "gender", "age")
MIN_PURITY = 0.9  # --group-shots: the share of out-of-fold shots the matcher must give their own person (bench: 0.99)

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--runs", nargs="+", required=True, help="run folders or logits .npz files")
parser.add_argument("--weights", default="f1", help="f1 | equal | opt | comma-separated numbers, one per member")
parser.add_argument("--method", choices=["soft", "hard"], default="soft", help="mean probabilities, or votes")
parser.add_argument("--per-task", action="store_true", help="argmax per task, then recombine into 18 classes")
parser.add_argument("--adjust", action="store_true", help="log-prior offsets for macro F1, fitted out of fold")
parser.add_argument("--adjust-by", choices=["age", "class"], default="age",
                    help="one offset per age band, shared by mask and gender (3), or one per class (18)")  # fmt: skip
parser.add_argument("--group-shots", action="store_true",
                    help="one gender and age for a person's shots, found by matching faces in --crops")  # fmt: skip
parser.add_argument("--embeddings", default=None,
                    help="embed.py's output: the face embedding votes on gender and age where it helps")  # fmt: skip
parser.add_argument("--face", default=None,
                    help="train_face.py's output: a tuned network votes on gender and age where it helps")  # fmt: skip
parser.add_argument("--embedding-weight", type=float, default=stacking.WEIGHT,
                    help="the embedding's vote beside the models' gender and age (1: as much as theirs)")  # fmt: skip
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py's output: the images --group-shots matches")
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
        raise InputError(f"--runs {path}: neither a run folder nor a logits file")
    test = load_logprobs(path / "test_logits.npz") if (path / "test_logits.npz").is_file() else None
    parts = [load_logprobs(f) for f in sorted(path.glob("fold[0-9]*/oof.npz"))]
    oof = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    if test is None and oof is None:
        raise InputError(f"--runs {path}: no test_logits.npz (run inference.py) and no fold*/oof.npz")
    return dict(name=path.name, test=test, oof=oof)


def aligned(members, part, ids=None, strict=True):
    """Each member's views of `part` in one row order. strict: every member must have every id."""
    have = [m[part] for m in members]
    if any(h is None for h in have):
        missing = next(m["name"] for m in members if m[part] is None)
        raise InputError(
            f"member {missing} has no {'test_logits.npz' if part == 'test' else 'out-of-fold predictions'}"
        )
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
            raise InputError(f"member {m['name']}: {len(missing)} {part} image(s) missing, e.g. {missing[0]}")
        if strict and len(h["image_id"]) != len(ids):
            extra = sorted(set(h["image_id"]) - set(ids))[:1]
            raise InputError(f"member {m['name']}: {part} images not in the others', e.g. {extra[0]}")
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
    """(fit, check) row indices of the out-of-fold images, folds by person."""
    persons = person_of(ids)
    if len(set(persons)) < 2:
        raise InputError("the out-of-fold predictions cover one person: too few to cross-validate on")
    return stacking.person_folds(persons, n_splits, seed)


def offsets_cv(logp, labels, ids, shared_by, seed):
    """Macro F1 with offsets fitted on other persons: 5 folds by person, 3 times (for a gain this small
    one split in two halves is too noisy: it said no where these 15 fits say yes, EXPERIMENTS.md).
    Returns the mean F1 and the first repeat's decisions: each image's class by offsets it was not fitted on."""
    f1s, decisions = [], None
    for repeat in range(3):
        held = np.empty(len(labels), dtype=int)
        for fit_rows, check in person_folds(ids, 5, seed + repeat):
            held[check] = (logp[check] + fit_offsets(logp[fit_rows], labels[fit_rows], shared_by)).argmax(1)
        f1s.append(macro_f1(labels, held))
        decisions = held if decisions is None else decisions
    return float(np.mean(f1s)), decisions


# ---- the face votes ---------------------------------------------------------------
def load_embeddings(folder, split, ids):
    """embed.py's (n, 128) embeddings of `ids`, in that order; one clear line if the file or an image is missing."""
    return load_rows(folder, split, ids, "embedding", "--embeddings",
                     f"run embed.py --crops WORK/crops --out {folder}", "embed.py --shots all")  # fmt: skip


def load_face(folder, split, ids):
    """train_face.py's (n, 6) gender-age log-probabilities of `ids`, in that order; one clear line if missing."""
    return load_rows(folder, split, ids, "gender_age", "--face", f"run train_face.py --out {folder}",
                     "rerun train_face.py")  # fmt: skip


def load_rows(folder, split, ids, key, flag, how_to_make, how_to_fix):
    """Array `key` of FOLDER/SPLIT.npz (image_id and one row an image), in the order of `ids`."""
    path = Path(folder) / f"{split}.npz"
    if not path.is_file():
        raise InputError(f"{flag} {folder}: no {split}.npz ({how_to_make})")
    with np.load(path, allow_pickle=False) as z:
        row = pd.Series(np.arange(len(z["image_id"])), index=z["image_id"].astype(str))
        values = z[key]
    missing = [i for i in ids if i not in row.index]
    if missing:
        raise InputError(f"{path}: no {key} for {len(missing)} image(s), e.g. {missing[0]} ({how_to_fix})")
    return values[row.loc[list(ids)].to_numpy()]


def fallback_box(folder):
    """The box embed.py gave the training crops where HOG found no face, for one photo to get the same."""
    with np.load(Path(folder) / "train.npz", allow_pickle=False) as z:
        settings = json.loads(str(z["settings"])) if "settings" in z.files else {}
    return np.array(settings.get("fallback_box", faceembed.GEOMETRY_BOX), dtype=np.float64)


def stack_input(way, views, embedding, groups):
    """The embeddings that vote, and the views they vote beside. 'image': each image's own embedding and the
    models' views; 'person': the embedding of the unmasked shot each image was grouped with, and the views
    averaged over the group (a masked face's embedding knows less than its owner's bare one)."""
    if way == "person":
        return embedding[groups], grouped(views, groups)
    return embedding, views


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
            raise InputError(f"--weights {args.weights} needs out-of-fold predictions (run folders with fold*/oof.npz)")
        weights = np.array(oof_f1) / np.sum(oof_f1)
    elif args.weights == "equal":
        weights = np.full(len(members), 1 / len(members))
    else:
        try:
            weights = np.array([float(w) for w in args.weights.split(",")])
        except ValueError:
            raise InputError(f"--weights {args.weights}: f1, equal, opt or numbers") from None
        if len(weights) != len(members) or (weights < 0).any() or weights.sum() == 0:
            raise InputError(f"--weights {args.weights}: need {len(members)} non-negative numbers, not all zero")
        weights = weights / weights.sum()
    if args.weights == "opt":
        weights, note = fit_weights(oof_views, labels, args, weights)
        report["opt_note"] = note
        print(note)
    weights = weights / weights.sum()

    offsets, group_test, rule_known, out = None, False, None, Path(args.out)
    if args.adjust and args.per_task:
        raise InputError("--adjust works on the joint 18-class view: leave out --per-task")
    shared_by = split_class(np.arange(18))[2] if args.adjust_by == "age" else np.arange(18)
    if has_oof:
        combined = combine(oof_views, weights, args.method)
        ens_oof = macro_f1(labels, predictions(combined, args.per_task))
        report.update(oof_images=len(labels), ensemble_oof_macro_f1=round(ens_oof, 4))

        def rule(views):  # what the submission's rule scores out of fold, and its decision for each image
            if args.adjust:
                return offsets_cv(views["label"], labels, oof_ids, shared_by, args.seed)
            pred = predictions(views, args.per_task)
            return macro_f1(labels, pred), pred

        plain, groups, persons = combined, None, person_of(oof_ids)
        if args.group_shots:
            groups = oof_groups(args.crops, oof_ids, combined["mask"].argmax(1) == 2)
            by_shots = grouped(combined, groups)
            without, with_groups = rule(combined), rule(by_shots)
            purity = float(np.mean(persons == persons[groups]))
            # a matcher that mixes persons up (drawn faces alike) can still win on a few out-of-fold images by luck
            matcher_ok = purity >= MIN_PURITY
            group_test = matcher_ok and with_groups[0] > without[0]
            if group_test:
                combined = by_shots
            rule_known = with_groups if group_test else without
            report["group_shots"] = dict(oof_f1_without=round(without[0], 4), oof_f1_with=round(with_groups[0], 4),
                                         oof_with_own_person=round(purity, 4), applied=bool(group_test))  # fmt: skip
            print(f"group shots: out-of-fold F1 {without[0]:.4f} -> {with_groups[0]:.4f}"
                  + (" (with the offsets, cross-validated)" if args.adjust else "")
                  + f"; {purity:.1%} of the shots grouped with their own person: "
                  + ("applied" if group_test else "not applied")
                  + ("" if matcher_ok else f" (under {MIN_PURITY:.0%})"))  # fmt: skip
        stack = None
        if args.embeddings or args.face:
            target, tried = labels % stacking.GENDER_AGE, {}
            train_embedding = load_embeddings(args.embeddings, "train", oof_ids) if args.embeddings else None
            train_face = load_face(args.face, "train", oof_ids) if args.face else None
            for way in ("image", "person") if args.group_shots and matcher_ok else ("image",):
                if args.embeddings:  # a regression on the frozen embedding, fitted on other persons
                    embedding, base = stack_input(way, plain, train_embedding, groups)
                    vote = stacking.out_of_fold(embedding, target, persons, seed=args.seed)
                    views = stacking.voted(base, vote, args.embedding_weight)
                    tried[way] = dict(rule=rule(views), views=views, fit_on=embedding,
                                      nats=stacking.information(vote, target))  # fmt: skip
                if args.face:  # the fine-tuned network's, already out of fold (train_face.py)
                    face_ga, base = stack_input(way, plain, train_face, groups)
                    views = stacking.voted(base, face_ga, args.embedding_weight)
                    tried[f"face_{way}"] = dict(rule=rule(views), views=views, fit_on=None,
                                                nats=stacking.information(face_ga, target))  # fmt: skip
            before = rule_known or rule(combined)
            # a vote surer than it is right (drawn faces the network cannot read) can still win a few images by luck
            informed = [way for way in tried if tried[way]["nats"] > 0]
            best = max(informed, key=lambda way: tried[way]["rule"][0], default=None)
            if best and tried[best]["rule"][0] > before[0]:
                # the test set's regression: fitted on every person (the tuned network's votes are made already)
                stack = best, None if best.startswith("face") else stacking.fit(tried[best]["fit_on"], target)
                combined, rule_known = tried[best]["views"], tried[best]["rule"]
            report["embeddings"] = dict(oof_f1_without=round(before[0], 4), applied=best if stack else None,
                                        **{f"oof_f1_{way}": round(t["rule"][0], 4) for way, t in tried.items()},
                                        **{f"nats_{way}": round(t["nats"], 3) for way, t in tried.items()})  # fmt: skip
            if args.embeddings:
                # one photo has its own face only: the image way, fitted on every training image, for inference.py
                saved = out.with_name(out.stem + "_embedding.npz")
                image_stacker = stack[1] if stack and best == "image" else stacking.fit(train_embedding, target)
                # or the fine-tuned fold networks, where their vote on each image on its own wins (and informs)
                tuned_wins = "face_image" in informed and tried["face_image"]["rule"][0] > tried["image"]["rule"][0]
                photo = "face_image" if tuned_wins and any(Path(args.face).glob("fold*.pt")) else "image"
                stacking.save_stacker(saved, image_stacker, args.embedding_weight,
                                      oof_f1_with=tried[photo]["rule"][0], oof_f1_without=before[0],
                                      fallback_box=fallback_box(args.embeddings),
                                      face=str(Path(args.face).resolve()) if photo == "face_image" else "")  # fmt: skip
                report["embeddings"].update(stacker=str(saved), photo_vote=photo)
            print(f"face votes: out-of-fold F1 {before[0]:.4f} -> "
                  + ", ".join(f"{t['rule'][0]:.4f} ({way}, {t['nats']:+.2f} nats)" for way, t in tried.items())
                  + (" (with the offsets, cross-validated)" if args.adjust else "")
                  + (f": {best} applied" if stack else ": not applied"))  # fmt: skip
        oof_pred = predictions(combined, args.per_task)
        if args.adjust:
            plain = macro_f1(labels, oof_pred)  # (--adjust refuses --per-task: this is the joint argmax)
            cv_with, cv_pred = rule_known or rule(combined)
            applied = cv_with > plain
            if applied:
                offsets, oof_pred = fit_offsets(combined["label"], labels, shared_by), cv_pred  # now on every image
            report["adjust"] = dict(by=args.adjust_by, oof_f1_without=round(plain, 4),
                                    oof_f1_with_cross_validated=round(cv_with, 4), applied=bool(applied),
                                    offsets=None if offsets is None else offsets.round(3).tolist())  # fmt: skip
            print(f"adjust: out-of-fold F1 {plain:.4f} -> {cv_with:.4f} (cross-validated over persons): "
                  + ("applied" if applied else "not applied"))  # fmt: skip
        # the rule's decision for every training image, made without it: a second round's labels (--pseudo)
        save_csv(pd.DataFrame(dict(ImageID=oof_ids, ans=oof_pred)), out.with_name(out.stem + "_oof.csv"))
        # what to expect on new photos, class by class: the decisions above against the training labels
        plot_confusions(oof_pred, labels, out.with_name(out.stem + "_oof_confusion.png"), "out of fold")
    else:
        stack = None
        for flag, name in ((args.group_shots, "group shots"), (args.embeddings or args.face, "face votes")):
            if flag:
                print(f"{name}: no out-of-fold predictions to check it on: not applied")
    for name, f, w in zip(names, oof_f1, weights):
        report["members"].append(dict(name=name, oof_macro_f1=None if f is None else round(f, 4), weight=round(w, 4)))
        print(f"  {name:24s} weight {w:.3f}" + ("" if f is None else f"  oof macro F1 {f:.4f}"))
    if has_oof:
        print(f"  {'ensemble':24s}              oof macro F1 {report['ensemble_oof_macro_f1']:.4f} "
              f"(best member {max(oof_f1):.4f}, {len(labels)} images)")  # fmt: skip

    # ---- test predictions ----
    combined = combine(test_views, weights, args.method)
    groups = None
    if group_test or (stack and stack[0].endswith("person")):
        groups = shot_groups(person_images(args.crops, "eval", test_ids), combined["mask"].argmax(1) == 2)
        report["group_shots"]["test_groups"] = int(len(np.unique(groups)))
    if stack:
        way, stacker = stack
        if stacker is None:  # the fine-tuned network's vote: train_face.py's eval.npz
            face_ga, base = stack_input(
                way.removeprefix("face_"), combined, load_face(args.face, "eval", test_ids), groups
            )
            combined = stacking.voted(base, face_ga, args.embedding_weight)
        else:
            embedding, base = stack_input(way, combined, load_embeddings(args.embeddings, "eval", test_ids), groups)
            combined = stacking.voted(base, stacking.predict(stacker, embedding), args.embedding_weight)
    elif group_test:
        combined = grouped(combined, groups)
    pred = predictions(combined, args.per_task, offsets)
    save_csv(pd.DataFrame(dict(ImageID=test_ids, ans=pred)), out)
    save_logprobs(out.with_name(out.stem + "_logits.npz"), test_ids, combined)
    if args.answers:
        answers = read_answers(args.answers)
        missing = [i for i in test_ids if i not in answers.index]
        if missing:
            raise InputError(f"{args.answers}: no answer for {len(missing)} image(s), e.g. {missing[0]}")
        label = answers.loc[test_ids].to_numpy()
        true = dict(zip(("mask", "gender", "age"), split_class(label)), label=label)
        report["test_members"] = {n: scores(v, true) for n, v in zip(names, test_views)}
        for n, s in report["test_members"].items():
            print(f"  {n:24s} test {score_line(s)}")
        shown = dict(combined)
        if args.per_task or offsets is not None:  # score what was submitted
            shown["label"] = np.log(np.eye(18)[pred] + 1e-12)
        report["test"] = scores(shown, true)
        table = per_class_table(pred, label)
        print(table.to_string(index=False))
        report["test_per_class"] = table.to_dict("records")
        plot_confusions(pred, label, out.with_name(out.stem + "_confusion.png"), "eval")
    save_json(report, out.with_suffix(".json"))
    print(f"wrote {out}, {out.with_suffix('.json')}")
    if args.answers:
        print(score_line(report["test"]))


if __name__ == "__main__":
    run_main(main)
