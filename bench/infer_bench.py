"""Inference speed: eval images per second with and without test-time augmentation, one run.

    python bench/infer_bench.py --crops WORK/bench/crops [--run WORK/bench/runs/single]

Uses inference.py's model loading (the run's first fold) and prediction; without --run, --backbone
with an 18-way head, randomly initialised unless --pretrained (speed does not depend on the weights).
"""

import argparse
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from table import bench_rows  # noqa: E402

from common import keep_freed_memory, load_crops, make_env  # noqa: E402
from model import build_model, load_models, predict  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", default=None, help="a trained run (default: --backbone, untrained head)")
parser.add_argument("--backbone", default="tf_efficientnet_lite0")
parser.add_argument("--img-size", type=int, default=128)
parser.add_argument("--pretrained", default="none", help="weights do not change speed; none runs any backbone offline")
parser.add_argument("--crops", default="WORK/bench/crops")
parser.add_argument("--images", type=int, default=512, help="eval images timed per way")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
args = parser.parse_args()

env = make_env()
keep_freed_memory(env.device)  # as inference.py does
if args.run:
    name, model, mean, std, cfg = load_models(args.run, env)[0]
else:
    cfg = Namespace(backbone=args.backbone, pretrained=args.pretrained, head_dropout=0.0, dropout_samples=1,
                    img_size=args.img_size)  # fmt: skip
    name, (model, mean, std) = "untrained head", build_model(cfg, {"label": 18}, env)
index, cache = load_crops(args.crops, "eval", cfg.img_size)
images = torch.from_numpy(cache)
rows = torch.arange(min(args.images, len(index)))
rates = {t: [] for t in ("none", "flip", "flip+shift")}
for r in range(args.rounds):
    for tta in rates:
        t = time.perf_counter()
        predict(model, images, rows, env, mean, std, 256, tta)
        rates[tta].append(len(rows) / (time.perf_counter() - t))
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()), flush=True)
med = {k: statistics.median(v) for k, v in rates.items()}
print(f"\n{args.run or args.backbone} ({name}, {cfg.backbone} at {cfg.img_size} px), {env.device} {env.precision}:")
for tta, v in med.items():
    print(f"tta {tta:10s} {v:7.0f} img/s  ({v / med['none']:.2f}x no TTA)")
bench_rows(args.table, [
    (f"inference {cfg.backbone} {cfg.img_size} px {env.device.type}, TTA none / flip / flip+shift",
     " / ".join(f"{v:.0f}" for v in med.values()) + " img/s"),
])  # fmt: skip
