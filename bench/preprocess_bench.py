"""Preprocessing speed: preprocess.py against a naive sequential loop, measured in one run.

    python bench/preprocess_bench.py --data ../shared/bench/utkmask --persons 50

Naive: for each image, one after the other, rembg.remove() on the full photo (rembg's
u2netp model at its fixed 320 input) and MTCNN.detect() on the full photo, crop, save.
Ours: preprocess.py as a user runs it (all cores, detector on a small copy, u2netp at 192,
worker start-up included). Prints images/second for both, the ratio, and the time the whole
train + eval set would take at our rate.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from table import bench_rows  # noqa: E402

from faces import crop_square, face_square, fallback_square, rembg_home  # noqa: E402
from rawdata import read_train  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "bench" / "utkmask"))
parser.add_argument("--persons", type=int, default=50, help="persons of the train split to time (7 images each)")
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
args = parser.parse_args()

images, _, _ = read_train(args.data)
persons = sorted(images["person_id"].unique())[: args.persons]
subset = images[images["person_id"].isin(persons)]
n = len(subset)
total = len(images) + sum(1 for f in (Path(args.data) / "eval" / "images").iterdir() if not f.name.startswith("."))
work = Path(tempfile.mkdtemp(prefix="prep_bench_"))

# ---- ours: preprocess.py on a data folder holding the subset (symlinks) ----
data = work / "data" / "train"
(data / "images").mkdir(parents=True)
rows = ["id,gender,race,age,path"]
src_csv = (Path(args.data) / "train" / "train.csv").read_text().splitlines()[1:]
for line in src_csv:
    pid, folder = line.split(",")[0], line.split(",")[-1]
    if pid in persons:
        rows.append(line)
        (data / "images" / folder).symlink_to(Path(args.data).resolve() / "train" / "images" / folder)
(data / "train.csv").write_text("\n".join(rows) + "\n")
cmd = [sys.executable, str(HERE.parent / "preprocess.py"), "--data", str(work / "data"), "--out", str(work / "ours")]
cmd += ["--splits", "train", "--size", str(args.size)]
t = time.perf_counter()
subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
ours_s = time.perf_counter() - t
ours = n / ours_s
# the same command on one person: start-up (imports, model loading, reading the layout) plus 7 images
keep = rows[:2]
(data / "train.csv").write_text("\n".join(keep) + "\n")
t = time.perf_counter()
subprocess.run(cmd[:-6] + ["--out", str(work / "one")] + cmd[-4:], check=True, stdout=subprocess.DEVNULL)
startup_s = time.perf_counter() - t
steady = (n - 7) / max(ours_s - startup_s, 1e-6)

# ---- naive: the sequential loop the seeds ran ----
rembg_home()
import rembg  # noqa: E402
from facenet_pytorch import MTCNN  # noqa: E402

u2netp = rembg.new_session("u2netp")
detector = MTCNN(keep_all=True)
out = work / "naive"
out.mkdir()
t = time.perf_counter()
for k, source in enumerate(subset["source"]):
    photo = Image.open(source).convert("RGB")
    # rembg.remove(data, alpha_matting, its two thresholds, erode size, the model to run, ...): defaults, then u2netp
    cutout = rembg.remove(photo, False, 240, 10, 10, u2netp, bgcolor=(124, 116, 104, 255)).convert("RGB")
    boxes, probs = detector.detect(photo)
    rgb = np.asarray(cutout)
    box = face_square(boxes[int(np.argmax(probs))], *photo.size) if boxes is not None else fallback_square(*photo.size)
    Image.fromarray(crop_square(rgb, box, args.size)).save(out / f"{k}.png")
naive = n / (time.perf_counter() - t)

shutil.rmtree(work)
print(f"images timed: {n} (train persons {len(persons)})")
print(f"naive sequential : {naive:6.2f} img/s")
print(f"preprocess.py    : {ours:6.2f} img/s  (workers: all cores)")
print(f"ratio            : {ours / naive:6.2f}x  (start-up {startup_s:.1f} s included)")
print(f"steady state     : {steady:6.2f} img/s, {steady / naive:.2f}x naive (start-up taken out)")
ours_min, naive_min = (startup_s + total / steady) / 60, total / naive / 60
print(f"whole set ({total} images): ours {ours_min:.1f} min; naive {naive_min:.1f} min")
bench_rows(args.table, [
    (f"preprocess, {n} bench images: ours / naive sequential", f"{ours:.1f} / {naive:.1f} img/s = {ours / naive:.2f}x"),
    ("preprocess, steady state (start-up out)", f"{steady:.1f} img/s = {steady / naive:.2f}x naive"),
    (f"preprocess, whole set of {total} images (estimate)", f"ours {ours_min:.1f} min, naive {naive_min:.1f} min"),
])  # fmt: skip
