"""One epoch of MAE pre-training."""
import contextlib
import math
from typing import Iterable

import torch

import util.lr_sched as lr_sched
import util.misc as misc
from util.step_log import DeviceLosses


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, run, args=None):
    """``run`` (``util.run.Run``) says where the epoch starts (in the middle after a resume), decides on a
    non-finite loss, and checkpoints after optimizer steps. With ``--no_host_sync`` (the fast path) each step's loss
    stays on the device until the console prints (``DeviceLosses``)."""
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = 'Epoch: [{}]'.format(epoch)
    print_freq = 20
    accum_iter = args.accum_iter
    # the forward's precision: fp16 on CUDA (the reference), --amp bf16 or none; fp32 on the CPU
    device_type, amp_dtype, amp = misc.amp_settings(args)
    autocast = torch.autocast(device_type, dtype=amp_dtype) if amp else contextlib.nullcontext()
    log_writer = run.log_writer

    optimizer.zero_grad()

    if log_writer is not None:
        print('log_dir: {}'.format(log_writer.log_dir))

    batches, start, iters_per_epoch = run.epoch_batches(epoch, data_loader, metric_logger)
    device_losses = DeviceLosses(metric_logger, run, epoch, iters_per_epoch, accum_iter, 'train_loss', print_freq) \
        if getattr(args, 'no_host_sync', False) else None
    for data_iter_step, (samples, _) in enumerate(
            metric_logger.log_every(batches, print_freq, header, iters_per_epoch, start), start=start):
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)
        lr = optimizer.param_groups[0]["lr"]

        samples = samples.to(device, non_blocking=True)
        update = (data_iter_step + 1) % accum_iter == 0

        # accumulation micro-steps keep their gradients local; DDP all-reduces once, on the step that updates
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            with autocast:
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)

            if device_losses is not None:  # read later; a non-finite loss gives NaN gradients: the step is skipped
                loss = device_losses.add(loss, lr, data_iter_step, update)
            else:
                loss_value = loss.item()
                loss_value_reduce = misc.all_reduce_mean(loss_value)
                if not math.isfinite(loss_value_reduce):  # the mean over ranks: every rank skips (or stops) here
                    run.skip_nonfinite(loss_value_reduce, epoch, data_iter_step)
                    if hasattr(model, 'no_sync'):
                        loss.backward()  # DDP expects a backward after each forward; the gradients are dropped
                    optimizer.zero_grad()  # (with accumulation, the whole window's)
                    continue
                metric_logger.update(loss=loss_value)
                metric_logger.update(lr=lr)
                if log_writer is not None and update:
                    # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
                    epoch_1000x = int((data_iter_step / iters_per_epoch + epoch) * 1000)
                    log_writer.add_scalar('train_loss', loss_value_reduce, epoch_1000x)
                    log_writer.add_scalar('lr', lr, epoch_1000x)

            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(), update_grad=update)

        if update:
            optimizer.zero_grad()
            if device_losses is not None:
                device_losses.after_update(data_iter_step)
            else:
                run.after_step(epoch, data_iter_step + 1, metric_logger)  # periodic checkpoint; stop on a signal

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
