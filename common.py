"""What every maskcls stage uses: the labels, the user-error exception, atomic writes, the machine
(device and precision) and the packed crops cache.

The other shared modules, each named for its job: rawdata.py (reading the competition layout), faces.py
(detect, crop, remove the background), model.py (backbones, heads, offline weights, prediction),
batches.py (fold data, batch order, augmentation), losses.py, engine.py (the trainers' parser, set-up,
optimisers, checkpoints and per-fold logging), scores.py (macro F1, score lines, logits files, plots).
"""

import argparse
import contextlib
import ctypes
import json
import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

# ---- labels ----------------------------------------------------------------------
# class = mask_state * 6 + gender * 3 + age_band (the competition's numbering)
MASK_STATES = ("wear", "incorrect", "not_wear")
GENDERS = ("male", "female")
AGE_BANDS = ("<30", "30-59", ">=60")
NUM_CLASSES = 18
TASKS = {"mask": 3, "gender": 2, "age": 3}  # task -> number of classes

# shot file stem -> mask state; a person folder holds exactly these seven shots
SHOTS = {
    "mask1": 0,
    "mask2": 0,
    "mask3": 0,
    "mask4": 0,
    "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
GENDER_WORDS = {"male": 0, "m": 0, "man": 0, "female": 1, "f": 1, "woman": 1}


def age_band(age, old_age=60):
    """Band of an age (scalar or array): 0 below 30, 1 from 30, 2 from `old_age` (60 on true bands)."""
    age = np.asarray(age)
    return np.where(age < 30, 0, np.where(age < old_age, 1, 2))


def class_id(mask_state, gender, band):
    """Works on numbers, numpy arrays, pandas columns and torch tensors alike."""
    return mask_state * 6 + gender * 3 + band


def split_class(label):
    """18-class label -> (mask_state, gender, age_band)."""
    label = np.asarray(label)
    return label // 6, (label // 3) % 2, label % 3


def class_name(label):
    m, g, a = (int(v) for v in split_class(label))
    return f"{MASK_STATES[m]}/{GENDERS[g]}/{AGE_BANDS[a]}"


class InputError(Exception):
    """The user's input or flags are wrong (a missing file, a bad row, an impossible flag): run_main prints
    it as one line and exits 2, no stack trace."""


# ---- atomic writes ---------------------------------------------------------------
# Every artifact is written to a temporary name in the same folder and renamed, so an
# interrupted stage never leaves a file that make (or a rerun) takes for finished.
UMASK = os.umask(0)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; finished files get the usual rights
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_csv(df, path):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_npz(path, **arrays):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # (a file object: np.savez would add .npz to the temp name)
            np.savez(f, **arrays)


def save_text(text, path):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


# ---- command-line helpers -------------------------------------------------------
def run_main(main):
    """Run a stage's main(); bad input ends with one line on stderr and exit code 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept, rerun to continue", file=sys.stderr)
        sys.exit(130)


def positive_int(text):
    """argparse type for sizes and counts: 0 would fail deep inside (a 0 px image) or train nothing."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


# ---- the machine: device, precision, data-parallel processes -------------------------------
@dataclass
class Env:
    """The machine context every stage passes around as `env`: where and how it computes."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    channels_last: bool
    scaler: torch.amp.GradScaler  # scales fp16 losses; with bf16 and fp32 a pass-through
    rank: int = 0  # torchrun: this process of `world`; only rank 0 logs and saves
    world: int = 1
    distributed: bool = False
    out: Path | None = None  # a trainer's run folder

    @property
    def main(self):
        return self.rank == 0

    @property
    def input_dtype(self):
        """What batches are cast to before the model (autocast would cast them anyway)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.input_dtype)


def make_env(device=None, precision="auto", channels_last="auto"):
    """One device line, one dtype line: bf16 autocast on CUDA (fp16 + scaler on older GPUs) and on
    CPUs with bf16 units, where it pays only with channels_last (measured on an AMX CPU: 1.4x at 128 px).
    channels_last pays in fp32 on CPU too (tf_efficientnet_lite0 trains 1.55x faster on an AVX2 CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cpu_bf16 = not cuda and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else ("bf16" if cpu_bf16 else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return Env(device, precision, channels_last != "off", scaler)


def keep_freed_memory(device="cpu"):
    """On CPU (a no-op for a CUDA device, whose memory PyTorch caches anyway): each training step allocates
    and frees the same large activations. glibc returns blocks over 32 MB (and freed memory at the heap's top)
    to the kernel at once, so every step pays a page fault per 4 kB page (on an AMX CPU a fresh 77 MB tensor
    cost 29 ms of them). Keeping freed memory in the process makes lite0 train 1.1-1.15x faster at 224 px, for
    a higher peak (+0.2 GB in the cpu preset), and predict 2x faster at batch 256. glibc only; a no-op
    elsewhere. Process-wide, so engine.setup_env (the trainers) and inference.py call it, not make_env:
    bench/train_bench.py times the usual loop without it."""
    if torch.device(device).type != "cpu":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GB
    except (OSError, AttributeError):
        return False


# ---- the packed crops cache -------------------------------------------------------------------
def load_crops(crops_dir, split, img_size=None):
    """Index of a split and its uint8 cache (N, img_size, img_size, 3) as a copy-on-write memory map
    (writable, so torch.from_numpy takes it as it is; a write stays in the process). A cache at another
    size is resized once and kept beside it (crops/<split>_u8_<size>.npy), so every later run and every
    torchrun process maps the same file: no copies; new crops (preprocess.py again) resize it again."""
    crops_dir = Path(crops_dir)
    index_path, cache_path = crops_dir / f"{split}.csv", crops_dir / f"{split}_u8.npy"
    if not index_path.is_file() or not cache_path.is_file():
        raise InputError(f"{index_path}: not found (run preprocess.py first)")
    index = pd.read_csv(index_path, dtype={"person_id": str, "image_id": str}, keep_default_na=False)
    cache = np.load(cache_path, mmap_mode="c")
    if cache.shape[0] != len(index):
        raise InputError(f"{cache_path} has {cache.shape[0]} rows, {index_path} {len(index)}: rerun preprocess.py")
    if img_size is not None and cache.shape[1] != img_size:  # None: as preprocess.py made it
        sized = crops_dir / f"{split}_u8_{img_size}.npy"
        stale = not sized.is_file() or sized.stat().st_mtime_ns < cache_path.stat().st_mtime_ns
        if stale or np.load(sized, mmap_mode="r").shape[0] != len(index):
            with atomic_path(sized) as tmp:
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.uint8, shape=(len(index), img_size, img_size, 3)
                )
                for i in range(0, len(index), 512):
                    x = torch.from_numpy(np.array(cache[i : i + 512])).permute(0, 3, 1, 2).float()
                    x = F.interpolate(
                        x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False
                    )
                    out[i : i + 512] = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
                out.flush()
                del out
        cache = np.load(sized, mmap_mode="c")
    return index, cache
