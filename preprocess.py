"""Crop every photo to the face, remove the background, and pack the crops for training.

    python preprocess.py --data DATA --out WORK/crops --size 256 --preview 16

For each train and eval image: MTCNN finds the face on a downscaled copy, a square with a
margin (chin, mask, hair) is cut and resized to --size, rembg's u2netp replaces the
background by a neutral colour, and the crop is saved as a PNG that records its box. Writes

    WORK/crops/train/<person_id>/<shot>.png, WORK/crops/eval/<name>.png   the crops
    WORK/crops/train_u8.npy, eval_u8.npy    packed uint8 (N, size, size, 3), rows in index order
    WORK/crops/train.csv, eval.csv          index: image_id, person_id, file, labels, face_found, box, bg_replaced
    WORK/crops/train_report.csv, eval_report.csv   every bad file, row and folder, and what was done with it
    WORK/crops/preview.png                  with --preview N: originals beside their crops

Parallel over --workers processes; a rerun keeps the finished crops: those of the same photo (its sha1) with the
same settings. --splits eval redoes the eval set alone (make does, for new eval photos: no model trains again).
2-core CPU: the 11,200 images of the utkmask bench in about 13 minutes on an Intel one (AMX), 30 on an AMD
EPYC (AVX2), where u2netp takes 90 % of the time (208 ms per image on one core; bench/preprocess_bench.py).
Those photos are framed at the face and u2netp keeps the whole frame (0.1 % of each crop replaced): --bg none
makes the same crops in 4 minutes there. A run prints the share replaced (column bg_replaced) and, under 1 %, that hint.
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import InputError, atomic_path, positive_int, run_main, save_csv
from faces import NEUTRAL, background_remover, face_detector, load_rgb, prepare_face
from rawdata import read_eval, read_train

HERE = Path(__file__).resolve().parent

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default="DATA", help="data folder in the competition layout (train/ and eval/)")
parser.add_argument("--out", default="WORK/crops", help="output folder")
parser.add_argument("--size", type=positive_int, default=256, help="side of the square crops, pixels")
parser.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="processes (1: run in this process)")
parser.add_argument("--bg", choices=["rembg", "none"], default="rembg", help="remove the background, or keep it")
parser.add_argument("--bg-model", default="u2netp", help="rembg model name; its .onnx must be in U2NET_HOME")
parser.add_argument("--bg-size", type=int, default=192, help="u2net input side (0: rembg's own, any model)")
parser.add_argument("--bg-context", type=float, default=0.25, help="border the segmenter sees around a crop")
parser.add_argument("--margin", type=float, default=0.6, help="crop side = (1 + margin) x the face box's longer side")
parser.add_argument("--detect-size", type=positive_int, default=128, help="longest side of the copy the detector sees")
parser.add_argument("--min-conf", type=float, default=0.9, help="detections below this confidence count as no face")
parser.add_argument("--on-bad", choices=["skip", "fail"], default="skip", help="bad input: report and skip, or stop")
parser.add_argument("--relabel", default=str(HERE / "relabel.csv"), help="label fixes CSV, or 'none'")
parser.add_argument("--preview", type=int, default=0, help="write preview.png with N originals beside their crops")
parser.add_argument("--splits", nargs="+", choices=["train", "eval"], default=["train", "eval"], help="what to do")

# what a crop depends on: a crop made with other settings is redone, not reused
CROP_SETTINGS = ("size", "bg", "bg_model", "bg_size", "bg_context", "margin", "detect_size", "min_conf")


# ---- the work on one image (runs in the worker processes) ---------------------------
worker = {}


def init_worker(settings):
    import torch

    torch.set_num_threads(1)  # one thread per process: processes scale better than threads here
    worker["settings"] = settings
    worker["detector"] = face_detector()
    worker["bg_alpha"] = (
        background_remover(settings["bg_model"], settings["bg_size"]) if settings["bg"] == "rembg" else None
    )


def process(job):
    """(row, source, dest, the source's sha1) -> (row, crop or None, info). The PNG is the unit of work:
    written atomically with its info inside, so a rerun can take it as finished."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    row, source, dest, source_sha1 = job
    s = worker["settings"]
    rgb, err = load_rgb(source)
    if err:
        return row, None, dict(error=err)
    crop, info = prepare_face(
        rgb,
        worker["detector"],
        worker["bg_alpha"],
        s["size"],
        s["margin"],
        s["detect_size"],
        s["min_conf"],
        s["bg_context"],
    )
    info["source_sha1"] = source_sha1
    meta = PngInfo()
    meta.add_text("maskcls", json.dumps(dict(info, settings=s)))
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        Image.fromarray(crop).save(tmp, format="PNG", pnginfo=meta, compress_level=1)  # fast; size is not the point
    return row, crop, info


def file_sha1(path):
    """A photo's fingerprint: a crop is kept only for the same photo (a new photo under an old name is cropped)."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError:  # (a file that cannot be read is reported where it is cropped)
        return ""


def finished_crop(dest, settings, source_sha1):
    """Info of a crop made earlier from the same photo with the same settings, else None."""
    from PIL import Image

    try:
        with Image.open(dest) as im:
            meta = json.loads(im.text.get("maskcls", "{}"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("settings") == settings and meta.get("source_sha1") == source_sha1 else None


def crop_split(split, table, out, settings, pool, problems):
    """Crop every image of one split; returns the index with crop info (rows in cache order)."""
    from PIL import Image

    table = table.reset_index(drop=True)
    if split == "train":
        table["file"] = [f"train/{pid}/{shot}.png" for pid, shot in zip(table["person_id"], table["shot"])]
    else:
        table["file"] = ["eval/" + Path(i).stem + ".png" for i in table["image_id"]]
    size = settings["size"]
    cache_path = out / f"{split}_u8.npy"
    info = [None] * len(table)
    with atomic_path(cache_path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(table), size, size, 3))
        todo = []
        for row, file in enumerate(table["file"]):
            source_sha1 = file_sha1(table.at[row, "source"])
            done = finished_crop(out / file, settings, source_sha1)
            if done:
                info[row] = done
                with Image.open(out / file) as im:
                    cache[row] = np.asarray(im.convert("RGB"))
            else:
                todo.append((row, table.at[row, "source"], str(out / file), source_sha1))
        if len(todo) < len(table):
            print(f"{split}: {len(table) - len(todo)} crops already done, {len(todo)} to go")
        bar = tqdm(total=len(todo), desc=f"crop {split}", unit="img", smoothing=0.05)
        results = pool.imap_unordered(process, todo, chunksize=4) if pool else map(process, todo)
        try:
            for row, crop, row_info in results:
                if crop is None:
                    where = table.at[row, "source"]
                    problems.add("bad_image", where, row_info["error"])  # raises with --on-bad fail
                    if split == "eval":  # the submission needs a row: predict from a blank crop
                        crop, row_info = np.full((size, size, 3), NEUTRAL, np.uint8), dict(face_found=False)
                    row_info["bad"] = True
                info[row] = row_info
                if crop is not None:
                    cache[row] = crop
                bar.update()
        finally:
            bar.close()
        cache.flush()
        del cache
        bad = np.array([bool(i.get("bad")) for i in info])
        if split == "train" and bad.any():  # drop the rows that have no crop, in the cache too
            keep = np.flatnonzero(~bad)
            full = np.load(tmp, mmap_mode="r")
            with atomic_path(tmp) as tmp2:
                np.save(tmp2, np.ascontiguousarray(full[keep]))
            del full
            table, info = table.iloc[keep].reset_index(drop=True), [info[i] for i in keep]
    table["face_found"] = [bool(i.get("face_found")) for i in info]
    table["face_conf"] = [i.get("face_conf", 0.0) for i in info]
    table["box"] = [i.get("box", "") for i in info]
    table["bg_replaced"] = [i.get("bg_replaced", np.nan) for i in info]  # (crops made before it was measured)
    if split == "eval":
        table["bad"] = [bool(i.get("bad")) for i in info]
    return table


def preview(out, table, n, seed=0):
    """Contact sheet: n random originals (face square drawn in) beside their crops."""
    from PIL import Image, ImageDraw

    rows = table.sample(n=min(n, len(table)), random_state=seed)
    cell, cols = 160, 4
    sheet = Image.new("RGB", (cols * 2 * cell, -(-len(rows) // cols) * cell), (255, 255, 255))
    for k, (_, r) in enumerate(rows.iterrows()):
        with Image.open(r["source"]) as im:
            original = im.convert("RGB")
        scale = cell / max(original.size)
        x0, y0, x1, y1 = (float(v) * scale for v in r["box"].split()) if r["box"] else (0, 0, 0, 0)
        original = original.resize((round(original.width * scale), round(original.height * scale)))
        d = ImageDraw.Draw(original)
        d.rectangle([x0, y0, x1, y1], outline=(0, 255, 0) if r["face_found"] else (255, 0, 0), width=2)
        with Image.open(out / r["file"]) as im:
            crop = im.convert("RGB").resize((cell, cell))
        x, y = (k % cols) * 2 * cell, (k // cols) * cell
        sheet.paste(original, (x + (cell - original.width) // 2, y + (cell - original.height) // 2))
        sheet.paste(crop, (x + cell, y))
    with atomic_path(out / "preview.png") as tmp:
        sheet.save(tmp, format="PNG")


def main():
    args = parser.parse_args()
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in CROP_SETTINGS}
    relabel = None if args.relabel == "none" else args.relabel
    if relabel and not Path(relabel).is_file():
        raise InputError(f"--relabel {relabel}: file not found")
    if args.bg == "rembg":
        background_remover(args.bg_model, args.bg_size)  # fails here, once, on a missing model
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp*"):  # half-written files of a killed run: never renamed, never used
        stale.unlink()

    # ---- read the data layout ----
    tables, problems = {}, {}
    if "train" in args.splits:
        tables["train"], problems["train"], changes = read_train(args.data, args.on_bad, relabel)
        print(f"train: {tables['train']['person_id'].nunique()} persons, {len(tables['train'])} images")
        print(f"relabel: {len(changes)} fixes applied" + "".join(f"\n  {c}" for c in changes))
    if "eval" in args.splits:
        tables["eval"], problems["eval"] = read_eval(args.data, args.on_bad)
        print(f"eval: {len(tables['eval'])} images")

    # ---- crop (train first; eval.csv is written last, so its presence means all is done) ----
    if args.workers > 1:  # one pool for both splits: each worker loads the models once
        pool = mp.get_context("spawn").Pool(args.workers, initializer=init_worker, initargs=(settings,))
    else:
        pool = None
        init_worker(settings)
    try:
        for split, table in tables.items():
            index = crop_split(split, table, out, settings, pool, problems[split])
            found = index["face_found"].mean() if len(index) else 0
            print(f"{split}: faces found in {found:.1%}; {(~index['face_found']).sum()} fallback crops")
            if args.bg == "rembg" and index["bg_replaced"].notna().any():
                # photos already framed at the face (UTKFace's): u2netp keeps the whole frame, its time buys nothing
                replaced = index["bg_replaced"].mean()
                hint = " (under 1%: --bg none makes the same crops without the slow part)" if replaced < 0.01 else ""
                print(f"{split}: background replaced in {replaced:.1%} of the crop area on average{hint}")
            save_csv(index, out / f"{split}.csv")
            tables[split] = index
    finally:
        for split, found in problems.items():  # a report a split, as either split can be redone alone
            save_csv(found.frame(), out / f"{split}_report.csv")
        if pool is not None:
            pool.terminate()
    for split, found in problems.items():
        print(f"{split} report: {found.summary()} (details in {out / f'{split}_report.csv'})")
    if args.preview and "train" in tables:
        preview(out, tables["train"], args.preview)
        print(f"wrote {out / 'preview.png'}")


if __name__ == "__main__":
    run_main(main)
