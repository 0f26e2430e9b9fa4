"""Batches: the rows of a fold, their order, and the pixels of a batch with its augmentation.

Training never decodes an image: a batch is gathered from the packed uint8 cache (a memory map on CPU, moved
whole to a GPU) and augmented as one tensor on the device, each augmentation a small function below.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common import TASKS, InputError, age_band, class_id, load_crops, split_class
from rawdata import read_answers

# ---- the rows of a fold: training targets, validation, pseudo-labels ------------------------


def parse_ages(spec):
    """'29,57-59' -> {29, 57, 58, 59}"""
    ages = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            ages.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise InputError(f"--drop-ages {spec!r}: expected numbers and ranges such as 29,57-59") from None
    return ages


def task_targets(index, old_age=60):
    """Targets per head. 'label', 'mask', 'gender', 'age' are classes; 'age_reg' is scaled years.
    With old_age != 60 the age band (and 18-class label) moves for training only."""
    # copies: pandas 3 hands out read-only views, which torch refuses to wrap
    band = age_band(index["age"].to_numpy(), old_age)
    mask, gender = index["mask"].to_numpy().copy(), index["gender"].to_numpy().copy()
    return dict(
        label=torch.as_tensor(class_id(mask, gender, band)),
        mask=torch.as_tensor(mask),
        gender=torch.as_tensor(gender),
        age=torch.as_tensor(band),
        age_reg=torch.as_tensor((index["age"].to_numpy() - 40) / 20, dtype=torch.float32),
    )


def fold_of_images(index, folds_path):
    """The fold of each crop in a crops index, from split.py's folds.csv (which is per person)."""
    folds_path = Path(folds_path)
    if not folds_path.is_file():
        raise InputError(f"{folds_path}: not found (run split.py first)")
    folds = pd.read_csv(folds_path, dtype={"person_id": str})
    fold_of = index["person_id"].map(dict(zip(folds["person_id"], folds["fold"])))
    if fold_of.isna().any():
        raise InputError(f"{folds_path}: {fold_of.isna().sum()} images of persons without a fold: rerun split.py")
    return fold_of.to_numpy(int)


def load_fold(args, fold, env):
    """Training and validation rows of one fold, with the pixels on the device when it is a GPU."""
    index, cache = load_crops(args.crops, "train", args.img_size)
    fold_of = fold_of_images(index, args.folds)
    n_folds = len(np.unique(fold_of))
    if fold != "full" and not 0 <= fold < n_folds:
        raise InputError(f"--fold {fold}: {args.folds} has folds 0..{n_folds - 1}")
    is_val = fold_of == fold if fold != "full" else np.zeros(len(index), bool)
    keep = ~is_val & ~index["age"].isin(parse_ages(args.drop_ages)).to_numpy()
    train_rows, val_rows = np.flatnonzero(keep), np.flatnonzero(is_val)
    # the uint8 cache stays a memory map on CPU (shared by processes), moves whole to a GPU
    images = torch.from_numpy(cache)
    train_targets = task_targets(index, args.old_age)
    true_targets = task_targets(index, 60)  # scores always on the true bands
    if args.pseudo:  # (the training images and the eval ones, in memory: no longer one shared map)
        n_true = len(train_rows)
        index, images, train_targets, train_rows = add_pseudo(args, index, images, train_targets, train_rows, val_rows)
        if env.main:
            print(f"pseudo: {len(train_rows) - n_true} images train on a first round's labels", flush=True)
    if env.device.type == "cuda":
        images = images.to(env.device)
    counts = {
        t: torch.bincount(train_targets[t][train_rows], minlength=n) for t, n in (("label", 18),) + tuple(TASKS.items())
    }
    old_pool = {}  # for --old-mixup: rows of old persons per training class
    for r in train_rows[train_targets["age"][train_rows].numpy() == 2]:
        old_pool.setdefault(int(train_targets["label"][r]), []).append(r)
    return SimpleNamespace(
        index=index,
        images=images,
        train_rows=torch.as_tensor(train_rows),
        val_rows=torch.as_tensor(val_rows),
        targets=train_targets,
        true_targets=true_targets,
        counts=counts,
        fold=fold,
        old_pool={k: torch.as_tensor(v) for k, v in old_pool.items()},
        steps_per_epoch=len(train_rows) // args.batch_size,
    )


