"""dlib's face-recognition ResNet in PyTorch, with its weights, to fine-tune as a face-trained backbone.

    python dlibnet.py            # convert once: reads the .dat, caches a state dict, prints its size

The weights are dlib_face_recognition_resnet_model_v1.dat from the `face-recognition-models` package
(dlib's metric-learning ResNet-29 variant, 150 x 150 aligned chips -> 128-d embeddings, trained on ~3M faces).
The .dat is read in pure Python (numpy) following dlib's serialization (dlib/serialize.h, dlib/dnn/core.h,
layers.h, input.h, tensor.h); no dlib needed. `load_dlib_resnet()` converts once and keeps the state dict
as a .pt under ~/.cache/maskcls (or $MASKCLS_CACHE), keyed by the .dat's hash.
The model takes RGB chips as float 0..255 (N, 3, 150, 150), aligned as dlib.get_face_chip(img, shape,
size=150, padding=0.25) makes them, and normalises inside as dlib's input_rgb_image_sized<150> does:
(pixel - mean RGB) / 256. It matches dlib's compute_face_descriptor to 3e-7 (tests/test_dlibnet.py asks 1e-4).
5.6 M parameters, 0.54 GFLOPs a chip (multiply-adds x 2). 2-core AMD EPYC (avx512_bf16), one torch thread, batch
64: 98 chips/s fp32, 148 bf16 autocast (dlib's own compute_face_descriptor: 8.9); a training step over all layers
48 chips/s in bf16. Under load from other jobs, one thread beat two by 2-4x on that box.
"""

import argparse
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, atomic_path, run_main

MODEL_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150  # dlib's input_rgb_image_sized<150>
EMBED_DIM = 128


