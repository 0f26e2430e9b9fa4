"""Train one 18-way head (the 2022 winning shape: one EfficientNet, one softmax over 18 classes).

    python train_single.py --crops WORK/crops --folds WORK/folds.csv --fold 0 \
        --backbone tf_efficientnet_lite0 --img-size 128 --epochs 6 --out WORK/runs/single

Writes WORK/runs/single/config.json and per fold fold0/{best.pt, last.pt, log.csv, metrics.json,
oof.npz, curves.png, confusion.png}. --fold all trains every fold; --fold full, run after them, one more model on
every person for the epochs they chose (foldfull/, no oof.npz); --resume continues from last.pt;
`torchrun --nproc_per_node=N train_single.py ...` trains data-parallel.
The knobs all trainers share are in common.train_parser (see --help); this one adds none.
"""

import time

import torch

from common import (
    Tracker,
    age_regression_loss,
    backward_step,
    build_model,
    check_finite,
    checkpoint_state,
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


def train_fold(args, env, fold):
    # ---- data ----
    data = load_fold(args, fold, env)
    if fold == "full":
        args.epochs = full_train_epochs(args, env)
    print0(env, f"fold {fold}: {len(data.train_rows)} train / {len(data.val_rows)} val images, {args.epochs} epochs")

    # ---- model ----
    torch.manual_seed(args.seed)
    heads = {"label": 18} | ({"age_reg": 1} if args.age_regression else {})
    model, mean, std = build_model(args, heads, env)
    optimizers = {"all": make_optimizer(param_groups(*model.params_of(list(heads)), args), args)}
    schedulers = {"all": make_scheduler(optimizers["all"], args, data.steps_per_epoch)}
    ema = make_ema(model, args)
    swa = torch.optim.swa_utils.AveragedModel(model) if args.swa_start else None
    if args.compile:
        model = torch.compile(model)
    model = wrap_distributed(model, env)
    loss_fn = make_loss(args.loss, data.counts["label"], args)
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
                loss = mixed(loss_fn, out["label"], y["label"], mix)
                if args.age_regression:
                    loss = loss + args.age_regression * mixed(age_regression_loss, out["age_reg"], y["age_reg"], mix)
            if step % 50 == 0:  # .item() inside is a sync: not every step
                check_finite(loss, epoch, step, env)
            backward_step(loss, optimizers["all"], env, model.parameters())
            schedulers["all"].step()
            if ema:
                ema.update(unwrap(model))
            losses.append(loss.detach())
            preds.append(out["label"].detach().argmax(-1))
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
    env = setup(args, "single")
    metrics = [train_fold(args, env, fold) for fold in folds_to_run(args)]
    summarise_run(env, [m for m in metrics if m.get("val_macro_f1") is not None])


if __name__ == "__main__":
    run_main(main)
