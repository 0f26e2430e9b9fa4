"""preprocess.py: real MTCNN and real rembg on a real face, the packed cache, resuming, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BENCH, REPO, SHOTS, image_array, last_line, make_layout, needs_bench, run
from PIL import Image
from skimage import data as skdata

from faces import NEUTRAL, face_detector


def astronaut_layout(root):
    """skimage's astronaut photo placed into the competition layout (train and eval)."""
    photo = Image.fromarray(skdata.astronaut())
    folder = root / "train" / "images" / "000001_female_White_47"
    folder.mkdir(parents=True)
    for shot in SHOTS:
        photo.save(folder / f"{shot}.jpg", quality=95)
    csv = "id,gender,race,age,path\n000001,female,White,47,000001_female_White_47\n"
    (root / "train" / "train.csv").write_text(csv)
    (root / "eval" / "images").mkdir(parents=True)
    photo.save(root / "eval" / "images" / "face.jpg", quality=95)
    (root / "eval" / "info.csv").write_text("ImageID,ans\nface.jpg,0\n")
    return root


def is_neutral(pixels, tol=8):
    return np.abs(pixels.astype(int) - np.array(NEUTRAL)).sum(-1) <= tol


def test_real_face_is_found_cropped_and_its_background_replaced(tmp_path):
    root = astronaut_layout(tmp_path / "data")
    proc = run("preprocess.py", "--data", root, "--out", tmp_path / "crops", "--workers", 1, "--size", 160)
    raw_proc = run(
        "preprocess.py", "--data", root, "--out", tmp_path / "raw", "--workers", 1, "--size", 160, "--bg", "none"
    )
    index = pd.read_csv(tmp_path / "crops" / "eval.csv")
    assert index.loc[0, "face_found"] and index.loc[0, "face_conf"] > 0.99
    x0, y0, x1, y1 = map(int, index.loc[0, "box"].split())
    # the astronaut's face is at about (181, 62)-(268, 172) in the 512 x 512 photo: inside the square
    assert x0 < 181 and y0 < 62 and x1 > 268 and y1 > 172 and (x1 - x0) < 300

    crop = image_array(tmp_path / "crops" / "eval" / "face.png")
    raw = image_array(tmp_path / "raw" / "eval" / "face.png")
    assert crop.shape == (160, 160, 3)
    # the detector finds the face again in the crop, large and central
    boxes, probs = face_detector().detect(Image.fromarray(crop))
    bx0, by0, bx1, by1 = boxes[int(np.argmax(probs))]
    assert probs.max() > 0.99 and bx1 - bx0 > 50 and abs((bx0 + bx1) / 2 - 80) < 25
    # background (top corners, beside the hair) became the neutral colour; the face kept its pixels
    corners = np.concatenate([crop[:12, :12].reshape(-1, 3), crop[:12, -12:].reshape(-1, 3)])
    assert is_neutral(corners).mean() > 0.9
    assert is_neutral(raw[:12, :12].reshape(-1, 3)).mean() < 0.1
    face = (slice(int(by0) + 10, int(by1) - 10), slice(int(bx0) + 10, int(bx1) - 10))
    assert not is_neutral(crop[face]).any()
    assert np.abs(crop[face].astype(int) - raw[face]).mean() < 3
    # the index says how much was replaced: the neutral share of the crop (the raw photo has next to none)
    replaced = index.loc[0, "bg_replaced"]
    assert 0.1 < replaced < 0.7 and abs(replaced - is_neutral(crop).mean()) < 0.05
    assert "eval: background replaced in" in proc.stdout and "--bg none makes" not in proc.stdout
    assert pd.read_csv(tmp_path / "raw" / "eval.csv").loc[0, "bg_replaced"] == 0
    assert "background replaced" not in raw_proc.stdout


@needs_bench
def test_photos_framed_at_the_face_get_the_hint_that_rembg_does_nothing(tmp_path):
    # UTKFace's aligned crops (the bench set) are framed at the face: u2netp keeps the whole frame
    person = pd.read_csv(BENCH / "train" / "train.csv", dtype=str).iloc[:1]
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    person.to_csv(root / "train" / "train.csv", index=False)
    folder = person.loc[0, "path"]
    shutil.copytree(BENCH / "train" / "images" / folder, root / "train" / "images" / folder)
    proc = run("preprocess.py", "--data", root, "--out", tmp_path / "crops", "--workers", 1, "--splits", "train")
    index = pd.read_csv(tmp_path / "crops" / "train.csv")
    assert len(index) == 7 and index["bg_replaced"].max() < 0.01
    assert "train: background replaced in 0." in proc.stdout and "--bg none makes the same crops" in proc.stdout