def model_file():
    """The .dat inside face-recognition-models (not imported: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        raise InputError("face-recognition-models is not installed (pip install --no-deps face-recognition-models)")
    return Path(spec.submodule_search_locations[0]) / "models" / MODEL_NAME


def cache_dir():
    return Path(os.environ.get("MASKCLS_CACHE") or Path.home() / ".cache" / "maskcls")


# ---- reading dlib's serialization -------------------------------------------------
class DlibReader:
    """dlib/serialize.h: integers as a control byte (bit 7 = negative, low 4 bits = byte count) and that many
    little-endian bytes; floats as float_details (int64 mantissa, int16 exponent: mantissa * 2**exponent);
    bools as the characters '0'/'1'; strings as a length and the bytes."""

    def __init__(self, data):
        self.data = memoryview(data)
        self.pos = 0

    def int(self):
        control = self.data[self.pos]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise InputError(f"{MODEL_NAME}: bad integer control byte {control:#x} at byte {self.pos}")
        value = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if control & 0x80 else value

    def float(self):
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # float_details::is_inf, is_ninf, is_nan
            return {32000: np.inf, 32001: -np.inf}.get(exponent, np.nan)
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self):
        char = bytes(self.data[self.pos : self.pos + 1])
        self.pos += 1
        if char not in (b"0", b"1"):
            raise InputError(f"{MODEL_NAME}: bad bool at byte {self.pos - 1}")
        return char == b"1"

    def string(self):
        size = self.int()
        text = bytes(self.data[self.pos : self.pos + size]).decode("latin-1")
        self.pos += size
        return text

    def version(self, expected, what):
        version = self.int()
        if version not in expected:
            raise InputError(f"{MODEL_NAME}: {what} version {version} at byte {self.pos}, expected one of {expected}")
        return version

    def tensor(self):
        """dlib/dnn/tensor.h: version, (num_samples, k, nr, nc), then the values: version 2 as raw
        little-endian float32, version 1 as one float_details each."""
        version = self.version((1, 2), "tensor")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        if version == 2:
            values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).copy()
            self.pos += 4 * count
        else:
            values = np.array([self.float() for _ in range(count)], dtype=np.float32)
        return values.reshape(shape)

    def alias_tensor(self):
        self.version((1,), "alias_tensor")
        return tuple(self.int() for _ in range(4))


# ---- the network's template, top-down as dlib serializes it --------------------------
# dlib's examples/dnn_face_recognition_ex.cpp (and tools/python/src/face_recognition.cpp):
#   block<N,stride,S>  = affine<con<N,3,3,1,1, relu<affine<con<N,3,3,stride,stride, S>>>>>
#   ares<N,S>          = relu<add_prev1<block<N,1, tag1<S>>>>
#   ares_down<N,S>     = relu<add_prev2<avg_pool<2,2,2,2, skip1<tag2<block<N,2, tag1<S>>>>>>>
#   alevel0 = ares_down<256>; alevel1 = ares<256,ares<256,ares_down<256>>>; alevel2 = the same at 128;
#   alevel3 = ares<64> x3 on ares_down<64>; alevel4 = ares<32> x3
#   loss_metric<fc_no_bias<128, avg_pool_everything<alevel0<...alevel4<max_pool<3,3,2,2, relu<affine<
#       con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>
def _block(n, stride):
    conv2, conv1 = ("layer", ("con", n, 3, 1)), ("layer", ("con", n, 3, stride))
    return [("layer", "affine"), conv2, ("layer", "relu"), ("layer", "affine"), conv1, ("tag", 1)]


def _ares(n):
    return [("layer", "relu"), ("layer", "add_prev")] + _block(n, 1)


def _ares_down(n):
    return [("layer", "relu"), ("layer", "add_prev"), ("layer", "avg_pool"), ("skip", 1), ("tag", 2)] + _block(n, 2)


TEMPLATE = (
    [("layer", "fc"), ("layer", "avg_pool")]
    + _ares_down(256)
    + _ares(256) * 2
    + _ares_down(256)
    + _ares(128) * 2
    + _ares_down(128)
    + _ares(64) * 3
    + _ares_down(64)
    + _ares(32) * 3
    + [("layer", "max_pool"), ("layer", "relu"), ("layer", "affine"), ("layer", ("con", 32, 7, 2))]
)


def read_details(r, kind):
    """One layer's details (layers.h); returns its tensors, or None for layers without parameters."""
    name = r.string()
    if kind == "relu" or kind == "add_prev":
        if name != f"{kind}_":
            raise InputError(f"{MODEL_NAME}: found {name!r} where {kind}_ belongs")
        return None
    if kind in ("avg_pool", "max_pool"):
        if name != f"{kind}_2":
            raise InputError(f"{MODEL_NAME}: found {name!r} where {kind}_2 belongs")
        [r.int() for _ in range(6)]  # nr, nc, stride_y, stride_x, padding_y, padding_x
        return None
    if kind == "affine":
        if name == "affine_":
            params = r.tensor().ravel()
            gamma, beta = r.alias_tensor(), r.alias_tensor()
            r.int()  # layer_mode: 0 = per channel
            k = int(np.prod(gamma))
            return {"weight": params[:k], "bias": params[k : k + int(np.prod(beta))]}
        if name == "bn_con2":  # a training net's batch norm: fold its running statistics as dlib does
            params = r.tensor().ravel()
            r.alias_tensor(), r.alias_tensor()
            r.tensor(), r.tensor()  # means, invstds of the last batch
            running_mean, running_var = r.tensor().ravel(), r.tensor().ravel()
            r.int(), r.int()  # num_updates, running_stats_window_size
            [r.float() for _ in range(4)]  # learning-rate and weight-decay multipliers
            eps = r.float()
            k = params.size // 2
            gamma = params[:k] / np.sqrt(running_var + np.float32(eps))
            return {"weight": gamma, "bias": params[k:] - gamma * running_mean}
        raise InputError(f"{MODEL_NAME}: found {name!r} where affine_ belongs")
    if kind == "fc":
        if name != "fc_2":
            raise InputError(f"{MODEL_NAME}: found {name!r} where fc_2 belongs")
        num_outputs, num_inputs = r.int(), r.int()
        params = r.tensor().ravel()
        r.alias_tensor(), r.alias_tensor()  # weights, biases
        if r.int() != 1:  # fc_bias_mode: FC_NO_BIAS
            raise InputError(f"{MODEL_NAME}: the fc layer has a bias; dlib's model has none")
        [r.float() for _ in range(4)]
        # dlib computes x (N, inputs) @ W (inputs, outputs): torch's Linear keeps W transposed
        return {"weight": params[: num_inputs * num_outputs].reshape(num_inputs, num_outputs).T}
    _, filters, size, stride = kind
    if name not in ("con_4", "con_5", "con_6"):
        raise InputError(f"{MODEL_NAME}: found {name!r} where con_4 belongs")
    params = r.tensor().ravel()
    num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(7))
    if (num_filters, nr, nc, stride_y, stride_x) != (filters, size, size, stride, stride):
        raise InputError(
            f"{MODEL_NAME}: con {num_filters} {nr}x{nc}/{stride_y}, expected {filters} {size}x{size}/{stride}"
        )
    shape = r.alias_tensor()  # filters: (num_filters, k, nr, nc)
    r.alias_tensor()  # biases
    [r.float() for _ in range(4)]
    use_bias = True
    if name in ("con_5", "con_6"):
        use_bias = r.bool()
        r.bool()  # use_relu (con_6): a fused relu, absent from this model
    count = int(np.prod(shape))
    out = {"weight": params[:count].reshape(shape), "padding": (pad_y, pad_x)}
    if use_bias:
        out["bias"] = params[count : count + filters]
    return out


