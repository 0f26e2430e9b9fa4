"""Stack a face embedding beside a model's predictions: a logistic regression from the embedding to the person's
(gender, age band), whose vote is added to the model's log-probabilities with a weight; the mask stays the model's.

    from stacking import gender_age, out_of_fold, fit, predict, vote, with_gender_age
    emb_oof = out_of_fold(embedding, labels % 6, persons)            # each person's from a fit on others
    oof_views = with_gender_age(oof_views, vote(gender_age(oof_views["label"]), emb_oof))
    test_ga = vote(gender_age(test_views["label"]), predict(fit(embedding, labels % 6), test_embedding))
    test_views = with_gender_age(test_views, test_ga)

Plain functions, no state: ensemble.py --embeddings calls them. Out of fold, fit() is handed only the rows of
other persons (out_of_fold's `fit_fn` argument makes that testable). A vote, not one regression over
[embedding, model]: such a regression learns how much to trust one fold's model, and the test set's models
(five folds and a full one, averaged) deserve more. Out of fold on the bench the vote scored 0.607 and the
regression 0.585 (the rule's macro F1; 0.545 without the embedding), EXPERIMENTS.md. Seconds on 9,100 images.
ensemble.py also saves the stacker fitted on every training image as plain arrays (save_stacker), for
inference.py --image --embedding (load_stacker, predict_saved: predict's numbers without sklearn's pickle).
"""

import zipfile

import numpy as np
from scipy.special import log_softmax, logsumexp, softmax

from common import InputError, save_npz

GENDER_AGE = 6  # the stacked target: gender * 3 + age_band, the 18-class label modulo 6
C = 0.03  # the logistic regression's inverse regularisation, chosen out of fold on the bench train split
WEIGHT = 2.0  # the embedding vote's weight beside the model's: chosen out of fold on the bench train split (2 runs)


def gender_age(label_logp):
    """(n, 18) class log-probabilities -> (n, 6) (gender, age band) log-probabilities, the mask summed out."""
    return logsumexp(np.asarray(label_logp, np.float64).reshape(-1, 3, GENDER_AGE), axis=1)


def vote(model_logp, embedding_logp, weight=WEIGHT):
    """(n, 6) log-probabilities: the model's and `weight` times the embedding's, renormalised."""
    return log_softmax(np.asarray(model_logp, np.float64) + weight * np.asarray(embedding_logp), axis=1)


def fit(x, target, c=C):
    """A standardised multinomial logistic regression on (x, target in 0-5); returns the fitted pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, target)


def predict(model, x):
    """(n, 6) log-probabilities; a class no fitted row had gets a floor of log 1e-6."""
    return floored(model.predict_proba(x), model.classes_)


def floored(proba, classes):
    """(n, k) probabilities of `classes` -> (n, 6) log-probabilities, log 1e-6 for a class not among them."""
    logp = np.full((len(proba), GENDER_AGE), np.log(1e-6))
    logp[:, classes] = np.log(np.clip(proba, 1e-6, None))
    return log_softmax(logp, axis=1)


def save_stacker(path, model, weight, **info):
    """fit()'s model as plain arrays (no pickle to trust), its vote's weight, and `info` (numbers, strings)."""
    scaler, regression = model[0], model[-1]
    save_npz(path, mean=scaler.mean_, scale=scaler.scale_, coef=regression.coef_, intercept=regression.intercept_,
             classes=regression.classes_, weight=weight, **info)  # fmt: skip


def load_stacker(path):
    """save_stacker's file as a dict of arrays, for predict_saved(); one clear line if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise InputError(f"{path}: not a stacker file (ensemble.py --embeddings writes OUT_embedding.npz)") from None
    missing = {"mean", "scale", "coef", "intercept", "classes", "weight"} - set(saved)
    if missing:
        raise InputError(f"{path}: not a stacker file, no {', '.join(sorted(missing))}")
    return saved


