"""inference.py and ensemble.py through their command lines, on hand-made logits and tiny runs."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import last_line, run
from sklearn.metrics import f1_score

from common import split_class
from ensemble import offsets_cv
from scores import macro_f1, save_logprobs


def views_from_probs(p18):
    """Both views from 18-class probabilities (tasks are marginals)."""
    grid = p18.reshape(-1, 3, 2, 3)
    return dict(label=np.log(p18), mask=np.log(grid.sum((2, 3))), gender=np.log(grid.sum((1, 3))),
                age=np.log(grid.sum((1, 2))))  # fmt: skip


def make_member(folder, test_ids, test_p, oof_ids, oof_p, oof_labels):
    folder.mkdir(parents=True)
    save_logprobs(folder / "test_logits.npz", test_ids, views_from_probs(test_p))
    save_logprobs(folder / "fold0" / "oof.npz", oof_ids, views_from_probs(oof_p), oof_labels)
    return folder


def random_probs(rng, n):
    p = rng.random((n, 18)) ** 4
    return p / p.sum(1, keepdims=True)


@pytest.fixture
def members(tmp_path):
    rng = np.random.default_rng(0)
    test_ids = [f"t{i}.jpg" for i in range(40)]
    oof_ids = [f"{p:06d}/mask{k}" for p in range(30) for k in range(1, 3)]
    labels = rng.integers(0, 18, len(oof_ids))
    out = []
    for name in ("a", "b"):
        oof_p = random_probs(rng, len(oof_ids))
        oof_p[np.arange(len(labels)), labels] += 0.3 if name == "a" else 0.1  # a is the better member
        oof_p /= oof_p.sum(1, keepdims=True)
        out.append(make_member(tmp_path / name, test_ids, random_probs(rng, 40), oof_ids, oof_p, labels))
    return out


def report(path):
    return json.loads(path.with_suffix(".json").read_text())


def test_f1_weights_sum_to_one_and_soft_vote_matches_hand_computation(members, tmp_path):
    out = tmp_path / "sub.csv"
    run("ensemble.py", "--runs", *members, "--weights", "f1", "--out", out)
    rep = report(out)
    w = np.array([m["weight"] for m in rep["members"]])
    f1 = np.array([m["oof_macro_f1"] for m in rep["members"]])
    assert abs(w.sum() - 1) < 1e-3 and np.allclose(w, f1 / f1.sum(), atol=1e-3) and w[0] > w[1]
    # by hand: weighted mean of the members' probabilities, argmax
    a, b = (np.load(m / "test_logits.npz") for m in members)
    wa, wb = f1 / f1.sum()
    expected = (wa * np.exp(a["logp_label"]) + wb * np.exp(b["logp_label"])).argmax(1)
    sub = pd.read_csv(out)
    assert sub["ImageID"].tolist() == list(a["image_id"]) and sub["ans"].tolist() == expected.tolist()


def test_ensemble_of_a_model_with_itself_is_the_model(members, tmp_path):
    out = tmp_path / "sub.csv"
    run("ensemble.py", "--runs", members[0], members[0], "--weights", "equal", "--out", out)
    alone = np.load(members[0] / "test_logits.npz")
    assert pd.read_csv(out)["ans"].tolist() == alone["logp_label"].argmax(1).tolist()
    rep = report(out)
    assert rep["ensemble_oof_macro_f1"] == rep["members"][0]["oof_macro_f1"]


def test_hard_vote_ties_break_deterministically(tmp_path):
    # two members, equal weight, disagreeing on every image: the tie goes to the higher summed probability
    ids = ["x.jpg", "y.jpg"]
    p1, p2 = np.full((2, 18), 0.01), np.full((2, 18), 0.01)
    p1[:, 3], p2[:, 7] = 0.6, 0.5
    p1, p2 = p1 / p1.sum(1, keepdims=True), p2 / p2.sum(1, keepdims=True)
    for name, p in (("a", p1), ("b", p2)):
        (tmp_path / name).mkdir()
        save_logprobs(tmp_path / name / "test_logits.npz", ids, views_from_probs(p))
    results = set()
    for order in ((tmp_path / "a", tmp_path / "b"), (tmp_path / "b", tmp_path / "a")):
        out = tmp_path / f"{order[0].name}.csv"
        run("ensemble.py", "--runs", *order, "--weights", "0.5,0.5", "--method", "hard", "--out", out)
        results.add(tuple(pd.read_csv(out)["ans"]))
    assert results == {(3, 3)}


def test_member_with_missing_ids_fails_clearly(members, tmp_path):
    z = dict(np.load(members[1] / "test_logits.npz"))
    save_logprobs(members[1] / "test_logits.npz", z["image_id"][:-1], {k[5:]: v[:-1] for k, v in z.items()
                                                                        if k.startswith("logp_")})  # fmt: skip
    proc = run("ensemble.py", "--runs", *members, "--out", tmp_path / "s.csv", check=False)
    assert proc.returncode == 2 and "member b" in last_line(proc.stderr) and "t39.jpg" in last_line(proc.stderr)


def test_member_without_test_predictions_fails_before_the_offsets_are_fitted(members, tmp_path):
    (members[1] / "test_logits.npz").unlink()  # trained, but inference.py not run on it yet
    proc = run("ensemble.py", "--runs", *members, "--adjust", "--out", tmp_path / "s.csv", check=False)
    assert proc.returncode == 2 and "member b has no test_logits.npz" in last_line(proc.stderr)
    assert "adjust:" not in proc.stdout and not (tmp_path / "s.csv").exists()


def test_answers_score_line_and_adjust_report(members, tmp_path):
    ids = list(np.load(members[0] / "test_logits.npz")["image_id"])
    answers = tmp_path / "answers.csv"
    pd.DataFrame(dict(ImageID=ids, ans=np.arange(len(ids)) % 18, extra=1)).to_csv(answers, index=False)
    out = tmp_path / "sub.csv"
    proc = run("ensemble.py", "--runs", *members, "--weights", "opt", "--adjust", "--out", out, "--answers", answers)
    assert last_line(proc.stdout).startswith("macro_f1=") and "gender_f1=" in last_line(proc.stdout)
    rep = report(out)
    assert {"oof_f1_without", "oof_f1_with_cross_validated", "applied"} <= set(rep["adjust"])
    assert "opt_note" in rep and set(rep["test_members"]) == {"a", "b"}
    # the submission's own per-class table: its F1s are the submitted answers' against the truth
    submitted = pd.read_csv(out)["ans"].to_numpy()
    truth = np.arange(len(ids)) % 18
    per_class = pd.DataFrame(rep["test_per_class"])
    assert per_class["support"].tolist() == np.bincount(truth, minlength=18).tolist()
    f1 = f1_score(truth, submitted, labels=range(18), average=None, zero_division=0)
    assert np.allclose(per_class["f1"], f1.round(3)) and per_class["f1"].mean() == pytest.approx(
        rep["test"]["macro_f1"], abs=2e-3
    )
    assert "precision" in proc.stdout and (tmp_path / "sub_confusion.png").stat().st_size > 10_000
    assert (tmp_path / "sub_oof_confusion.png").stat().st_size > 10_000


def test_adjust_shares_one_offset_per_age_band_and_fixes_an_age_bias(tmp_path):
    # a member that calls most 60-and-over faces 30-59: a raised old-band offset fixes it out of fold
    rng = np.random.default_rng(1)
    oof_ids = [f"{p:06d}/mask{k}" for p in range(150) for k in range(1, 3)]
    labels = rng.integers(0, 18, len(oof_ids))
    oof_p = random_probs(rng, len(oof_ids)) * 0.2
    oof_p[np.arange(len(labels)), labels] += 0.5
    old = split_class(labels)[2] == 2
    oof_p[np.flatnonzero(old), labels[old] - 1] += 0.6  # the same mask and gender, one band younger
    oof_p /= oof_p.sum(1, keepdims=True)
    test_ids = [f"t{i}.jpg" for i in range(40)]
    member = make_member(tmp_path / "a", test_ids, random_probs(rng, 40), oof_ids, oof_p, labels)
    out = tmp_path / "sub.csv"
    run("ensemble.py", "--runs", member, "--adjust", "--out", out)
    adjust = report(out)["adjust"]
    assert adjust["by"] == "age" and adjust["applied"]
    assert adjust["oof_f1_with_cross_validated"] > adjust["oof_f1_without"]
    offsets = np.array(adjust["offsets"]).reshape(6, 3)  # class = (mask, gender) x age band
    assert (offsets == offsets[0]).all() and offsets[0, 2] > offsets[0, 1]
    test = np.load(member / "test_logits.npz")["logp_label"]  # the submission is argmax with the offsets
    assert pd.read_csv(out)["ans"].tolist() == (test + np.array(adjust["offsets"])).argmax(1).tolist()
    # the rule's out-of-fold decisions (a second round's labels): offsets each image was not fitted on
    oof = pd.read_csv(tmp_path / "sub_oof.csv", dtype={"ImageID": str})
    assert oof["ImageID"].tolist() == oof_ids
    logp = np.load(member / "fold0" / "oof.npz")["logp_label"].astype(np.float64)
    _, held = offsets_cv(logp, labels, np.array(oof_ids), split_class(np.arange(18))[2], 0)
    assert oof["ans"].tolist() == held.tolist() and macro_f1(labels, held) > macro_f1(labels, logp.argmax(1))
    run("ensemble.py", "--runs", member, "--adjust", "--adjust-by", "class", "--out", out)
    assert report(out)["adjust"]["by"] == "class" and len(report(out)["adjust"]["offsets"]) == 18


def test_without_a_rule_the_out_of_fold_decisions_are_the_ensembles_argmax(members, tmp_path):
    run("ensemble.py", "--runs", members[0], "--out", tmp_path / "s.csv")
    oof = np.load(members[0] / "fold0" / "oof.npz")
    decisions = pd.read_csv(tmp_path / "s_oof.csv", dtype={"ImageID": str})
    assert decisions["ImageID"].tolist() == oof["image_id"].tolist()
    assert decisions["ans"].tolist() == oof["logp_label"].argmax(1).tolist()


def test_bad_weights_are_refused(members, tmp_path):
    proc = run("ensemble.py", "--runs", *members, "--weights", "1,2,3", "--out", tmp_path / "s.csv", check=False)
    assert proc.returncode == 2 and "need 2" in last_line(proc.stderr)


# ---- inference on a tiny trained run ----
@pytest.fixture(scope="module")
def tiny_run(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("infer")
    run("preprocess.py", "--data", demo_data, "--out", work / "crops", "--workers", 1, "--size", 48)
    run("split.py", "--crops", work / "crops", "--folds", 3, "--out", work / "folds.csv")
    for fold in (0, 1):
        run("train_multi.py", "--crops", work / "crops", "--folds", work / "folds.csv", "--fold", fold, "--out",
            work / "run", "--backbone", "test_efficientnet", "--pretrained", "none", "--img-size", 32,
            "--batch-size", 16, "--epochs", 1, "--threads", 1)  # fmt: skip
    return work


@pytest.mark.trains
def test_inference_averages_folds_writes_submission_and_scores(tiny_run, demo_data):
    proc = run("inference.py", "--run", tiny_run / "run", "--crops", tiny_run / "crops", "--answers",
               demo_data / "eval" / "answers.csv", "--tta", "flip+shift", "--embed")  # fmt: skip
    assert "2 model(s) (fold0, fold1)" in proc.stdout
    info = pd.read_csv(demo_data / "eval" / "info.csv")
    sub = pd.read_csv(tiny_run / "run" / "submission.csv")
    assert sub["ImageID"].tolist() == info["ImageID"].tolist() and sub["ans"].between(0, 17).all()
    logits = np.load(tiny_run / "run" / "test_logits.npz")
    assert logits["logp_label"].shape == (len(info), 18) and logits["logp_mask"].shape == (len(info), 3)
    assert (sub["ans"].to_numpy() == logits["logp_label"].argmax(1)).all()
    line = last_line(proc.stdout)
    assert line.startswith("macro_f1=") and all(k in line for k in ("acc=", "mask_f1=", "gender_f1=", "age_f1="))
    scores = json.loads((tiny_run / "run" / "scores.json").read_text())
    assert f"macro_f1={scores['macro_f1']:.4f}" in line and len(scores["per_class"]) == 18
    assert (tiny_run / "run" / "test_confusion.png").is_file() and (tiny_run / "run" / "embed.png").is_file()


@pytest.mark.trains
def test_inference_on_single_photos(tiny_run, demo_data):
    photo = sorted((demo_data / "eval" / "images").iterdir())[0]
    proc = run("inference.py", "--run", tiny_run / "run", "--crops", tiny_run / "crops", "--image", photo)
    assert "class" in last_line(proc.stdout) and "mask" in last_line(proc.stdout) and "age" in last_line(proc.stdout)


@pytest.mark.trains
def test_the_face_embedding_votes_on_a_photos_gender_and_age(tiny_run, tmp_path):
    pytest.importorskip("dlib")
    from PIL import Image
    from skimage import data

    import stacking

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo, quality=95)
    # a stacker sure of (female, 30-59) whatever the face: fitted on noise, nearly all of it labelled 4
    rng = np.random.default_rng(0)
    target = np.where(rng.random(600) < 0.95, 4, rng.integers(0, 6, 600))
    stacker = tmp_path / "sub_embedding.npz"
    stacking.save_stacker(stacker, stacking.fit(rng.normal(size=(600, 128)), target), 2.0)
    args = ("inference.py", "--run", tiny_run / "run", "--crops", tiny_run / "crops", "--image", photo)
    without = last_line(run(*args).stdout)
    voted = last_line(run(*args, "--embedding", stacker).stdout)
    gender_age = lambda line: re.search(r"gender (\S+) ([\d.]+), age (\S+) ([\d.]+)", line).groups()
    assert voted.startswith(f"{photo}: class ") and gender_age(voted) != gender_age(without)
    assert gender_age(voted)[::2] == ("female", "30-59") and "embedding voted" not in without
    assert "embedding voted (weight 2, no HOG face: fixed box)" in voted  # a 48 px crop: too small for HOG's window

    proc = run(*args, "--embedding", tmp_path / "none.npz", check=False)
    assert proc.returncode == 2 and "none.npz: not found" in last_line(proc.stderr) and "Traceback" not in proc.stderr


@pytest.mark.trains
def test_answers_missing_ids_fail_clearly(tiny_run, tmp_path):
    bad = tmp_path / "answers.csv"
    bad.write_text("ImageID,ans\nnot_there.jpg,3\n")
    proc = run("inference.py", "--run", tiny_run / "run", "--crops", tiny_run / "crops", "--answers", bad,
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "no answer for" in last_line(proc.stderr)


@pytest.mark.trains
@pytest.mark.parametrize("damage", ["truncated", "foreign", "pickled_code", "other_size"])
def test_bad_checkpoints_are_refused_with_one_line(tiny_run, tmp_path, damage):
    import shutil

    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run_dir)
    best = run_dir / "fold0" / "best.pt"
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[:1000])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, best)
    elif damage == "pickled_code":
        torch.save({"model": Exploit(tmp_path / "pwned"), "config": {}}, best)
    else:  # a checkpoint trained at another image size: the config says 48 while fold1 says 32
        state = torch.load(best, weights_only=True)
        state["config"]["img_size"] = 48
        torch.save(state, best)
    proc = run("inference.py", "--run", run_dir, "--crops", tiny_run / "crops", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(run_dir) in last_line(proc.stderr)
    assert not (tmp_path / "pwned").exists()


class Exploit:
    """Pickles to a call of os.system: weights_only=True must refuse to run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_split_class_matches_views():
    p = np.random.default_rng(1).random((5, 18))
    p /= p.sum(1, keepdims=True)
    v = views_from_probs(p)
    m, g, a = split_class(p.argmax(1))
    assert (np.exp(v["mask"])[np.arange(5), m] > 0).all() and g.max() <= 1 and a.max() <= 2


