"""train_face.py: dlib's real network fine-tuned on real face crops (skimage's astronaut, turned and tinted per
person); out of fold, a held-out person's prediction never depends on that person's labels; a rerun keeps the
finished folds, trains a fold again when its labels change and only predicts new eval images; the one-line errors."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SHOTS, last_line, run
from PIL import Image, ImageOps
from scipy.special import logsumexp
from skimage import data as skdata

pytest.importorskip("dlib")
pytestmark = pytest.mark.trains

# (id, gender, race, age): both genders and all three age bands, so every fold's probe has every class
PERSONS = [(f"{k:06d}", ("female", "male")[k % 2], "White", (22, 45, 70)[k % 3]) for k in range(1, 13)]
FAST = ["--epochs", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """preprocess.py's crops, split.py's two folds and embed.py's embeddings of twelve astronauts."""
    root = tmp_path_factory.mktemp("face")
    data = root / "data"
    face = Image.fromarray(skdata.astronaut())
    rows = ["id,gender,race,age,path"]
    for k, (pid, gender, race, age) in enumerate(PERSONS):
        folder = f"{pid}_{gender}_{race}_{age}"
        rows.append(f"{pid},{gender},{race},{age},{folder}")
        person = face.rotate(2 * k)
        person = ImageOps.grayscale(person).convert("RGB") if gender == "male" else person  # a signal to learn
        for shot in SHOTS:
            (data / "train" / "images" / folder).mkdir(parents=True, exist_ok=True)
            person.save(data / "train" / "images" / folder / f"{shot}.jpg", quality=95)
    (data / "train" / "train.csv").write_text("\n".join(rows) + "\n")
    (data / "eval" / "images").mkdir(parents=True)
    face.save(data / "eval" / "images" / "face.jpg", quality=95)
    (data / "eval" / "info.csv").write_text("ImageID,ans\nface.jpg,0\n")
    run("preprocess.py", "--data", data, "--out", root / "crops", "--workers", 1, "--bg", "none", "--size", 200)
    run("split.py", "--crops", root / "crops", "--folds", 2, "--out", root / "folds.csv")
    run("embed.py", "--crops", root / "crops", "--out", root / "emb", "--workers", 1)
    return root


