"""Draw a small synthetic data set in the exact competition layout, for `make demo` and tests.

    python tools/make_demo_data.py --out WORK/demo_data --persons 60 --eval-persons 20

Writes OUT/train/{train.csv,images/<id>_<gender>_<race>_<age>/<shot>.<ext>} and
OUT/eval/{info.csv,answers.csv,images/<sha1>.jpg}. Each person is a drawn face whose
cues a model can learn: hair length and lip colour follow gender; grey hair and wrinkles
grow with age; a mask covers nose and mouth (wear), mouth and chin only (incorrect) or
nothing (not wear), in one of two styles drawn at random (a plain rounded rectangle on ear
loops, or a striped cup on a head strap), so the state is learnt from where the mask sits.
Shots of one person differ by shift, scale, rotation, light, mask style and colour. Like
real copies of the data, the folders also hold junk (`._mask1.jpg`, `.DS_Store`, a hidden
folder) and mixed extensions. Seconds on any machine.
"""

import argparse
import hashlib
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 192, 256  # portrait like the competition's 384x512, halved
RACES = ("Asian", "White", "Black", "Indian")
SKIN = {"Asian": (231, 196, 160), "White": (240, 205, 185), "Black": (120, 80, 55), "Indian": (190, 140, 100)}


def draw_person(rng, gender, age, race):
    """Everything about a person that stays the same across shots."""
    grey = float(np.clip((age - 22) / 38, 0, 1))  # 0 young, 1 at 60
    base_hair = rng.choice([(30, 25, 20), (70, 45, 25), (120, 80, 40), (20, 20, 20)])
    hair = tuple(int((1 - grey) * c + grey * 215) for c in base_hair)
    return dict(
        gender=gender,
        age=age,
        skin=tuple(int(c + rng.integers(-15, 15)) for c in SKIN[race]),
        hair=hair,
        wrinkles=int(np.clip((age - 28) / 5, 0, 7)),
        face_w=int(rng.integers(70, 84)),
        face_h=int(rng.integers(92, 106)),
        background=tuple(int(v) for v in rng.integers(60, 230, 3)),
        shirt=tuple(int(v) for v in rng.integers(0, 255, 3)),
    )


