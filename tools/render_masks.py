"""Draw masks on the eval persons' `normal` shots with a second, independent renderer: a held-out measure of
the mask state on masks no model was trained on (never train on its output).

    python tools/render_masks.py --data ../shared/bench/utkmask --out WORK/heldout_masks --preview 12

For every eval image whose answer is `not wear` (mask 2: one `normal` shot per person), dlib finds 68
landmarks (HOG detector; MTCNN's box where HOG finds none) and the renderer draws --wear masks worn correctly
(upper edge from the top of the nose bridge to halfway down the nose, lower edge at or under the chin) and
--incorrect masks worn wrong, half below the nose (from just under its tip to the upper lip: mouth covered,
nose out) and half pulled down on the chin (mouth out); the unmasked shot stays in as `not wear`. Four shape
families (fitted cloth, flat surgical with pleats, N95 cup, duckbill), six procedural textures (solid, ribbed
knit, heather, camouflage, twill, printed diamonds) in a palette of mask colours, each shaded by a random
directional light on the mask's own height field, with contact shadow, ear loops or head straps and the
photo's brightness. Every draw is checked on its own alpha: a worn mask covers nose tip, mouth and chin; a
mask below the nose leaves the nose tip out and covers the mouth; one on the chin leaves the lips out.
Writes, in the competition's eval layout (so preprocess.py --splits eval and inference.py --answers read it):

    OUT/eval/images/<sha1>.jpg, OUT/eval/info.csv (ImageID,ans=0)
    OUT/eval/answers.csv   ImageID,ans,person_id,mask,gender,age,age_band,placement,shape,texture
    OUT/render.csv         per image: the draw's settings, landmark source, nose/mouth/chin points and their
                           alpha, and the share of the photo the mask covers (area: a mask on the chin of a
                           tight crop can be a thin strip at its edge)
    OUT/alpha/<sha1>.png   with --save-alpha: each drawn mask's coverage (255 = mask)
    OUT/preview.png        with --preview N: N persons' images side by side

The bench's masks come from another generator (dlib 68 points too, but a textured mesh warped between two
curves): this one shares no code or texture with it. Seeded: the same --seed draws byte-identical images.
2-core CPU: the 300 bench eval persons (1,500 images at the defaults) in about 1 minute, one process.
tools/mask_check.py scores a trained run on the result.
"""

import argparse
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # common.py lives in the repository root
from common import InputError, atomic_path, run_main, save_csv  # noqa: E402
from faces import face_detector  # noqa: E402

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default="../shared/bench/utkmask", help="data with eval/answers.csv (mask 2 = normal)")
parser.add_argument("--out", default="WORK/heldout_masks", help="output folder (eval/ inside); never train on it")
parser.add_argument("--wear", type=int, default=2, help="masks worn correctly per person")
parser.add_argument("--incorrect", type=int, default=2, help="masks worn wrong per person (below nose, on chin, ...)")
parser.add_argument("--persons", type=int, default=0, help="use the first N persons only (0: all)")
parser.add_argument("--quality", type=int, nargs=2, default=[80, 95], help="JPEG quality range of every image")
parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
parser.add_argument("--save-alpha", action="store_true", help="also write each mask's coverage to OUT/alpha/")
parser.add_argument("--preview", type=int, default=0, help="write OUT/preview.png with N persons' images")

SHAPES = ("fitted", "flat", "cup", "duckbill")
TEXTURES = ("solid", "ribbed", "heather", "camo", "twill", "diamonds")
INCORRECT = ("below_nose", "chin")  # a person's wrongly worn masks take these in turn
PALETTE = {  # the colours masks come in, roughly
    "black": (28, 28, 30), "white": (236, 236, 232), "navy": (30, 40, 78), "sky": (150, 196, 228),
    "grey": (128, 128, 132), "beige": (214, 192, 160), "pink": (232, 160, 180), "olive": (96, 104, 60),
    "red": (178, 34, 40), "teal": (40, 128, 128), "mint": (170, 220, 196), "purple": (96, 60, 130),
}  # fmt: skip
SS = 4  # supersampling of the drawn outline: anti-aliased edges