def train_face(work, out, *extra, crops=None, check=True):
    return run("train_face.py", "--crops", crops or work / "crops", "--embeddings", work / "emb", "--folds",
               work / "folds.csv", "--out", out, *FAST, *extra, check=check)  # fmt: skip


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_the_stage_writes_out_of_fold_votes_for_every_shot_and_keeps_finished_folds(work, tmp_path):
    out = tmp_path / "face"
    proc = train_face(work, out)
    train, test = load(out / "train.npz"), load(out / "eval.npz")
    crops = pd.read_csv(work / "crops" / "train.csv", dtype=str)
    assert sorted(train["image_id"]) == sorted(crops["image_id"]) and train["gender_age"].shape == (84, 6)
    assert test["image_id"].tolist() == ["face.jpg"]
    for votes in (train["gender_age"], test["gender_age"]):  # log-probabilities of gender * 3 + age band
        assert np.allclose(logsumexp(votes, axis=1), 0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["folds"] == [0, 1] and report["oof_images"] == 84
    log = pd.read_csv(out / "log.csv")
    assert len(log) == 4 and (out / "curves.png").stat().st_size > 0 and "unmasked shots, out of fold" in proc.stdout
    # gray faces are the men: the heads' start, a probe on the frozen embedding, separates them out of fold (two
    # steps of tuning on six near-identical faces need not: their embeddings differ by less than a step moves them)
    assert report["every_shot"]["frozen"]["gender_f1"] == 1.0

    # a rerun (say after a kill once fold 1 was done) keeps the finished folds and writes the same votes
    (out / "eval.npz").unlink(), (out / "train.npz").unlink()
    again = train_face(work, out)
    assert "fold 0: already done" in again.stdout and "fold 1: already done" in again.stdout
    assert np.array_equal(load(out / "train.npz")["gender_age"], train["gender_age"])
    # other settings (finer age bins for the head, summed into the bands): the fold is trained again
    finer = train_face(work, tmp_path / "finer", "--use-folds", "0", "--age-edges", "30", "45", "60")
    assert "already done" not in finer.stdout
    finer_votes = load(tmp_path / "finer" / "train.npz")["gender_age"]
    assert finer_votes.shape == (42, 6) and np.allclose(logsumexp(finer_votes, axis=1), 0, atol=1e-6)
    # the old band trained from 45 (the 45-year-olds become old for the head): other votes, still on the 3 bands
    older = train_face(work, tmp_path / "older", "--use-folds", "0", "--old-age", "45")
    assert "already done" not in older.stdout
    older_votes = load(tmp_path / "older" / "train.npz")
    same_rows = pd.Series(np.arange(84), index=train["image_id"]).loc[older_votes["image_id"]].to_numpy()
    assert older_votes["gender_age"].shape == (42, 6)
    assert not np.allclose(older_votes["gender_age"], train["gender_age"][same_rows], atol=1e-3)


def crops_changed(work, folder, relabel_fold=None, flip_eval=False):
    """--crops (in `folder`, made or rewritten) with the same training crops: fold `relabel_fold`'s persons with
    their gender and age band changed, and with `flip_eval` the eval crops mirrored (same ids, other pixels)."""
    folds = pd.read_csv(work / "folds.csv", dtype={"person_id": str}).set_index("person_id")["fold"]
    crops = pd.read_csv(work / "crops" / "train.csv", dtype={"person_id": str, "image_id": str}, keep_default_na=False)
    rows = crops["person_id"].map(folds).eq(relabel_fold)
    crops.loc[rows, "gender"] = 1 - crops.loc[rows, "gender"]
    crops.loc[rows, "age_band"] = (crops.loc[rows, "age_band"] + 1) % 3
    folder.mkdir(exist_ok=True)
    for f in ("train.csv", "train_u8.npy", "eval.csv", "eval_u8.npy"):
        (folder / f).unlink(missing_ok=True)
    crops.to_csv(folder / "train.csv", index=False)
    for f in ("train_u8.npy", "eval.csv"):
        (folder / f).symlink_to(work / "crops" / f)
    if flip_eval:
        np.save(folder / "eval_u8.npy", np.load(work / "crops" / "eval_u8.npy")[:, :, ::-1])
    else:
        (folder / "eval_u8.npy").symlink_to(work / "crops" / "eval_u8.npy")
    return folder


def test_a_held_out_persons_votes_never_depend_on_their_own_labels(work, tmp_path):
    """Fold 0's votes with every fold-0 person's gender and age changed are the same to the last bit; with
    fold 1's (the training persons') changed they are not: a stage that read its held-out persons' labels would
    fail the first check, one that ignored labels the second."""

    def votes_with_labels_of_fold_changed(fold, name):
        train_face(work, tmp_path / f"out_{name}", "--use-folds", "0",
                   crops=crops_changed(work, tmp_path / name, relabel_fold=fold))  # fmt: skip
        return load(tmp_path / f"out_{name}" / "train.npz")

    train_face(work, tmp_path / "out", "--use-folds", "0")
    own = load(tmp_path / "out" / "train.npz")
    held_changed = votes_with_labels_of_fold_changed(0, "held")
    assert held_changed["image_id"].tolist() == own["image_id"].tolist()
    assert np.array_equal(held_changed["gender_age"], own["gender_age"])
    assert not np.allclose(votes_with_labels_of_fold_changed(1, "trained")["gender_age"], own["gender_age"], atol=1e-3)


def test_a_finished_fold_is_trained_again_when_its_labels_change_and_predicts_new_eval_images(work, tmp_path):
    """A fold file is kept for the same training images and labels (the same --crops folder each time, as make all
    passes it); a new eval set is predicted by the saved network, which stays as it was, and gets the votes a
    network trained from scratch beside it would give."""
    import hashlib

    out, crops = tmp_path / "face", tmp_path / "crops"
    train_face(work, out, "--use-folds", "0", crops=crops_changed(work, crops))
    first = load(out / "eval.npz")["gender_age"]
    assert "fold 0: already done" in train_face(work, out, "--use-folds", "0", crops=crops).stdout
    crops_changed(work, crops, relabel_fold=1)  # persons fold 0 trains on, relabelled
    relabelled = train_face(work, out, "--use-folds", "0", crops=crops).stdout
    assert "fold 0: already done" not in relabelled and "trained already" not in relabelled
    crops_changed(work, crops)  # labels as at first: trained again
    train_face(work, out, "--use-folds", "0", crops=crops)
    weights = hashlib.sha1((out / "fold0.pt").read_bytes()).hexdigest()
    crops_changed(work, crops, flip_eval=True)  # a new eval set with the same ids
    proc = train_face(work, out, "--use-folds", "0", crops=crops)
    assert "fold 0: trained already" in proc.stdout and "predicting the eval images" in proc.stdout
    assert "fold 0 epoch" not in proc.stderr and hashlib.sha1((out / "fold0.pt").read_bytes()).hexdigest() == weights
    assert load(out / "eval.npz")["image_id"].tolist() == ["face.jpg"]
    new_votes = load(out / "eval.npz")["gender_age"]
    assert not np.allclose(new_votes, first, atol=1e-4)
    train_face(work, tmp_path / "fresh", "--use-folds", "0", crops=crops)
    assert np.allclose(load(tmp_path / "fresh" / "eval.npz")["gender_age"], new_votes, atol=1e-6)
    assert "fold 0: already done" in train_face(work, out, "--use-folds", "0", crops=crops).stdout


def test_one_photo_gets_the_fold_networks_vote_as_the_eval_set_did(work, tmp_path):
    """fold<k>.pt hold each fold's network and heads (loaded with weights_only): the eval image, cut as one photo
    is, gets from them the vote eval.npz holds; inference.py --image, given a stacker that names them, uses them."""
    import faceembed
    import stacking

    out = tmp_path / "face"
    train_face(work, out, "--precision", "fp32")  # (bf16 would round the eval votes the photo's fp32 is checked on)
    tuned = faceembed.load_tuned(out)
    assert len(tuned) == 2 and all(edges == [30, 60] for _, _, edges in tuned)
    models = faceembed.load_models(faceembed.model_folder())
    crop = np.load(work / "crops" / "eval_u8.npy")[0]
    chip, found = faceembed.photo_chip(models, crop)
    assert found  # HOG's box, as embed.py's for this crop
    assert np.abs(faceembed.tuned_vote(tuned, chip[None]) - load(out / "eval.npz")["gender_age"]).max() < 1e-5

    # a tiny image model; a stacker sure of (female, 30-59) whatever the face, naming the tuned networks or not
    run("train_multi.py", "--crops", work / "crops", "--folds", work / "folds.csv", "--fold", 0, "--out",
        tmp_path / "run", "--backbone", "test_efficientnet", "--pretrained", "none", "--img-size", 32, "--batch-size",
        16, "--epochs", 1, "--threads", 1)  # fmt: skip
    rng = np.random.default_rng(0)
    target = np.where(rng.random(600) < 0.95, 4, rng.integers(0, 6, 600))
    regression = stacking.fit(rng.normal(size=(600, 128)), target)
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=95)
    lines = {}
    for name, face in (("regression", ""), ("tuned", str(out))):
        stacking.save_stacker(tmp_path / f"{name}.npz", regression, 2.0, face=face)
        lines[name] = last_line(run("inference.py", "--run", tmp_path / "run", "--crops", work / "crops", "--image",
                                    photo, "--embedding", tmp_path / f"{name}.npz").stdout)  # fmt: skip
    assert "| embedding voted (weight 2, HOG face)" in lines["regression"] and "age 30-59 1.00" in lines["regression"]
    # the tuned networks' vote, not the regression's sure one (their ages cycle over the same face: unsure)
    assert "| face network voted (weight 2, HOG face)" in lines["tuned"] and "age 30-59 1.00" not in lines["tuned"]
    (out / "fold1.pt").unlink()
    proc = run("inference.py", "--run", tmp_path / "run", "--crops", work / "crops", "--image", photo,
               "--embedding", tmp_path / "tuned.npz", check=False)  # fmt: skip
    assert proc.returncode == 2 and last_line(proc.stderr).endswith(
        f"fold1.pt: not found (rerun train_face.py --out {out})"
    )


