"""Scores: macro F1 (the competition's metric) and the score line every stage prints, the logits files stages
pass to each other, and the plots people look at (training curves, confusion matrices)."""

import numpy as np
import pandas as pd

from common import AGE_BANDS, GENDERS, MASK_STATES, TASKS, class_name, save_figure, save_npz, split_class


def macro_f1(labels, pred, n_classes=18):
    """Macro F1 over all n_classes (a class never predicted nor present counts 0, as the competition's scorer)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, pred, average="macro", labels=range(n_classes), zero_division=0))


def scores(views, true):
    """Macro F1 (18 classes and per task) and accuracy. true: {'label','mask','gender','age'} arrays."""
    pred = views["label"].argmax(-1)
    out = dict(macro_f1=macro_f1(true["label"], pred), acc=float(np.mean(np.asarray(true["label"]) == pred)))
    for t, n in TASKS.items():
        # a task's prediction is read off the 18-class argmax, so the numbers describe one submission
        task_pred = split_class(pred)[("mask", "gender", "age").index(t)]
        out[f"{t}_f1"] = macro_f1(true[t], task_pred, n)
    return {k: round(float(v), 4) for k, v in out.items()}


def per_class_table(pred, true_label):
    """Precision, recall, F1 and support of each of the 18 classes, for the decisions `pred`."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, n = precision_recall_fscore_support(true_label, pred, labels=range(18), zero_division=0)
    return pd.DataFrame(dict(cls=range(18), name=[class_name(c) for c in range(18)], precision=p.round(3),
                             recall=r.round(3), f1=f.round(3), support=n))  # fmt: skip


def score_line(s):
    return (
        f"macro_f1={s['macro_f1']:.4f} acc={s['acc']:.4f} mask_f1={s['mask_f1']:.4f} "
        f"gender_f1={s['gender_f1']:.4f} age_f1={s['age_f1']:.4f}"
    )


def save_logprobs(path, image_ids, views, labels=None):
    """The logits file every stage reads: image ids, 18-class and per-task log-probabilities."""
    arrays = {f"logp_{k}": v.astype(np.float32) for k, v in views.items()}
    if labels is not None:
        arrays["label"] = np.asarray(labels)
    save_npz(path, image_id=np.asarray(image_ids, dtype=str), **arrays)


def load_logprobs(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- plots ------------------------------------------------------------------------------------
def plot_curves(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(log["epoch"], log["train_loss"], "o-", label="train")
    if "val_loss" in log and log["val_loss"].notna().any():
        a.plot(log["epoch"], log["val_loss"], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(log["epoch"], log["train_f1"], "o-", label="train (augmented)")
    for c in ("val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1"):
        if c in log and log[c].notna().any():
            b.plot(log["epoch"], log[c], "o-" if c == "val_f1" else ".--", label=c.replace("val_", "val "))
    b.set(xlabel="epoch", ylabel="macro F1", title="macro F1", ylim=(0, 1))
    b.legend(fontsize=7)
    save_figure(fig, path)


def plot_confusions(pred, true_label, path, title=""):
    """18-class confusion matrix of the decisions `pred` and one per task, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = plt.figure(figsize=(12, 7))
    ax = fig.add_axes([0.14, 0.08, 0.50, 0.84])
    ConfusionMatrixDisplay.from_predictions(
        true_label, pred, labels=range(18), ax=ax, colorbar=False, text_kw={"fontsize": 6}
    )
    ax.set_yticks(range(18), [f"{class_name(c)} {c}" for c in range(18)], fontsize=7)
    ax.set_title(f"{title} 18 classes (row: true)")
    names = dict(mask=MASK_STATES, gender=GENDERS, age=AGE_BANDS)
    for k, t in enumerate(("mask", "gender", "age")):
        ax = fig.add_axes([0.70, 0.70 - 0.31 * k, 0.26, 0.22])
        ConfusionMatrixDisplay.from_predictions(
            split_class(true_label)[k], split_class(pred)[k], labels=range(TASKS[t]), display_labels=names[t], ax=ax,
            colorbar=False, text_kw={"fontsize": 7},
        )  # fmt: skip
        ax.set_title(t, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("")
        ax.set_ylabel("")
    save_figure(fig, path)