# ---- landmarks and the face frame ---------------------------------------------------
def landmark_models():
    """dlib's HOG face detector and 68-point shape predictor (face-recognition-models ships the file)."""
    import dlib

    spec = importlib.util.find_spec("face_recognition_models")  # not imported: it needs pkg_resources
    if spec is None:
        raise InputError("face-recognition-models is not installed (requirements-nodeps.txt)")
    path = Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))


def find_landmarks(rgb, hog, predictor, mtcnn):
    """(68, 2) landmarks in pixels and where the face box came from ('hog', 'mtcnn'), or (None, reason).
    mtcnn: a dict that holds the MTCNN detector once a face needs it (its import takes seconds)."""
    import dlib

    found = hog(rgb, 1)
    if found:
        rect, source = max(found, key=lambda r: r.area()), "hog"
    else:
        if not mtcnn:
            mtcnn["detector"] = face_detector()
        boxes, probs = mtcnn["detector"].detect(Image.fromarray(rgb))
        if boxes is None:
            return None, "no face"
        x0, y0, x1, y1 = boxes[int(np.argmax(probs))]
        # MTCNN's box reaches the hairline; dlib's predictor was trained on HOG boxes, which start lower
        y0 = y0 + 0.15 * (y1 - y0)
        rect, source = dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), "mtcnn"
    shape = predictor(rgb, rect)
    pts = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
    eyes_y, nose_y, lips_y, chin_y = pts[36:48, 1].mean(), pts[33, 1], pts[62:67, 1].mean(), pts[8, 1]
    if not eyes_y < nose_y < lips_y < chin_y:  # a very tilted or misread face: no trustworthy placement
        return None, "landmarks out of order"
    return pts, source


class Frame:
    """Face coordinates: origin at the nose bridge (landmark 27), u along the eye line, v down the face, both in
    units of the distance between the eye centres. Masks are built here, so they follow roll and face size."""

    def __init__(self, pts):
        left, right = pts[36:42].mean(0), pts[42:48].mean(0)
        self.iod = np.linalg.norm(right - left)
        self.r = (right - left) / self.iod
        self.d = np.array([-self.r[1], self.r[0]])  # 90 degrees from r, pointing to the chin
        self.origin = pts[27]

    def to_face(self, p):
        q = np.asarray(p, np.float64) - self.origin
        return np.stack([q @ self.r, q @ self.d], -1) / self.iod

    def to_image(self, uv):
        uv = np.asarray(uv, np.float64) * self.iod
        return self.origin + uv[..., :1] * self.r + uv[..., 1:] * self.d


def half_width(face_pts, v):
    """The face's half width at height v (face units), from the jaw line (points 0-4 and 12-16); below the jaw's
    corner the width shrinks slowly instead of following the jaw to the chin: a mask pulled down hangs under
    the chin as wide as the jaw."""
    low = face_pts[[4, 12], 1].mean()
    vv = np.minimum(v, low)
    w = []
    for side in (face_pts[0:5], face_pts[12:17]):
        order = np.argsort(side[:, 1])
        w.append(np.abs(np.interp(vv, side[order, 1], side[order, 0])))
    return (w[0] + w[1]) / 2 * (1 - 0.2 * np.clip((v - low) / 1.0, 0, 1))


