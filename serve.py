"""Two browser pages for a trained run: predict a photo, and audit the training labels.

    python serve.py --run WORK/runs/single            (or: make serve RUN=WORK/runs/single)
    -> http://127.0.0.1:8000/ (predict) and http://127.0.0.1:8000/audit

Predict: drop a photo. It is cropped to the face and its background removed as preprocess.py made the
training crops (the settings are read off the crops folder's PNGs, as inference.py --image reads them),
predicted by the run's models averaged (TTA as --tta), and shown with the 18-class answer, bars for the
mask / gender / age band probabilities, and a Grad-CAM heat map (captum) of where the models looked.
Audit: the training persons whose out-of-fold predictions (RUN/fold*/oof.npz) confidently disagree with
their labels, ranked, as a contact sheet. One click marks a fix (gender, age, two swapped shots); every
change rewrites RUN/relabel_draft.csv (atomically) in relabel.csv's format, id,field,old,new,note: the
--relabel fixes the crops were made with first, then the marks. Review it, then
    python preprocess.py --data DATA --out WORK/crops --relabel WORK/runs/single/relabel_draft.csv
Safe on a shared machine: listens on 127.0.0.1 only (--host to change), refuses uploads over
--max-upload-mb before reading past the limit, decodes them in memory (nothing written to disk), and
never uses a client's file name. Other users of the same machine can still reach 127.0.0.1.
--embedding WORK/submission_embedding.npz (make serve passes it when it exists): dlib's face embedding, or the
fine-tuned face networks the file names, votes on gender and age as in ensemble.py (stacking.py).
2-core AMD EPYC (shared), 6 tf_efficientnet_lite0 models at 128 px, flip TTA: 2.2 photos/s, p95 0.48 s with one
client (face crop 0.18 s, models 0.14 s, heat map 0.08 s); RSS flat at 1.4 GB (bench/serve_bench.py).
"""

import argparse
import asyncio
import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch

import faceembed
import stacking
from batches import standardise, to_float
from common import (
    AGE_BANDS,
    GENDERS,
    MASK_STATES,
    SHOTS,
    InputError,
    age_band,
    class_name,
    make_env,
    positive_int,
    run_main,
    save_csv,
)
from faces import NEUTRAL, background_remover, crop_settings, crop_square, face_detector, load_rgb, prepare_face
from model import average_views, load_models, logprob_views, predict
from rawdata import Problems, read_csv_text, require_columns
from scores import load_logprobs

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", required=True, help="run folder written by a train_*.py script")
parser.add_argument("--crops", default=None, help="preprocess.py output (crop settings, the audit's crops); "
                    "default: the folder the run was trained on (its config.json), else WORK/crops")  # fmt: skip
parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed)")
parser.add_argument("--tta", choices=["none", "flip", "flip+shift"], default="flip", help="test-time augmentation")
parser.add_argument("--use-folds", default="all", help="models to average, as inference.py: all, cv, or 0,1,full")
parser.add_argument("--max-upload-mb", type=float, default=20, help="larger uploads are refused, unread")
parser.add_argument("--max-megapixels", type=float, default=40, help="larger images are refused before decoding")
parser.add_argument("--min-conf", type=float, default=0.7, help="audit: list a person when the model gives another "
                    "label this probability (mean over the person's shots), or a shot another class")  # fmt: skip
parser.add_argument("--audit-persons", type=positive_int, default=100, help="audit: most persons listed")
parser.add_argument("--relabel", default=str(HERE / "relabel.csv"), help="fixes the crops were made with (they "
                    "head the draft, so the draft can replace them), or none")  # fmt: skip
parser.add_argument("--draft", default=None, help="relabel draft the audit page writes (default RUN/relabel_draft.csv)")
parser.add_argument("--embedding", default=None, help="ensemble.py's _embedding.npz: dlib's embedding of the photo "
                    "votes on gender and age, as inference.py --image --embedding")  # fmt: skip
parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
parser.add_argument("--threads", type=positive_int, default=1, help="torch threads: one photo gains little from "
                    "more, and on a busy machine threads waiting on each other cost 10x (measured)")  # fmt: skip