def draw_shot(p, mask_state, rng):
    bg = Image.new("RGB", (W, H), p["background"])
    d = ImageDraw.Draw(bg)
    cx, cy, fw, fh = W // 2, 100, p["face_w"], p["face_h"]
    # shoulders and neck
    d.ellipse([cx - 90, cy + fh // 2 + 30, cx + 90, cy + fh // 2 + 170], fill=p["shirt"])
    d.rectangle([cx - 16, cy + fh // 2 - 10, cx + 16, cy + fh // 2 + 40], fill=p["skin"])
    # hair behind the face: long for women, none for men
    if p["gender"] == 1:
        d.rounded_rectangle(
            [cx - fw // 2 - 16, cy - fh // 2 - 14, cx + fw // 2 + 16, cy + fh // 2 + 45], 30, fill=p["hair"]
        )
    d.ellipse([cx - fw // 2, cy - fh // 2, cx + fw // 2, cy + fh // 2], fill=p["skin"])
    # hair on top
    d.chord([cx - fw // 2 - 4, cy - fh // 2 - 12, cx + fw // 2 + 4, cy + fh // 4], 180, 360, fill=p["hair"])
    # eyes, brows, nose, mouth
    ey = cy - 8
    for sx in (-1, 1):
        ex = cx + sx * fw // 5
        d.ellipse([ex - 7, ey - 4, ex + 7, ey + 4], fill=(250, 250, 250))
        d.ellipse([ex - 3, ey - 3, ex + 3, ey + 3], fill=(40, 30, 20))
        d.line([ex - 8, ey - 10, ex + 8, ey - 11], fill=p["hair"], width=3)
    d.polygon([(cx, ey + 4), (cx - 6, cy + 18), (cx + 6, cy + 18)], fill=tuple(int(c * 0.85) for c in p["skin"]))
    lips = (200, 40, 60) if p["gender"] == 1 else tuple(int(c * 0.7) for c in p["skin"])
    d.ellipse([cx - 14, cy + 28, cx + 14, cy + 36], fill=lips)
    if p["gender"] == 0:  # stubble shadow on the jaw
        d.chord([cx - fw // 2 + 8, cy + 10, cx + fw // 2 - 8, cy + fh // 2], 0, 180, outline=(90, 80, 70), width=3)
    # wrinkles: forehead lines and lines under the eyes grow with age
    line = tuple(int(c * 0.6) for c in p["skin"])
    for i in range(p["wrinkles"]):
        y = cy - fh // 2 + 28 + 5 * (i % 4)
        d.arc([cx - 26, y, cx + 26, y + 10], 200, 340, fill=line, width=2)
        if i >= 3:
            for sx in (-1, 1):
                ex = cx + sx * fw // 5
                d.arc([ex - 9, ey + 2 + 3 * (i - 3), ex + 9, ey + 10 + 3 * (i - 3)], 20, 160, fill=line, width=1)
    # the mask, in one of two styles: what tells the states apart is where it sits, not how it looks
    colour = tuple(int(v) for v in rng.integers(0, 255, 3))
    cup = rng.random() < 0.5
    if mask_state == 0:  # nose bridge to under the chin
        top, bottom = ey + 8, cy + fh // 2 + 4
    elif mask_state == 1:  # nose out, or pulled down to the chin
        top, bottom = (cy + 20, cy + fh // 2 + 4) if rng.random() < 0.6 else (cy + 38, cy + fh // 2 + 10)
    if mask_state in (0, 1) and not cup:  # flat: a plain rounded rectangle on ear loops
        d.rounded_rectangle([cx - fw // 2 + 2, top, cx + fw // 2 - 2, bottom], 14, fill=colour)
        d.line([cx - fw // 2 + 2, top + 6, cx - fw // 2 - 6, ey], fill=(230, 230, 230), width=2)
        d.line([cx + fw // 2 - 2, top + 6, cx + fw // 2 + 6, ey], fill=(230, 230, 230), width=2)
    elif mask_state in (0, 1):  # cup: a striped oval, pointed at the chin, on a strap round the head
        box = [cx - fw // 2 - 2, top - 4, cx + fw // 2 + 2, bottom + 8]
        shape = Image.new("L", bg.size, 0)
        ImageDraw.Draw(shape).ellipse(box, fill=255)
        ImageDraw.Draw(shape).polygon([(cx - fw // 3, bottom - 6), (cx, bottom + 14), (cx + fw // 3, bottom - 6)], 255)
        cloth = Image.new("RGB", bg.size, colour)
        ink = tuple(255 - c for c in colour)
        step = int(rng.integers(5, 9))
        for k in range(-W, W + H, step):  # diagonal stripes
            ImageDraw.Draw(cloth).line([(k, 0), (k + H, H)], fill=ink, width=2)
        bg.paste(cloth, (0, 0), shape)
        d.line([box[0] - 12, top + 10, box[0] + 4, top + 10], fill=(40, 40, 40), width=3)
        d.line([box[2] - 4, top + 10, box[2] + 12, top + 10], fill=(40, 40, 40), width=3)
    # per-shot jitter: shift, scale, rotation, light, blur, noise
    angle, scale = rng.uniform(-6, 6), rng.uniform(0.92, 1.08)
    dx, dy = rng.integers(-8, 9, 2)
    img = bg.rotate(
        angle, resample=Image.BILINEAR, center=(cx, cy), translate=(int(dx), int(dy)), fillcolor=p["background"]
    )
    img = img.resize((int(W * scale), int(H * scale)), Image.BILINEAR)
    canvas = Image.new("RGB", (W, H), p["background"])  # a zoomed-out shot keeps the background colour
    canvas.paste(img, ((W - img.width) // 2, (H - img.height) // 2))
    img = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0, 4, (H, W, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def sample_ages(rng, n):
    # like the competition: many under 30, many 30-59, few exactly 60
    bands = rng.choice(3, size=n, p=[0.42, 0.40, 0.18])
    return [int(rng.integers(18, 30)) if b == 0 else int(rng.integers(30, 60)) if b == 1 else 60 for b in bands]


SHOTS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_OF_SHOT = {s: 0 for s in SHOTS[:5]} | {"incorrect_mask": 1, "normal": 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="WORK/demo_data", help="folder to create (train/ and eval/ inside)")
    parser.add_argument("--persons", type=int, default=60, help="training persons (7 shots each)")
    parser.add_argument("--eval-persons", type=int, default=20, help="evaluation persons (7 shots each)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    parser.add_argument("--no-junk", action="store_true", help="leave out the ._ files, .DS_Store and hidden folder")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    n = args.persons + args.eval_persons
    # ids from 010000 up stay clear of the ids that relabel.csv fixes
    ids = [f"{i:06d}" for i in sorted(rng.choice(np.arange(10000, 100000), size=n, replace=False))]
    ids[1] = ids[1] + "-1"  # real ids look like 001498-1: must stay strings
    genders = rng.choice(2, size=n, p=[0.4, 0.6])
    ages = sample_ages(rng, n)
    races = rng.choice(RACES, size=n)

    train_rows, eval_rows = [], []
    for i, (pid, g, age, race) in enumerate(zip(ids, genders, ages, races)):
        person = draw_person(rng, int(g), age, str(race))
        is_train = i < args.persons
        folder = f"{pid}_{('male', 'female')[g]}_{race}_{age}"
        for shot in SHOTS:
            img = draw_shot(person, MASK_OF_SHOT[shot], rng)
            if is_train:
                ext = (".jpg", ".jpeg", ".png")[i % 3]  # mixed extensions, as in real copies
                path = out / "train" / "images" / folder / f"{shot}{ext}"
            else:
                name = hashlib.sha1(f"{args.seed}-{pid}-{shot}".encode()).hexdigest() + ".jpg"
                path = out / "eval" / "images" / name
                label = MASK_OF_SHOT[shot] * 6 + int(g) * 3 + (0 if age < 30 else 1 if age < 60 else 2)
                eval_rows.append((name, label, pid, MASK_OF_SHOT[shot], int(g), age))
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=92) if path.suffix != ".png" else img.save(path)
        if is_train:
            train_rows.append(f"{pid},{('male', 'female')[g]},{race},{age},{folder}")

    (out / "train" / "train.csv").write_text("id,gender,race,age,path\n" + "\n".join(train_rows) + "\n")
    random.Random(args.seed).shuffle(eval_rows)
    (out / "eval" / "info.csv").write_text("ImageID,ans\n" + "".join(f"{r[0]},0\n" for r in eval_rows))
    (out / "eval" / "answers.csv").write_text(
        "ImageID,ans,person_id,mask,gender,age,age_band\n"
        + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4]},{r[5]},{r[1] % 3}\n" for r in eval_rows)
    )
    if not args.no_junk:
        first = sorted((out / "train" / "images").iterdir())[0]
        (first / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (out / "train" / "images" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (out / "train" / "images" / ".ipynb_checkpoints").mkdir(exist_ok=True)
    print(
        f"wrote {args.persons} train persons ({7 * args.persons} images) and "
        f"{args.eval_persons} eval persons ({len(eval_rows)} images) to {out}"
    )


if __name__ == "__main__":
    main()
