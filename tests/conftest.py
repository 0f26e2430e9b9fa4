"""Helpers shared by the tests: run a stage script as a user would, and build tiny data sets."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench" / "utkmask"
SHOTS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")

sys.path.insert(0, str(REPO))

needs_bench = pytest.mark.skipif(not (BENCH / "train" / "train.csv").is_file(), reason="../shared/bench not here")


def run(script, *args, check=True, timeout=900):
    """Run `python script args...` from the repository root; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_image(path, colour=(120, 80, 60), size=(24, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_layout(root, persons, shots=SHOTS, ext=".jpg"):
    """DATA/train in the competition layout: persons = [(id, gender, race, age), ...]."""
    rows = ["id,gender,race,age,path"]
    for pid, gender, race, age in persons:
        folder = f"{pid}_{gender}_{race}_{age}"
        rows.append(f"{pid},{gender},{race},{age},{folder}")
        for k, shot in enumerate(shots):
            write_image(root / "train" / "images" / folder / f"{shot}{ext}", colour=(10 * k, 100, 150))
    (root / "train" / "train.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo generator's data set, small: 24 train persons, 6 eval persons."""
    out = tmp_path_factory.mktemp("demo") / "data"
    run("tools/make_demo_data.py", "--out", out, "--persons", 24, "--eval-persons", 6, "--seed", 1)
    return out


def lines(text):
    return [line for line in text.strip().splitlines() if line.strip()]


def last_line(text):
    return lines(text)[-1] if lines(text) else ""


def image_array(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
