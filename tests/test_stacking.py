"""stacking.py and ensemble.py --embeddings: out of fold never reads a person's own row or label; the views it
returns are log-probabilities that keep the model's mask; a real signal is applied, a planted leak is not."""

import json

import numpy as np
import pandas as pd
from conftest import last_line, run
from scipy.special import log_softmax, logsumexp

import stacking
from scores import save_logprobs


def persons_and_targets(n_persons=240, shots=7, seed=0):
    rng = np.random.default_rng(seed)
    persons = np.repeat(np.arange(n_persons), shots)
    target = np.repeat(rng.integers(0, 6, n_persons), shots)  # a person's (gender, age band) on all their shots
    return rng, persons, target


class Spy:
    """A fit_fn that records which persons (column 0 of x) each model was fitted on and asked about."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, target):
        model = stacking.fit(x, target)
        seen = set(x[:, 0].astype(int))
        predict_proba = model.predict_proba

        def spied(x_held):
            self.calls.append((seen, set(x_held[:, 0].astype(int))))
            return predict_proba(x_held)

        model.predict_proba = spied
        return model


def test_out_of_fold_fits_only_on_other_persons():
    rng, persons, target = persons_and_targets()
    x = np.hstack([persons[:, None], rng.normal(size=(len(persons), 4))])
    spy = Spy()
    stacking.out_of_fold(x, target, persons, fit_fn=spy, n_splits=5)
    assert len(spy.calls) == 5
    assert set().union(*(held for _, held in spy.calls)) == set(persons)  # every person predicted once
    for seen, held in spy.calls:
        assert not seen & held


def test_a_feature_that_only_names_the_person_does_not_leak_its_label():
    """Random labels and a random code per person: fitted on a person's own rows, a weakly regularised
    regression learns the code -> label table (in-sample accuracy near 1); out of fold it can only guess."""
    rng, persons, target = persons_and_targets(n_persons=150)
    codes = rng.normal(size=(150, 200))[persons] + 0.05 * rng.normal(size=(len(persons), 200))
    fit = lambda x, t: stacking.fit(x, t, c=10.0)
    in_sample = (stacking.predict(fit(codes, target), codes).argmax(1) == target).mean()
    assert in_sample > 0.95  # the planted feature leaks when a fit reads the person's own label
    oof = stacking.out_of_fold(codes, target, persons, fit_fn=fit)
    assert (oof.argmax(1) == target).mean() < 0.3  # chance is 1/6


def test_a_real_signal_is_learned_out_of_fold_and_its_vote_moves_the_model():
    rng, persons, target = persons_and_targets()
    embedding = np.hstack([np.eye(6)[target] + 0.5 * rng.normal(size=(len(persons), 6)),  # knows the class, noisily
                           rng.normal(size=(len(persons), 30))])  # fmt: skip
    oof = stacking.out_of_fold(embedding, target, persons)
    assert np.allclose(logsumexp(oof, axis=1), 0, atol=1e-6)
    assert (oof.argmax(1) == target).mean() > 0.6
    model = stacking.gender_age(log_softmax(rng.normal(size=(len(persons), 18)), axis=1))  # knows nothing
    assert np.allclose(stacking.vote(model, oof, 0.0), model)
    voted = stacking.vote(model, oof, 1.0)
    assert np.allclose(logsumexp(voted, axis=1), 0) and (voted.argmax(1) == target).mean() > 0.5


def test_views_keep_the_models_mask_and_take_the_stacked_gender_and_age():
    rng = np.random.default_rng(1)
    label = log_softmax(rng.normal(size=(5, 18)), axis=1)
    views = dict(label=label, mask=np.zeros((5, 3)), gender=np.zeros((5, 2)), age=np.zeros((5, 3)), other=1)
    ga = log_softmax(rng.normal(size=(5, 6)), axis=1)
    out = stacking.with_gender_age(views, ga)
    assert out["other"] == 1 and np.allclose(logsumexp(out["label"], axis=1), 0)
    by = out["label"].reshape(5, 3, 6)  # label = mask * 6 + gender * 3 + age band
    assert np.allclose(logsumexp(by, axis=2), logsumexp(label.reshape(5, 3, 6), axis=2))  # the mask stays
    assert np.allclose(stacking.gender_age(out["label"]), ga)
    assert np.allclose(np.exp(out["gender"]), np.exp(ga).reshape(5, 2, 3).sum(2))
    assert np.allclose(np.exp(out["age"]), np.exp(ga).reshape(5, 2, 3).sum(1))


def test_a_class_no_fitted_row_had_gets_the_floor():
    rng = np.random.default_rng(2)
    x, target = rng.normal(size=(60, 3)), np.tile([0, 1, 4], 20)
    logp = stacking.predict(stacking.fit(x, target), x)
    assert logp.shape == (60, 6) and np.allclose(logsumexp(logp, axis=1), 0)
    assert (logp[:, [2, 3, 5]] < np.log(2e-6)).all()


# ---- ensemble.py --embeddings through its command line, on hand-made logits and embeddings ----
def ensemble_case(tmp_path, embedding_of, face_of=None, face_weights=False):
    """A run whose out-of-fold and test predictions know each image's mask and nothing of gender and age,
    and embed.py's files with embedding_of(rng, person's (gender, age) class, person index) per image; with
    face_of, train_face.py's files too: face_of(rng, class) is an image's (6,) gender-age log-probabilities (and
    with face_weights a fold0.pt beside them, as train_face.py writes its fold networks)."""
    rng = np.random.default_rng(3)
    n_persons, n_test, shots = 240, 60, 3
    ga = rng.integers(0, 6, n_persons + n_test)  # each person's gender * 3 + age band
    label = np.repeat(ga, shots) + 6 * rng.integers(0, 3, len(ga) * shots)  # + the mask of each shot
    ids = [f"{p:06d}/mask{k}" for p in range(n_persons) for k in range(1, shots + 1)]
    ids += [f"t{p}_{k}.jpg" for p in range(n_test) for k in range(shots)]
    mask = np.eye(3)[label // 6] * 4.0  # the model is sure of the mask, says nothing of the rest
    logp = log_softmax(np.repeat(mask, 6, axis=1) + 0.3 * rng.normal(size=(len(label), 18)), axis=1)
    views = dict(label=logp, mask=log_softmax(mask, axis=1), gender=np.log(np.full((len(label), 2), 0.5)),
                 age=np.log(np.full((len(label), 3), 1 / 3)))  # fmt: skip
    train, test = slice(0, n_persons * shots), slice(n_persons * shots, None)
    save_logprobs(tmp_path / "run" / "fold0" / "oof.npz", ids[train], {k: v[train] for k, v in views.items()},
                  label[train])  # fmt: skip
    save_logprobs(tmp_path / "run" / "test_logits.npz", ids[test], {k: v[test] for k, v in views.items()})
    pd.DataFrame(dict(ImageID=ids[test], ans=label[test])).to_csv(tmp_path / "answers.csv", index=False)
    embedding = np.stack([embedding_of(rng, ga[i // shots], i // shots) for i in range(len(ids))]).astype(np.float32)
    (tmp_path / "emb").mkdir(parents=True)
    for split, rows in (("train", train), ("eval", test)):  # embed.py's files, as ensemble.py reads them
        np.savez(tmp_path / "emb" / f"{split}.npz", image_id=np.array(ids[rows]), embedding=embedding[rows])
    face = []
    if face_of is not None:
        votes = np.stack([face_of(rng, ga[i // shots]) for i in range(len(ids))])
        (tmp_path / "face").mkdir()
        for split, rows in (("train", train), ("eval", test)):  # train_face.py's files
            np.savez(tmp_path / "face" / f"{split}.npz", image_id=np.array(ids[rows]), gender_age=votes[rows])
        face = ["--face", tmp_path / "face"]
        if face_weights:
            (tmp_path / "face" / "fold0.pt").write_bytes(b"")  # ensemble.py only names the folder
    out = tmp_path / "sub.csv"
    run("ensemble.py", "--runs", tmp_path / "run", "--embeddings", tmp_path / "emb", *face, "--out", out,
        "--answers", tmp_path / "answers.csv")  # fmt: skip
    return json.loads(out.with_suffix(".json").read_text())


def test_ensemble_applies_an_embedding_that_knows_gender_and_age(tmp_path):
    rep = ensemble_case(tmp_path, lambda rng, ga, person: np.eye(6)[ga] * 2 + rng.normal(size=6))
    emb = rep["embeddings"]
    assert emb["applied"] == "image" and emb["oof_f1_image"] > emb["oof_f1_without"] + 0.2
    assert rep["test"]["gender_f1"] > 0.7 and rep["test"]["age_f1"] > 0.5  # the model alone: chance (0.5, 0.33)


def test_ensemble_out_of_fold_does_not_read_a_persons_own_label(tmp_path):
    """Each person's embedding is a random code of their own: fitted on a person's own rows the regression
    learns the code -> label table (in-sample 1.0, test_a_feature_that_only_names...), so a stacker that read
    its own person's label would score near 1 out of fold (the mask is known); out of fold by person it guesses."""
    codes = np.random.default_rng(4).normal(size=(300, 128))
    rep = ensemble_case(tmp_path, lambda rng, ga, person: codes[person] + 0.05 * rng.normal(size=128))
    emb = rep["embeddings"]
    assert emb["oof_f1_image"] < emb["oof_f1_without"] + 0.1 < 0.4


