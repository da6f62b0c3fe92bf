"""One epoch of MAE pre-training."""
import contextlib
from typing import Iterable

import torch

import util.lr_sched as lr_sched
import util.misc as misc
from util.training.run import NonFiniteLosses, drop_gradients, epoch_batches


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler, log_writer=None, args=None, saver=None,
                    position=None):
    """The reference's epoch, plus [new]: ``saver`` (``util.checkpoints.saver.CheckpointSaver``) checkpoints inside the
    epoch (``--save_every_iters``, a stop signal); ``position`` (``util.checkpoints.resume.Position``) is where an epoch
    interrupted in the middle continues; ``--skip_nonfinite``; ``--no_host_sync`` (the losses stay on the device
    until the console prints: the meters and ``log_writer`` take them as they are)."""
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ", read_later=args.no_host_sync)
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = 'Epoch: [{}]'.format(epoch)
    print_freq = 20

    accum_iter = args.accum_iter

    optimizer.zero_grad()

    if log_writer is not None:
        print('log_dir: {}'.format(log_writer.log_dir))

    nonfinite = NonFiniteLosses(args.skip_nonfinite, epoch, saver, read_later=args.no_host_sync)
    # an epoch resumed in the middle starts after its trained batches, with its meters and random streams
    batches, start, iters_per_epoch = epoch_batches(data_loader, epoch, position, metric_logger, args.batch_size)
    for data_iter_step, (samples, _) in enumerate(
            metric_logger.log_every(batches, print_freq, header, iters_per_epoch, start), start):

        # we use a per iteration (instead of per epoch) lr scheduler
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)
        lr = optimizer.param_groups[0]["lr"]

        samples = samples.to(device, non_blocking=True)
        update = (data_iter_step + 1) % accum_iter == 0

        # accumulation micro-steps keep their gradients local; DDP all-reduces once, on the step that updates
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            with loss_scaler.autocast:  # the forward's precision: fp16 on CUDA (the reference), --amp bf16, none
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss, loss_value, loss_value_reduce = nonfinite.check(loss, data_iter_step)
            if loss_value is None:  # a non-finite loss, skipped (--skip_nonfinite)
                drop_gradients(loss, model, optimizer)
                continue
            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(), update_grad=update)

        if update:
            optimizer.zero_grad()

        metric_logger.update(loss=loss_value, lr=lr)
        if log_writer is not None and update:
            # We use epoch_1000x as the x-axis in tensorboard. This calibrates different curves when batch size
            # changes.
            epoch_1000x = int((data_iter_step / iters_per_epoch + epoch) * 1000)
            log_writer.add_scalar('train_loss', loss_value_reduce, epoch_1000x)
            log_writer.add_scalar('lr', lr, epoch_1000x)

        if update and saver is not None:  # checkpoints inside the epoch; a stop signal saves and stops
            saver.after_step(epoch, data_iter_step + 1, iters_per_epoch, metric_logger)

    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
