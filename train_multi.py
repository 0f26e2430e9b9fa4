"""Train three heads (mask 3, gender 2, age band 3) on a shared backbone; loss = weighted sum.

    python train_multi.py --crops WORK/crops --folds WORK/folds.csv --fold 0 \
        --backbone tf_efficientnet_lite0 --img-size 128 --epochs 6 --task-weights 1,1,2 --out WORK/runs/multi

Age is the hard task: --age-loss gives it its own loss, --age-hidden a deeper head,
--age-backbone NAME a backbone of its own. Predictions combine the heads into 18 classes
(product of the three probabilities). Outputs as train_single.py.
2-core CPU with bf16 units, lite0 at 128 px, 3 epochs: val F1 0.47-0.54 a fold, 3.4-3.5 min a fold.
"""

import time

import torch

from batches import load_fold, make_batch, mix_batch, train_batches
from common import TASKS, class_id, run_main
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
three_head_knobs(parser)


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
    optimizer = make_optimizer(param_groups(*model.params_of(list(heads)), args), args)
    run = start_run(model, {"all": optimizer}, args, env, fold, data.steps_per_epoch)
    model, scheduler = run.model, run.schedulers["all"]  # model: inside the compile/DDP wrappers where asked
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
            with env.autocast():  # bf16 (or fp16) where the machine has it
                out = model(x)
                loss = sum(w * mixed(fn, out[t], y[t], mix) for t, (w, fn) in losses_of.items())
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
            stats.add(loss, class_id(*(out[t].argmax(-1) for t in TASKS)), y["label"], len(batch))
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
    env = setup_env(args, "multi")
    summarise_run(env, [train_fold(args, env, fold) for fold in folds_to_run(args)])


if __name__ == "__main__":
    run_main(main)