def test_demo_data_end_to_end_with_workers(demo_data, tmp_path):
    out = tmp_path / "crops"
    proc = run("preprocess.py", "--data", demo_data, "--out", out, "--workers", 2, "--size", 64, "--preview", 8)
    train, evals = pd.read_csv(out / "train.csv", dtype=str), pd.read_csv(out / "eval.csv", dtype=str)
    assert len(train) == 24 * 7 and len(evals) == 6 * 7
    assert {"image_id", "person_id", "file", "label", "face_found", "box"} <= set(train.columns)
    cache = np.load(out / "train_u8.npy", mmap_mode="r")
    assert cache.shape == (168, 64, 64, 3) and cache.dtype == np.uint8
    for row in (0, 77, 167):  # cache rows follow the index order
        assert np.array_equal(cache[row], image_array(out / train.loc[row, "file"]))
    eval_cache = np.load(out / "eval_u8.npy", mmap_mode="r")
    info = pd.read_csv(demo_data / "eval" / "info.csv")
    assert evals["image_id"].tolist() == info["ImageID"].tolist() and eval_cache.shape[0] == len(info)
    assert (out / "preview.png").stat().st_size > 10_000
    assert "report:" in proc.stdout and "relabel: 0 fixes applied" in proc.stdout


def test_rerun_skips_finished_crops_and_changed_settings_redo_them(demo_data, tmp_path):
    out = tmp_path / "crops"
    args = ["--data", demo_data, "--out", out, "--workers", 1, "--size", 48, "--bg", "none", "--splits", "train"]
    run("preprocess.py", *args)
    first = np.load(out / "train_u8.npy").copy()
    for f in list((out / "train").rglob("*.png"))[:5]:
        f.unlink()
    proc = run("preprocess.py", *args)
    assert "163 crops already done, 5 to go" in proc.stdout
    assert np.array_equal(first, np.load(out / "train_u8.npy"))
    # the same photos elsewhere: kept; a new photo under an old name: cropped again (the crop records its photo's sha1)
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    train = pd.read_csv(out / "train.csv", dtype=str)
    replaced = Path(train.loc[0, "source"].replace(str(demo_data), str(data)))
    replaced.write_bytes(Path(train.loc[9, "source"]).read_bytes())
    proc = run("preprocess.py", "--data", data, *args[2:])
    assert "167 crops already done, 1 to go" in proc.stdout
    again = np.load(out / "train_u8.npy")
    assert np.array_equal(again[1:], first[1:]) and np.array_equal(again[0], first[9])
    proc = run("preprocess.py", *args[:-4], "--margin", "0.3", "--bg", "none", "--splits", "train")
    assert "already done" not in proc.stdout


def test_kill_midway_then_rerun_gives_identical_output(demo_data, tmp_path):
    args = ["--data", demo_data, "--workers", 1, "--size", 48, "--bg", "none", "--splits", "train"]
    run("preprocess.py", *args, "--out", tmp_path / "whole")
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "preprocess.py"), *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.rglob("*.png"))) < 40 and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train.csv").exists()  # nothing make could take for finished
    assert len(list(out.rglob("*.png"))) < 168
    rerun = run("preprocess.py", *args, "--out", out)
    assert "crops already done" in rerun.stdout
    assert (out / "train.csv").read_bytes() == (tmp_path / "whole" / "train.csv").read_bytes().replace(
        b"/whole/", b"/killed/"
    ) or pd.read_csv(out / "train.csv").drop(columns="source").equals(
        pd.read_csv(tmp_path / "whole" / "train.csv").drop(columns="source")
    )
    assert np.array_equal(np.load(out / "train_u8.npy"), np.load(tmp_path / "whole" / "train_u8.npy"))
    assert not list(out.rglob("*.tmp*"))