# ---- the run: models, face detector and background remover, loaded once ---------------------
def load_state(args, run, crops, env):
    """Everything a request needs, built once: models, detector, segmenter, the audit and its draft."""
    # one thread runs every photo, in turn: the models' cores are the CPU's, more threads would only share them
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # (torch's thread count carries over)
    state = argparse.Namespace(args=args, run=run, crops=crops, env=env, worker=worker)
    state.models = load_models(run, env, args.use_folds)
    state.img_size = state.models[0].cfg.img_size
    state.settings, made = crop_settings(crops)
    print(f"crop settings from {made}" if made else f"{crops}: no crop to read settings from: preprocess.py defaults")
    state.detector = face_detector()
    s = state.settings
    state.bg = background_remover(s["bg_model"], s["bg_size"]) if s["bg"] == "rembg" else None
    state.max_upload = int(args.max_upload_mb * 2**20)
    state.stacker = stacking.load_stacker(args.embedding) if args.embedding else None
    state.face_models = faceembed.load_models(faceembed.model_folder()) if args.embedding else None
    state.tuned = stacking.tuned_named(state.stacker) if args.embedding else None
    state.audit = load_audit(run, crops, args.min_conf, args.audit_persons)
    draft_path = Path(args.draft) if args.draft else run / "relabel_draft.csv"
    state.draft = Draft(draft_path, None if args.relabel == "none" else Path(args.relabel))
    return state


# ---- predict one photo -------------------------------------------------------------------
def decode(data, max_pixels):
    """Upload bytes -> RGB array, in memory. The size is read off the header before any pixel is decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:  # PIL's own limit, over twice its 89 megapixels
        raise InputError(f"{str(e).split(',')[0]}: the limit is {max_pixels / 1e6:.0f} megapixels") from None
    except Exception as e:  # PIL raises many types for what is not an image
        raise InputError(f"not an image this page can read ({type(e).__name__}): send a JPEG or PNG photo") from None
    if w * h > max_pixels:
        raise InputError(f"the image is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels): the limit is "
                        f"{max_pixels / 1e6:.0f}; send a smaller copy")  # fmt: skip
    rgb, err = load_rgb(io.BytesIO(data))
    if err:
        raise InputError(f"not an image this page can read: {err}")
    return rgb


def grad_cam(models, small, cls, env):
    """Grad-CAM of class `cls` on each model's last feature map of its shared backbone (timm's
    feature_info names that stage), averaged over the models; 0..1 at the model's input size.
    captum's LayerGradCam takes a function of the input, so the dict that Net returns is turned into the
    18-class log-probabilities there. In fp32: one image, and the gradients are the product."""
    from captum.attr import LayerAttribution, LayerGradCam

    maps = []
    for fold_model in models:
        model, backbone = fold_model.model, fold_model.model.backbones["shared"]
        layer = backbone.get_submodule(backbone.feature_info[-1]["module"])
        x = standardise(to_float(torch.from_numpy(small[None].copy()), env), fold_model.mean, fold_model.std)
        if env.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cam = LayerGradCam(lambda x, model=model: logprob_views(model(x))["label"], layer)
        attribution = cam.attribute(x, target=cls, relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attribution.float(), small.shape[:2], "bilinear")[0, 0].detach())
    mean = torch.stack(maps).mean(0)
    return (mean / mean.max().clamp_min(1e-12)).cpu().numpy()


def heat_overlay(crop, cam):
    """The heat map (jet colours) laid over the crop, at the crop's size."""
    from matplotlib import colormaps
    from PIL import Image

    cam = np.asarray(Image.fromarray(cam.astype(np.float32)).resize(crop.shape[1::-1], Image.BILINEAR)).clip(0, 1)
    heat = colormaps["jet"](cam)[..., :3] * 255
    return (0.55 * crop + 0.45 * heat).round().astype(np.uint8)


def png_bytes(rgb):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def png_url(rgb):
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()