# ---- the mask's outline ------------------------------------------------------------
def outline(shape, placement, face_pts, rng):
    """Closed polygon (face units) of one mask, and the height of its crease (duckbill) or None.
    The mask is laid out as if worn correctly, then slid down the face as a whole for a wrong placement."""
    # worn correctly: the upper edge anywhere from the top of the nose bridge to halfway down to the tip
    nose_bridge = face_pts[28, 1] + (face_pts[30, 1] - face_pts[28, 1]) * rng.uniform(-0.1, 0.5)
    chin = face_pts[8, 1]
    bottom = chin + rng.uniform(0.0, 0.25)  # at or under the chin
    if placement == "wear":
        top = nose_bridge
    elif placement == "below_nose":  # upper edge between just under the nose tip and the upper lip
        top = face_pts[30, 1] + (face_pts[51, 1] - face_pts[30, 1]) * rng.uniform(0.3, 0.8)
    else:  # chin: upper edge between the lower lip and the chin
        top = face_pts[57, 1] + (chin - face_pts[57, 1]) * rng.uniform(0.15, 0.45)
    shift = top - nose_bridge
    bottom += shift * rng.uniform(0.8, 1.0)  # a mask pulled down stretches a little over the chin
    margin = rng.uniform(0.03, 0.12)
    mouth_v = face_pts[62:67, 1].mean()
    n = 40
    if shape in ("fitted", "duckbill"):
        drop = rng.uniform(0.25, 0.45) if shape == "fitted" else rng.uniform(0.1, 0.25)
        side_top = top + drop
        side_bottom = (face_pts[[4, 12], 1].mean() if shape == "fitted" else face_pts[[3, 13], 1].mean()) + shift
        w_top = half_width(face_pts, side_top) + margin
        u = np.linspace(-w_top, w_top, n)
        top_edge = np.stack([u, top + drop * (u / w_top) ** 2], 1)
        v = np.linspace(side_top, side_bottom, n)
        right = np.stack([half_width(face_pts, v) + margin, v], 1)
        w_b = right[-1, 0]
        if shape == "fitted":  # the bottom follows the jaw round the chin
            t = np.linspace(0, 1, n)
            u = w_b * (1 - 2 * t)
            bottom_edge = np.stack([u, side_bottom + (bottom - side_bottom) * (1 - (u / w_b) ** 2) ** 0.7], 1)
        else:  # duckbill: a wedge to a point under the chin
            bottom_edge = np.array([[w_b, side_bottom], [0.0, bottom + 0.1], [-w_b, side_bottom]])
        left = right[::-1] * [-1, 1]
        poly = np.concatenate([top_edge, right, bottom_edge, left])
        crease = top + (bottom - top) * rng.uniform(0.4, 0.55) if shape == "duckbill" else None
        return poly, crease
    if shape == "flat":  # surgical: a rounded rectangle across the face, hardly following it
        w = half_width(face_pts, mouth_v + shift) + margin + rng.uniform(0.0, 0.1)
        drop = rng.uniform(0.0, 0.12)
        t = np.linspace(-1, 1, n)
        top_edge = np.stack([w * t, top + drop * t**2], 1)
        bottom_edge = np.stack([-w * t * 0.92, bottom - 0.05 - 0.1 * t**2], 1)
        right = np.array([[w, top + drop + 0.05], [w * 0.96, bottom - 0.2]])
        left = right[::-1] * [-1, 1]
        return np.concatenate([top_edge, right, bottom_edge, left]), None
    # cup (N95): an ellipse from the nose bridge to under the chin
    w = half_width(face_pts, mouth_v + shift) + margin
    a = np.linspace(0, 2 * np.pi, 4 * n, endpoint=False)
    centre, half_height = (top + bottom) / 2, (bottom - top) / 2
    return np.stack([w * np.cos(a), centre + half_height * np.sin(a)], 1), None


def rasterise(poly_px, size):
    """Anti-aliased coverage in 0..1 of a polygon in image pixels: drawn at SS x and averaged down."""
    w, h = size
    canvas = Image.new("L", (w * SS, h * SS), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in (poly_px * SS)], fill=255)
    a = np.asarray(canvas, np.float32).reshape(h, SS, w, SS).mean((1, 3)) / 255
    return a


# ---- texture and light -------------------------------------------------------------
def smooth_noise(rng, shape, sigma):
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (x - x.mean()) / (x.std() + 1e-8)