def add_pseudo(args, index, images, targets, train_rows, val_rows):
    """--pseudo: a first round's ensemble labelled the eval images (its submission) and, out of fold, every
    training image. The eval images and this fold's validation images train on those labels, so the fold's
    validation persons stand where the eval persons stand: unlabelled, predicted once, trained on. Scores stay
    on the true labels (data.true_targets)."""
    pseudo = pd.concat([read_answers(p) for p in args.pseudo])
    pseudo = pseudo[~pseudo.index.duplicated()]
    ids = index["image_id"].to_numpy()
    val = val_rows[np.isin(ids[val_rows], pseudo.index)]
    eval_index, eval_cache = load_crops(args.crops, "eval", args.img_size)
    eval_index = eval_index[eval_index["image_id"].isin(pseudo.index)]
    if len(val) + len(eval_index) == 0:
        raise InputError(f"--pseudo {' '.join(args.pseudo)}: no image id of the eval set or of this fold's val persons")

    def as_targets(labels):  # task_targets of a class: its age is the band's middle (for --age-regression)
        mask, gender, band = split_class(labels)
        return task_targets(pd.DataFrame(dict(mask=mask, gender=gender, age=np.array([25, 45, 60])[band])))

    for k, v in as_targets(pseudo.loc[ids[val]]).items():  # this fold's val images: relabelled
        targets[k][torch.as_tensor(val)] = v
    for k, v in as_targets(pseudo.loc[eval_index["image_id"]]).items():  # eval images: appended
        targets[k] = torch.cat([targets[k], v])
    eval_rows = len(index) + np.arange(len(eval_index))
    images = torch.cat([images, torch.from_numpy(np.asarray(eval_cache[eval_index.index.to_numpy()]))])
    index = pd.concat([index, eval_index.assign(person_id="eval/" + eval_index["image_id"])], ignore_index=True)
    return index, images, targets, np.concatenate([train_rows, val, eval_rows])


def epoch_order(data, args, gen):
    """The training rows of one epoch, in batch order, per --sampler."""
    rows = data.train_rows
    if args.sampler == "random":
        return rows[torch.randperm(len(rows), generator=gen)]
    if args.sampler == "weighted":  # each class drawn about equally often
        labels = data.targets["label"][rows]
        weights = 1.0 / data.counts["label"][labels].float()
        return rows[torch.multinomial(weights, len(rows), replacement=True, generator=gen)]
    # person: all shots of a person in one batch, persons shuffled
    persons = data.index["person_id"].to_numpy()[rows.numpy()]
    _, person_idx = np.unique(persons, return_inverse=True)
    person_idx = torch.as_tensor(person_idx)
    shuffled = torch.randperm(int(person_idx.max()) + 1, generator=gen)
    key = shuffled[person_idx] * 16 + torch.randint(0, 16, (len(rows),), generator=gen)
    return rows[torch.argsort(key, stable=True)]


def train_batches(data, args, env, gen):
    """Yields (rows of this process's share of the batch, global batch rows). Every process draws the same
    global order from the same generator; each takes a contiguous slice, so torchrun = one process."""
    order = epoch_order(data, args, gen)
    steps = len(order) // args.batch_size
    if args.max_steps:
        steps = min(steps, args.max_steps)
    share = args.batch_size // env.world
    for s in range(steps):
        batch = order[s * args.batch_size : (s + 1) * args.batch_size]
        yield batch[env.rank * share : (env.rank + 1) * share], batch


# ---- pixels: from the uint8 cache to the model's input -----------------------------------
def gather(images, rows):
    """images[rows], for the cache on the CPU or the GPU: index_select is 3x faster than indexing on CPU."""
    return images.index_select(0, torch.as_tensor(rows).to(images.device))