def predict_photo(state, data):
    """One upload -> the page's answer (a JSON-able dict). Runs on the one model thread (state.worker): one photo
    at a time on the CPU's cores and in memory, captum's hooks never meet another request's forward, and the
    memory the steps free stays in that thread's malloc arena for the next photo (RSS flat, bench/serve_bench.py)."""
    s, env = state.settings, state.env
    rgb = decode(data, state.args.max_megapixels * 1e6)
    t0 = time.perf_counter()
    crop, info = prepare_face(rgb, state.detector, state.bg, s["size"], s["margin"], s["detect_size"],
                              s["min_conf"], s["bg_context"])  # fmt: skip
    small = crop_square(crop, (0, 0, crop.shape[1], crop.shape[0]), state.img_size)  # as inference.py --image
    t1 = time.perf_counter()
    images = torch.from_numpy(small[None].copy())
    views = average_views([predict(m.model, images, torch.arange(1), env, m.mean, m.std, 1, state.args.tta)
                     for m in state.models])  # fmt: skip
    models_cls = int(views["label"][0].argmax())  # the heat map's class: the models' own answer, before any vote
    vote = ""
    if state.stacker:  # the face embedding's (or the fine-tuned networks') vote on gender and age
        views, found = stacking.vote_on_photo(state.stacker, state.face_models, views, crop, state.tuned)
        vote = stacking.vote_note(state.stacker, state.tuned, found)
    p = {k: np.exp(v[0]) for k, v in views.items()}
    cls = int(p["label"].argmax())
    t2 = time.perf_counter()
    cam = grad_cam(state.models, small, models_cls, env)
    t3 = time.perf_counter()
    note = "" if info["face_found"] else (
        "No face found: this is the fallback crop (the whole photo if about square, else its upper centre), "
        "so the answer is a guess. A photo with the face large and upright works best.")  # fmt: skip
    return dict(
        answer=dict(cls=cls, name=class_name(cls), p=round(float(p["label"][cls]), 4)),
        top=[
            dict(cls=int(c), name=class_name(c), p=round(float(p["label"][c]), 4))
            for c in p["label"].argsort()[::-1][:3]
        ],
        bars={
            task: [dict(name=n, p=round(float(v), 4)) for n, v in zip(names, p[task])]
            for task, names in (("mask", MASK_STATES), ("gender", GENDERS), ("age", AGE_BANDS))
        },
        face_found=info["face_found"],
        face_conf=info["face_conf"],
        note=note,
        vote=vote,
        crop=png_url(crop),
        cam=png_url(heat_overlay(crop, cam)),
        seconds=dict(prepare=round(t1 - t0, 3), predict=round(t2 - t1, 3), grad_cam=round(t3 - t2, 3)),
    )


# ---- audit: where the out-of-fold predictions disagree with the labels, per person ---------------
def load_audit(run, crops, min_conf, most):
    """The crops index, its cache (thumbnails), and the persons to list, ranked; a note instead where
    the run or the crops cannot give them (the predict page works without)."""
    audit = argparse.Namespace(persons=[], by_person={}, note="", index=None, cache=None, run_name=Path(run).name)
    index_path, cache_path = Path(crops) / "train.csv", Path(crops) / "train_u8.npy"
    oof_paths = sorted(Path(run).glob("fold*/oof.npz"))
    if not index_path.is_file() or not cache_path.is_file():
        audit.note = f"{index_path} or its cache not found: give --crops, the folder the run was trained on"
        return audit
    if not oof_paths:
        audit.note = f"no fold*/oof.npz in {run}: only cross-validation folds predict their training images"
        return audit
    index = pd.read_csv(index_path, dtype={"person_id": str, "image_id": str}, keep_default_na=False)
    cache = np.load(cache_path, mmap_mode="r")
    if cache.shape[0] != len(index):
        audit.note = f"{cache_path} has {cache.shape[0]} rows, {index_path} {len(index)}: rerun preprocess.py"
        return audit
    parts = [load_logprobs(p) for p in oof_paths]
    oof_ids = pd.Index(np.concatenate([z["image_id"] for z in parts]))
    views = {k: np.concatenate([z[f"logp_{k}"] for z in parts]) for k in ("label", "mask", "gender", "age")}
    where = pd.Series(np.arange(len(oof_ids)), index=oof_ids)
    where = where[~where.index.duplicated()]
    seen = index[index["image_id"].isin(where.index)]  # training images some fold held out
    probs = {k: np.exp(v[where.loc[seen["image_id"]].to_numpy()]) for k, v in views.items()}
    seen = seen.assign(row=seen.index).reset_index(drop=True)  # row: the image's row in the index and cache
    persons = []
    for person_id, shots in seen.groupby("person_id", sort=False):
        person = audit_person(person_id, shots, {k: v[shots.index] for k, v in probs.items()}, min_conf)
        persons.append(person)
    listed = sorted((p for p in persons if p["score"] >= min_conf), key=lambda p: -p["score"])[:most]
    audit.persons, audit.index, audit.cache = listed, index, cache
    audit.by_person = {p["person_id"]: p for p in persons}
    audit.note = (f"{len(seen)} training images of {len(persons)} persons have out-of-fold predictions; "
                  f"{len(listed)} persons listed (--min-conf {min_conf}, at most {most})")  # fmt: skip
    return audit


