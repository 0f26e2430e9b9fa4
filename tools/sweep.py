"""Compare training recipes over several folds: one run of a training script per recipe and fold,
several side by side (one GPU holds ten lite0 runs at 128 px; on a 2-core CPU keep --parallel 1).

    python tools/sweep.py --crops WORK/crops --folds WORK/folds.csv --fold 0,1,2 --parallel 10 \
        --recipe "preset: train_single.py --backbone-lr-mult 1.0" \
        --recipe "cutmix: train_single.py --backbone-lr-mult 1.0 --cutmix 0.5"

Prints each recipe's mean validation macro F1 and its paired difference from the first recipe on the same
folds, +- its standard deviation over folds: folds differ more than recipes do (EXPERIMENTS.md), so the
paired figure is the one to read. Writes OUT/results.csv (a row per run) and the runs in OUT/<recipe>/.
A finished run (metrics.json) is read, not rerun; an interrupted one continues (--resume).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # common.py lives in the repository root
from common import InputError, run_main, save_csv  # noqa: E402

# ---- knobs -----------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/crops", help="preprocess.py output")
parser.add_argument("--folds", default="WORK/folds.csv", help="split.py output")
parser.add_argument("--fold", default="0,1,2", help="folds to validate on, comma-separated")
parser.add_argument("--recipe", action="append", default=[], help="'NAME: SCRIPT FLAGS...'; the first is the reference")
parser.add_argument("--recipes", help="a file of recipes, one per line ('#' comments)")
parser.add_argument("--common", default="", help="flags every run gets, e.g. '--img-size 128 --epochs 6'")
parser.add_argument("--parallel", type=int, default=1, help="runs at once")
parser.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: cores / --parallel)")
parser.add_argument("--out", default="WORK/sweep", help="folder of the runs and results.csv")


def parse_recipes(args):
    lines = list(args.recipe)
    if args.recipes:
        lines += [s for s in Path(args.recipes).read_text().splitlines() if s.strip() and not s.startswith("#")]
    recipes = {}
    for line in lines:
        name, _, command = line.partition(":")
        name, command = name.strip(), shlex.split(command)
        if not name.replace("_", "").replace("-", "").isalnum() or not command or not command[0].endswith(".py"):
            raise InputError(
                f"--recipe {line!r}: expected 'NAME: SCRIPT.py FLAGS...' with NAME in letters, digits, - _"
            )
        if not (REPO / command[0]).is_file():
            raise InputError(f"--recipe {line!r}: no script {command[0]} in {REPO}")
        recipes[name] = command
    if not recipes:
        raise InputError("no recipes: give --recipe 'NAME: SCRIPT.py FLAGS' or --recipes FILE")
    return recipes


def read_metrics(fold_dir):
    path = fold_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def paired_table(results):
    """Mean val F1 per recipe, and its difference from the first recipe on the folds both finished."""
    f1 = results.pivot_table(index="recipe", columns="fold", values="val_macro_f1", sort=False)
    diff = f1 - f1.iloc[0]  # NaN where either run is missing, so mean and std use shared folds only
    tasks = results.groupby("recipe", sort=False)[["val_mask_f1", "val_gender_f1", "val_age_f1"]].mean()
    table = pd.DataFrame(
        dict(folds=f1.notna().sum(axis=1), val_f1=f1.mean(axis=1), paired=diff.mean(axis=1), sd=diff.std(axis=1))
    ).join(tasks)
    table.iloc[0, table.columns.get_indexer(["paired", "sd"])] = float("nan")  # the reference itself
    return table.reset_index()


def main():
    args = parser.parse_args()
    recipes = parse_recipes(args)
    folds = [k.strip() for k in args.fold.split(",") if k.strip()]
    # the runs start in the repository root: absolute paths, so the sweep works from any folder
    out, crops, folds_csv = Path(args.out).resolve(), Path(args.crops).resolve(), Path(args.folds).resolve()
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.parallel)
    jobs = [(name, k) for name in recipes for k in folds]  # recipe by recipe: the first ones finish first
    todo = [(name, k) for name, k in jobs if read_metrics(out / name / f"fold{k}") is None]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished; {args.parallel} at a time")

    # ---- run: a pool of subprocesses, each a training script as a user would type it ----
    running, failed = [], []
    bar = tqdm(total=len(todo), desc="runs", unit="run")
    while todo or running:
        while todo and len(running) < args.parallel:
            name, k = todo.pop(0)
            command = [sys.executable, str(REPO / recipes[name][0]), "--crops", str(crops), "--folds", str(folds_csv),
                       "--fold", k, "--out", str(out / name), "--threads", str(threads), "--resume",
                       *shlex.split(args.common), *recipes[name][1:]]  # fmt: skip
            (out / name).mkdir(parents=True, exist_ok=True)
            log = open(out / name / f"fold{k}.log", "w")
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), name, k, log))
        time.sleep(0.5)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, name, k, log = job
            running.remove(job)
            log.close()
            bar.update()
            if proc.returncode != 0:
                failed.append(f"{name} fold {k} (exit {proc.returncode}, see {out / name}/fold{k}.log)")
                tqdm.write(f"failed: {failed[-1]}")
    bar.close()

    # ---- results: a row per finished run, then the paired comparison ----
    rows = [m | dict(recipe=name, fold=k) for name, k in jobs if (m := read_metrics(out / name / f"fold{k}"))]
    if not rows:
        raise InputError(f"no run finished: {'; '.join(failed)}")
    results = pd.DataFrame(rows)
    save_csv(results, out / "results.csv")
    table = paired_table(results)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    print(f"results: {out / 'results.csv'}" + (f"; failed: {'; '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