def texture(kind, colour, s, t, rng, px_per_unit):
    """Mask colour (H, W, 3) in 0..255 at surface coordinates s (around the face), t (down), face units."""
    base = np.array(colour, np.float64)
    hw = s.shape
    fine = smooth_noise(rng, hw, 0.7)[..., None]
    if kind == "solid":
        out = base * (1 + 0.04 * fine)
    elif kind == "ribbed":  # knit ribs running down the mask
        f = rng.uniform(6, 12)
        out = base * (0.86 + 0.14 * np.sin(2 * np.pi * f * s)[..., None] + 0.03 * fine)
    elif kind == "heather":  # two yarn colours mixed in fine streaks
        other = np.clip(base + rng.uniform(-70, 70, 3), 0, 255)
        streak = smooth_noise(rng, hw, (0.4, max(1.5, 0.15 * px_per_unit)))[..., None]
        out = np.where(streak > 0.3, other, base) * (1 + 0.03 * fine)
    elif kind == "camo":  # three or four blotch colours
        palette = [base] + [np.clip(base + rng.uniform(-80, 80, 3), 0, 255) for _ in range(rng.integers(2, 4))]
        blotch = smooth_noise(rng, hw, max(2.0, 0.25 * px_per_unit))
        level = np.digitize(blotch, np.quantile(blotch, np.linspace(0, 1, len(palette) + 1)[1:-1]))
        out = np.array(palette)[level] * (1 + 0.03 * fine)
    elif kind == "twill":  # denim-like diagonal weave
        f = rng.uniform(14, 24)
        out = base * (0.9 + 0.1 * np.sin(2 * np.pi * f * (s + t))[..., None] + 0.05 * fine)
    else:  # diamonds: a small print on a plain ground
        f, r = rng.uniform(2.5, 5), rng.uniform(0.12, 0.25)
        ink = np.clip(255 - base + rng.uniform(-40, 40, 3), 0, 255)
        d = np.abs((s * f) % 1 - 0.5) + np.abs((t * f) % 1 - 0.5)
        out = np.where((d < r)[..., None], ink, base) * (1 + 0.03 * fine)
    return out


def height_field(alpha, shape, crease_px, t_px, rng):
    """A bump for the shading: a dome from the outline inwards, pleats on the flat mask, a ridge on the
    duckbill's crease. In pixels."""
    dist = ndimage.distance_transform_edt(alpha > 0.5)
    reach = max(2.0, dist.max())
    dome = 1 - (1 - np.clip(dist / reach, 0, 1)) ** 2
    h = dome * reach * (rng.uniform(0.6, 1.0) if shape != "cup" else rng.uniform(1.0, 1.6))
    if shape == "flat":  # three pleats across
        h += 1.5 * np.sin(2 * np.pi * t_px / max(4.0, reach / 1.5)) * (dist > 1)
    if crease_px is not None:
        h += reach * 0.4 * np.clip(1 - np.abs(t_px - crease_px) / (reach * 0.6), 0, 1)
    return ndimage.gaussian_filter(h, 1.0)


def shade(h, rng):
    """Lambert shading of a height field by one directional light (azimuth and elevation random)."""
    gy, gx = np.gradient(h)
    n = np.stack([-gx, -gy, np.ones_like(h)], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    az, el = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.3)
    light = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return 0.45 + 0.6 * np.clip(n @ light, 0, 1)