def audit_person(person_id, shots, p, min_conf):
    """One person's shots and the fixes the model points to: gender (the other one), age (the nearest age in
    the band the model prefers over the recorded one), swap (the two shots whose mask states each look most
    like the other's label). Each with its probability; the person's score is the highest, or a shot's."""
    order = np.argsort([list(SHOTS).index(s) if s in SHOTS else 99 for s in shots["shot"]], kind="stable")
    shots, p = shots.iloc[order], {k: v[order] for k, v in p.items()}
    gender, age = int(shots["gender"].iloc[0]), int(shots["age"].iloc[0])
    band = int(age_band(age))
    p_gender, p_age = p["gender"].mean(0), p["age"].mean(0)
    n = len(shots)
    fixes = [dict(field="gender", old=GENDERS[gender], new=GENDERS[1 - gender], p=float(p_gender[1 - gender]),
                  text=f"gender {GENDERS[gender]} → {GENDERS[1 - gender]}",
                  why=f"model says {GENDERS[1 - gender]} {p_gender[1 - gender]:.2f} (mean of {n} shots)")]  # fmt: skip
    other = max((b for b in range(3) if b != band), key=lambda b: p_age[b])
    new_age = (min(age, 29), min(max(age, 30), 59), max(age, 60))[other]
    fixes.append(dict(field="age", old=str(age), new=str(new_age), p=float(p_age[other]),
                      text=f"age {age} → {new_age}",
                      why=f"model says {AGE_BANDS[other]} {p_age[other]:.2f} (mean of {n} shots)"))  # fmt: skip
    masks, names = shots["mask"].to_numpy(), shots["shot"].tolist()
    pairs = [(min(p["mask"][a, masks[b]], p["mask"][b, masks[a]]), a, b)
             for a, b in combinations(range(n), 2) if masks[a] != masks[b]]  # fmt: skip
    if pairs:
        score, a, b = max(pairs)
        fixes.append(dict(field="swap", old=names[a], new=names[b], p=float(score),
                          text=f"swap {names[a]} ↔ {names[b]}",
                          why=f"each looks like the other's mask state: {score:.2f} at least"))  # fmt: skip
    tiles = []
    for k, (_, shot) in enumerate(shots.iterrows()):
        pred = int(p["label"][k].argmax())
        p_pred = float(p["label"][k, pred])
        tiles.append(dict(row=int(shot["row"]), shot=shot["shot"], label=class_name(int(shot["label"])),
                          answer=class_name(pred), p=round(p_pred, 3),
                          wrong=bool(pred != int(shot["label"]) and p_pred >= min_conf)))  # fmt: skip
    for fix in fixes:
        fix["p"], fix["confident"] = round(fix["p"], 3), fix["p"] >= min_conf
    score = max([f["p"] for f in fixes] + [t["p"] for t in tiles if t["wrong"]])
    return dict(person_id=person_id, gender=GENDERS[gender], age=age, band=AGE_BANDS[band], score=round(score, 3),
                fixes=fixes, shots=tiles)  # fmt: skip