def test_ensemble_saves_the_image_stacker_as_plain_arrays_that_predict_as_a_refit(tmp_path):
    rep = ensemble_case(tmp_path, lambda rng, ga, person: np.eye(6)[ga] * 2 + rng.normal(size=6))
    path = tmp_path / "sub_embedding.npz"
    assert rep["embeddings"]["stacker"] == str(path)
    saved = stacking.load_stacker(path)  # (np.load without pickle: plain arrays only)
    assert float(saved["weight"]) == stacking.WEIGHT
    assert round(float(saved["oof_f1_with"]), 4) == rep["embeddings"]["oof_f1_image"]
    assert round(float(saved["oof_f1_without"]), 4) == rep["embeddings"]["oof_f1_without"]
    # the same fit on every training image, by hand: its predictions on the test embeddings, to 1e-6
    train, test = np.load(tmp_path / "emb" / "train.npz"), np.load(tmp_path / "emb" / "eval.npz")
    oof = np.load(tmp_path / "run" / "fold0" / "oof.npz")
    assert oof["image_id"].tolist() == train["image_id"].tolist()
    refit = stacking.fit(train["embedding"], oof["label"] % stacking.GENDER_AGE)
    expected = stacking.predict(refit, test["embedding"])
    assert np.abs(stacking.predict_saved(saved, test["embedding"]) - expected).max() < 1e-6


