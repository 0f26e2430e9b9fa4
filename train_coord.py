"""Train three heads by coordinate updates: one task at a time, each on the weights the last left.

    python train_coord.py --crops WORK/crops --folds WORK/folds.csv --fold 0 \
        --backbone tf_efficientnet_lite0 --img-size 128 --epochs 6 --task-order mask,gender,age --out WORK/runs/coord

Per batch, for each task in --task-order: forward with the current weights (only the backbone
that task reads), backward that task's loss alone, step that task's optimizer (the parameters it
uses, with momentum of its own). The next task's loss is computed on the updated weights. So a
step costs up to three forwards; with --gender-backbone and --age-backbone no two tasks share
parameters and it costs what a weighted-sum step does (bench/coord_bench.py).
The competition team that proposed it reported validation macro F1 0.5876 (weighted sum) -> 0.6696 (this) in
its write-up, on the competition's data. Here, on the bench set (2-core CPU with bf16 units, lite0 at 128 px,
3 epochs): val F1 0.51-0.56 a fold against train_multi.py's 0.47-0.54, OOF 0.529 against 0.517, at 9.7-10.6 min
a fold. Outputs as train_single.py.
"""

import time

import torch

from batches import load_fold, make_batch, mix_batch, train_batches
from common import TASKS, InputError, class_id, run_main
from engine import (
    EpochStats,
    FoldLog,
    check_finite,
    folds_to_run,
    full_train_epochs,
    make_optimizer,
    model_to_validate,
    param_groups,
    print0,
    resume,
    save_epoch,
    setup_env,
    start_run,
    summarise_run,
    three_head_knobs,
    train_parser,
    validate,
)
from losses import age_regression_loss, mixed, task_losses
from model import build_model, own_backbones, unwrap

# ---- knobs -----------------------------------------------------------------------
parser = train_parser(__doc__)
g = three_head_knobs(parser)
g.add_argument("--task-order", default="mask,gender,age", help="order of the per-task steps within a batch")


def task_heads(args):
    """The heads each task's step trains (the age regression head goes with age)."""
    return {"mask": ["mask"], "gender": ["gender"], "age": ["age"] + (["age_reg"] if args.age_regression else [])}


def coord_step(model, x, y, mix, order, heads_of, losses_of, optimizers, env, age_regression=0.0, clip_grad=5.0):
    """One batch of coordinate updates. Returns {task: (loss, output)}; each task's forward runs after
    the previous task's optimizer step, so it sees the updated shared weights."""
    results = {}
    for task in order:
        optimizer = optimizers[task]
        with env.autocast():  # bf16 (or fp16) where the machine has it
            out = model(x, heads=heads_of[task])  # only the backbone this task reads
            weight, fn = losses_of[task]
            loss = weight * mixed(fn, out[task], y[task], mix)
            if "age_reg" in out:
                loss = loss + age_regression * mixed(age_regression_loss, out["age_reg"], y["age_reg"], mix)
        optimizer.zero_grad(set_to_none=True)
        env.scaler.scale(loss).backward()  # the scaler guards fp16 gradients; with bf16 and fp32 a pass-through
        env.scaler.unscale_(optimizer)  # clip the true gradients
        if clip_grad:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        env.scaler.step(optimizer)  # this task's parameters only: the others keep their weights and momentum
        env.scaler.update()
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
    # each step leaves the other heads unused: DDP must not wait for their gradients
    run = start_run(model, optimizers, args, env, fold, data.steps_per_epoch, find_unused=True)
    model = run.model  # inside the compile/DDP wrappers where asked
    losses_of = task_losses(args, data.counts)  # {task: (weight, loss)}
    fold_log = FoldLog(args, env, fold)
    start = resume(run, args, env, fold_log)

    # ---- train ----
    for epoch in range(start, args.epochs):
        model.train()
        stats = EpochStats()
        for step, (rows, batch) in enumerate(train_batches(data, args, env, run.gen)):
            t_data = time.perf_counter()
            x, y = make_batch(data, rows, args, env, run.gen, mean, std, len(batch))
            x, mix = mix_batch(x, args, run.gen)
            stats.data_seconds += time.perf_counter() - t_data
            results = coord_step(model, x, y, mix, order, heads_of, losses_of, optimizers, env, args.age_regression,
                                 args.clip_grad)  # fmt: skip
            for scheduler in run.schedulers.values():
                scheduler.step()
            if run.ema:
                run.ema.update(unwrap(model))
            loss = sum(r[0] for r in results.values())
            if step % 50 == 0:  # .item() inside is a sync: not every step
                check_finite(loss, epoch, step, env)
            stats.add(loss, class_id(*(results[t][1].argmax(-1) for t in TASKS)), y["label"], len(batch))
        train = stats.summary(epoch, run.schedulers["age"].get_last_lr()[-1], env)

        # ---- validate, save, log ----
        eval_model = model_to_validate(run, args, epoch, data, env, mean, std)  # EMA / SWA weights when asked
        val = validate(eval_model, data, args, env, mean, std)
        fold_log.add(epoch, train, val)
        save_epoch(run, fold_log, args, env, epoch, eval_model)  # last.pt; best.pt and oof.npz when val improved
        fold_log.write()
        if val and args.patience and epoch - fold_log.best_epoch >= args.patience:
            print0(env, f"fold {fold}: no better validation F1 for {args.patience} epochs: stopping")
            break
    return fold_log.finish()


def main():
    args = parser.parse_args()
    if sorted(args.task_order.split(",")) != sorted(TASKS):  # before setup_env makes the run folder
        raise InputError(f"--task-order {args.task_order}: expected each of mask, gender, age once")
    env = setup_env(args, "coord")
    summarise_run(env, [train_fold(args, env, fold) for fold in folds_to_run(args)])


if __name__ == "__main__":
    run_main(main)
