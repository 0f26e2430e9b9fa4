"""Coordinate updates against the weighted sum: seconds per batch on the same model, one run.

    python bench/coord_bench.py --backbone tf_efficientnet_lite0 --img-size 128

The weighted-sum step (train_multi.py) runs the shared backbone once; the coordinate step
(train_coord.py) runs it once per task that reads it, after the previous task's update. With a
backbone per task nothing is shared and the two should cost the same. Both steps are the
scripts' own code (train_coord.coord_step; the weighted sum as train_multi.py writes it).
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
from table import bench_rows, versus  # noqa: E402

from common import TASKS, make_env  # noqa: E402
from engine import make_optimizer, param_groups  # noqa: E402
from losses import make_loss  # noqa: E402
from model import build_model  # noqa: E402
from train_coord import coord_step  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--backbone", default="tf_efficientnet_lite0")
parser.add_argument("--img-size", type=int, default=128)
parser.add_argument("--pretrained", default="none", help="weights do not change speed; none runs any backbone offline")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
args = parser.parse_args()

env = make_env()
cfg = Namespace(backbone=args.backbone, pretrained=args.pretrained, head_dropout=0.2, dropout_samples=1, opt="adamw",
                lr=1e-3, weight_decay=0.01, momentum=0.9, backbone_lr_mult=0.1, label_smoothing=0.1, ldam_margin=0.5,
                focal_gamma=2.0, focal_alpha=1.0)  # fmt: skip
x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=env.device)
if env.channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
y = {t: torch.randint(0, n, (args.batch_size,), device=env.device) for t, n in TASKS.items()}
losses_of = {t: (1.0, make_loss("ce", torch.ones(n), cfg)) for t, n in TASKS.items()}


def setups(own):
    model, _, _ = build_model(cfg, dict(TASKS), env, own)
    model.train()
    multi_opt = make_optimizer(param_groups(*model.params_of(list(TASKS)), cfg), cfg)
    coord_opts = {t: make_optimizer(param_groups(*model.params_of([t]), cfg), cfg) for t in TASKS}

    def multi():
        with env.autocast():
            out = model(x)
            loss = sum(w * fn(out[t], y[t]) for t, (w, fn) in losses_of.items())
        multi_opt.zero_grad(set_to_none=True)  # the step of train_multi.py
        env.scaler.scale(loss).backward()
        env.scaler.unscale_(multi_opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        env.scaler.step(multi_opt)
        env.scaler.update()

    def coord():
        coord_step(model, x, y, None, list(TASKS), {t: [t] for t in TASKS}, losses_of, coord_opts, env)

    return multi, coord


def seconds_per_batch(fn):
    fn()
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        fn()
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / args.steps


shared_multi, shared_coord = setups({})
own_multi, own_coord = setups({"gender": args.backbone, "age": args.backbone})
ways = dict(shared_multi=shared_multi, shared_coord=shared_coord, own_multi=own_multi, own_coord=own_coord)
times = {k: [] for k in ways}
for r in range(args.rounds):
    for k, fn in ways.items():
        times[k].append(seconds_per_batch(fn))
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
med = {k: statistics.median(v) for k, v in times.items()}
print(f"\n{args.backbone} at {args.img_size} px, batch {args.batch_size}, {env.device} {env.precision}")
print(
    f"one shared backbone : weighted sum {med['shared_multi']:.3f} s/batch, coordinate {med['shared_coord']:.3f} "
    f"s/batch: {med['shared_coord'] / med['shared_multi']:.2f}x (three forwards by design: at most 3x)"
)
print(f"a backbone per task : weighted sum {med['own_multi']:.3f} s/batch, coordinate {med['own_coord']:.3f} "
      f"s/batch: {med['own_coord'] / med['own_multi']:.2f}x (nothing shared: about 1x)")  # fmt: skip
what = f"coordinate / weighted sum, {args.backbone} {args.img_size} px batch {args.batch_size} {env.device.type}"

pairs = [("one shared backbone", "shared_coord", "shared_multi"), ("a backbone per task", "own_coord", "own_multi")]
bench_rows(args.table, [(f"{what}, {label}", versus(med[a], med[b], "s", 3)) for label, a, b in pairs])