# ---- one image ---------------------------------------------------------------------
def draw_mask(rgb, pts, placement, rng):
    """The photo with one mask drawn in, its coverage (H, W) in 0..1, and the draw's settings."""
    frame = Frame(pts)
    face_pts = frame.to_face(pts)
    shape, kind = SHAPES[rng.integers(len(SHAPES))], TEXTURES[rng.integers(len(TEXTURES))]
    colour_name = list(PALETTE)[rng.integers(len(PALETTE))]
    colour = np.clip(np.array(PALETTE[colour_name]) + rng.uniform(-18, 18, 3), 0, 255)
    poly, crease = outline(shape, placement, face_pts, rng)
    # the photo's light, read before drawing: a face in shadow gets a darker mask; a little of its colour cast too
    cheeks = rgb[int(max(0, pts[29, 1] - 3)) : int(pts[33, 1]) + 1, int(max(0, pts[31, 0])) : int(pts[35, 0]) + 1]
    skin = cheeks.reshape(-1, 3).mean(0) if cheeks.size else np.full(3, 150.0)
    light = np.clip(skin.mean() / 165, 0.45, 1.15) * np.clip((rgb.reshape(-1, 3).mean(0) + 1) / (rgb.mean() + 1),
                                                               0.9, 1.1) ** 0.5  # fmt: skip

    # work in a box round the mask and its straps only: a large photo costs no more than a small one
    u0, v0 = poly.min(0) - [1.8, 0.6]
    u1, v1 = poly.max(0) + [1.8, 0.3]
    v0 = min(v0, face_pts[[0, 16], 1].min() - 0.6)
    corners = frame.to_image(np.array([[u0, v0], [u1, v0], [u0, v1], [u1, v1]]))
    (x0, y0), (x1, y1) = np.floor(corners.min(0)).astype(int), np.ceil(corners.max(0)).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, rgb.shape[1]), min(y1, rgb.shape[0])
    frame.origin = frame.origin - [x0, y0]
    box = rgb[y0:y1, x0:x1]
    h, w = box.shape[:2]
    alpha = rasterise(frame.to_image(poly), (w, h))
    alpha = ndimage.gaussian_filter(alpha, rng.uniform(0.2, 0.7))  # the photo's own softness

    # surface coordinates: around a cylinder the width of the face (texture compresses towards the cheeks)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    uv = frame.to_face(np.stack([xx, yy], -1))
    radius = half_width(face_pts, face_pts[33, 1]) * 1.25
    s = np.arcsin(np.clip(uv[..., 0] / radius, -1, 1)) * radius
    t = uv[..., 1]
    cloth = texture(kind, colour, s, t, rng, frame.iod)
    hf = height_field(alpha, shape, None if crease is None else crease * frame.iod, t * frame.iod, rng)
    cloth = cloth * shade(hf, rng)[..., None] * light
    cloth += rng.normal(0, rng.uniform(1, 4), cloth.shape)  # sensor noise, as on the face

    out = box.astype(np.float64)
    # a soft contact shadow just outside the edge, towards the light's far side
    offset = rng.uniform(-1.5, 1.5, 2) + [0, 1.5]
    shadow = ndimage.gaussian_filter(ndimage.shift(alpha, offset[::-1], order=1), 2.0) * (1 - alpha)
    out *= (1 - rng.uniform(0.15, 0.35) * shadow)[..., None]
    out = out * (1 - alpha[..., None]) + cloth * alpha[..., None]
    img = Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))
    draw_straps(img, frame, face_pts, poly, shape, colour, rng)
    drawn, coverage = rgb.copy(), np.zeros(rgb.shape[:2])
    drawn[y0:y1, x0:x1], coverage[y0:y1, x0:x1] = np.asarray(img), alpha
    return drawn, coverage, dict(shape=shape, texture=kind, colour=colour_name)


