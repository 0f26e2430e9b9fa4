"""stacking.py: out of fold never reads a person's own row or label; the views it returns are log-probabilities
that keep the model's mask."""

import numpy as np
from scipy.special import log_softmax, logsumexp

import stacking


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


def test_a_real_signal_is_learned_out_of_fold():
    rng, persons, target = persons_and_targets()
    embedding = np.eye(6)[target] + 0.5 * rng.normal(size=(len(persons), 6))  # knows the class, noisily
    model_logp = log_softmax(rng.normal(size=(len(persons), 18)), axis=1)
    x = stacking.features(np.hstack([embedding, rng.normal(size=(len(persons), 30))]), stacking.gender_age(model_logp))
    assert x.shape == (len(persons), 42)
    oof = stacking.out_of_fold(x, target, persons)
    assert np.allclose(logsumexp(oof, axis=1), 0, atol=1e-6)
    assert (oof.argmax(1) == target).mean() > 0.6


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


def test_group_rows_finds_each_shots_anchor():
    ids = np.array(["a/mask1", "a/normal", "b/normal", "b/mask1"])
    groups = np.array([1, 1, 2, 2])  # each row's anchor row (ensemble.shot_groups)
    assert stacking.group_rows(ids, groups, np.array(["b/normal", "a/normal"])).tolist() == [1, 1, 0, 0]
    assert stacking.group_rows(ids, groups, np.array(["a/normal"])).tolist() == [0, 0, -1, -1]
