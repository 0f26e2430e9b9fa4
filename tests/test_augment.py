"""The batch augmentation of the engine (batches.make_batch) against plain step-by-step definitions:
its fused arithmetic is for speed only and must not change what the augmentation does."""

import math
from argparse import Namespace

import torch
import torch.nn.functional as F

from batches import affine_grid, make_batch, normalise
from common import make_env

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
ENV = make_env(torch.device("cpu"), "fp32", "off")


def batch_data(n=6, size=24):
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return Namespace(images=images, targets={"label": torch.arange(n)}, old_pool={})


def augment(data, **knobs):
    args = Namespace(**{"flip": 0.0, "color": 0.0, "ssr": 0.0, "erase": 0.0, "old_mixup": 0.0, **knobs})
    rows = torch.arange(len(data.images))
    x, _ = make_batch(data, rows, args, ENV, torch.Generator().manual_seed(7), MEAN, STD, len(rows))
    return x


def draws(n):
    """The random numbers make_batch draws, in its order, from the same seed."""
    gen = torch.Generator().manual_seed(7)
    r = {k: torch.rand(n, generator=gen) for k in ("flip", "old", "b", "c", "s", "erase")}
    return r, torch.rand(n, 6, generator=gen) * 2 - 1


def test_no_augmentation_is_just_normalising():
    data = batch_data()
    torch.testing.assert_close(augment(data), normalise(data.images, ENV, MEAN, STD))


def test_colour_jitter_equals_brightness_then_contrast_then_saturation():
    data, strength = batch_data(), 0.4
    r, _ = draws(len(data.images))
    x = data.images.permute(0, 3, 1, 2).float() / 255
    for i in range(len(x)):  # the textbook order, one image at a time
        b, c, s = (1 + strength * (r[k][i] * 2 - 1) for k in "bcs")
        img = x[i] * b
        img = (img - img.mean()) * c + img.mean()  # contrast about the mean grey
        grey = img.mean(dim=0, keepdim=True)
        x[i] = ((img - grey) * s + grey).clamp(0, 1)
    expected = (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    torch.testing.assert_close(augment(data, color=strength), expected, atol=1e-5, rtol=1e-5)


def test_affine_grid_equals_torch():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for shape in [(5, 3, 16, 16), (5, 3, 7, 12)]:
        torch.testing.assert_close(affine_grid(theta, shape), F.affine_grid(theta, list(shape), align_corners=False))


def test_flip_alone_mirrors_the_image():
    data = batch_data()
    r, _ = draws(len(data.images))
    flipped = r["flip"] < 0.5
    assert 0 < int(flipped.sum()) < len(flipped)  # the seed gives both cases
    plain = normalise(data.images, ENV, MEAN, STD)
    expected = torch.where(flipped.view(-1, 1, 1, 1), plain.flip(3), plain)
    torch.testing.assert_close(augment(data, flip=0.5), expected, atol=1e-5, rtol=1e-5)


def test_shift_scale_rotate_keeps_the_picture_and_pads_with_the_background():
    data = batch_data(size=32)
    data.images[:] = torch.tensor([200, 30, 90], dtype=torch.uint8)  # one flat colour
    out = augment(data, ssr=0.15)
    flat = normalise(data.images[:1], ENV, MEAN, STD)[0, :, 0, 0]
    centre = out[:, :, 12:20, 12:20]
    torch.testing.assert_close(centre, flat.view(1, 3, 1, 1).expand_as(centre), atol=1e-4, rtol=1e-4)
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.abs() < flat.abs().view(1, 3, 1)).any()  # rotated or shrunk: some corner shows background (0)


def test_erasing_blanks_one_box_of_5_to_25_percent_with_the_background():
    data = batch_data(n=64, size=32)
    data.images[:] = 255  # white, far from the background value 0 after normalising
    out = augment(data, erase=0.5)
    r, _ = draws(64)
    blank = (out == 0).all(dim=1).float().mean(dim=(1, 2))  # fraction of pixels erased, per image
    erased = r["erase"] < 0.5
    assert (blank[~erased] == 0).all()
    assert ((blank[erased] > 0.03) & (blank[erased] < 0.3)).all(), blank[erased]
    assert math.isclose(float(erased.float().mean()), 0.5, abs_tol=0.2)


def test_old_mixup_blends_old_faces_only_with_their_own_class():
    # images 0-2: class 2 (old man, mask worn), image 3 alone in class 5, images 4-5 young: flat greys, far apart
    grey = torch.tensor([10.0, 20.0, 30.0, 250.0, 120.0, 160.0])
    data = Namespace(
        images=grey.view(-1, 1, 1, 1).expand(6, 8, 8, 3).to(torch.uint8).contiguous(),
        targets={"label": torch.tensor([2, 2, 2, 5, 0, 0]), "age": torch.tensor([2, 2, 2, 2, 0, 0])},
        old_pool={2: torch.tensor([0, 1, 2]), 5: torch.tensor([3])},
    )
    out = augment(data, old_mixup=1.0)  # every old image is blended
    r, _ = draws(6)
    raw = out[:, 0, 0, 0] * STD[0] * 255 + MEAN[0] * 255  # back to 0..255
    lam = 0.5 + 0.4 * r["c"]
    partner = torch.tensor([[0, 1, 2][int(r["b"][i] * 3) % 3] for i in range(3)])
    expected = (lam[:3] * grey[:3] + (1 - lam[:3]) * grey[partner]).round()
    torch.testing.assert_close(raw[:3], expected, atol=1e-3, rtol=0)
    assert (partner != torch.arange(3)).any()  # the seed blends at least one with another face
    torch.testing.assert_close(raw[3:], grey[3:], atol=1e-3, rtol=0)  # alone in its class, and the young: unchanged
