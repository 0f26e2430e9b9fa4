"""Person-level stratified K folds, plus the data report every team made first.

    python split.py --crops WORK/crops --folds 5 --seed 42 --out WORK/folds.csv

Reads WORK/crops/train.csv (one row per image, written by preprocess.py) and writes
WORK/folds.csv (person_id, gender, age, age_band, fold): all seven shots of a person land
in one fold, and folds are stratified by gender x age band so each keeps the rare >=60
persons. Beside it: folds_report.txt (counts per class, per task, per fold) and
folds_ages.png (age histogram by gender, band boundaries marked). Seconds on any machine.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from common import AGE_BANDS, GENDERS, MASK_STATES, InputError, class_name, run_main, save_csv, save_figure, save_text

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py output folder (reads its train.csv)")
parser.add_argument("--folds", type=int, default=5, help="number of folds K")
parser.add_argument("--seed", type=int, default=42, help="shuffling seed; the same seed gives the same folds")
parser.add_argument("--out", default="WORK/folds.csv", help="folds file to write")


def person_table(images):
    """One row per person (labels of a person are the same on every shot)."""
    persons = images.groupby("person_id", sort=True).agg(gender=("gender", "first"), age=("age", "first"))
    persons["age_band"] = images.groupby("person_id", sort=True)["age_band"].first()
    return persons.reset_index()


def make_folds(persons, n_folds, seed):
    # stratify on gender x age band: the 18 classes follow, since every person has all mask states
    strata = persons["gender"] * 3 + persons["age_band"]
    smallest = strata.value_counts().min()
    if smallest < n_folds:
        print(f"warning: the rarest gender x age group has {smallest} persons, fewer than {n_folds} folds")
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.zeros(len(persons), dtype=int)
    for k, (_, val) in enumerate(skf.split(persons, strata)):
        fold[val] = k
    return persons.assign(fold=fold)


def report(images, folds):
    """Counts per class, per task and per fold, as text."""
    images = images.merge(folds[["person_id", "fold"]], on="person_id")
    lines = [f"{images['person_id'].nunique()} persons, {len(images)} images, {folds['fold'].nunique()} folds", ""]
    per_class = pd.crosstab(images["label"], images["fold"], margins=True, margins_name="all")
    per_class.insert(0, "class", [class_name(c) if c != "all" else "" for c in per_class.index])
    lines += ["images per class and fold", per_class.to_string(), ""]
    for task, names in (("mask", MASK_STATES), ("gender", GENDERS), ("age_band", AGE_BANDS)):
        t = pd.crosstab(images[task].map(dict(enumerate(names))), images["fold"], margins=True, margins_name="all")
        share = (t["all"] / t.loc["all", "all"]).round(3)
        lines += [f"images per {task} and fold", t.assign(share=share).to_string(), ""]
    persons = pd.crosstab(folds["fold"], [folds["gender"].map(dict(enumerate(GENDERS))), folds["age_band"]])
    lines += ["persons per fold (gender, age band)", persons.to_string(), ""]
    return "\n".join(lines)


def age_histogram(persons, boundaries=(30, 60)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    bins = np.arange(persons["age"].min(), persons["age"].max() + 2) - 0.5
    for g, name in enumerate(GENDERS):
        ax.hist(persons.loc[persons["gender"] == g, "age"], bins=bins, alpha=0.6, label=name)
    for b in boundaries:
        ax.axvline(b - 0.5, color="k", ls="--", lw=1)
    ax.set(xlabel="age (years)", ylabel="persons", title="Age by gender; dashed lines: band boundaries 30 and 60")
    ax.legend()
    return fig


def main():
    args = parser.parse_args()
    index = Path(args.crops) / "train.csv"
    if not index.is_file():
        raise InputError(f"{index}: not found (run preprocess.py first)")
    images = pd.read_csv(index, dtype={"person_id": str, "image_id": str})
    if args.folds < 2:
        raise InputError(f"--folds {args.folds}: need at least 2")
    persons = person_table(images)
    if len(persons) < args.folds:
        raise InputError(f"--folds {args.folds}: only {len(persons)} persons in {index}")

    folds = make_folds(persons, args.folds, args.seed)
    out = Path(args.out)
    save_csv(folds[["person_id", "gender", "age", "age_band", "fold"]], out)
    text = report(images, folds)
    save_text(text, out.with_name(out.stem + "_report.txt"))
    save_figure(age_histogram(persons), out.with_name(out.stem + "_ages.png"))
    print(text)
    print(f"wrote {out} and {out.stem}_report.txt, {out.stem}_ages.png beside it")


if __name__ == "__main__":
    run_main(main)
