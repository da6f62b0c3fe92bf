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


def grad_sync(model, update):
    """Gradients of accumulation micro-steps stay local: DDP all-reduces once, on the step that updates (run the
    forward and ``backward_step`` inside this context)."""
    return contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync()


def backward_step(model, loss, optimizer, loss_scaler, args, epoch, step, update, skipped, clip_grad=None):
    """The reference's backward: ``loss / accum_iter``, scaled backward, and on ``update`` the (clipped) optimizer
    step and ``zero_grad``. A non-finite loss (its mean over ranks decides, so every rank takes the same branch)
    goes to ``nonfinite_guard`` and the step is dropped. Returns ``(loss_value, loss_value_reduce, skipped,
    stepped)``."""
    loss_value = loss.item()
    loss_value_reduce = misc.all_reduce_mean(loss_value)
    if not math.isfinite(loss_value_reduce):
        skipped = nonfinite_guard(args, epoch, step, loss_value_reduce, skipped)
        if hasattr(model, 'no_sync'):
            loss.backward()  # DDP expects a backward after each forward; the gradients are dropped
        optimizer.zero_grad()  # (with accumulation, the whole window's)
        return loss_value, loss_value_reduce, skipped, False
    loss_scaler(loss / args.accum_iter, optimizer, clip_grad=clip_grad, parameters=model.parameters(),
                update_grad=update)
    if update:
        optimizer.zero_grad()
    return loss_value, loss_value_reduce, skipped, True


def start_batches(data_loader, resume):
    """Start the epoch's batches; returns ``(iterator, start_iter, iters_per_epoch)``.

    ``resume`` (a mid-epoch resume, else None) holds ``start_iter`` and ``restore_rng``. The random streams are
    restored only after the loader's iterator exists, because creating it draws the workers' base seed from the
    global generator, which the interrupted run did at the start of the epoch, not at the resume point."""
    start_iter = resume['start_iter'] if resume else 0
    iters_per_epoch = len(data_loader) + start_iter
    batches = iter(data_loader)
    if resume:
        resume['restore_rng']()
    return batches, start_iter, iters_per_epoch


def new_metric_logger(resume):
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    if resume and resume.get('meters'):
        metric_logger.load_state(resume['meters'])
    return metric_logger


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, log_writer=None, args=None,
                    checkpointer=None, resume=None):
    model.train(True)
    metric_logger = new_metric_logger(resume)
    header = 'Epoch: [{}]'.format(epoch)
    print_freq = 20
    accum_iter = args.accum_iter
    skipped = 0

    optimizer.zero_grad()

    if log_writer is not None:
        print('log_dir: {}'.format(log_writer.log_dir))

    batches, start_iter, iters_per_epoch = start_batches(data_loader, resume)
    logged = metric_logger.log_every(batches, print_freq, header, total=iters_per_epoch, start=start_iter)
    for data_iter_step, (samples, _) in enumerate(logged, start=start_iter):
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)

        samples = samples.to(device, non_blocking=True)
        update = (data_iter_step + 1) % accum_iter == 0

        with grad_sync(model, update):
            with misc.autocast(args):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_value, loss_value_reduce, skipped, stepped = backward_step(
                model, loss, optimizer, loss_scaler, args, epoch, data_iter_step, update, skipped)
        if not stepped:
            continue

        if device.type == 'cuda':
            torch.cuda.synchronize()

        metric_logger.update(loss=loss_value)
        lr = optimizer.param_groups[0]["lr"]
        metric_logger.update(lr=lr)

        if log_writer is not None and update:
            # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
            epoch_1000x = int((data_iter_step / iters_per_epoch + epoch) * 1000)
            log_writer.add_scalar('train_loss', loss_value_reduce, epoch_1000x)
            log_writer.add_scalar('lr', lr, epoch_1000x)

        if update:
            misc.fault_point('step', epoch, data_iter_step + 1)
        if checkpointer is not None and update:
            checkpointer.after_step(epoch, data_iter_step + 1, iters_per_epoch, metric_logger)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
