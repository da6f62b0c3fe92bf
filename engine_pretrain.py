"""One epoch of MAE pre-training."""
import contextlib
from typing import Iterable

import torch

import util.lr_sched as lr_sched
from util.step_log import EpochLog, drop_gradients


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, run, args=None):
    """``run`` (``util.run.LoopHooks``) says where the epoch starts (in the middle after a resume), decides on a
    non-finite loss, and checkpoints after optimizer steps; ``EpochLog`` carries each step's loss to the meters,
    the console and TensorBoard (with ``--no_host_sync``, read from the device every 20 steps)."""
    model.train(True)
    accum_iter = args.accum_iter
    optimizer.zero_grad()

    log = EpochLog(run, epoch, data_loader, args, loss_tag='train_loss')
    for data_iter_step, (samples, _) in log.batches:
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / log.iters_per_epoch + epoch, args)
        lr = optimizer.param_groups[0]["lr"]

        samples = samples.to(device, non_blocking=True)
        update = (data_iter_step + 1) % accum_iter == 0

        # accumulation micro-steps keep their gradients local; DDP all-reduces once, on the step that updates
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            with loss_scaler.autocast:  # the forward's precision: fp16 on CUDA (the reference), --amp bf16, none
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss, skip = log.add(loss, lr, data_iter_step, update)
            if skip:  # a non-finite loss (--skip_nonfinite)
                drop_gradients(loss, model, optimizer)
                continue
            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(), update_grad=update)

        if update:
            optimizer.zero_grad()
            log.after_update(data_iter_step)  # periodic checkpoint; stop on a signal

    return log.finish()