def test_ensemble_applies_the_tuned_networks_votes_where_they_beat_the_embeddings(tmp_path):
    """train_face.py's votes are out of fold already: ensemble.py tries them beside the regression on the frozen
    embedding, applies the better, and the test predictions take the eval file's votes."""
    codes = np.random.default_rng(5).normal(size=(300, 16))  # an embedding that knows nothing of the labels
    rep = ensemble_case(tmp_path, lambda rng, ga, person: codes[person],
                        face_of=lambda rng, ga: log_softmax(np.eye(6)[ga] * 3 + rng.normal(size=6)))  # fmt: skip
    votes = rep["embeddings"]
    assert votes["applied"] == "face_image" and votes["oof_f1_face_image"] > votes["oof_f1_image"] + 0.2
    assert rep["test"]["gender_f1"] > 0.8 and rep["test"]["age_f1"] > 0.6  # the model alone: chance (0.5, 0.33)


def test_one_photo_gets_the_tuned_networks_where_their_image_way_wins_and_their_weights_are_there(tmp_path):
    """The image stacker ensemble.py saves for inference.py --image names the fine-tuned networks' folder when their
    vote on each image on its own beat the regression's out of fold; without fold networks on disk it cannot."""
    codes = np.random.default_rng(5).normal(size=(300, 16))
    tuned = lambda rng, ga: log_softmax(np.eye(6)[ga] * 3 + rng.normal(size=6))  # noqa: E731
    rep = ensemble_case(tmp_path / "a", lambda rng, ga, person: codes[person], face_of=tuned, face_weights=True)
    saved = stacking.load_stacker(tmp_path / "a" / "sub_embedding.npz")
    assert rep["embeddings"]["photo_vote"] == "face_image" and str(saved["face"]) == str(tmp_path / "a" / "face")
    assert round(float(saved["oof_f1_with"]), 4) == rep["embeddings"]["oof_f1_face_image"]
    rep = ensemble_case(tmp_path / "b", lambda rng, ga, person: codes[person], face_of=tuned)
    saved = stacking.load_stacker(tmp_path / "b" / "sub_embedding.npz")
    assert rep["embeddings"]["photo_vote"] == "image" and str(saved["face"]) == ""
    # an embedding that knows, a tuned vote that does not: the regression stays the photo's
    rep = ensemble_case(tmp_path / "c", lambda rng, ga, person: np.eye(6)[ga] * 2 + rng.normal(size=6),
                        face_of=lambda rng, ga: log_softmax(rng.normal(size=6)), face_weights=True)  # fmt: skip
    assert rep["embeddings"]["photo_vote"] == "image"


def test_ensemble_says_which_image_the_tuned_network_did_not_predict(tmp_path):
    ensemble_case(tmp_path, lambda rng, ga, person: rng.normal(size=6),
                  face_of=lambda rng, ga: log_softmax(np.eye(6)[ga] * 3 + rng.normal(size=6)))  # fmt: skip
    with np.load(tmp_path / "face" / "eval.npz") as z:
        np.savez(tmp_path / "face" / "eval.npz", image_id=z["image_id"][1:], gender_age=z["gender_age"][1:])
    proc = run("ensemble.py", "--runs", tmp_path / "run", "--face", tmp_path / "face", "--out", tmp_path / "b.csv",
               check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "eval.npz: no gender_age for 1 image(s), e.g. t0_0.jpg (rerun train_face.py)" in last_line(proc.stderr)


def test_a_vote_surer_than_it_is_right_is_left_out_though_it_wins_out_of_fold(tmp_path):
    """Right and sure on 60 % of the images, wrong and as sure on the rest: beside a model that knows nothing of
    gender and age it wins the rule's F1, but its likelihood is below the classes' own shares (negative nats),
    the mark of a network that cannot read the faces (the demo's drawn ones): ensemble.py leaves it out."""

    def sure(rng, ga):
        return log_softmax(np.eye(6)[ga if rng.random() < 0.6 else (ga + 1) % 6] * 30)

    codes = np.random.default_rng(6).normal(size=(300, 16))
    rep = ensemble_case(tmp_path, lambda rng, ga, person: codes[person], face_of=sure)
    votes = rep["embeddings"]
    assert votes["oof_f1_face_image"] > votes["oof_f1_without"] + 0.2  # it would win on F1 alone
    assert votes["nats_face_image"] < 0 and votes["applied"] != "face_image"
