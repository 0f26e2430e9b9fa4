"""Reading the competition's layout: DATA/train (train.csv + a folder of seven shots per person), DATA/eval
(info.csv + images), the label fixes of relabel.csv, and answer files. Problems are collected for the report
or stop the run (--on-bad fail) as one line."""

import os
from pathlib import Path

import pandas as pd

from common import GENDER_WORDS, GENDERS, IMAGE_EXTS, NUM_CLASSES, SHOTS, InputError, age_band, class_id


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
            raise InputError(f"{where}: {message}")

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
    except (pd.errors.ParserError, pd.errors.EmptyInputError, UnicodeDecodeError) as e:
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
    or stop the run with a InputError (on_bad='fail'). `relabel` is a CSV of label fixes
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
        raise InputError(f"{path}: column ans must hold class numbers 0-17") from None
    if not ans.between(0, NUM_CLASSES - 1).all():
        raise InputError(f"{path}: column ans must hold class numbers 0-17")
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