# ---- --group-shots: the shots of one person, found by their faces ----
def person_shots(photo, rng, size=32, same_top=True):
    """Seven 32-px shots of one 'person' (a window of a real photo), each framed a little differently
    (shift, scale, turn), six with a 'mask' over the lower half; the last one unmasked. same_top=False:
    every shot is a different window, so nothing ties a person's shots together."""
    from PIL import Image, ImageDraw

    side = 160
    x0, y0 = rng.integers(0, np.array(photo.size) - side - 16, 2) + 8
    shots = []
    for k in range(7):
        if not same_top:
            x0, y0 = rng.integers(0, np.array(photo.size) - side - 16, 2) + 8
        s = side * rng.uniform(0.97, 1.03)
        cx, cy = x0 + side / 2 + rng.uniform(-0.035, 0.035) * side, y0 + side / 2 + rng.uniform(-0.035, 0.035) * side
        turned = photo.rotate(rng.uniform(-4, 4), center=(cx, cy), resample=Image.BILINEAR)
        shot = turned.crop((int(cx - s / 2), int(cy - s / 2), int(cx + s / 2), int(cy + s / 2)))
        shot = shot.resize((size, size), Image.BILINEAR)
        if k < 6:  # masks of any colour, from just under the matched rows down
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            ImageDraw.Draw(shot).rectangle((3, 15 + 2 * (k == 5), size - 4, size), fill=colour)
        shots.append(np.asarray(shot))
    return shots


