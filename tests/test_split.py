"""split.py: person-level stratified folds and the data report, through the script."""

import numpy as np
import pandas as pd
from conftest import last_line, run

from common import age_band, class_id


def write_index(crops, n_persons=300, seed=0):
    """A crops index (the columns split.py reads) for n persons x 7 shots."""
    rng = np.random.default_rng(seed)
    ages = np.where(rng.random(n_persons) < 0.12, 60, rng.integers(18, 60, n_persons))
    genders = (rng.random(n_persons) < 0.6).astype(int)
    rows = []
    for p in range(n_persons):
        for shot, mask in [("mask1", 0), ("mask2", 0), ("mask3", 0), ("mask4", 0), ("mask5", 0),
                           ("incorrect_mask", 1), ("normal", 2)]:  # fmt: skip
            band = int(age_band(ages[p]))
            rows.append(dict(image_id=f"{p:06d}/{shot}", person_id=f"{p:06d}", mask=mask, gender=genders[p],
                             age=ages[p], age_band=band, label=int(class_id(mask, genders[p], band))))  # fmt: skip
    crops.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(crops / "train.csv", index=False)
    return pd.DataFrame(rows)


def folds_of(tmp_path, seed, name, n_folds=5):
    out = tmp_path / f"{name}.csv"
    run("split.py", "--crops", tmp_path / "crops", "--folds", n_folds, "--seed", seed, "--out", out)
    return pd.read_csv(out, dtype={"person_id": str})


def test_persons_never_cross_folds_and_classes_stay_balanced(tmp_path):
    images = write_index(tmp_path / "crops")
    folds = folds_of(tmp_path, 42, "folds")
    assert folds["person_id"].is_unique and len(folds) == images["person_id"].nunique()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    merged = images.merge(folds[["person_id", "fold"]], on="person_id")
    assert merged.groupby("person_id")["fold"].nunique().max() == 1
    whole = merged["label"].value_counts(normalize=True)
    for _, part in merged.groupby("fold"):
        share = part["label"].value_counts(normalize=True).reindex(whole.index, fill_value=0)
        assert (share - whole).abs().max() < 0.03, (share - whole).abs().max()
    # the rare >=60 band is in every fold
    assert merged[merged["age_band"] == 2].groupby("fold")["person_id"].nunique().min() >= 5


def test_same_seed_same_folds_other_seed_other_folds(tmp_path):
    write_index(tmp_path / "crops")
    a, b, c = folds_of(tmp_path, 42, "a"), folds_of(tmp_path, 42, "b"), folds_of(tmp_path, 7, "c")
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_report_and_age_plot_are_written(tmp_path):
    write_index(tmp_path / "crops")
    proc = run("split.py", "--crops", tmp_path / "crops", "--out", tmp_path / "folds.csv")
    report = (tmp_path / "folds_report.txt").read_text()
    assert "images per class and fold" in report and "wear/female/>=60" in report
    assert "300 persons, 2100 images, 5 folds" in proc.stdout
    png = (tmp_path / "folds_ages.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "folds.csv" in last_line(proc.stdout)


def test_missing_index_is_one_clear_line(tmp_path):
    proc = run("split.py", "--crops", tmp_path / "nowhere", "--out", tmp_path / "f.csv", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "run preprocess.py first" in proc.stderr
