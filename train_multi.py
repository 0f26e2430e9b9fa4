"""Train three heads (mask 3, gender 2, age band 3) on a shared backbone; loss = weighted sum.

    python train_multi.py --crops WORK/crops --folds WORK/folds.csv --fold 0 \
        --backbone tf_efficientnet_lite0 --img-size 128 --epochs 6 --task-weights 1,1,2 --out WORK/runs/multi

Age is the hard task: --age-loss gives it its own loss, --age-hidden a deeper head,
--age-backbone NAME a backbone of its own. Predictions combine the heads into 18 classes
(product of the three probabilities). Outputs as train_single.py.
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
g = parser.add_argument_group("three heads")
g.add_argument("--task-weights", default="1,1,1", help="loss weights of mask,gender,age")
g.add_argument("--mask-loss", default=None, help="loss of the mask head (default: --loss)")
g.add_argument("--gender-loss", default=None, help="loss of the gender head (default: --loss)")
g.add_argument("--age-loss", default=None, help="loss of the age head (default: --loss)")
g.add_argument("--age-hidden", type=int, default=0, help="hidden units of a deeper age head (0: linear)")
g.add_argument("--age-backbone", default=None, help="a backbone of its own for the age head")
g.add_argument("--gender-backbone", default=None, help="a backbone of its own for the gender head")


def task_losses(args, data):
    try:
        weights = [float(w) for w in args.task_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3:
        raise DataError(f"--task-weights {args.task_weights}: expected three numbers (mask,gender,age)")
    specs = {"mask": args.mask_loss, "gender": args.gender_loss, "age": args.age_loss}
    return {t: (w, make_loss(specs[t] or args.loss, data.counts[t], args)) for t, w in zip(TASKS, weights)}


def train_fold(args, env, fold):
    # ---- data ----
    data = load_fold(args, fold, env)
    if fold == "full":
        args.epochs = full_train_epochs(args, env)
    print0(env, f"fold {fold}: {len(data.train_rows)} train / {len(data.val_rows)} val images, {args.epochs} epochs")

    # ---- model ----
    torch.manual_seed(args.seed)
    heads = dict(TASKS) | ({"age_reg": 1} if args.age_regression else {})
    model, mean, std = build_model(args, heads, env, own_backbones(args), args.age_hidden)
    optimizers = {"all": make_optimizer(param_groups(*model.params_of(list(heads)), args), args)}
    schedulers = {"all": make_scheduler(optimizers["all"], args, data.steps_per_epoch)}
    ema = make_ema(model, args)
    swa = torch.optim.swa_utils.AveragedModel(model) if args.swa_start else None
    if args.compile:
        model = torch.compile(model)
    model = wrap_distributed(model, env)
    losses_of = task_losses(args, data)
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
            with env.autocast():
                out = model(x)
                loss = sum(w * mixed(fn, out[t], y[t], mix) for t, (w, fn) in losses_of.items())
                if args.age_regression:
                    loss = loss + args.age_regression * mixed(age_regression_loss, out["age_reg"], y["age_reg"], mix)
            if step % 50 == 0:  # .item() inside is a sync: not every step
                check_finite(loss, epoch, step, env)
            backward_step(loss, optimizers["all"], env, model.parameters())
            schedulers["all"].step()
            if ema:
                ema.update(unwrap(model))
            losses.append(loss.detach())
            preds.append(class_id(*(out[t].detach().argmax(-1) for t in TASKS)))
            targets.append(y["label"])
            images += len(batch)
        lr = schedulers["all"].get_last_lr()[-1]
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
    env = setup(args, "multi")
    metrics = [train_fold(args, env, fold) for fold in folds_to_run(args)]
    summarise_run(env, [m for m in metrics if m.get("val_macro_f1") is not None])


if __name__ == "__main__":
    run_main(main)