def test_full_trains_one_more_network_on_every_person_and_it_alone_votes_on_the_eval_images(work, tmp_path):
    """--full: the fold networks' out-of-fold votes stay what they were to the last bit (the rule is fitted on
    them); foldfull.pt, trained on every person, gives the eval votes and one photo's, and a rerun keeps it."""
    import faceembed

    folds_only, full = tmp_path / "folds_only", tmp_path / "full"
    train_face(work, folds_only, "--use-folds", "0", "--precision", "fp32")
    fold0_votes = load(folds_only / "eval.npz")["gender_age"]
    proc = train_face(work, full, "--use-folds", "0", "--full", "--precision", "fp32")
    assert np.array_equal(load(full / "train.npz")["gender_age"], load(folds_only / "train.npz")["gender_age"])
    report = json.loads((full / "report.json").read_text())
    assert report["folds"] == [0] and report["vote_folds"] == ["full"] and report["oof_images"] == 42
    log = pd.read_csv(full / "log.csv")
    assert log["fold"].astype(str).tolist() == ["0", "0", "full", "full"]
    assert log["gender_logloss"].isna().tolist() == [False, False, True, True]  # it holds no one out
    assert "fold full epoch 2" in proc.stderr

    tuned = faceembed.load_tuned(full)
    assert len(tuned) == 1  # foldfull.pt alone, not fold0.pt
    crop = np.load(work / "crops" / "eval_u8.npy")[0]
    chip, _ = faceembed.photo_chip(faceembed.load_models(faceembed.model_folder()), crop)
    eval_votes = load(full / "eval.npz")["gender_age"]
    assert np.abs(faceembed.tuned_vote(tuned, chip[None]) - eval_votes).max() < 1e-5
    assert not np.allclose(eval_votes, fold0_votes, atol=1e-4)  # not fold 0's

    (full / "eval.npz").unlink()
    again = train_face(work, full, "--use-folds", "0", "--full", "--precision", "fp32")
    assert "fold 0: already done" in again.stdout and "fold full: already done" in again.stdout
    assert np.array_equal(load(full / "eval.npz")["gender_age"], eval_votes)
    # --full later, beside finished folds: they are kept (it changes nothing of theirs), the full one is trained
    later = train_face(work, folds_only, "--use-folds", "0", "--full", "--precision", "fp32")
    assert "fold 0: already done" in later.stdout and "fold full epoch 2" in later.stderr
    assert np.array_equal(load(folds_only / "eval.npz")["gender_age"], eval_votes)
    # and off: fold 0 trained under --full did not vote on the eval images; its saved network now does
    back = train_face(work, full, "--use-folds", "0", "--precision", "fp32")
    assert "fold 0: trained already" in back.stdout and "fold 0 epoch" not in back.stderr
    assert np.allclose(load(full / "eval.npz")["gender_age"], fold0_votes, atol=1e-6)


