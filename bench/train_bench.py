"""Training speed: our engine against a seed-style loop and against compute alone, in one run.

    python bench/train_bench.py --crops WORK/bench/crops --backbone tf_efficientnet_lite0 --img-size 128

(a) ours: batches gathered from the packed uint8 cache, augmented on the device, channels_last, bf16
    autocast where the machine has bf16 units, else fp32 (as train_*.py do);
(b) seed-style: a Dataset that opens each crop PNG and applies torchvision PIL transforms per
    sample, a DataLoader with worker processes, fp32, no channels_last;
(c) compute only: (a)'s model stepping on one batch already in memory;
(d) the same in (b)'s fp32 default layout: (c)/(d) is what our precision and layout gain on this machine
    (on one H200 lite0 at 224 px b32 compute ran no faster in bf16 + channels_last than (b) end to end).
(b+) (b) in our process. On a CPU our engine keeps freed memory in the process (`common.keep_freed_memory`),
    a process-wide setting that speeds the usual loop too (1.1-1.4x), so there (b) runs in a process of its
    own with glibc's default malloc, as the usual loop runs, and (b+) in ours: (a)/(b+) is what the engine
    gains beyond that setting.
They run in alternation (rounds), so a busy machine slows all ways alike; medians are printed,
with the ratios (a)/(b), (a)/(b+) and (a)/(c), and the data paths alone (no model): batches/s of our cache
+ device augmentation against the seed-style DataLoader.

How much (a) gains over (b) depends on the backbone as much as on the data path: bf16 units speed up
dense convolutions about 3x (resnet18/50 at 224 px, measured on an AMX CPU) and depthwise ones less
(EfficientNet compute 1.8-2.4x, with `model.fast_depthwise_training` and `model.fast_relu6`), so `make bench` runs
tf_efficientnet_lite0, efficientnet_b0 and resnet18 at 224 px. On a CPU without bf16 units both run fp32
and (a) gains what channels_last gives (lite0 1.55x on AVX2, resnet18 1.06x).
"""

import argparse
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from table import bench_rows, versus  # noqa: E402

from batches import make_batch, task_targets  # noqa: E402
from common import keep_freed_memory, load_crops, make_env  # noqa: E402
from engine import make_optimizer, param_groups  # noqa: E402
from model import build_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--crops", default="WORK/bench/crops")
parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm name (e.g. resnet18)")
parser.add_argument("--pretrained", default="none", help="weights do not change speed; none runs any backbone offline")
parser.add_argument("--img-size", type=int, default=128)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=6, help="timed steps per way per round")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of the seed-style loop")
parser.add_argument("--seed-process", action="store_true", help=argparse.SUPPRESS)  # (b): the child below
args = parser.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
own_malloc = not args.seed_process and keep_freed_memory(device)  # as engine.setup_env does
index, cache = load_crops(args.crops, "train", args.img_size)
env = make_env(device)
cfg = Namespace(backbone=args.backbone, pretrained=args.pretrained, head_dropout=0.2, dropout_samples=1, opt="adamw",
                lr=1e-3, weight_decay=0.01, momentum=0.9, backbone_lr_mult=0.1, flip=0.5, color=0.2, ssr=0.08,
                erase=0.25, old_mixup=0.0)  # fmt: skip
images = torch.from_numpy(cache)
if device.type == "cuda":
    images = images.to(device)
data = Namespace(images=images, targets=task_targets(index), old_pool={})
gen = torch.Generator().manual_seed(0)


def new_model(fast):
    e = env if fast else make_env(device, "fp32", "off")
    model, mean, std = build_model(cfg, {"label": 18}, e)
    opt = make_optimizer(param_groups(*model.params_of(["label"]), cfg), cfg)
    return e, model.train(), opt, mean, std


def step(e, model, opt, x, y):
    with e.autocast():
        loss = F.cross_entropy(model(x)["label"].float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ---- (b) the seed-style data path -----------------------------------------------------
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, files, labels, size):
        self.files, self.labels = files, labels
        self.tf = T.Compose([T.Resize(size), T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2),
                             T.RandomAffine(14, (0.08, 0.08), (0.92, 1.08)), T.ToTensor(),
                             T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])  # fmt: skip

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB")), self.labels[i]


files = [str(Path(args.crops) / f) for f in index["file"]]
dataset = FileDataset(files, data.targets["label"], args.img_size)
loader = torch.utils.data.DataLoader(
    dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers, drop_last=True,
    persistent_workers=True, pin_memory=device.type == "cuda",
)  # fmt: skip
seed_batches = iter(loader)


def seed_batch():
    global seed_batches
    try:
        return next(seed_batches)
    except StopIteration:
        seed_batches = iter(loader)
        return next(seed_batches)


def our_batch(mean, std):
    rows = torch.randint(0, len(index), (args.batch_size,), generator=gen)
    return make_batch(data, rows, cfg, env, gen, mean, std, args.batch_size)


PREFETCHED = args.loader_workers * 2  # DataLoader's default prefetch_factor is 2 batches per worker


