"""How ensemble.py --group-shots scales: seconds and right-person rate as the set of faces grows.

    python bench/group_bench.py --crops WORK/bench/crops [--persons 300 650 1300] [--lsa-persons 1800]

Matches the train split's shots (the true unmasked shots as anchors, so only the matching is measured) in sets
of --persons persons; then times scipy's assignment alone on a random matrix of --lsa-persons persons (the
competition's eval set has 1,800), since that step grows as the cube of the images and the rest as the square.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from table import bench_rows  # noqa: E402

from common import load_crops  # noqa: E402
from shots import MATCH_SIZE, assign_shots, shot_groups  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/bench/crops")
parser.add_argument("--persons", type=int, nargs="+", default=[300, 650, 1300], help="set sizes to match")
parser.add_argument("--lsa-persons", type=int, default=1800, help="persons for the assignment-only timing")
parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

index, images = load_crops(args.crops, "train", MATCH_SIZE)  # the 32-px copies ensemble.py matches, in index order
persons = pd.factorize(index["person_id"])[0]
order = np.random.default_rng(0).permutation(persons.max() + 1)  # which persons go into a set
rows_out, seconds = [], {}
for n in args.persons:
    rows = np.flatnonzero(np.isin(persons, order[:n]))
    t = time.perf_counter()
    groups = shot_groups(np.asarray(images[rows]), index["mask"].to_numpy()[rows] == 2)
    seconds[n] = time.perf_counter() - t
    right = np.mean(persons[rows] == persons[rows][groups])
    print(f"{n:5d} persons ({len(rows)} images): {seconds[n]:6.1f} s, {right:.1%} with their own person", flush=True)
    rows_out.append((f"--group-shots, {n} persons ({len(rows)} images)", f"{seconds[n]:.1f} s, {right:.1%} right"))
small, large = min(seconds), max(seconds)
print(f"{large} / {small} persons: {seconds[large] / seconds[small]:.1f}x the time for {large / small:.1f}x the faces")

# The assignment alone at the competition's size: six masked shots to each unmasked one.
others = 6 * args.lsa_persons
sim = np.random.default_rng(0).random((others, args.lsa_persons), dtype=np.float32)
t = time.perf_counter()
assign_shots(sim)
lsa = time.perf_counter() - t
print(f"assignment alone, {args.lsa_persons} persons ({others} x {others}, random similarities): {lsa:.1f} s")
rows_out.append((f"--group-shots assignment alone, {args.lsa_persons} persons (random matrix)", f"{lsa:.1f} s"))
bench_rows(args.table, rows_out)
