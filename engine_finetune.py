"""Supervised training (fine-tuning, linear probing): one epoch, the evaluation loop, and the epochs of training and
evaluation with the best accuracy, as in the reference."""
import contextlib
import datetime
import math
import time
from types import SimpleNamespace
from typing import Iterable, Optional

import torch
from timm.data import Mixup
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from util.step_log import DeviceLosses


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, loss_scaler, run,
                    max_norm: Optional[float] = None, mixup_fn: Optional[Mixup] = None, args=None):
    """``max_norm``: clip the gradient norm to it (None: no clipping). ``mixup_fn``: Mixup/CutMix applied to each
    batch (the targets become soft). ``run`` (``util.run.Run``): where the epoch starts, non-finite losses,
    checkpoints after optimizer steps. Returns the epoch's averaged meters (``lr``, ``loss``)."""
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
    device_losses = DeviceLosses(metric_logger, run, epoch, iters_per_epoch, accum_iter, 'loss', print_freq) \
        if getattr(args, 'no_host_sync', False) else None
    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(batches, print_freq, header, iters_per_epoch, start), start=start):
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)

        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            with autocast:
                outputs = model(samples)
                loss = criterion(outputs, targets)
            # with layer-wise decay the groups' lrs differ: report the largest (the head's)
            max_lr = max(group["lr"] for group in optimizer.param_groups)

            if device_losses is not None:  # read later; a non-finite loss gives NaN gradients: the step is skipped
                loss = device_losses.add(loss, max_lr, data_iter_step, update)
            else:
                loss_value = loss.item()
                loss_value_reduce = misc.all_reduce_mean(loss_value)
                if not math.isfinite(loss_value_reduce):  # the mean over ranks: every rank skips (or stops) here
                    run.skip_nonfinite(loss_value_reduce, epoch, data_iter_step)
                    if hasattr(model, 'no_sync'):
                        loss.backward()  # DDP expects a backward after each forward; the gradients are dropped
                    optimizer.zero_grad()
                    continue
                metric_logger.update(loss=loss_value)
                metric_logger.update(lr=max_lr)
                if log_writer is not None and update:
                    # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
                    epoch_1000x = int((data_iter_step / iters_per_epoch + epoch) * 1000)
                    log_writer.add_scalar('loss', loss_value_reduce, epoch_1000x)
                    log_writer.add_scalar('lr', max_lr, epoch_1000x)

            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        update_grad=update)

        if update:
            optimizer.zero_grad()
            if device_losses is not None:
                device_losses.after_update(data_iter_step)
            else:
                run.after_step(epoch, data_iter_step + 1, metric_logger)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, args=None):
    """Top-1/top-5 accuracy (in %) and cross-entropy over ``data_loader``, averaged over all processes; prints
    ``* Acc@1 .. Acc@5 .. loss ..``. The loss is the mean of the per-batch means, as in the reference. ``args``
    selects the precision (``--amp``); without it, fp16 autocast on CUDA and fp32 on the CPU."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = misc.MetricLogger(delimiter="  ")
    header = 'Test:'
    device_type, amp_dtype, amp = misc.amp_settings(args if args is not None else SimpleNamespace(device=str(device)))
    autocast = torch.autocast(device_type, dtype=amp_dtype) if amp else contextlib.nullcontext()

    model.eval()

    for batch in metric_logger.log_every(data_loader, 10, header):
        images = batch[0]
        target = batch[-1]
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)

        with autocast:
            output = model(images)
            loss = criterion(output, target)

        acc1, acc5 = accuracy(output, target, topk=(1, 5))

        batch_size = images.shape[0]
        metric_logger.update(loss=loss.item())
        metric_logger.meters['acc1'].update(acc1.item(), n=batch_size)
        metric_logger.meters['acc5'].update(acc5.item(), n=batch_size)
    metric_logger.synchronize_between_processes()
    print('* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f}'
          .format(top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))

    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def train_and_evaluate(model, criterion, data_loader_train, data_loader_val, optimizer, device, loss_scaler, run,
                       args, n_parameters, max_norm=None, mixup_fn=None):
    """The epochs of fine-tuning and linear probing: train, evaluate, keep the best accuracy, and hand the epoch's
    log row and test points to ``run``."""
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            data_loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      run, max_norm, mixup_fn, args=args)

        try:
            test_stats = evaluate(data_loader_val, model, device, args)
        except misc.UsageError:  # a bad validation image: the epoch's training is not lost
            run.keep_trained_epoch(epoch)
            raise
        print(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: "
              f"{test_stats['acc1']:.1f}%")
        run.max_accuracy = max(run.max_accuracy, test_stats["acc1"])
        print(f'Max accuracy: {run.max_accuracy:.2f}%')

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch,
                     'n_parameters': n_parameters}
        run.end_epoch(epoch, log_stats, points={'perf/test_acc1': test_stats['acc1'],
                                                'perf/test_acc5': test_stats['acc5'],
                                                'perf/test_loss': test_stats['loss']})
    run.close()
    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))