def read_dlib_resnet(path):
    """Parse the .dat into [(kind, tensors)] bottom-up (input side first) and the input's mean RGB."""
    try:
        return _read_dlib_resnet(DlibReader(Path(path).read_bytes()), path)
    except (IndexError, ValueError) as e:  # ran off the end, or a tensor larger than the file
        raise InputError(f"{path}: truncated or not dlib's face-recognition model ({e})") from None


def _read_dlib_resnet(r, path):
    r.version((1,), "add_loss_layer")
    if r.string() != "loss_metric_2":
        raise InputError(f"{path}: not dlib's metric-loss network")
    r.float(), r.float()  # margin, distance threshold
    versions = []
    for node, _ in TEMPLATE:  # every wrapper writes its version, then its subnetwork: all versions come first
        versions.append(r.version((1, 2, 3), node))
    if r.string() != "input_rgb_image_sized":
        raise InputError(f"{path}: the input layer is not input_rgb_image_sized")
    mean_rgb = [r.float() for _ in range(3)]
    if (r.int(), r.int()) != (CHIP_SIZE, CHIP_SIZE):
        raise InputError(f"{path}: the input is not {CHIP_SIZE} x {CHIP_SIZE}")
    layers = []
    for depth in reversed(range(len(TEMPLATE))):  # then, bottom-up, each layer's own details and state
        node, kind = TEMPLATE[depth]
        if node != "layer":
            continue
        layers.append((kind, read_details(r, kind)))
        r.bool(), r.bool(), r.bool()  # this_layer_setup_called, gradient_input_is_stale, output disabled
        r.tensor(), r.tensor()  # x_grad, cached_output
        if depth == len(TEMPLATE) - 1:  # the layer on the input: grad_final, and from version 3 the expansion
            r.tensor()
            if versions[depth] >= 3:
                r.int()
        elif versions[depth] >= 2:
            r.tensor()  # params_grad
    if r.pos != len(r.data):
        raise InputError(f"{path}: {len(r.data) - r.pos} bytes left after the network")
    return [(kind, t) for kind, t in layers if t is not None], mean_rgb


# ---- the model ---------------------------------------------------------------------
class Affine(nn.Module):
    """dlib's affine_ layer: a per-channel scale and shift (its batch norm folded for inference)."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])


def add_prev(a, b):
    """dlib's add_prev: sums tensors of different sizes as if the smaller were zero-padded (channels at the
    end, rows and columns at the bottom and right); the output has the larger size in every dimension."""
    shape = [max(p, q) for p, q in zip(a.shape, b.shape)]

    def grow(t):
        if list(t.shape) == shape:
            return t
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

    return grow(a) + grow(b)


class ResBlock(nn.Module):
    """ares / ares_down: conv-affine-relu-conv-affine, plus the input (2 x 2 mean-pooled when it downsamples;
    its channels zero-extended), then relu. A stride-2 dlib con has no padding, a stride-1 con pads 1."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=0 if stride == 2 else 1)
        self.affine1 = Affine(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1)
        self.affine2 = Affine(c_out)

    def forward(self, x):
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.stride == 2:
            x = F.avg_pool2d(x, 2, 2)
        return F.relu(add_prev(y, x))