def thumbnail(audit, row, side=128):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(audit.cache[row])).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=85)
    return buf.getvalue()


# ---- the relabel draft --------------------------------------------------------------------
class Draft:
    """The fixes marked on the audit page, written whole after each change (atomically) in relabel.csv's
    format: the base fixes first (those the crops were made with: passing the draft to preprocess.py in their
    place must keep them), then the marks. Marks found in an existing draft are taken up again."""

    COLUMNS = ["id", "field", "old", "new", "note"]

    def __init__(self, path, base_path):
        self.path, self.marks = path, {}
        self.base = pd.DataFrame(columns=self.COLUMNS)
        if base_path is not None:
            self.base = self.read(base_path)
        if path.is_file():
            base_rows = {tuple(r) for r in self.base[self.COLUMNS[:4]].itertuples(index=False)}
            for row in self.read(path).to_dict("records"):
                if (row["id"], row["field"], row["old"], row["new"]) not in base_rows:
                    self.marks[self.key(row)] = row

    def read(self, path):
        df = read_csv_text(path, Problems("fail"))  # one line and exit 2 on a broken file
        require_columns(df, self.COLUMNS[:4], path, Problems("fail"))
        return df.reindex(columns=self.COLUMNS, fill_value="")

    @staticmethod
    def key(row):
        # one gender and one age per person; swaps by their pair of shots
        return (row["id"], row["field"]) + ((row["old"], row["new"]) if row["field"] == "swap" else ())

    def mark(self, row, on):
        if on:
            self.marks[self.key(row)] = row
        else:
            self.marks.pop(self.key(row), None)
        save_csv(pd.concat([self.base, pd.DataFrame(list(self.marks.values()), columns=self.COLUMNS)]), self.path)

    def summary(self):
        text = self.path.read_text() if self.path.is_file() else ""
        return dict(path=str(self.path), base=len(self.base), marks=list(self.marks.values()), text=text)


def fix_row(audit, fix):
    """A click on the audit page -> a relabel row. Everything is checked against the index: the client
    names a person, a field and a new value; `old` comes from the labels the crops hold."""
    person = audit.by_person.get(str(fix.get("person_id", "")))
    if person is None:
        raise InputError("unknown person")
    field, new, old = fix.get("field"), str(fix.get("new", "")), str(fix.get("old", ""))
    proposal = next((f for f in person["fixes"] if f["field"] == field), None)
    if field == "gender" and new in GENDERS and new != person["gender"]:
        old = person["gender"]
    elif field == "age" and new.isdigit() and 0 < int(new) < 120:
        old = str(person["age"])
    elif field == "swap" and {old, new} <= {t["shot"] for t in person["shots"]} and old != new:
        pass
    else:
        raise InputError(f"not a fix: {field} {old!r} -> {new!r}")
    why = proposal["why"] if proposal and (proposal["old"], proposal["new"]) == (old, new) else "marked by eye"
    note = f"serve.py audit of {audit.run_name}: {why}".replace(",", ";")  # no commas: the file stays plain
    return dict(id=person["person_id"], field=field, old=old, new=new, note=note)