def predict_saved(saved, x):
    """predict() of a saved stacker, from its arrays: standardise, the regression's softmax, the same floor."""
    z = (np.asarray(x, np.float64) - saved["mean"]) / saved["scale"]
    logits = z @ saved["coef"].T + saved["intercept"]
    if logits.shape[1] == 1:  # two classes: sklearn keeps one row of coefficients, for the second class
        logits = np.hstack([np.zeros_like(logits), logits])
    return floored(softmax(logits, axis=1), saved["classes"])


def person_folds(persons, n_splits=5, seed=0):
    """[(fit rows, held rows)]: folds by person, so no person is on both sides."""
    from sklearn.model_selection import GroupKFold

    persons = np.asarray(persons)
    n_splits = min(n_splits, len(np.unique(persons)))
    return list(GroupKFold(n_splits, shuffle=True, random_state=seed).split(persons, groups=persons))


def out_of_fold(x, target, persons, fit_fn=fit, n_splits=5, seed=0):
    """(n, 6) log-probabilities, each row's from a model fit_fn fitted on other persons' rows only:
    fit_fn(x[fit_rows], target[fit_rows]) never sees a held-out person's features or label."""
    logp = np.empty((len(x), GENDER_AGE))
    for fit_rows, held in person_folds(persons, n_splits, seed):
        logp[held] = predict(fit_fn(x[fit_rows], target[fit_rows]), x[held])
    return logp


def information(vote_logp, target):
    """What a (n, 6) vote knows of `target` (0-5) out of fold, in nats: its mean log-likelihood of the true class
    minus that of the classes' own shares. Below zero it is surer than it is right: ensemble.py leaves it out."""
    shares = np.bincount(target, minlength=GENDER_AGE) / len(target)
    rows = np.arange(len(target))
    return float(np.mean(np.asarray(vote_logp)[rows, target]) - np.mean(np.log(shares[target])))


def voted(views, embedding_logp, weight=WEIGHT):
    """A logits dict with the embedding's (n, 6) vote on gender and age added beside the views' own."""
    return with_gender_age(views, vote(gender_age(views["label"]), embedding_logp, weight))


def tuned_named(saved):
    """The fine-tuned networks a saved stacker names (ensemble.py --face, where their vote on each image on its own
    beat the regression's out of fold), loaded for vote_on_photo; else None."""
    import faceembed

    folder = str(saved.get("face", ""))
    return faceembed.load_tuned(folder) if folder else None


def vote_on_photo(saved, face_models, views, crop, tuned=None):
    """One photo's views (inference.py --image, serve.py) with a saved stacker's vote: the crop's chip at the
    crops' own size, framed as embed.py framed the training crops where HOG finds no face, embedded for the
    regression, or with `tuned` (tuned_named) given to the fine-tuned networks. Returns (views, HOG found the face)."""
    import faceembed

    box = saved.get("fallback_box", faceembed.GEOMETRY_BOX)
    chip, found = faceembed.photo_chip(face_models, crop, fallback_box=box)
    if tuned:
        vote = faceembed.tuned_vote(tuned, chip[None])
    else:
        vote = predict_saved(saved, faceembed.embed_chips(face_models, chip[None]))
    return voted(views, vote, float(saved["weight"])), found


def vote_note(saved, tuned, found):
    """What voted on one photo's gender and age, as inference.py's line and serve.py's page say it."""
    voter = "face network" if tuned else "embedding"
    return f"{voter} voted (weight {float(saved['weight']):g}, " + ("HOG face)" if found else "no HOG face: fixed box)")


def with_gender_age(views, gender_age_logp):
    """A logits dict (label 18, mask 3, gender 2, age 3) with (gender, age band) replaced by `gender_age_logp`:
    label = the model's mask + the stacked (gender, age); gender and age views are its marginals."""
    ga = np.asarray(gender_age_logp, np.float64)
    mask = logsumexp(np.asarray(views["label"], np.float64).reshape(-1, 3, GENDER_AGE), axis=2)
    label = (mask[:, :, None] + ga[:, None, :]).reshape(-1, 18)
    by_gender = ga.reshape(-1, 2, 3)
    return dict(views, label=label, gender=logsumexp(by_gender, axis=2), age=logsumexp(by_gender, axis=1))