def draw_straps(img, frame, face_pts, poly, shape, colour, rng):
    """Ear loops from the mask's corners to behind the ears, or a cup's two head straps, anti-aliased."""
    w, h = img.size
    big = img.resize((w * SS, h * SS), Image.BILINEAR)
    d = ImageDraw.Draw(big)
    strap = tuple(int(c) for c in (colour if rng.random() < 0.5 else PALETTE[["white", "black"][rng.integers(2)]]))
    width = max(1, int(round(0.035 * frame.iod * SS)))
    top_v, bottom_v = poly[:, 1].min(), poly[:, 1].max()
    for sign in (-1, 1):
        side = poly[np.argmax(sign * poly[:, 0])]
        if shape == "cup":  # elastic round the head at two heights
            for v in (top_v + 0.3 * (bottom_v - top_v), top_v + 0.75 * (bottom_v - top_v)):
                a = np.array([sign * (abs(side[0]) - 0.05), v])
                ends = [a, a + [sign * 1.5, -0.3]]
                d.line([tuple(p) for p in frame.to_image(np.array(ends)) * SS], fill=strap, width=width)
            continue
        ear = np.array([sign * (abs(face_pts[0 if sign < 0 else 16, 0]) + 0.1), face_pts[[0, 16], 1].mean() - 0.1])
        upper = poly[np.argmin(np.abs(poly[:, 0] - sign * abs(side[0])) + 10 * (poly[:, 1] > side[1]))]
        for corner in (upper, poly[np.argmax(sign * poly[:, 0] + 0.5 * poly[:, 1])]):
            t = np.linspace(0, 1, 12)[:, None]
            bend = ear + [sign * 0.25, 0.3]
            curve = (1 - t) ** 2 * corner + 2 * (1 - t) * t * bend + t**2 * ear  # quadratic Bezier
            d.line([tuple(p) for p in frame.to_image(curve) * SS], fill=strap, width=width, joint="curve")
    img.paste(big.resize((w, h), Image.LANCZOS))


def covered(alpha, p):
    """The mask's coverage at a landmark (0..1); a landmark outside the photo (a chin below a tight crop) is read
    at the nearest pixel inside."""
    x = int(np.clip(round(p[0]), 0, alpha.shape[1] - 1))
    y = int(np.clip(round(p[1]), 0, alpha.shape[0] - 1))
    return float(alpha[y, x])


def placement_holds(placement, alpha, pts):
    """What each placement must show, read off the mask's own alpha."""
    nose_tip, upper_lip, mouth, lower_lip, chin = pts[30], pts[51], pts[62:67].mean(0), pts[57], pts[8]
    on = lambda p: covered(alpha, p) > 0.5  # noqa: E731
    if placement == "wear":
        return on(nose_tip) and on(mouth) and on(chin)
    if placement == "below_nose":
        return not on(nose_tip) and on(mouth) and on(lower_lip)
    return not on(nose_tip) and not on(upper_lip) and not on(lower_lip) and on(chin)


def save_jpeg(rgb, path, quality):
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=int(quality))