# ---- web app -------------------------------------------------------------------------------
def make_app(state):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="maskcls", docs_url=None, redoc_url=None, openapi_url=None)
    # a page elsewhere that renames itself 127.0.0.1 (DNS rebinding) cannot read these pages: Host is checked
    # (--host 0.0.0.0 opens them to any name the machine has: the user asked for the network)
    names = ["*"] if state.args.host in ("0.0.0.0", "::") else ["127.0.0.1", "localhost", "[::1]", state.args.host]
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=names)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def error(status, text):
        return JSONResponse({"error": text}, status_code=status)

    @app.middleware("http")
    async def same_origin(request: Request, call_next):
        # another site's page in the user's browser may send a POST here: only our own pages may
        origin = request.headers.get("origin")
        if request.method != "GET" and origin and urlsplit(origin).netloc != request.headers.get("host"):
            return error(403, f"requests from {origin} are refused")
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'")  # fmt: skip
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(InputError)
    async def user_error(request, e):
        return error(400, str(e))

    @app.exception_handler(Exception)
    async def server_error(request, e):  # (uvicorn logs the traceback)
        return error(500, f"the server failed on this request ({type(e).__name__}: {str(e)[:120]}); it keeps serving")

    @app.get("/")
    async def predict_page():
        return FileResponse(STATIC / "predict.html")

    @app.get("/audit")
    async def audit_page():
        return FileResponse(STATIC / "audit.html")

    @app.get("/api/info")
    async def info():
        m = state.models
        return dict(run=str(state.run), models=[f.name for f in m], backbone=m[0].cfg.backbone,
                    img_size=state.img_size, tta=state.args.tta, max_upload_bytes=state.max_upload,
                    settings=state.settings)  # fmt: skip

    @app.post("/api/predict")
    async def predict_upload(request: Request):
        # the body is the photo's bytes (no form, no file name); read as it streams, up to the limit
        limit = state.max_upload
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return error(413, f"the file is {int(declared) / 2**20:.1f} MB: the limit is {limit / 2**20:.0f} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return error(413, f"the file is over the limit of {limit / 2**20:.0f} MB")
        if not body:
            return error(400, "empty upload: choose a photo")
        return await asyncio.get_running_loop().run_in_executor(state.worker, predict_photo, state, bytes(body))

    @app.get("/api/audit")
    async def audit():
        a = state.audit
        return dict(persons=a.persons, note=a.note, min_conf=state.args.min_conf, draft=state.draft.summary())

    @app.get("/api/crop/{row}")
    async def crop(row: int):
        a = state.audit
        if a.cache is None or not 0 <= row < len(a.cache):
            return error(404, "no such crop")
        return Response(thumbnail(a, row), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/fix")
    async def fix(request: Request):
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            return error(415, "send JSON")
        body = await request.json()
        if not isinstance(body, dict):
            return error(400, "send a JSON object")
        row = fix_row(state.audit, body)
        state.draft.mark(row, bool(body.get("on", True)))  # small file; written in the event loop, one at a time
        return dict(draft=state.draft.summary())

    return app


# ---- main --------------------------------------------------------------------------------
def listen(host, port):
    """The listening socket, opened before the slow model loading: a port in use fails at once, and a client
    that connects before the server is ready waits in the queue instead of being refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"--host {host} --port {port}: cannot listen ({e.strerror}); try another --port") from None
    sock.listen(128)
    return sock


def main():
    args = parser.parse_args()
    run = Path(args.run)
    if not run.is_dir():
        raise InputError(f"--run {run}: no such folder (a train_*.py script writes it with --out)")
    if not STATIC.is_dir():
        raise InputError(f"{STATIC}: not found (it comes with serve.py)")
    crops = args.crops
    if crops is None:
        config = run / "config.json"
        crops = json.loads(config.read_text()).get("crops", "WORK/crops") if config.is_file() else "WORK/crops"
    sock = listen(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: anyone who reaches this address can upload photos and read the audit")
    torch.set_num_threads(args.threads)
    env = make_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.precision)
    state = load_state(args, run, Path(crops), env)
    names = ", ".join(m.name for m in state.models)
    print(f"{run}: {len(state.models)} model(s) ({names}), {state.models[0].cfg.backbone} at {state.img_size} px, "
          f"tta {args.tta}; audit: {state.audit.note}")  # fmt: skip
    if state.stacker:
        voter = f"the {len(state.tuned)} fine-tuned face networks" if state.tuned else "the face embedding's regression"
        print(f"{args.embedding}: {voter} vote on gender and age (weight {float(state.stacker['weight']):g})")
    try:  # one photo through every step now: a missing package or model fails here, not on the first upload
        import captum  # noqa: F401
    except ImportError:
        raise InputError("the heat map needs captum: pip install -r requirements.txt") from None
    blank = png_bytes(np.full((64, 64, 3), NEUTRAL, np.uint8))
    state.worker.submit(predict_photo, state, blank).result()

    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"serving {url}/ (predict) and {url}/audit (labels; draft {state.draft.path}); Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn.Config(app=make_app(state), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    run_main(main)
