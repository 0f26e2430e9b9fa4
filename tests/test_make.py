"""The Makefile DAG as a user drives it: kill -9 in every stage then rerun gives the same submission;
a rerun does only what changed."""

import os
import re
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
from conftest import REPO

# the demo preset, made tiny: a small timm model from scratch, deterministic kernels
TINY = ["PRESET=demo", "MODELS=single multi", "BACKBONE=test_efficientnet", "IMG_SIZE=48", "EPOCHS=3",
        "BATCH=16", "WORKERS=2", "CROP_SIZE=64", "PREP_FLAGS=--bg none",
        "TRAIN_FLAGS=--pretrained none --deterministic --threads 1"]  # fmt: skip


def make(*args, check=True):
    proc = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode not in (0, 1):  # 1: `make -q` saying something is out of date
        raise AssertionError(f"make exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def running(script):
    """Pids of live processes whose command line runs `script`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(script.encode()) for part in cmdline):
            pids.append(int(pid))
    return pids


def kill_make_during(data, work, script, ready=lambda: True):
    """Start `make all`, wait until `script` runs and `ready()` holds, then SIGKILL make and all it started."""
    proc = subprocess.Popen(["make", "all", f"DATA={data}", f"WORK={work}", *TINY], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (running(script) and ready()):
        time.sleep(0.05)
    assert proc.poll() is None, f"make ended before {script} could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # the group's processes are gone once the kernel has reaped them
        if not running(script):
            break
        time.sleep(0.05)


@pytest.mark.trains
def test_kill_each_stage_then_rerun_gives_the_same_submission(demo_data, tmp_path):
    whole, work = tmp_path / "whole", tmp_path / "killed"
    first = make("all", f"DATA={demo_data}", f"WORK={whole}", *TINY)
    assert first.returncode == 0 and "macro_f1" in first.stdout
    assert "2 model(s) (fold0, foldfull)" in first.stdout  # the fold's model and the one trained on every person

    crops = work / "crops"
    kill_make_during(demo_data, work, "preprocess.py", lambda: len(list(crops.rglob("*.png"))) >= 30)
    assert not (crops / "eval.csv").exists() and not (crops / "train.csv").exists()
    log = work / "runs" / "single" / "fold0" / "log.csv"
    kill_make_during(demo_data, work, "train_single.py", lambda: log.is_file() and len(log.read_text().split()) >= 2)
    assert not (work / "runs" / "single" / "fold0" / "metrics.json").exists()
    kill_make_during(demo_data, work, "inference.py")
    assert not (work / "runs" / "multi" / "test_logits.npz").exists()
    kill_make_during(demo_data, work, "train_face.py")
    assert not (work / "face" / "eval.npz").exists()
    kill_make_during(demo_data, work, "ensemble.py")
    assert not (work / "submission.csv").exists()

    rerun = make("all", f"DATA={demo_data}", f"WORK={work}", *TINY)
    assert rerun.returncode == 0 and "preprocess.py" not in rerun.stdout and "split.py" not in rerun.stdout
    assert (work / "submission.csv").read_bytes() == (whole / "submission.csv").read_bytes()
    assert not [p for p in work.rglob("*") if ".tmp" in p.name]

    # a second `make all` does nothing; a changed knob redoes only what depends on it
    assert make("-q", "all", f"DATA={demo_data}", f"WORK={work}", *TINY).returncode == 0
    plan = lambda *change: make("-n", "all", f"DATA={demo_data}", f"WORK={work}", *TINY, *change).stdout  # noqa: E731
    epochs = plan("EPOCHS=4")
    assert "preprocess.py" not in epochs and "split.py" not in epochs
    assert all(s in epochs for s in ("train_single.py", "train_multi.py", "inference.py", "ensemble.py"))
    one_model = plan("MULTI_FLAGS=--lr 0.01")
    assert "train_multi.py" in one_model and "train_single.py" not in one_model
    one_model = plan("MULTI_EPOCHS=5")
    assert "train_multi.py" in one_model and "--epochs 5" in one_model and "train_single.py" not in one_model
    new_fold = plan("FOLDS=0 1")
    assert "--fold 1" in new_fold and "--fold 0" not in new_fold
    tta = plan("TTA=none")
    assert "inference.py" in tta and "--tta none" in tta and "ensemble.py" in tta and "train_" not in tta
    weights = plan("WEIGHTS=equal")
    assert "ensemble.py" in weights and "--weights equal" in weights and "inference.py" not in weights


@pytest.mark.trains
def test_a_new_eval_set_is_only_predicted(demo_data, tmp_path):
    """New eval photos (one dropped, one replaced, then one written over in place): the eval split is cropped again
    (the new photo alone), the training crops, the folds and every model stay; the face networks and the models only
    predict. A training photo written over in place makes every model train again."""
    data, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(demo_data, data)
    args = ("all", f"DATA={data}", f"WORK={work}", *TINY, "MODELS=single")
    assert make(*args).returncode == 0
    info = (data / "eval" / "info.csv").read_text().splitlines()
    dropped, replaced = info.pop().split(",")[0], info[1].split(",")[0]
    (data / "eval" / "info.csv").write_text("\n".join(info) + "\n")
    (data / "eval" / "images" / dropped).rename(data / "eval" / "images" / replaced)  # another face, the same name
    again = make(*args).stdout
    assert "--splits eval" in again and "1 to go" in again and "--splits train" not in again
    assert "split.py" not in again and "train_single.py" not in again
    assert "fold full: trained already" in again and "predicting the eval images" in again
    assert "inference.py" in again and "ensemble.py" in again and "macro_f1" in again
    submission = pd.read_csv(work / "submission.csv")
    assert submission["ImageID"].tolist() == [line.split(",")[0] for line in info[1:]]
    assert make("-q", *args).returncode == 0
    # a photo written over in place (its folder's date stays): seen, cropped again, predicted; nothing trains
    images = data / "eval" / "images"
    folder_date = images.stat().st_mtime_ns
    overwritten = info[2].split(",")[0]
    (images / overwritten).write_bytes((images / info[3].split(",")[0]).read_bytes())
    assert images.stat().st_mtime_ns == folder_date and make("-q", *args, check=False).returncode == 1
    again = make(*args).stdout
    assert "1 to go" in again and "--splits train" not in again and "train_single.py" not in again
    assert "ensemble.py" in again and make("-q", *args).returncode == 0
    # a training photo written over in place: new training data, so the plan crops it and trains again
    photo = next((data / "train" / "images").glob("*/normal.*"))
    photo.write_bytes(photo.read_bytes())
    plan = make("-n", *args).stdout
    assert "--splits train" in plan and "split.py" in plan and "train_single.py" in plan


def test_epochs_on_the_command_line_set_every_model_also_where_a_preset_sets_one(tmp_path):
    def epochs(*args):
        plan = make("-n", "all", "DATA=nodata", f"WORK={tmp_path}", *args).stdout
        return {m: re.search(rf"train_{m}\.py .*--epochs (\d+)", plan).group(1) for m in ("single", "multi", "coord")}

    assert epochs("PRESET=gpu")["coord"] != epochs("PRESET=gpu")["multi"]  # the preset gives coord epochs of its own
    for preset in ("PRESET=cpu", "PRESET=gpu"):
        every = (preset, "MODELS=single multi coord")
        assert epochs(*every, "EPOCHS=4") == {"single": "4", "multi": "4", "coord": "4"}
        assert epochs(*every, "EPOCHS=4", "SINGLE_EPOCHS=7") == {"single": "7", "multi": "4", "coord": "4"}
    assert not list(tmp_path.iterdir())  # a plan writes nothing


def test_seeds_train_each_model_once_per_seed_and_the_ensemble_takes_every_run(tmp_path):
    def plan(*args):
        text = make("-n", "all", "DATA=nodata", f"WORK={tmp_path}", "MODELS=single multi", *args).stdout
        trains = re.findall(r"train_(\w+)\.py .*--fold (\d) --out (\S+) (.*)", text)
        seed = [re.search(r"--seed (\d+)", rest) for *_, rest in trains]
        runs = {(script, out.rsplit("/", 1)[1], s and s.group(1)) for (script, _, out, _), s in zip(trains, seed)}
        ensemble = re.search(r"ensemble\.py --runs (.*?) --", text).group(1).split()
        return runs, len(trains), [r.rsplit("/", 1)[1] for r in ensemble]

    assert plan() == ({("single", "single", None), ("multi", "multi", None)}, 10, ["single", "multi"])
    runs, n_folds, ensembled = plan("SEEDS=0 1")
    assert runs == {("single", "single", None), ("single", "single_seed1", "1"), ("multi", "multi", None),
                    ("multi", "multi_seed1", "1")}  # fmt: skip
    assert n_folds == 20 and ensembled == ["single", "single_seed1", "multi", "multi_seed1"]
    assert not list(tmp_path.iterdir())


def test_each_run_adds_a_model_trained_on_every_person_after_its_folds(tmp_path):
    def plan(*args):
        return make("-n", *args, "DATA=nodata", f"WORK={tmp_path}", "MODELS=single multi").stdout.splitlines()

    lines = plan("all")
    for model in ("single", "multi"):
        trains = [line for line in lines if f"train_{model}.py" in line]
        full = [line for line in trains if "--fold full" in line]
        assert len(trains) == 6 and len(full) == 1
        assert full[0].replace("--fold full", "--fold 4") in trains  # the same recipe
        infer = next(line for line in lines if f"inference.py --run {tmp_path}/runs/{model} " in line)
        assert "--use-folds 0,1,2,3,4,full" in infer
    # it needs the folds first: its epochs are the ones they chose
    alone = plan(f"{tmp_path}/runs/single/foldfull/metrics.json")
    folds = [line.split("--fold ")[1].split()[0] for line in alone if "--fold " in line]
    assert folds == ["0", "1", "2", "3", "4", "full"]
    without = [line for line in plan("all", "FULL=0") if "train_" in line or "inference.py" in line]
    assert not any("--fold full" in line for line in without)
    assert [line.split("--use-folds ")[1].split()[0] for line in without if "inference.py" in line] == ["0,1,2,3,4"] * 2
    assert not list(tmp_path.iterdir())


def test_pseudo_plans_a_second_round_on_the_first_rounds_labels(tmp_path):
    text = make("-n", "all", "DATA=nodata", f"WORK={tmp_path}", "MODELS=single multi", "PSEUDO=1").stdout
    runs = f"{tmp_path}/runs"
    ensembles = re.findall(r"ensemble\.py --runs (.*?) --weights.* --out (\S+)", text)
    assert ensembles == [(f"{runs}/single {runs}/multi", f"{tmp_path}/round1.csv"),
                         (f"{runs}/single_pseudo {runs}/multi_pseudo", f"{tmp_path}/submission.csv")]  # fmt: skip
    trains = re.findall(r"train_(\w+)\.py .*--fold (\d) --out \S+/runs/(\w+) --resume (.*)", text)
    first = {(script, fold): rest for script, fold, run, rest in trains if run == script}
    second = {(script, fold): rest for script, fold, run, rest in trains if run == f"{script}_pseudo"}
    assert len(first) == len(second) == 10 and len(trains) == 20
    for key, rest in second.items():  # the same recipe, with the first round's labels
        assert rest == f"{first[key]} --pseudo {tmp_path}/round1.csv {tmp_path}/round1_oof.csv"
    lines = text.splitlines()  # the first round's ensemble comes before any training on its labels
    round1 = min(i for i, line in enumerate(lines) if f"--out {tmp_path}/round1.csv" in line)
    assert round1 < min(i for i, line in enumerate(lines) if "--pseudo" in line)
    assert not list(tmp_path.iterdir())


@pytest.mark.trains
def test_pseudo_runs_both_rounds_end_to_end(demo_data, tmp_path):
    proc = make("all", f"DATA={demo_data}", f"WORK={tmp_path}", *TINY, "MODELS=single", "PSEUDO=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("round1.csv", "round1_oof.csv", "submission.csv", "runs/single_pseudo/test_logits.npz"):
        assert (tmp_path / name).is_file(), name
    assert "images train on a first round's labels" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("macro_f1=")  # the second round's ensemble, scored
    again = make("-q", "all", f"DATA={demo_data}", f"WORK={tmp_path}", *TINY, "MODELS=single", "PSEUDO=1")
    assert again.returncode == 0  # nothing left to do


def test_the_face_stages_come_before_the_ensemble_and_can_be_left_out(tmp_path):
    def plan(*args):
        return make("-n", "all", "DATA=nodata", f"WORK={tmp_path}", *args).stdout

    lines = plan().splitlines()
    step = {
        s: next(i for i, line in enumerate(lines) if s in line) for s in ("embed.py", "train_face.py", "ensemble.py")
    }
    assert step["embed.py"] < step["train_face.py"] < step["ensemble.py"]
    assert f"--embeddings {tmp_path}/embeddings --face {tmp_path}/face" in lines[step["ensemble.py"]]
    assert "--use-folds 0 1 2 3 4 --full" in "".join(lines[step["train_face.py"] : step["train_face.py"] + 2])
    assert "--full" not in "".join(plan("FULL=0").split("train_face.py")[1:2])  # FULL: the models' and the face's
    no_face = plan("FACE=0")
    assert "embed.py" in no_face and "train_face.py" not in no_face and "--face" not in no_face
    no_embed = plan("EMBED=0")
    assert "embed.py" not in no_embed and "train_face.py" not in no_embed and "--embeddings" not in no_embed
    assert "--epochs 3" in "".join(plan("FACE_FLAGS=--epochs 3").split("train_face.py")[1:2])
    assert not list(tmp_path.iterdir())  # a plan writes nothing
