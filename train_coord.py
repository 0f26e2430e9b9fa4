"""Train three heads by coordinate updates: one task at a time, each on the weights the last left.

    python train_coord.py --crops WORK/crops --folds WORK/folds.csv --fold 0 \
        --backbone tf_efficientnet_lite0 --img-size 128 --epochs 6 --task-order mask,gender,age --out WORK/runs/coord

Per batch, for each task in --task-order: forward with the current weights (only the backbone
that task reads), backward that task's loss alone, step that task's optimizer (the parameters it
uses, with momentum of its own). The next task's loss is computed on the updated weights. So a
step costs up to three forwards; with --gender-backbone and --age-backbone no two tasks share
parameters and it costs what a weighted-sum step does (bench/coord_bench.py).
The team that proposed it reported validation macro F1 0.5876 (weighted sum) -> 0.6696 (this).
Outputs as train_single.py.
"""

import time

import torch

from common import (
    TASKS,
    DataError,
    Tracker,
    age_regression_loss,
    backward_step,
    build_model,
    check_finite,
    checkpoint_state,
    class_id,
    epoch_summary,
    folds_to_run,
    full_train_epochs,
    load_fold,
    make_batch,
    make_ema,
    make_loss,
    make_optimizer,
    make_scheduler,
    mix_batch,
    mixed,
    model_to_validate,
    own_backbones,
    param_groups,
    print0,
    resume_fold,
    run_main,
    setup,
    summarise_run,
    train_batches,
    train_parser,
    unwrap,
    wrap_distributed,
)

# ---- knobs -----------------------------------------------------------------------
parser = train_parser(__doc__)
g = parser.add_argument_group("coordinate updates")
g.add_argument("--task-order", default="mask,gender,age", help="order of the per-task steps within a batch")
g.add_argument("--task-weights", default="1,1,1", help="loss scale of each task's step (mask,gender,age)")
g.add_argument("--mask-loss", default=None, help="loss of the mask head (default: --loss)")
g.add_argument("--gender-loss", default=None, help="loss of the gender head (default: --loss)")
g.add_argument("--age-loss", default=None, help="loss of the age head (default: --loss)")
g.add_argument("--age-hidden", type=int, default=0, help="hidden units of a deeper age head (0: linear)")
g.add_argument("--age-backbone", default=None, help="a backbone of its own for the age head")
g.add_argument("--gender-backbone", default=None, help="a backbone of its own for the gender head")


def task_heads(args):
    """The heads each task's step trains (the age regression head goes with age)."""
    return {"mask": ["mask"], "gender": ["gender"], "age": ["age"] + (["age_reg"] if args.age_regression else [])}


def coord_step(model, x, y, mix, order, heads_of, losses_of, optimizers, env, age_regression=0.0):
    """One batch of coordinate updates. Returns {task: (loss, output)}; each task's forward runs after
    the previous task's optimizer step, so it sees the updated shared weights."""
    results = {}
    for task in order:
        with env.autocast():
            out = model(x, heads=heads_of[task])
            weight, fn = losses_of[task]
            loss = weight * mixed(fn, out[task], y[task], mix)
            if "age_reg" in out:
                loss = loss + age_regression * mixed(age_regression_loss, out["age_reg"], y["age_reg"], mix)
        params = [p for group in optimizers[task].param_groups for p in group["params"]]
        backward_step(loss, optimizers[task], env, params)
        results[task] = (loss.detach(), out[task].detach())
    return results


def train_fold(args, env, fold):
    # ---- data ----
    data = load_fold(args, fold, env)
    if fold == "full":
        args.epochs = full_train_epochs(args, env)
    order = args.task_order.split(",")  # checked in main()
    print0(env, f"fold {fold}: {len(data.train_rows)} train / {len(data.val_rows)} val images, {args.epochs} epochs")

    # ---- model: one optimizer (and scheduler) per task, over the parameters that task uses ----
    torch.manual_seed(args.seed)
    heads = dict(TASKS) | ({"age_reg": 1} if args.age_regression else {})
    model, mean, std = build_model(args, heads, env, own_backbones(args), args.age_hidden)
    heads_of = task_heads(args)
    optimizers = {t: make_optimizer(param_groups(*model.params_of(heads_of[t]), args), args) for t in TASKS}
    schedulers = {t: make_scheduler(optimizers[t], args, data.steps_per_epoch) for t in TASKS}
    ema = make_ema(model, args)
    swa = torch.optim.swa_utils.AveragedModel(model) if args.swa_start else None
    if args.compile:
        model = torch.compile(model)
    model = wrap_distributed(model, env, find_unused=True)  # each step leaves the other heads unused
    weights = [float(w) for w in args.task_weights.split(",")]
    specs = {"mask": args.mask_loss, "gender": args.gender_loss, "age": args.age_loss}
    losses_of = {t: (w, make_loss(specs[t] or args.loss, data.counts[t], args)) for t, w in zip(TASKS, weights)}
    gen = torch.Generator().manual_seed(args.seed * 1000 + (fold if fold != "full" else 999))
    tracker = Tracker(args, env, fold, data)
    start = resume_fold(args, env, tracker, model, optimizers, schedulers, ema, swa, gen)

    # ---- train ----
    for epoch in range(start, args.epochs):
        model.train()
        t0, data_seconds, images, losses, preds, targets = time.perf_counter(), 0.0, 0, [], [], []
        for step, (rows, batch) in enumerate(train_batches(data, args, env, gen)):
            t_data = time.perf_counter()
            x, y = make_batch(data, rows, args, env, gen, mean, std, len(batch))
            x, mix = mix_batch(x, args, gen)
            data_seconds += time.perf_counter() - t_data
            results = coord_step(model, x, y, mix, order, heads_of, losses_of, optimizers, env, args.age_regression)
            for s in schedulers.values():
                s.step()
            if ema:
                ema.update(unwrap(model))
            loss = sum(r[0] for r in results.values())
            if step % 50 == 0:  # .item() inside is a sync: not every step
                check_finite(loss, epoch, step, env)
            losses.append(loss)
            preds.append(class_id(*(results[t][1].argmax(-1) for t in TASKS)))
            targets.append(y["label"])
            images += len(batch)
        lr = schedulers["age"].get_last_lr()[-1]
        train = epoch_summary(env, epoch, losses, preds, targets, lr, images, t0, data_seconds)

        # ---- validate and save ----
        eval_model = model_to_validate(args, model, ema, swa, epoch, data, env, gen, mean, std)
        state = checkpoint_state(args, env, model, optimizers, schedulers, ema, swa, gen, epoch)
        if tracker.end_epoch(epoch, train, eval_model, state, mean, std):
            print0(env, f"fold {fold}: no better validation F1 for {args.patience} epochs: stopping")
            break
    return tracker.finish()


def main():
    args = parser.parse_args()
    if sorted(args.task_order.split(",")) != sorted(TASKS):  # before setup() makes the run folder
        raise DataError(f"--task-order {args.task_order}: expected each of mask, gender, age once")
    env = setup(args, "coord")
    metrics = [train_fold(args, env, fold) for fold in folds_to_run(args)]
    summarise_run(env, [m for m in metrics if m.get("val_macro_f1") is not None])


if __name__ == "__main__":
    run_main(main)
