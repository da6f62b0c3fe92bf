"""One epoch of MAE pre-training."""
import contextlib
import math
from typing import Iterable

import torch

import util.lr_sched as lr_sched
import util.misc as misc


def nonfinite_guard(args, epoch, step, loss_value_reduce, skipped):
    """Decide what to do with a non-finite (all-ranks mean) loss: skip the step while fewer than
    ``--skip_nonfinite`` steps were skipped, else stop with the iteration and the last good checkpoint named.
    Returns the new number of skipped steps."""
    limit = getattr(args, 'skip_nonfinite', 0)
    if skipped < limit:
        print(f"Loss is {loss_value_reduce} at epoch {epoch} iteration {step}: skipping this step "
              f"({skipped + 1} of at most {limit})")
        return skipped + 1
    last = misc.find_resume_checkpoint(args.output_dir) if args.output_dir else ''
    raise misc.TrainingStopped(
        f"Loss is {loss_value_reduce} at epoch {epoch} iteration {step}, stopping training; "
        + (f"the last good checkpoint is {last}" if last else "no checkpoint was written yet")
        + (" (--skip_nonfinite N skips up to N such steps)" if limit == 0 else ""))


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, log_writer=None, args=None):
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = 'Epoch: [{}]'.format(epoch)
    print_freq = 20
    accum_iter = args.accum_iter
    skipped = 0

    optimizer.zero_grad()

    if log_writer is not None:
        print('log_dir: {}'.format(log_writer.log_dir))

    for data_iter_step, (samples, _) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)

        samples = samples.to(device, non_blocking=True)
        update = (data_iter_step + 1) % accum_iter == 0

        # gradients of accumulation micro-steps stay local; DDP all-reduces once, on the step that updates
        sync = contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with misc.autocast(args):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_value = loss.item()
            # the mean over ranks decides, so every rank takes the same branch
            loss_value_reduce = misc.all_reduce_mean(loss_value)
            if not math.isfinite(loss_value_reduce):
                skipped = nonfinite_guard(args, epoch, data_iter_step, loss_value_reduce, skipped)
                if hasattr(model, 'no_sync'):
                    loss.backward()  # DDP expects a backward after each forward; the gradients are dropped
                optimizer.zero_grad()  # (with accumulation, the whole window's)
                continue
            loss = loss / accum_iter
            loss_scaler(loss, optimizer, parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad()

        if device.type == 'cuda':
            torch.cuda.synchronize()

        metric_logger.update(loss=loss_value)
        lr = optimizer.param_groups[0]["lr"]
        metric_logger.update(lr=lr)

        if log_writer is not None and update:
            # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
            epoch_1000x = int((data_iter_step / len(data_loader) + epoch) * 1000)
            log_writer.add_scalar('train_loss', loss_value_reduce, epoch_1000x)
            log_writer.add_scalar('lr', lr, epoch_1000x)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