def to_float(x_uint8, env):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..255, one copy. NCHW, not the cache's channels_last
    view: the per-pixel operations of make_batch run several times faster on it (measured on CPU)."""
    x_uint8 = x_uint8.to(env.device, non_blocking=True).permute(0, 3, 1, 2)
    return torch.empty(x_uint8.shape, device=env.device).copy_(x_uint8)


def standardise(x, mean, std):
    """0..255 -> the backbone's normalisation, in place; the neutral background becomes about 0.
    mul_ + add_ is 2x faster on CPU than one addcmul whose first argument is broadcast."""
    return x.mul_((1 / (255 * std)).view(1, 3, 1, 1)).add_((-mean / std).view(1, 3, 1, 1))


def normalise(x_uint8, env, mean, std):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), normalised with the backbone's mean and std."""
    return model_input(standardise(to_float(x_uint8, env), mean, std), env)


def model_input(x, env):
    """In the layout and dtype the model runs in: autocast would cast the input to bf16/fp16 anyway.
    Cast first, then reorder: half the bytes to transpose, 2x faster than one .to(dtype, memory_format) on CPU."""
    layout = torch.channels_last if env.channels_last else torch.contiguous_format
    return x.to(env.input_dtype).contiguous(memory_format=layout)


# ---- augmentation: per image, on whole batches, on the device ---------------------------
# torchvision's v2 transforms draw one set of parameters per call; for a batch we want one per image without
# a Python loop, so the few operations we need are written here on whole batches.
def batch_draws(gen, global_size, rank, size):
    """Every random number a batch's augmentation uses, drawn for the whole global batch from `gen`, so every
    torchrun process (and a resumed run) draws the same; this process keeps its share of `size` images.
    "uniform" holds six numbers in -1..1 per image: rotation, scale, x shift (also the erased box's x), y shift,
    the erased box's area and its y."""
    draws = {k: torch.rand(global_size, generator=gen) for k in ("flip", "old", "bright", "contrast", "satur", "erase")}
    draws["uniform"] = torch.rand(global_size, 6, generator=gen) * 2 - 1
    return {k: v[rank * size : (rank + 1) * size] for k, v in draws.items()}


def old_mixup(x_u8, data, rows, draws, p):
    """Blend a rare old face with another training face of its class (0.5-0.9 its own): new faces, same label.
    The partner and the blend reuse the colour draws (independent of the draws that choose who is blended)."""
    labels = data.targets["label"][rows]
    for i in torch.nonzero((draws["old"] < p) & (data.targets["age"][rows] == 2)).flatten().tolist():
        pool = data.old_pool[int(labels[i])]
        j = pool[int(draws["bright"][i] * len(pool)) % len(pool)]
        lam = 0.5 + 0.4 * float(draws["contrast"][i])
        x_u8[i] = (lam * x_u8[i].float() + (1 - lam) * data.images[j].to(x_u8.device).float()).round().byte()
    return x_u8


def colour_jitter(x, draws, strength, env):
    """Brightness, then contrast about the image's mean grey, then saturation about each pixel's grey, on 0..255."""
    per_image = lambda t: t.to(env.device).view(-1, 1, 1, 1)  # noqa: E731
    bright = 1 + strength * (draws["bright"] * 2 - 1)
    contrast = 1 + strength * (draws["contrast"] * 2 - 1)
    satur = 1 + strength * (draws["satur"] * 2 - 1)
    # the three composed are one affine map per pixel, s*c*b*x + (1-s)*c*b*g + (1-c)*b*m: two passes, not ten
    grey3 = x.sum(dim=1, keepdim=True)  # 3x each pixel's grey (a sum is faster than a mean here)
    mean_grey = grey3.mean(dim=(2, 3), keepdim=True) / 3
    offset = grey3.mul_(per_image((1 - satur) * contrast * bright / 3)).add_(
        per_image((1 - contrast) * bright) * mean_grey
    )
    return torch.addcmul(offset, x, per_image(satur * contrast * bright), out=x).clamp_(
        0, 255
    )  # in place: fresh memory is slow


def shift_scale_rotate(x, draws, strength, flip_p, env):
    """One affine warp per image: the mirror image with probability flip_p, a turn of up to strength x 180
    degrees (0.08: +-14), a scale of 1 +- strength, a shift of up to 2 x strength; zeros (the background) fill."""
    flip = (draws["flip"] < flip_p).to(env.device).float() * -2 + 1  # -1 flips
    u = draws["uniform"].to(env.device)
    angle = u[:, 0] * strength * math.pi
    scale = 1 + u[:, 1] * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, u[:, 2] * strength * 2], 1),
            torch.stack([sin * flip, cos, u[:, 3] * strength * 2], 1),
        ],
        1,
    )
    return F.grid_sample(x, affine_grid(theta, x.shape), mode="bilinear", padding_mode="zeros", align_corners=False)


