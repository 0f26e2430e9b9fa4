"""The training engine: what train_single.py, train_multi.py and train_coord.py share around their step.

Each trainer keeps its loop and its step (forward, loss, backward, clip, optimiser step) in its own file. Here
live, once: the knobs they share, the set-up of the machine and the run folder, optimisers and schedules, the
run state a checkpoint keeps (`Run`), and the record of a fold (validation, log.csv and plots, checkpoints,
metrics.json).
"""

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from batches import gather, normalise, train_batches
from common import InputError, atomic_path, keep_freed_memory, make_env, positive_int, save_csv, save_json
from model import load_checkpoint, predict, unwrap, wrap_distributed
from scores import macro_f1, plot_confusions, plot_curves, save_logprobs, scores


# ---- knobs -------------------------------------------------------------------------------
def train_parser(doc):
    """The knobs every trainer shares; each script adds its own below them."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--crops", default="WORK/crops", help="preprocess.py output")
    g.add_argument("--folds", default="WORK/folds.csv", help="split.py output")
    g.add_argument(
        "--fold",
        default="0",
        help="fold to validate on: 0..K-1, 'all' (one after the other), or 'full': train on every person for the "
        "epochs the run's folds chose",
    )
    g.add_argument("--full-train", action="store_true", help="the same as --fold full")
    g.add_argument("--out", default=None, help="run folder (default WORK/runs/<script>)")
    g.add_argument("--img-size", type=positive_int, default=128, help="side of the square input, pixels")
    g.add_argument("--old-age", type=int, default=60, help="training targets: age band 2 starts here (scores: 60)")
    g.add_argument("--drop-ages", default="", help="training only: drop persons of these ages, e.g. 29,57-59")
    g.add_argument(
        "--pseudo",
        nargs="+",
        default=[],
        metavar="CSV",
        help="a second round: ImageID,ans files of a first round's ensemble (submission.csv, submission_oof.csv);"
        " the eval images and this fold's val images train on those labels (scores stay on the true ones)",
    )
    g.add_argument(
        "--sampler",
        choices=["random", "weighted", "person"],
        default="random",
        help="batch order: shuffled, inverse class frequency, or whole persons together",
    )
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    g.add_argument("--pretrained", default="auto", help="auto (offline registry weights) | none | PATH")
    g.add_argument("--backbone-lr-mult", type=float, default=0.1, help="backbone lr = lr x this (heads: lr)")
    g.add_argument("--head-dropout", type=float, default=0.2, help="dropout before each head")
    g.add_argument("--dropout-samples", type=positive_int, default=1, help="multi-sample dropout: K draws averaged")
    g.add_argument("--age-regression", type=float, default=0.0, help="weight of an auxiliary age regression head")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="ce", help="ce|wce|focal|ls|f1|ldam|sce, or a weighted sum: 0.7*focal+0.3*f1")
    g.add_argument("--focal-gamma", type=float, default=2.0)
    g.add_argument("--focal-alpha", type=float, default=1.0)
    g.add_argument("--label-smoothing", type=float, default=0.1, help="used by 'ls'")
    g.add_argument("--ldam-margin", type=float, default=0.5, help="largest LDAM margin (rarest class)")
    g = p.add_argument_group("augmentation (per sample, on the device, from the uint8 cache)")
    g.add_argument("--flip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color", type=float, default=0.2, help="brightness/contrast/saturation jitter strength")
    g.add_argument("--ssr", type=float, default=0.08, help="shift-scale-rotate strength (shift fraction)")
    g.add_argument("--erase", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--cutmix", type=float, default=0.0, help="probability a batch is CutMixed")
    g.add_argument("--cutmix-vertical", action="store_true", help="CutMix with full-height vertical strips")
    g.add_argument("--mixup", type=float, default=0.0, help="probability a batch is MixUped")
    g.add_argument(
        "--old-mixup", type=float, default=0.0,
        help="probability a face of the old band is blended with another training face of its class (0.5-0.9 its own)",
    )  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=6)
    g.add_argument("--batch-size", type=positive_int, default=64, help="global batch (split across torchrun ranks)")
    g.add_argument(
        "--opt",
        choices=["adamw", "adam", "sgd", "momentum", "madgrad"],
        default="adamw",
        help="sgd is Nesterov momentum (timm's naming)",
    )
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the heads")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--sched", choices=["onecycle", "cosine", "step", "cyclic", "constant"], default="onecycle")
    g.add_argument("--warmup-epochs", type=float, default=0.5, help="for cosine")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off); EMA weights validated")
    g.add_argument("--swa-start", type=int, default=0, help="average weights from this epoch on (0: off)")
    g.add_argument("--patience", type=int, default=0, help="stop after N epochs without a better val F1 (0: off)")
    g.add_argument("--clip-grad", type=float, default=5.0, help="clip the gradients' norm to this (0: off)")
    g = p.add_argument_group("machine")
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 on CUDA or on a CPU with bf16 units, else fp32/fp16",
    )
    g.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="auto: on (faster)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (resume = uninterrupted)")
    g.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    g.add_argument("--eval-batch-size", type=positive_int, default=256)
    g.add_argument("--max-steps", type=int, default=0, help="stop each epoch after N steps (smoke tests)")
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN/fold*/tb (needs tensorboard)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (imported only then)")
    return p


def three_head_knobs(parser):
    """The knobs of the trainers with mask, gender and age heads (train_multi.py, train_coord.py)."""
    g = parser.add_argument_group("three heads")
    g.add_argument("--task-weights", default="1,1,1", help="loss weight of each task: mask,gender,age")
    g.add_argument("--mask-loss", default=None, help="loss of the mask head (default: --loss)")
    g.add_argument("--gender-loss", default=None, help="loss of the gender head (default: --loss)")
    g.add_argument("--age-loss", default=None, help="loss of the age head (default: --loss)")
    g.add_argument("--age-hidden", type=int, default=0, help="hidden units of a deeper age head (0: linear)")
    g.add_argument("--age-backbone", default=None, help="a backbone of its own for the age head")
    g.add_argument("--gender-backbone", default=None, help="a backbone of its own for the gender head")
    return g


# ---- set-up: the machine, torchrun, the run folder ---------------------------------------
def setup_env(args, script):
    """The machine (device, precision, data-parallel processes from torchrun's environment) and the run folder,
    with the resolved config.json in it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    cuda, n_gpus = torch.cuda.is_available(), torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local_rank >= n_gpus:  # one process per GPU (CUDA_VISIBLE_DEVICES= runs on CPU)
        raise InputError(f"torchrun: process {local_rank} but {n_gpus} GPU(s): --nproc_per_node {n_gpus} at most")
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
    keep_freed_memory(device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    env = make_env(device, args.precision, args.channels_last)
    if distributed:
        env.rank, env.world, env.distributed = dist.get_rank(), dist.get_world_size(), True
    if args.batch_size % env.world:
        raise InputError(f"--batch-size {args.batch_size} does not split over {env.world} processes")
    if args.fold == "full":  # one spelling in the config: a fold begun as --full-train resumes as --fold full
        args.full_train = True
    for p in args.pseudo:  # their content goes into the config: new labels from a first round start a fold over
        if not Path(p).is_file():
            raise InputError(f"--pseudo {p}: not found (ensemble.py writes it)")
    if args.pseudo:
        args.pseudo_sha1 = hashlib.sha1(b"".join(Path(p).read_bytes() for p in args.pseudo)).hexdigest()
    env.out = Path(args.out or f"WORK/runs/{script}")
    if env.main:
        env.out.mkdir(parents=True, exist_ok=True)
        config = dict(vars(args), script=script, precision=env.precision, world=env.world)
        save_json(config, env.out / "config.json")
    return env


def print0(env, *a):
    if env.main:
        print(*a, flush=True)


def folds_to_run(args, n_folds=None):
    if args.full_train:  # (setup_env sets it for --fold full too)
        return ["full"]
    if args.fold == "all":
        if n_folds is None:
            n_folds = pd.read_csv(args.folds)["fold"].nunique()
        return list(range(n_folds))
    try:
        return [int(args.fold)]
    except ValueError:
        raise InputError(f"--fold {args.fold}: expected a fold number, 'all' or 'full'") from None


def full_train_epochs(args, env):
    """--fold full: the mean best epoch of the run's CV folds, else --epochs."""
    best = [json.loads(p.read_text())["best_epoch"] for p in sorted(env.out.glob("fold[0-9]*/metrics.json"))]
    return round(float(np.mean(best))) + 1 if best else args.epochs


# ---- optimisation --------------------------------------------------------------------------
def param_groups(backbone_params, head_params, args):
    """Backbone at lr x backbone_lr_mult, heads at lr; no weight decay on biases and norms."""
    groups = []
    for params, lr in ((backbone_params, args.lr * args.backbone_lr_mult), (head_params, args.lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            dict(params=decay, lr=lr, weight_decay=args.weight_decay),
            dict(params=no_decay, lr=lr, weight_decay=0.0),
        ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups, args):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)


def make_scheduler(optimizer, args, steps_per_epoch):
    """Stepped every batch."""
    total = max(1, args.epochs * steps_per_epoch)
    S = torch.optim.lr_scheduler
    if args.sched == "onecycle":
        return S.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=0.25,
            div_factor=20,
            final_div_factor=200,
        )
    if args.sched == "cosine":
        warm = int(args.warmup_epochs * steps_per_epoch)
        return S.LambdaLR(
            optimizer,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
        )
    if args.sched == "step":
        return S.StepLR(optimizer, step_size=max(1, total // 3), gamma=0.1)
    if args.sched == "cyclic":
        return S.CyclicLR(
            optimizer,
            base_lr=[g["lr"] / 10 for g in optimizer.param_groups],
            max_lr=[g["lr"] for g in optimizer.param_groups],
            step_size_up=max(1, steps_per_epoch),
            cycle_momentum=False,
        )
    return S.LambdaLR(optimizer, lambda s: 1.0)


def check_finite(loss, epoch, step, env):
    """NaN/inf loss: stop naming the batch; last.pt and best.pt of earlier epochs stay."""
    if not torch.isfinite(loss):
        raise InputError(
            f"loss is {loss.item()} at epoch {epoch} step {step}: stopped; last good checkpoint kept "
            f"in {env.out} (lower --lr, or try --precision fp32)"
        )


# ---- the run state of a fold: what a step changes and last.pt keeps ----------------------------
@dataclass
class Run:
    """What training a fold changes, and --resume restores from last.pt."""

    model: torch.nn.Module  # as trained: inside torch.compile and DDP wrappers where asked (unwrap() for weights)
    optimizers: dict  # {"all": optimizer}, or one per task for coordinate steps
    schedulers: dict  # one per optimizer, stepped every batch
    ema: object  # timm ModelEmaV3 of the weights (--ema), or None
    swa: object  # torch AveragedModel (--swa-start), or None
    gen: torch.Generator  # batch order, augmentation and mixing draws


def start_run(model, optimizers, args, env, fold, steps_per_epoch, find_unused=False):
    """The Run of a fold: a schedule per optimiser, EMA and SWA copies when asked, the compile and data-parallel
    wrappers, and the batch generator, seeded by --seed and the fold."""
    schedulers = {k: make_scheduler(o, args, steps_per_epoch) for k, o in optimizers.items()}
    ema = None
    if args.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.ema)
    swa = torch.optim.swa_utils.AveragedModel(model) if args.swa_start else None
    if args.compile:
        model = torch.compile(model)
    model = wrap_distributed(model, env, find_unused)
    gen = torch.Generator().manual_seed(args.seed * 1000 + (fold if fold != "full" else 999))
    return Run(model, optimizers, schedulers, ema, swa, gen)


def checkpoint_state(run, args, env, epoch):
    """Everything --resume needs, and the config that built the model."""
    rng = dict(torch=torch.get_rng_state(), gen=run.gen.get_state())
    if torch.cuda.is_available():  # dropout on a GPU draws from the device's own generator
        rng["cuda"] = torch.cuda.get_rng_state()
    return dict(
        model=unwrap(run.model).state_dict(),
        optimizers={k: o.state_dict() for k, o in run.optimizers.items()},
        schedulers={k: s.state_dict() for k, s in run.schedulers.items()},
        ema=run.ema.state_dict() if run.ema else None,
        swa=run.swa.state_dict() if run.swa else None,
        scaler=env.scaler.state_dict(),
        rng=rng,
        epoch=epoch,
        config=vars(args),
    )


def resume(run, args, env, fold_log):
    """--resume: load the fold's last.pt into the run and its log; returns the epoch to start at."""
    path = fold_log.dir / "last.pt"
    if not (args.resume and path.is_file()):
        return 0
    state = load_checkpoint(path)
    # a last.pt made with other settings is not continued: make reruns a fold when its flags change
    ignore = {"resume", "fold", "out", "threads", "tensorboard", "wandb", "eval_batch_size"}
    changed = sorted(k for k in set(vars(args)) | set(state["config"])
                     if k not in ignore and vars(args).get(k) != state["config"].get(k))  # fmt: skip
    if changed:
        print0(env, f"fold {fold_log.fold}: last.pt was made with other settings ({', '.join(changed)}): starting over")
        return 0
    unwrap(run.model).load_state_dict(state["model"])
    for k in run.optimizers:
        run.optimizers[k].load_state_dict(state["optimizers"][k])
        run.schedulers[k].load_state_dict(state["schedulers"][k])
    if run.ema:
        run.ema.load_state_dict(state["ema"])
    if run.swa:
        run.swa.load_state_dict(state["swa"])
    if state.get("scaler"):
        env.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    run.gen.set_state(state["rng"]["gen"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    fold_log.resume(state)
    print0(env, f"fold {fold_log.fold}: resumed after epoch {state['epoch']}")
    return state["epoch"] + 1


def model_to_validate(run, args, epoch, data, env, mean, std):
    """The EMA weights when --ema, the SWA average (BatchNorm recomputed) on the last epoch, else the model."""
    if run.swa and epoch >= args.swa_start:
        run.swa.update_parameters(unwrap(run.model))
        if epoch == args.epochs - 1:
            batches = (
                normalise(gather(data.images, rows), env, mean, std)
                for rows, _ in train_batches(data, args, env, run.gen)
            )
            with env.autocast():  # batches come in the autocast dtype
                torch.optim.swa_utils.update_bn(batches, run.swa)
            return run.swa.module
    return run.ema.module if run.ema else run.model


def save_checkpoint(path, **state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ---- the record of a fold: training stats, validation, log.csv, checkpoints, metrics.json ----------
class EpochStats:
    """The training half of a log.csv row, gathered over an epoch's steps without a sync per step."""

    def __init__(self):
        self.started, self.data_seconds, self.images = time.perf_counter(), 0.0, 0
        self.losses, self.preds, self.targets = [], [], []

    def add(self, loss, pred, target, images):
        self.losses.append(loss.detach())
        self.preds.append(pred.detach())
        self.targets.append(target)
        self.images += images

    def summary(self, epoch, lr, env):
        """One sync per epoch (the loss), for the log; a NaN/inf loss anywhere in the epoch stops the run here,
        naming its step, before anything is saved."""
        stacked = torch.stack(self.losses) if self.losses else torch.zeros(1)
        bad = torch.nonzero(~torch.isfinite(stacked))
        if len(bad):
            check_finite(stacked[bad[0, 0]], epoch, int(bad[0, 0]), env)
        f1 = macro_f1(torch.cat(self.targets).cpu(), torch.cat(self.preds).cpu()) if self.preds else 0.0
        return dict(
            loss=all_reduce_mean(float(stacked.mean()), env),
            f1=f1,
            lr=lr,
            images=self.images,
            seconds=time.perf_counter() - self.started,
            data_seconds=self.data_seconds,
        )


def all_reduce_mean(value, env):
    """Average a float over torchrun processes (for logging only)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t) / env.world


@dataclass
class Validation:
    f1: float
    row: dict  # the validation half of a log.csv row
    image_ids: np.ndarray
    views: dict  # log-probabilities of the val images, both views
    true: dict  # their true labels (true age bands), per view


def validate(model, data, args, env, mean, std):
    """The model on the fold's validation images, scored on the true age bands; None for --fold full."""
    if not len(data.val_rows):
        return None
    views = predict(model, data.images, data.val_rows, env, mean, std, args.eval_batch_size)
    true = {k: v[data.val_rows].numpy() for k, v in data.true_targets.items()}
    s = scores(views, true)
    loss = float(F.nll_loss(torch.from_numpy(views["label"]), torch.from_numpy(true["label"])))
    row = dict(val_loss=loss, val_f1=s["macro_f1"], val_acc=s["acc"], val_mask_f1=s["mask_f1"],
               val_gender_f1=s["gender_f1"], val_age_f1=s["age_f1"])  # fmt: skip
    return Validation(s["macro_f1"], row, data.index["image_id"].to_numpy()[data.val_rows.numpy()], views, true)


class FoldLog:
    """The record of one fold: a row per epoch (log.csv, curves.png, the printed line, TensorBoard or W&B when
    asked), the best epoch and its validation, and at the end metrics.json and confusion.png."""

    def __init__(self, args, env, fold):
        self.args, self.env, self.fold, self.dir = args, env, fold, env.out / f"fold{fold}"
        self.rows, self.best_f1, self.best_epoch, self.best = [], -1.0, -1, None
        self.started, self.board = time.time(), None
        if not env.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.board = SummaryWriter(self.dir / "tb")
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise InputError("--wandb needs the wandb package (pip install wandb; wandb login)") from None
            wandb.init(project="maskcls", name=f"{env.out.name}-fold{fold}", config=vars(args), reinit=True)

    def state(self):
        return dict(log=self.rows, best_f1=self.best_f1, best_epoch=self.best_epoch)

    def resume(self, state):
        self.rows, self.best_f1, self.best_epoch = state["log"], state["best_f1"], state["best_epoch"]

    def add(self, epoch, train, val):
        """Record an epoch; True when its validation F1 is the best so far (--fold full: every epoch, so the
        last is the one kept)."""
        seconds = max(train["seconds"], 1e-9)
        row = dict(epoch=epoch, train_loss=train["loss"], train_f1=train["f1"], lr=train["lr"],
                   img_per_s=train["images"] / seconds, data_frac=train["data_seconds"] / seconds,
                   seconds=train["seconds"]) | (val.row if val else {})  # fmt: skip
        self.rows.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
        improved = val is None or val.f1 > self.best_f1
        if improved:
            self.best_epoch = epoch
            if val:
                self.best_f1, self.best = val.f1, val
        return improved

    def write(self):
        """log.csv, curves.png and the epoch's line (after the checkpoints: a kill in between loses no state)."""
        if not self.env.main:
            return
        row = self.rows[-1]
        improved = row["epoch"] == self.best_epoch
        log = pd.DataFrame(self.rows)
        save_csv(log, self.dir / "log.csv")
        plot_curves(log, self.dir / "curves.png")
        if self.board:
            for k, v in row.items():
                self.board.add_scalar(k, v, row["epoch"])
        if self.args.wandb:
            import wandb

            wandb.log(row)
        val = (
            f" val f1 {row['val_f1']:.4f} (mask {row['val_mask_f1']:.3f} gender {row['val_gender_f1']:.3f} "
            f"age {row['val_age_f1']:.3f})"
            if "val_f1" in row
            else ""
        )
        print(
            f"fold {self.fold} epoch {row['epoch']}: train loss {row['train_loss']:.4f} f1 {row['train_f1']:.4f}{val} "
            f"| {row['img_per_s']:.0f} img/s, data {row['data_frac']:.0%}, {row['seconds']:.0f}s"
            + (" *" if improved and "val_f1" in row else ""),
            flush=True,
        )

    def finish(self):
        """metrics.json and the confusion matrices of the best epoch; returns the metrics."""
        if not self.env.main:
            return {}
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.env.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        best = next((r for r in self.rows if r["epoch"] == self.best_epoch), {})
        metrics = dict(
            fold=self.fold,
            best_epoch=self.best_epoch,
            epochs_run=len(self.rows),
            val_macro_f1=best.get("val_f1"),
            val_acc=best.get("val_acc"),
            val_mask_f1=best.get("val_mask_f1"),
            val_gender_f1=best.get("val_gender_f1"),
            val_age_f1=best.get("val_age_f1"),
            train_img_per_s=round(float(np.mean([r["img_per_s"] for r in self.rows])), 1) if self.rows else 0,
            wall_seconds=round(time.time() - self.started, 1),
            peak_memory_mb=round(peak_mb),
            device=str(self.env.device),
            precision=self.env.precision,
            world=self.env.world,
        )
        save_json(metrics, self.dir / "metrics.json")
        if self.best:
            pred, true_label = self.best.views["label"].argmax(-1), self.best.true["label"]
            plot_confusions(pred, true_label, self.dir / "confusion.png", f"fold {self.fold}")
        if self.board:
            self.board.close()
        return metrics


def save_epoch(run, fold_log, args, env, epoch, eval_model):
    """last.pt (all --resume needs); when the epoch is the best so far, best.pt (the weights validated) and
    oof.npz (their out-of-fold predictions)."""
    if not env.main:
        return
    if fold_log.best_epoch == epoch:
        best = dict(model=unwrap(eval_model).state_dict(), config=vars(args), epoch=epoch, best_f1=fold_log.best_f1)
        save_checkpoint(fold_log.dir / "best.pt", **best)
        if fold_log.best:
            best = fold_log.best
            save_logprobs(fold_log.dir / "oof.npz", best.image_ids, best.views, best.true["label"])
    save_checkpoint(fold_log.dir / "last.pt", **checkpoint_state(run, args, env, epoch), **fold_log.state())


def summarise_run(env, metrics_list):
    """After --fold all: the mean of the folds' metrics in cv_metrics.json."""
    metrics_list = [m for m in metrics_list if m.get("val_macro_f1") is not None]
    if not env.main or not metrics_list:
        return
    keys = ("val_macro_f1", "val_acc", "val_mask_f1", "val_gender_f1", "val_age_f1")
    summary = {k: round(float(np.mean([m[k] for m in metrics_list if m.get(k) is not None])), 4) for k in keys}
    summary["folds"] = [m["fold"] for m in metrics_list]
    save_json(summary, env.out / "cv_metrics.json")
    print(f"{env.out}: " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "folds"))