# ---- the held-out set --------------------------------------------------------------
def main():
    args = parser.parse_args()
    answers_path = Path(args.data) / "eval" / "answers.csv"
    if not answers_path.is_file():
        raise InputError(f"--data {args.data}: no eval/answers.csv (the eval split with its true labels)")
    answers = pd.read_csv(answers_path, dtype={"ImageID": str, "person_id": str})
    need = {"ImageID", "ans"}
    if not need <= set(answers.columns):
        raise InputError(f"{answers_path}: needs columns {sorted(need)}")
    answers["mask"] = answers["ans"] // 6
    persons = answers[answers["mask"] == 2].reset_index(drop=True)  # the unmasked shots
    if "person_id" not in persons:
        persons["person_id"] = [Path(i).stem for i in persons["ImageID"]]
    if args.persons:
        persons = persons.iloc[: args.persons]
    if persons.empty:
        raise InputError(f"{answers_path}: no image with mask state 'not wear' (ans 12-17) to draw masks on")
    out = Path(args.out)
    images_dir = out / "eval" / "images"
    if (out / "render.csv").is_file():  # a set this script made before: its images and crops go (preprocess.py
        for old in ("eval", "crops", "alpha"):  # would take a crop of the same name for a new image's)
            shutil.rmtree(out / old, ignore_errors=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    hog, predictor = landmark_models()
    mtcnn = {}  # made when HOG first finds no face

    rows, skipped, previews = [], [], []
    for k, person in enumerate(tqdm(persons.itertuples(), total=len(persons), desc="draw masks", unit="person")):
        rng = np.random.default_rng([args.seed, k])  # per person: the same draws whatever --persons is
        with Image.open(Path(args.data) / "eval" / "images" / person.ImageID) as im:
            rgb = np.asarray(im.convert("RGB"))
        pts, source = find_landmarks(rgb, hog, predictor, mtcnn)
        if pts is None:
            skipped.append((person.ImageID, source))
            continue
        gender_band = person.ans % 6
        placements = ["wear"] * args.wear + [INCORRECT[(k + i) % len(INCORRECT)] for i in range(args.incorrect)]
        shots = []
        for n, placement in enumerate(placements + ["none"]):
            name = hashlib.sha1(f"{args.seed}-{person.person_id}-{n}".encode()).hexdigest() + ".jpg"
            if placement == "none":
                img, alpha, settings = rgb, np.zeros(rgb.shape[:2]), dict(shape="", texture="", colour="")
                mask_state = 2
            else:
                for _ in range(10):  # redraw until the placement shows what its label says
                    img, alpha, settings = draw_mask(rgb, pts, placement, rng)
                    if placement_holds(placement, alpha, pts):
                        break
                else:
                    skipped.append((name, f"no {placement} draw passed its check"))
                    continue
                mask_state = 0 if placement == "wear" else 1
            save_jpeg(img, images_dir / name, rng.integers(args.quality[0], args.quality[1] + 1))
            if args.save_alpha:
                with atomic_path(out / "alpha" / name.replace(".jpg", ".png")) as tmp:
                    Image.fromarray((alpha * 255).round().astype(np.uint8)).save(tmp, format="PNG")
            mouth = pts[62:67].mean(0)
            rows.append(dict(
                ImageID=name, ans=mask_state * 6 + gender_band, person_id=person.person_id, mask=mask_state,
                gender=gender_band // 3, age=getattr(person, "age", ""), age_band=gender_band % 3,
                placement=placement, **settings, landmarks=source, source=person.ImageID,
                nose_x=pts[30, 0], nose_y=pts[30, 1], mouth_x=mouth[0], mouth_y=mouth[1], chin_x=pts[8, 0],
                chin_y=pts[8, 1], alpha_nose=covered(alpha, pts[30]), alpha_mouth=covered(alpha, mouth),
                alpha_chin=covered(alpha, pts[8]), area=round(float(alpha.mean()), 4),
            ))  # fmt: skip
            shots.append(img)
        if len(previews) < args.preview:
            previews.append(shots)

    if not rows:
        raise InputError(f"--data {args.data}: no face found on any of {len(persons)} images ({skipped[0][1]})")
    table = pd.DataFrame(rows).sample(frac=1, random_state=args.seed).reset_index(drop=True)
    save_csv(table, out / "render.csv")
    cols = ["ImageID", "ans", "person_id", "mask", "gender", "age", "age_band", "placement", "shape", "texture"]
    save_csv(table[cols], out / "eval" / "answers.csv")
    save_csv(table[["ImageID"]].assign(ans=0), out / "eval" / "info.csv")  # written last: the set is complete
    if previews:
        cell = 128
        sheet = Image.new("RGB", (cell * max(map(len, previews)), cell * len(previews)), (255, 255, 255))
        for i, shots in enumerate(previews):
            for j, img in enumerate(shots):
                sheet.paste(Image.fromarray(img).resize((cell, cell), Image.LANCZOS), (j * cell, i * cell))
        with atomic_path(out / "preview.png") as tmp:
            sheet.save(tmp, format="PNG")
    counts = table["placement"].value_counts().to_dict()
    print(f"landmarks: {table.drop_duplicates('person_id')['landmarks'].value_counts().to_dict()}; "
          f"skipped {len(skipped)}" + (f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))  # fmt: skip
    print(f"wrote {len(table)} images of {table['person_id'].nunique()} persons to {out / 'eval'}: {counts}")


if __name__ == "__main__":
    run_main(main)