def timed(fn, warmup=1, steps=args.steps):
    for _ in range(warmup):  # warm-up; for the DataLoader also the batches its workers made while others ran
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * args.batch_size / (time.perf_counter() - t)


def a_ours():
    x, y = our_batch(fast[3], fast[4])
    step(*fast[:3], x, y["label"])


def b_seed():
    x, y = seed_batch()
    step(*slow[:3], x.to(device, non_blocking=True), y.to(device, non_blocking=True))


def timed_seed(way):
    # the DataLoader ways drain the batches its workers made while others ran, then run 4x the
    # steps: otherwise batches made in advance flatter the seed-style loop (seen on a GPU).
    # The data path alone runs 8x the steps: without a model a step is too short to time.
    if way == "b":
        return timed(b_seed, PREFETCHED + 1, 4 * args.steps)
    return timed(seed_batch, PREFETCHED + 1, 8 * args.steps)


slow = new_model(False)
if args.seed_process:  # (b) the child: times the seed-style loop whenever the parent says which way
    print("ready", flush=True)
    for way in sys.stdin:
        print(timed_seed(way.strip()), flush=True)
    sys.exit()
if own_malloc:
    child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--seed-process"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    for line in child.stdout:  # set-up output, then "ready"
        if line.strip() == "ready":
            break
    else:
        sys.exit(f"error: the seed-style loop's own process stopped (exit code {child.wait()}) before timing")


def in_child(way):
    child.stdin.write(way + "\n")
    child.stdin.flush()
    return float(child.stdout.readline())


fast = new_model(True)
fixed_x, fixed_y = our_batch(fast[3], fast[4])


def c_compute():
    step(*fast[:3], fixed_x, fixed_y["label"])


fixed_x_fp32 = fixed_x.float().contiguous()


def d_compute_fp32():
    step(*slow[:3], fixed_x_fp32, fixed_y["label"])


seed_as_it_runs = in_child if own_malloc else timed_seed  # in a process of its own, without our memory setting
ways = dict(a_ours=lambda: timed(a_ours), b_seed=lambda: seed_as_it_runs("b"))
if own_malloc:
    ways |= dict(b_seed_our_memory=lambda: timed_seed("b"))
ways |= dict(c_compute=lambda: timed(c_compute), d_compute_fp32=lambda: timed(d_compute_fp32),
             data_ours=lambda: timed(lambda: our_batch(fast[3], fast[4]), 1, 8 * args.steps),
             data_seed=lambda: seed_as_it_runs("data"))  # fmt: skip
results = {k: [] for k in ways}
for r in range(args.rounds):
    for k, way in ways.items():
        results[k].append(way())
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()), flush=True)
if own_malloc:
    child.stdin.close()
    child.wait()
med = {k: statistics.median(v) for k, v in results.items()}
print(
    f"\n{args.backbone} at {args.img_size} px, batch {args.batch_size}, {device}, ours in {env.precision}"
    f"{' + channels_last' if env.channels_last else ''}; seed-style fp32 with {args.loader_workers} loader workers"
)
print(f"(a) ours               {med['a_ours']:7.1f} img/s")
as_it_runs = "  (own process, glibc's default malloc)" if own_malloc else ""
print(f"(b) seed-style loop    {med['b_seed']:7.1f} img/s{as_it_runs}")
if own_malloc:
    print(f"(b+) (b) in our process {med['b_seed_our_memory']:7.1f} img/s  (with our memory setting)")
print(f"(c) compute only       {med['c_compute']:7.1f} img/s")
print(f"(d) (c) in fp32, NCHW  {med['d_compute_fp32']:7.1f} img/s")
print(f"(c)/(d) = {med['c_compute'] / med['d_compute_fp32']:.2f}x: what our precision and layout gain here")
print(f"(a)/(b) = {med['a_ours'] / med['b_seed']:.2f}x   (a)/(c) = {med['a_ours'] / med['c_compute']:.2f}")
if own_malloc:
    print(f"(a)/(b+) = {med['a_ours'] / med['b_seed_our_memory']:.2f}x: beyond the memory setting")
print(f"data path alone: ours {med['data_ours']:.0f} img/s, seed DataLoader {med['data_seed']:.0f} img/s, "
      f"{med['data_ours'] / med['data_seed']:.1f}x")  # fmt: skip
what = f"train {args.backbone} {args.img_size} px batch {args.batch_size} {device.type}"

pairs = [("(a) ours / (b) seed-style", "a_ours", "b_seed"), ("(a) ours / (c) compute only", "a_ours", "c_compute"),
         ("compute only, our precision and layout / fp32 default layout", "c_compute", "d_compute_fp32"),
         ("data path alone, ours / seed loader", "data_ours", "data_seed")]  # fmt: skip
if own_malloc:
    pairs += [("(a) ours / (b+) seed-style in our process, with our memory setting", "a_ours", "b_seed_our_memory")]
bench_rows(args.table, [(f"{what}: {label}", versus(med[a], med[b], "img/s")) for label, a, b in pairs])
