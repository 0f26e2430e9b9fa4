"""The shots of one person, found among unlabelled images: ensemble.py --group-shots gives them one gender and age.

    from shots import shot_groups, grouped
    groups = shot_groups(images, unmasked)   # each image -> the row of the unmasked shot it belongs to
    views = grouped(views, groups)           # gender and age averaged over a person's shots; the mask stays each shot's

A person's seven shots share the top of the face (brows, eyes, hair, background), which no mask covers, so each
masked shot is matched to the unmasked shots there, over small warps that absorb how each shot was framed, and
scipy assigns them one to one. Bench: 99 % of the out-of-fold shots go to their own person; 2.5 s for 300 persons,
29 s for 1,300 on a 2-core CPU (bench/group_bench.py).
"""

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import log_softmax
from tqdm import tqdm

from common import InputError, load_crops

MATCH_SIZE = 32  # pixels: the top rows of 32-px copies are enough, and take seconds
MATCH_ROWS = 13  # the top 40 %, above any mask


def match_warps():
    """Where each of 225 warps (shifts up to 8 %, scalings of 5 %, turns of 5 degrees) samples the top rows."""
    thetas = []
    for dx in (-0.08, -0.04, 0, 0.04, 0.08):
        for dy in (-0.08, -0.04, 0, 0.04, 0.08):
            for scale in (0.95, 1.0, 1.05):
                for turn in np.deg2rad([-5, 0, 5]):
                    c, s = scale * np.cos(turn), scale * np.sin(turn)
                    thetas.append([[c, -s, dx], [s, c, dy]])
    thetas = torch.tensor(thetas, dtype=torch.float32)
    return F.affine_grid(thetas, (len(thetas), 3, MATCH_SIZE, MATCH_SIZE), align_corners=False)[:, :MATCH_ROWS]


def unit(v):
    """Zero-mean unit vectors: their dot product is the normalised cross-correlation (light does not count)."""
    v = v.flatten(-3)
    v = v - v.mean(-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def shot_groups(images, unmasked):
    """For every image, the row of the unmasked shot it belongs to (unmasked shots: their own row).
    Each other shot's similarity to every unmasked one is the best over the warps; then scipy assigns
    them one to one, each unmasked shot taking at most ceil(others / unmasked): a person has one."""
    groups = np.arange(len(images))
    anchors, others = np.flatnonzero(unmasked), np.flatnonzero(~unmasked)
    if len(anchors) == 0 or len(others) == 0:
        return groups
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float()
    anchor_top, grid = unit(x[anchors, :, :MATCH_ROWS]), match_warps()
    sim = np.empty((len(others), len(anchors)), dtype=np.float32)
    for i, row in enumerate(tqdm(others, desc="matching shots", leave=False)):
        warped = F.grid_sample(x[row].expand(len(grid), -1, -1, -1), grid, padding_mode="border", align_corners=False)
        sim[i] = (anchor_top @ unit(warped).T).amax(1).numpy()
    matched, anchor = assign_shots(sim)
    groups[others[matched]] = anchors[anchor]
    return groups


def assign_shots(sim):
    """One to one on a (shots x unmasked shots) similarity: each unmasked shot takes at most ceil(shots /
    unmasked). Returns (shot rows matched, their unmasked shot's column)."""
    per_anchor = -(-sim.shape[0] // sim.shape[1])
    matched, slot = linear_sum_assignment(np.repeat(sim, per_anchor, axis=1), maximize=True)
    return matched, slot // per_anchor


def person_of(ids):
    """The person of each out-of-fold image id ('person/shot')."""
    return np.array([str(i).split("/")[0] for i in ids])


def person_images(crops, split, ids):
    """The MATCH_SIZE copies of `ids`' crops, in that order."""
    index, cache = load_crops(crops, split, MATCH_SIZE)
    row = pd.Series(np.arange(len(index)), index=index["image_id"].astype(str))
    missing = [i for i in ids if i not in row.index]
    if missing:
        raise InputError(f"{crops}/{split}.csv: no crop for {len(missing)} image(s), e.g. {missing[0]} (--crops?)")
    return np.asarray(cache[row.loc[ids].to_numpy()])


def oof_groups(crops, ids, unmasked, persons_per_set=300):
    """Out of fold, in sets of about as many persons as an eval set: matching is harder among more faces."""
    images = person_images(crops, "train", ids)
    persons = pd.factorize(person_of(ids))[0]
    groups = np.arange(len(ids))
    for s in range(persons.max() // persons_per_set + 1):
        rows = np.flatnonzero(persons // persons_per_set == s)
        groups[rows] = rows[shot_groups(images[rows], unmasked[rows])]
    return groups


def grouped(views, groups):
    """Gender and age log-probabilities averaged over each group's shots; the mask stays each shot's own."""

    def group_mean(v):  # log-probabilities again after the mean
        return log_softmax(pd.DataFrame(v).groupby(groups).transform("mean").to_numpy(), axis=1)

    p = np.exp(views["label"]).reshape(-1, 3, 6)  # mask x (gender, age band): label = mask * 6 + gender * 3 + band
    mask, gender_age = np.log(p.sum(2) + 1e-12), group_mean(np.log(p.sum(1) + 1e-12))
    label = (mask[:, :, None] + gender_age[:, None, :]).reshape(-1, 18)
    return dict(views, label=label, gender=group_mean(views["gender"]), age=group_mean(views["age"]))