class DlibResNet(nn.Module):
    """The network of dnn_face_recognition_ex.cpp. forward: RGB 0..255 (N, 3, 150, 150) -> 128-d embedding;
    features: the 256-d mean-pooled map before the embedding layer (what a new head may take instead)."""

    num_features = 256

    def __init__(self, mean_rgb=(122.782, 117.001, 104.298)):
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 32, 7, 2, padding=0)
        self.affine = Affine(32)
        # dlib's names: level4 runs first (largest maps), level0 last
        self.level4 = nn.Sequential(*[ResBlock(32, 32, 1) for _ in range(3)])
        self.level3 = nn.Sequential(ResBlock(32, 64, 2), *[ResBlock(64, 64, 1) for _ in range(3)])
        self.level2 = nn.Sequential(ResBlock(64, 128, 2), *[ResBlock(128, 128, 1) for _ in range(2)])
        self.level1 = nn.Sequential(ResBlock(128, 256, 2), *[ResBlock(256, 256, 1) for _ in range(2)])
        self.level0 = nn.Sequential(ResBlock(256, 256, 2))
        self.fc = nn.Linear(256, EMBED_DIM, bias=False)

    def features(self, x):
        x = (x - self.mean_rgb) / 256.0
        x = F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)
        x = self.level0(self.level1(self.level2(self.level3(self.level4(x)))))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def state_from_dat(path):
    """The .dat's weights as a state dict for DlibResNet, every shape checked."""
    layers, mean_rgb = read_dlib_resnet(path)
    model = DlibResNet(mean_rgb)
    targets = [m for m in model.modules() if isinstance(m, nn.Conv2d | Affine | nn.Linear)]
    if len(targets) != len(layers):
        raise InputError(f"{path}: {len(layers)} layers with weights, the model has {len(targets)}")
    for module, (kind, tensors) in zip(targets, layers):
        if isinstance(module, nn.Conv2d) and tuple(tensors.pop("padding")) != module.padding:
            raise InputError(f"{path}: con padding differs from the model's {module.padding}")
        for name, value in tensors.items():
            param = getattr(module, name)
            if tuple(param.shape) != value.shape:
                raise InputError(f"{path}: {kind} {name} {value.shape} does not fit {tuple(param.shape)}")
            param.data.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
    return model.state_dict()


def load_dlib_resnet(path=None, cache=None):
    """DlibResNet with dlib's weights: converted from the .dat on first use, then read from the cached .pt."""
    path = Path(path) if path else model_file()
    if not path.is_file():
        raise InputError(f"{path}: dlib's face-recognition model not found")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    cached = Path(cache or cache_dir()) / f"{path.stem}.{digest}.pt"
    if cached.is_file():
        state = torch.load(cached, map_location="cpu", weights_only=True)
    else:
        state = state_from_dat(path)
        with atomic_path(cached) as tmp:
            torch.save(state, tmp)
    model = DlibResNet(state["mean_rgb"].flatten().tolist())
    model.load_state_dict(state)
    return model.eval()


def chips_to_tensor(chips):
    """uint8 RGB chips (N, 150, 150, 3), as dlib.get_face_chip returns them -> float (N, 3, 150, 150)."""
    return torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).float()


def count_flops(model, size=CHIP_SIZE):
    """Multiply-adds of convolutions and the linear layer for one chip, times 2 (the usual FLOPs)."""
    macs = []

    def conv_hook(m, _, out):
        macs.append(out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups)

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks.append(model.fc.register_forward_hook(lambda m, _, out: macs.append(m.in_features * m.out_features)))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return 2 * sum(macs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"dlib's {MODEL_NAME} (default: face-recognition-models')")
    p.add_argument("--cache", default=None, help="where the converted .pt goes (default ~/.cache/maskcls)")
    args = p.parse_args()
    model = load_dlib_resnet(args.model, args.cache)
    params = sum(t.numel() for t in model.parameters())
    print(f"dlib ResNet: {params / 1e6:.2f} M parameters, {count_flops(model) / 1e9:.2f} GFLOPs a 150 px chip")


if __name__ == "__main__":
    run_main(main)
