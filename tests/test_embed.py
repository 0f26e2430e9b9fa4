"""embed.py: dlib's real detector, landmarks and face-recognition ResNet on a real face, the fallback box on a
photo without one, resuming after a kill, and the one-line errors."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, SHOTS, image_array, last_line, run
from PIL import Image
from skimage import data as skdata

dlib = pytest.importorskip("dlib")
from faceembed import MODEL_FILES, model_folder  # noqa: E402  (after the skip: it needs dlib's models)

PERSONS = ("000001_female_White_47", "000002_male_White_35", "000003_female_Asian_61")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """preprocess.py's crops of the astronaut (every train shot of three persons, and eval), and of a coffee cup
    (eval): a photo with no face."""
    root = tmp_path_factory.mktemp("embed") / "data"
    face = Image.fromarray(skdata.astronaut())
    rows = ["id,gender,race,age,path"]
    for k, folder in enumerate(PERSONS):
        pid, gender, race, age = folder.split("_")
        rows.append(f"{pid},{gender},{race},{age},{folder}")
        (root / "train" / "images" / folder).mkdir(parents=True)
        for shot in SHOTS:  # each person a little different: another chunk hash, another crop
            face.rotate(3 * k).save(root / "train" / "images" / folder / f"{shot}.jpg", quality=95)
    (root / "train" / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "eval" / "images").mkdir(parents=True)
    face.save(root / "eval" / "images" / "face.jpg", quality=95)
    Image.fromarray(skdata.coffee()).save(root / "eval" / "images" / "cup.jpg", quality=95)
    (root / "eval" / "info.csv").write_text("ImageID,ans\nface.jpg,0\ncup.jpg,0\n")
    out = root.parent / "crops"
    run("preprocess.py", "--data", root, "--out", out, "--workers", 1, "--bg", "none", "--size", 200)
    return out


def dlib_models():
    folder = model_folder()
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(os.path.join(folder, MODEL_FILES["landmarks"])),
        dlib.face_recognition_model_v1(os.path.join(folder, MODEL_FILES["resnet"])),
    )


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_face_embedding_is_dlibs_own_and_no_face_gets_the_fixed_box(crops, tmp_path):
    out = tmp_path / "emb"
    proc = run("embed.py", "--crops", crops, "--out", out, "--splits", "eval", "--workers", 1)
    assert "eval: 2 crops embedded" in proc.stdout
    emb = load(out / "eval.npz")
    assert emb["image_id"].tolist() == ["face.jpg", "cup.jpg"] and emb["embedding"].shape == (2, 128)
    assert emb["face_found"].tolist() == [True, False]

    # dlib's own calls on the crop: HOG, the 5 landmarks in its box, compute_face_descriptor
    detector, landmarks, resnet = dlib_models()
    face = image_array(crops / "eval" / "face.png")
    (box,) = detector(face, 0)
    own = np.array(resnet.compute_face_descriptor(face, landmarks(face, box)))
    assert np.abs(emb["embedding"][0] - own).max() < 1e-4
    assert emb["box"][0].tolist() == [box.left(), box.top(), box.right(), box.bottom()]
    # dlib's own ResNet through the stage gives the same numbers as its torch copy (the default)
    run("embed.py", "--crops", crops, "--out", tmp_path / "dlib", "--splits", "eval", "--workers", 1,
        "--backend", "dlib")  # fmt: skip
    assert np.abs(load(tmp_path / "dlib" / "eval.npz")["embedding"] - emb["embedding"]).max() < 1e-5

    # no face: the documented fallback, the landmarks in the fixed box (here the split's only HOG box)
    cup = image_array(crops / "eval" / "cup.png")
    assert len(detector(cup, 0)) == 0
    assert emb["box"][1].tolist() == emb["box"][0].tolist()
    in_box = lambda box: np.array(resnet.compute_face_descriptor(cup, landmarks(cup, dlib.rectangle(*box))))
    assert np.abs(emb["embedding"][1] - in_box(emb["box"][1].tolist())).max() < 1e-4

    # a box given by hand, as fractions of the side
    by_hand = tmp_path / "by_hand"
    run("embed.py", "--crops", crops, "--out", by_hand, "--splits", "eval", "--workers", 1,
        "--fallback-box", "0.2 0.25 0.8 0.85")  # fmt: skip
    hand = load(by_hand / "eval.npz")
    assert hand["box"][1].tolist() == [40, 50, 160, 170] and np.allclose(hand["embedding"][0], emb["embedding"][0])
    assert np.abs(hand["embedding"][1] - in_box([40, 50, 160, 170])).max() < 1e-4
    assert not np.allclose(hand["embedding"][1], emb["embedding"][1])


SLOW = ["--upsample", 1]  # HOG on a 2x copy: slower, a wider window to kill the run in


def test_killed_run_resumes_and_gives_the_same_embeddings(crops, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run("embed.py", "--crops", crops, "--out", whole, "--splits", "train", "--workers", 2, "--chunk", 2, *SLOW)
    cmd = [sys.executable, str(REPO / "embed.py"), "--crops", str(crops), "--out", str(killed), "--splits", "train",
           "--workers", "1", "--chunk", "2", *map(str, SLOW)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(killed.glob("chunks/train_*.npz"))) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, "embed.py ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("chunks/train_*.npz")))
    assert not (killed / "train.npz").exists() and 3 <= done < 11  # 21 crops: 11 chunks

    rerun = run("embed.py", "--crops", crops, "--out", killed, "--splits", "train", "--workers", 1, "--chunk", 2, *SLOW)
    assert f"train: {done} chunks already done, {11 - done} to go" in rerun.stdout
    a, b = load(whole / "train.npz"), load(killed / "train.npz")
    assert a["image_id"].tolist() == b["image_id"].tolist() and len(a["image_id"]) == 21
    assert np.abs(a["embedding"] - b["embedding"]).max() < 1e-6 and (a["face_found"] == b["face_found"]).all()
    assert not list(killed.glob("chunks/*")) and not list(killed.glob(".*.tmp*"))

    # done: a third run does nothing but date the file (else make, seeing it older than new flags that change no
    # setting, would run the stage at every call); --shots unmasked embeds the `normal` shots only
    os.utime(killed / "train.npz", (0, 0))
    again = run("embed.py", "--crops", crops, "--out", killed, "--splits", "train", "--workers", 1, "--chunk", 2, *SLOW)
    assert "train: embeddings already done" in again.stdout and "embed train" not in again.stderr
    assert (killed / "train.npz").stat().st_mtime > time.time() - 600
    assert np.array_equal(load(killed / "train.npz")["embedding"], b["embedding"])
    normal = tmp_path / "normal"
    run("embed.py", "--crops", crops, "--out", normal, "--splits", "train", "--shots", "unmasked", "--workers", 1,
        *SLOW)  # fmt: skip
    n = load(normal / "train.npz")
    assert n["image_id"].tolist() == [f"{p.split('_')[0]}/normal" for p in PERSONS]
    rows = [a["image_id"].tolist().index(i) for i in n["image_id"]]
    assert np.abs(n["embedding"] - a["embedding"][rows]).max() < 1e-6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--models", "/nonexistent"], "shape_predictor_5_face_landmarks.dat"),
        (["--fallback-box", "0.5 0.5 0.2 0.9"], "four fractions"),
        (["--crops", "/nonexistent"], "run preprocess.py first"),
        (["--jitters", "2"], "--backend dlib"),
    ],
)
def test_bad_input_is_one_line(crops, tmp_path, flags, message):
    args = ["--crops", crops, "--out", tmp_path / "e", "--splits", "eval", "--workers", 1, *flags]
    proc = run("embed.py", *args, check=False)
    assert proc.returncode == 2 and message in last_line(proc.stderr) and "Traceback" not in proc.stderr


def test_help():
    proc = run("embed.py", "--help")
    assert "--fallback-box" in proc.stdout and "--workers" in proc.stdout
