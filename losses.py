"""Losses: --loss names a term or a weighted sum of terms (0.7*focal+0.3*f1); the three-head trainers give each
task its own (--age-loss f1) and weight (--task-weights 1,1,2)."""

import torch
import torch.nn.functional as F

from common import TASKS, InputError


def soft_f1_loss(logits, target):
    """1 - macro F1 computed on probabilities (differentiable)."""
    p = logits.float().softmax(-1)
    onehot = F.one_hot(target, p.shape[-1]).float()
    tp = (p * onehot).sum(0)
    f1 = 2 * tp / (2 * tp + (p * (1 - onehot)).sum(0) + ((1 - p) * onehot).sum(0) + 1e-7)
    return 1 - f1.mean()


def focal_loss(logits, target, gamma=2.0, alpha=1.0):
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (alpha * (1 - torch.exp(-ce)) ** gamma * ce).mean()


def symmetric_ce(logits, target, a=0.1, b=1.0):
    """Symmetric cross-entropy (Wang et al. 2019): CE plus reverse CE, robust to label noise."""
    logits = logits.float()
    p = logits.softmax(-1).clamp(1e-7, 1)
    onehot = F.one_hot(target, logits.shape[-1]).float().clamp(1e-4, 1)
    return a * F.cross_entropy(logits, target) + b * (-(p * onehot.log()).sum(-1)).mean()


def make_loss(spec, counts, args):
    """'ce', 'focal', ... or '0.7*focal+0.3*f1' -> loss(logits, target). counts: class frequencies."""
    inverse = counts.sum() / (len(counts) * counts.clamp(min=1).float())
    ldam_margin = 1.0 / counts.clamp(min=1).float() ** 0.25
    ldam_margin = ldam_margin * (args.ldam_margin / ldam_margin.max())
    parts = []
    for term in spec.split("+"):
        weight, _, name = term.strip().rpartition("*")
        weight = float(weight) if weight else 1.0
        if name == "ce":
            fn = lambda z, y: F.cross_entropy(z.float(), y)  # noqa: E731
        elif name == "wce":  # inverse class frequency
            fn = lambda z, y: F.cross_entropy(z.float(), y, weight=inverse.to(z.device))  # noqa: E731
        elif name == "ls":
            fn = lambda z, y: F.cross_entropy(z.float(), y, label_smoothing=args.label_smoothing)  # noqa: E731
        elif name == "focal":
            fn = lambda z, y: focal_loss(z, y, args.focal_gamma, args.focal_alpha)  # noqa: E731
        elif name == "f1":
            fn = soft_f1_loss
        elif name == "ldam":  # rarer classes must win by a larger margin (Cao et al. 2019)
            fn = lambda z, y: F.cross_entropy(  # noqa: E731
                z.float() - ldam_margin.to(z.device)[y].unsqueeze(1) * F.one_hot(y, z.shape[-1]), y
            )
        elif name == "sce":
            fn = symmetric_ce
        else:
            raise InputError(f"--loss {spec}: unknown term {name!r} (ce, wce, ls, focal, f1, ldam, sce)")
        parts.append((weight, fn))
    return lambda z, y: sum(w * fn(z, y) for w, fn in parts)


def age_regression_loss(pred, years_scaled):
    return F.smooth_l1_loss(pred.float().squeeze(-1), years_scaled)


def task_losses(args, counts):
    """{task: (weight, loss)} of the three-head trainers, from --task-weights and --mask/gender/age-loss."""
    try:
        weights = [float(w) for w in args.task_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3:
        raise InputError(f"--task-weights {args.task_weights}: expected three numbers (mask,gender,age)")
    specs = {"mask": args.mask_loss, "gender": args.gender_loss, "age": args.age_loss}
    return {t: (w, make_loss(specs[t] or args.loss, counts[t], args)) for t, w in zip(TASKS, weights)}


def mixed(loss_fn, output, target, mix):
    """loss_fn on a batch that may be mixed (batches.mix_batch): lam of the first target, 1 - lam of the second."""
    if mix is None:
        return loss_fn(output, target)
    perm, lam = mix
    return lam * loss_fn(output, target) + (1 - lam) * loss_fn(output, target[perm])