def test_one_line_errors(work, tmp_path):
    proc = run("train_face.py", "--crops", work / "crops", "--embeddings", tmp_path / "none", "--folds",
               work / "folds.csv", "--out", tmp_path / "o", check=False)  # fmt: skip
    assert proc.returncode != 0 and last_line(proc.stderr).endswith("no train.npz (run embed.py first)")
    proc = run("train_face.py", "--crops", work / "crops", "--embeddings", work / "emb", "--folds",
               tmp_path / "folds.csv", "--out", tmp_path / "o", check=False)  # fmt: skip
    assert proc.returncode != 0 and "not found (run split.py first)" in last_line(proc.stderr)
    proc = train_face(work, tmp_path / "o", "--age-edges", "20", "40", check=False)
    assert proc.returncode == 2 and "30 and 60 among them" in last_line(proc.stderr)
    proc = train_face(work, tmp_path / "o", "--old-age", "25", check=False)
    assert proc.returncode == 2 and last_line(proc.stderr).endswith(
        "--old-age 25: between the age edges around 60 (30 60)"
    )
    proc = train_face(work, tmp_path / "o", "--use-folds", "7", check=False)
    assert proc.returncode == 2 and last_line(proc.stderr).endswith(
        f"--use-folds 7: no such fold in {work / 'folds.csv'}"
    )
