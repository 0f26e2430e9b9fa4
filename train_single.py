"""Train one 18-way head (the 2022 winning shape: one EfficientNet, one softmax over 18 classes).

    python train_single.py --crops WORK/crops --folds WORK/folds.csv --fold 0 \
        --backbone tf_efficientnet_lite0 --img-size 128 --epochs 6 --out WORK/runs/single

Writes WORK/runs/single/config.json and per fold fold0/{best.pt, last.pt, log.csv, metrics.json,
oof.npz, curves.png, confusion.png}. --fold all trains every fold; --fold full, run after them, one more model on
every person for the epochs they chose (foldfull/, no oof.npz); --resume continues from last.pt;
`torchrun --nproc_per_node=N train_single.py ...` trains data-parallel.
2-core CPU with bf16 units, lite0 at 128 px, 3 epochs: val F1 0.52-0.55 a fold, 4.6-4.9 min a fold.
The knobs all trainers share are in engine.train_parser (see --help); this one adds none.
"""

import time

import torch

from batches import load_fold, make_batch, mix_batch, train_batches
from common import run_main
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
    train_parser,
    validate,
)
from losses import age_regression_loss, make_loss, mixed
from model import build_model, unwrap

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
    optimizer = make_optimizer(param_groups(*model.params_of(list(heads)), args), args)
    run = start_run(model, {"all": optimizer}, args, env, fold, data.steps_per_epoch)
    model, scheduler = run.model, run.schedulers["all"]  # model: inside the compile/DDP wrappers where asked
    loss_fn = make_loss(args.loss, data.counts["label"], args)
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
            with env.autocast():  # bf16 (or fp16) where the machine has it
                out = model(x)
                loss = mixed(loss_fn, out["label"], y["label"], mix)
                if args.age_regression:
                    loss = loss + args.age_regression * mixed(age_regression_loss, out["age_reg"], y["age_reg"], mix)
            if step % 50 == 0:  # .item() inside is a sync: not every step
                check_finite(loss, epoch, step, env)
            optimizer.zero_grad(set_to_none=True)
            env.scaler.scale(loss).backward()  # the scaler guards fp16 gradients; with bf16 and fp32 a pass-through
            env.scaler.unscale_(optimizer)  # clip the true gradients
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            env.scaler.step(optimizer)
            env.scaler.update()
            scheduler.step()
            if run.ema:
                run.ema.update(unwrap(model))
            stats.add(loss, out["label"].argmax(-1), y["label"], len(batch))
        train = stats.summary(epoch, scheduler.get_last_lr()[-1], env)

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
    env = setup_env(args, "single")
    summarise_run(env, [train_fold(args, env, fold) for fold in folds_to_run(args)])


if __name__ == "__main__":
    run_main(main)