def odd_images_layout(root):
    """One person whose shots are the formats real photo folders hold."""
    root = make_layout(root, [("000001", "female", "Asian", 45), ("000002", "male", "Asian", 61)])
    person = root / "train" / "images" / "000001_female_Asian_45"
    portrait = np.zeros((96, 64, 3), np.uint8)
    portrait[:48] = (255, 0, 0)  # red top, blue bottom
    portrait[48:] = (0, 0, 255)
    Image.fromarray(portrait[:, :, 0]).save(person / "mask1.jpg")  # greyscale
    Image.fromarray(portrait).convert("CMYK").save(person / "mask2.jpg")  # CMYK
    rotated = Image.fromarray(portrait).rotate(180)  # stored upside down, EXIF says turn it
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated.save(person / "mask3.jpg", exif=exif.tobytes())
    Image.fromarray(portrait).save(person / "mask4.jpg", quality=95)
    whole = (person / "mask4.jpg").read_bytes()
    (person / "mask5.jpg").write_bytes(whole[: len(whole) * 9 // 10])  # truncated: header fine, data cut
    (person / "normal.jpg").write_bytes(b"")  # zero bytes
    Image.new("RGB", (1, 1)).save(person / "incorrect_mask.jpg")  # 1x1
    return root


def test_odd_formats_are_read_and_broken_files_reported(tmp_path):
    root = odd_images_layout(tmp_path / "data")
    out = tmp_path / "crops"
    proc = run("preprocess.py", "--data", root, "--out", out, "--workers", 1, "--size", 32, "--bg", "none",
               "--splits", "train")  # fmt: skip
    index = pd.read_csv(out / "train.csv", dtype=str)
    shots = set(index.loc[index["person_id"] == "000001", "shot"])
    assert shots == {"mask1", "mask2", "mask3", "mask4"}
    report = pd.read_csv(out / "train_report.csv")
    bad = dict(zip(report["where"].str.split("/").str[-1], report["message"]))
    assert set(bad) == {"mask5.jpg", "normal.jpg", "incorrect_mask.jpg"}
    assert "cannot decode" in bad["mask5.jpg"] and "zero-byte" in bad["normal.jpg"]
    assert "1x1" in bad["incorrect_mask.jpg"]
    assert "3 bad_image" in proc.stdout
    cache = np.load(out / "train_u8.npy")
    assert cache.shape[0] == len(index) == 11
    rows = index.reset_index().set_index("image_id")["index"].astype(int)
    upright = cache[rows["000001/mask4"]]
    assert np.array_equal(cache[rows["000001/mask3"]][2, 16] > 128, upright[2, 16] > 128)  # EXIF applied
    assert upright[2, 16, 0] > 200 and upright[-3, 16, 2] > 200  # red on top, blue below
    assert cache[rows["000001/mask2"]][2, 16, 0] > 200  # CMYK converted to RGB
    assert cache[rows["000001/mask1"]].std(axis=2).max() == 0  # greyscale: three equal channels


def test_fail_policy_is_one_line_and_exit_code_2(tmp_path):
    root = odd_images_layout(tmp_path / "data")
    proc = run("preprocess.py", "--data", root, "--out", tmp_path / "crops", "--workers", 1, "--bg", "none",
               "--splits", "train", "--on-bad", "fail", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("error: ") and "000001_female_Asian_45/" in last_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "crops" / "train.csv").exists()


def test_broken_eval_image_keeps_its_row(tmp_path):
    root = astronaut_layout(tmp_path / "data")
    (root / "eval" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (root / "eval" / "info.csv").write_text("ImageID,ans\nbroken.jpg,0\nface.jpg,0\n")
    out = tmp_path / "crops"
    run("preprocess.py", "--data", root, "--out", out, "--workers", 1, "--size", 32, "--bg", "none", "--splits", "eval")
    index = pd.read_csv(out / "eval.csv")
    assert index["image_id"].tolist() == ["broken.jpg", "face.jpg"]
    assert index["bad"].tolist() == [True, False]
    assert is_neutral(np.load(out / "eval_u8.npy")[0].reshape(-1, 3)).all()


BAD_MODELS = [(["--bg-model", "nope"], "not a rembg model"), (["--bg-model", "silueta"], "not found under U2NET_HOME")]


@pytest.mark.parametrize("flag, message", BAD_MODELS)
def test_unusable_background_model_is_one_line(tmp_path, flag, message):
    root = astronaut_layout(tmp_path / "data")
    proc = run("preprocess.py", "--data", root, "--out", tmp_path / "c", *flag, check=False)
    assert proc.returncode == 2 and message in last_line(proc.stderr) and "Traceback" not in proc.stderr