def photo_persons(n, rng, same_top=True):
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = []
    for p in range(n):
        photo = Image.fromarray(photos[p % len(photos)]).resize((400, 400))
        out.append(person_shots(photo, rng, same_top=same_top))
    return out


def test_shot_groups_finds_each_persons_shots_in_real_photos():
    from shots import shot_groups

    rng = np.random.default_rng(0)
    persons = photo_persons(20, rng)  # four windows of each of five photos: neighbours look alike
    images = np.stack([shot for shots in persons for shot in shots])
    person = np.repeat(np.arange(20), 7)
    unmasked = np.tile(np.arange(7) == 6, 20)
    shuffle = rng.permutation(len(images))
    groups = shot_groups(images[shuffle], unmasked[shuffle])
    assert (person[shuffle][groups] == person[shuffle]).all()  # every shot with its own person's unmasked shot
    assert (groups[unmasked[shuffle]] == np.flatnonzero(unmasked[shuffle])).all()


def grouping_case(tmp_path, same_top, twins=False):
    """A crops folder of photo 'persons' and a member whose gender x age is right on only 4 of 7 shots.
    twins: persons 2i and 2i+1 have the same shots and the same gender x age, so the matcher mixes them up."""
    rng = np.random.default_rng(1)
    crops = tmp_path / "crops"
    crops.mkdir()
    parts = {}
    for split, n_persons in (("train", 24), ("eval", 12)):
        persons = photo_persons(n_persons, rng, same_top)
        gender_age = rng.integers(0, 6, n_persons)
        if twins:
            persons = [persons[p - p % 2] for p in range(n_persons)]
            gender_age = gender_age[np.arange(n_persons) // 2 * 2]
        ids = [f"{p:06d}/shot{k}" if split == "train" else f"{p:06d}{k}.jpg" for p in range(n_persons)
               for k in range(7)]  # fmt: skip
        label = np.array([[0] * 5 + [1, 2]] * n_persons).ravel() * 6 + np.repeat(gender_age, 7)
        probs = np.full((len(ids), 18), 0.01)
        for i, lab in enumerate(label):
            wrong = (lab % 6 + 1 + rng.integers(0, 5)) % 6 + lab // 6 * 6  # same mask, another gender x age
            probs[i, lab], probs[i, wrong] = (0.5, 0.3) if i % 7 in (0, 2, 4, 6) else (0.3, 0.5)
        order = rng.permutation(len(ids)) if split == "eval" or twins else np.arange(len(ids))  # twins: random ties
        ids, label, probs = np.array(ids)[order], label[order], probs[order]
        images = np.stack([s for shots in persons for s in shots])[order]
        pd.DataFrame(dict(image_id=ids)).to_csv(crops / f"{split}.csv", index=False)
        np.save(crops / f"{split}_u8.npy", images)
        parts[split] = (ids, probs / probs.sum(1, keepdims=True), label)
    (ids, p, label), (test_ids, test_p, test_label) = parts["train"], parts["eval"]
    member = make_member(tmp_path / "a", test_ids, test_p, ids, p, label)
    return crops, member, test_ids, test_label


def test_group_shots_gives_a_persons_shots_one_gender_and_age(tmp_path):
    crops, member, test_ids, test_label = grouping_case(tmp_path, same_top=True)
    out = tmp_path / "sub.csv"
    proc = run("ensemble.py", "--runs", member, "--group-shots", "--crops", crops, "--out", out)
    group = report(out)["group_shots"]
    assert group["applied"] and group["oof_f1_with"] > group["oof_f1_without"] and "applied" in proc.stdout
    assert group["oof_with_own_person"] == 1.0 and group["test_groups"] == 12
    sub = pd.read_csv(out).set_index("ImageID").loc[test_ids]
    assert (sub["ans"].to_numpy() == test_label).all()  # 3 of 7 shots were wrong before, each person's now right


def test_group_shots_is_left_out_where_the_matcher_mixes_persons_up_even_if_it_helps(tmp_path):
    crops, member, _, _ = grouping_case(tmp_path, same_top=True, twins=True)  # twins: grouping is right by luck
    out = tmp_path / "sub.csv"
    proc = run("ensemble.py", "--runs", member, "--group-shots", "--crops", crops, "--out", out)
    group = report(out)["group_shots"]
    assert group["oof_f1_with"] > group["oof_f1_without"] and group["oof_with_own_person"] < 0.9
    assert not group["applied"] and "not applied (under 90%)" in proc.stdout


def test_group_shots_is_left_out_where_it_does_not_help(tmp_path):
    crops, member, test_ids, _ = grouping_case(tmp_path, same_top=False)
    out = tmp_path / "sub.csv"
    proc = run("ensemble.py", "--runs", member, "--group-shots", "--crops", crops, "--out", out)
    assert not report(out)["group_shots"]["applied"] and "not applied" in proc.stdout
    alone = np.load(member / "test_logits.npz")
    assert pd.read_csv(out)["ans"].tolist() == alone["logp_label"].argmax(1).tolist()


def test_group_shots_without_the_crops_fails_clearly(members, tmp_path):
    proc = run("ensemble.py", "--runs", *members, "--group-shots", "--crops", tmp_path / "nowhere", "--out",
               tmp_path / "s.csv", check=False)  # fmt: skip
    assert proc.returncode == 2 and "nowhere" in last_line(proc.stderr) and "Traceback" not in proc.stderr


def test_group_bench_times_each_set_and_finds_the_persons(tmp_path):
    # bench/group_bench.py on photo 'persons' (train.csv's true unmasked shots as anchors), sets of 5 and 10
    persons = photo_persons(10, np.random.default_rng(2))
    crops = tmp_path / "crops"
    crops.mkdir()
    person_id = np.repeat([f"{p:06d}" for p in range(10)], 7)
    shot = np.tile(np.arange(7), 10)
    index = pd.DataFrame(dict(image_id=[f"{p}/shot{k}" for p, k in zip(person_id, shot)], person_id=person_id,
                              mask=np.where(shot == 6, 2, np.where(shot == 5, 1, 0))))  # fmt: skip
    index.to_csv(crops / "train.csv", index=False)
    np.save(crops / "train_u8.npy", np.stack([s for shots in persons for s in shots]))
    table = tmp_path / "table.md"
    proc = run("bench/group_bench.py", "--crops", crops, "--persons", 5, 10, "--lsa-persons", 30, "--table", table)
    rows = [line.strip(" |").split(" | ") for line in table.read_text().splitlines()]
    assert [what for what, _ in rows] == [
        "--group-shots, 5 persons (35 images)",
        "--group-shots, 10 persons (70 images)",
        "--group-shots assignment alone, 30 persons (random matrix)",
    ]
    assert all(figure.endswith("100.0% right") for _, figure in rows[:2]), rows
    assert "10 / 5 persons" in proc.stdout and float(rows[2][1].split()[0]) >= 0