def erase(x, draws, p):
    """With probability p, one box of 5-25 % of the image filled with the background value (0 once normalised)."""
    u, (h, w) = draws["uniform"], x.shape[2:]
    half = (0.05 + 0.2 * (u[:, 4] + 1) / 2).sqrt() / 2  # half the side, area 5-25%
    cy, cx = (u[:, 5] + 1) / 2, (u[:, 2] + 1) / 2
    y0, y1 = ((cy - half).clamp(0, 1) * h).long().tolist(), ((cy + half).clamp(0, 1) * h).long().tolist()
    x0, x1 = ((cx - half).clamp(0, 1) * w).long().tolist(), ((cx + half).clamp(0, 1) * w).long().tolist()
    for i in torch.nonzero(draws["erase"] < p).flatten().tolist():  # a slice each: no full-size mask
        x[i, :, y0[i] : y1[i], x0[i] : x1[i]] = 0.0
    return x


def make_batch(data, rows, args, env, gen, mean, std, global_size):
    """Pixels (normalised, in the model's layout and dtype) and targets of this process's share of a batch."""
    draws = batch_draws(gen, global_size, env.rank, len(rows))
    x_u8 = gather(data.images, rows)
    if args.old_mixup > 0:
        x_u8 = old_mixup(x_u8, data, rows, draws, args.old_mixup)
    x = to_float(x_u8, env)
    if args.color > 0:
        x = colour_jitter(x, draws, args.color, env)
    x = standardise(x, mean, std)
    if args.ssr > 0 or args.flip > 0:
        x = shift_scale_rotate(x, draws, args.ssr, args.flip, env)
    if args.erase > 0:
        x = erase(x, draws, args.erase)
    y = {k: v[rows].to(env.device) for k, v in data.targets.items()}
    return model_input(x, env), y


def affine_grid(theta, shape):
    """F.affine_grid(theta, shape, align_corners=False) from its separable parts: an output pixel's source x
    is a*x + b*y + c, x varying along rows and y down columns, so two broadcast adds per coordinate.
    6x faster on an AVX2 CPU than a matmul with a base grid (K=3 matmuls run slowly there)."""
    n, _, h, w = shape
    x = (torch.arange(w, device=theta.device) * 2 + 1) / w - 1  # pixel centres in -1..1
    y = (torch.arange(h, device=theta.device) * 2 + 1) / h - 1
    grid = torch.empty(n, h, w, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):  # source x, then source y
        a, b, c = theta[:, k, :, None, None].unbind(1)  # (n, 1, 1) each
        torch.add(a * x.view(1, 1, w), b * y.view(1, h, 1) + c, out=grid[..., k])
    return grid


# ---- mixing two images of a batch (CutMix, MixUp) -----------------------------------------
def mix_batch(x, args, gen):
    """CutMix or MixUp on a batch: returns (x, (perm, lam)) or (x, None). Losses then
    weigh the two targets by lam (losses.mixed)."""
    draw = torch.rand(4, generator=gen)
    if args.cutmix > 0 and draw[0] < args.cutmix:
        lam = float(draw[1])
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        h, w = x.shape[2:]
        if args.cutmix_vertical:  # a full-height strip: keeps both faces' upper and lower halves aligned
            cw = int(round(w * (1 - lam)))
            x0 = int(draw[2] * (w - cw + 1))
            y0, y1, x1 = 0, h, x0 + cw
        else:
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            y0, x0 = int(draw[2] * (h - ch + 1)), int(draw[3] * (w - cw + 1))
            y1, x1 = y0 + ch, x0 + cw
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        return x, (perm, 1 - (y1 - y0) * (x1 - x0) / (h * w))
    if args.mixup > 0 and draw[0] < args.cutmix + args.mixup:
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())  # global torch RNG: seeded per run
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        return lam * x + (1 - lam) * x[perm], (perm, lam)
    return x, None
