"""Memory of a training run: its peak, and proof that the packed cache is not copied per process.

    python bench/memory_bench.py --crops WORK/bench/crops --procs 1 2

Runs train_single.py for a few steps and its validation, alone and under torchrun with N gloo
processes, and samples every training process with psutil while it runs. Prints per run:
- peak RSS of each process (what `top` shows: resident pages of the memory-mapped cache count in every
  process that touched them) and the peak of PSS summed over the processes (shared pages counted once:
  the memory the run really holds);
- the cache file's pages: resident in each process, and how many of them are private copies
  (private dirty: pages a process wrote to, or copied). The cache is a memory map of
  crops/train_u8_<size>.npy that training only reads, so all processes read the same pages of the
  kernel's page cache: 0 MB copied, however many processes (or DataLoader workers) there are.
A few steps touch only part of the cache; a whole epoch maps all of it (one copy, the file's size).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from table import bench_rows  # noqa: E402

from common import load_crops  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/bench/crops")
parser.add_argument("--backbone", default="tf_efficientnet_lite0")
parser.add_argument("--img-size", type=int, default=128)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=10, help="training steps per run (then one validation)")
parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes per run (>1: torchrun, gloo)")
parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
args = parser.parse_args()

MB = 2**20
_, cache = load_crops(args.crops, "train", args.img_size)  # makes the sized cache once, as training would
cache_file = str(Path(cache.filename).resolve())
cache_mb = Path(cache_file).stat().st_size / MB
work = Path(tempfile.mkdtemp(prefix="memory_bench_"))
folds = work / "folds.csv"
split = [sys.executable, str(HERE.parent / "split.py"), "--crops", args.crops, "--folds", "5", "--out", str(folds)]
subprocess.run(split, check=True, capture_output=True)


def sample(proc):
    """(rss, pss, cache resident, cache private dirty) of one process, in MB."""
    full = proc.memory_full_info()
    mapped = [m for m in proc.memory_maps(grouped=True) if m.path == cache_file]
    cache_rss = sum(m.rss for m in mapped)
    cache_copied = sum(m.private_dirty for m in mapped)
    return full.rss / MB, full.pss / MB, cache_rss / MB, cache_copied / MB


def run(n):
    train = [str(HERE.parent / "train_single.py"), "--crops", args.crops, "--folds", str(folds), "--fold", "0",
             "--out", str(work / f"run{n}"), "--backbone", args.backbone, "--pretrained", "none",
             "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", "1",
             "--max-steps", str(args.steps)]  # fmt: skip
    if n > 1:
        train = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *train]
    log = work / f"run{n}.log"  # a file, not a pipe: a full pipe would stall the trainer
    with log.open("w") as out:
        # on CPU, also where there is a GPU: it is the memory map on the host that is measured
        cpu_only = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        top = psutil.Popen([sys.executable, *train], stdout=out, stderr=subprocess.STDOUT, env=cpu_only)
    peak = {}  # pid -> max of each figure
    peak_pss_sum = 0.0
    while top.poll() is None:
        try:  # torchrun's own process only launches the trainers
            procs = top.children(recursive=True) if n > 1 else [top]
        except psutil.Error:
            procs = []
        figures = {}
        for p in procs:
            try:
                if "train_single.py" in " ".join(p.cmdline()):
                    figures[p.pid] = sample(p)
            except psutil.Error:  # it ended between the listing and the reading
                pass
        for pid, f in figures.items():
            peak[pid] = tuple(max(a, b) for a, b in zip(peak.get(pid, f), f))
        peak_pss_sum = max(peak_pss_sum, sum(f[1] for f in figures.values()))
        time.sleep(args.every)
    if top.returncode != 0:
        sys.exit(f"error: training with {n} process(es) failed:\n{log.read_text()[-2000:]}")
    return list(peak.values()), peak_pss_sum


print(f"cache {cache_file}: {cache_mb:.0f} MB; train_single.py {args.backbone} {args.img_size} px b{args.batch_size}, "
      f"{args.steps} steps + validation")  # fmt: skip
rows = []
for n in args.procs:
    t0 = time.time()
    peaks, pss_sum = run(n)
    rss = " / ".join(f"{p[0]:.0f}" for p in peaks)
    cache_rss = " / ".join(f"{p[2]:.1f}" for p in peaks)
    copied = sum(p[3] for p in peaks)
    print(f"{n} process(es), {time.time() - t0:.0f} s: peak RSS {rss} MB; peak PSS summed {pss_sum:.0f} MB; "
          f"cache resident {cache_rss} MB of {cache_mb:.0f}, copied {copied:.0f} MB")  # fmt: skip
    what = f"memory, train {args.backbone} {args.img_size} px b{args.batch_size}, {n} process(es)"
    rows.append(
        (f"{what}: peak RSS each; PSS summed; cache pages copied", f"{rss} MB; {pss_sum:.0f} MB; {copied:.0f} MB")
    )
bench_rows(args.table, rows)
shutil.rmtree(work)  # the short runs' checkpoints and logs
