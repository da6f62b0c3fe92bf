"""Supervised training (fine-tuning, linear probing): one epoch and the evaluation loop, as in the reference, and the
evaluation after each epoch's training."""
import contextlib
from types import SimpleNamespace
from typing import Iterable, Optional

import torch
from timm.data import Mixup
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from util.checkpoints.saver import rng_state, set_rng_state
from util.errors import UsageError
from util.training.run import NonFiniteLosses, drop_gradients, epoch_batches


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, loss_scaler,
                    max_norm: Optional[float] = None, mixup_fn: Optional[Mixup] = None, log_writer=None, args=None,
                    model_ema=None, saver=None, position=None):
    """The reference's epoch, plus [new]: ``model_ema`` (--model_ema, timm's ``ModelEmaV3``), the average of the
    weights, updated after each optimizer step, before that step's checkpoint (a step skipped for a non-finite loss
    is none); ``saver`` (``util.checkpoints.saver.CheckpointSaver``) checkpoints inside the epoch
    (``--save_every_iters``, a stop signal); ``position`` (``util.checkpoints.resume.Position``) is where an epoch
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
    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(batches, print_freq, header, iters_per_epoch, start), start):

        # we use a per iteration (instead of per epoch) lr scheduler
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)

        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        # accumulation micro-steps keep their gradients local; DDP all-reduces once, on the step that updates
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            with loss_scaler.autocast:  # the forward's precision: fp16 on CUDA (the reference), --amp bf16, none
                outputs = model(samples)
                loss = criterion(outputs, targets)
            loss, loss_value, loss_value_reduce = nonfinite.check(loss, data_iter_step)
            if loss_value is None:  # a non-finite loss, skipped (--skip_nonfinite)
                drop_gradients(loss, model, optimizer)
                continue
            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        update_grad=update)

        if update:
            optimizer.zero_grad()
            if model_ema is not None:  # (through DDP's and --compile's wrappers: the same tensors, in the same order)
                model_ema.update(model)

        # with layer-wise decay the groups' lrs differ: report the largest (the head's)
        max_lr = max(group["lr"] for group in optimizer.param_groups)
        metric_logger.update(loss=loss_value, lr=max_lr)
        if log_writer is not None and update:
            # We use epoch_1000x as the x-axis in tensorboard. This calibrates different curves when batch size
            # changes.
            epoch_1000x = int((data_iter_step / iters_per_epoch + epoch) * 1000)
            log_writer.add_scalar('loss', loss_value_reduce, epoch_1000x)
            log_writer.add_scalar('lr', max_lr, epoch_1000x)

        if update and saver is not None:  # checkpoints inside the epoch; a stop signal saves and stops
            saver.after_step(epoch, data_iter_step + 1, iters_per_epoch, metric_logger)

    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, args=None, ema=False):
    """Top-1/top-5 accuracy (in %) and cross-entropy over ``data_loader``, averaged over all processes; prints
    ``* Acc@1 .. Acc@5 .. loss ..`` and the accuracy line of the reference's entry points. The loss is the mean of
    the per-batch means, as in the reference. ``args`` selects the precision (``--amp``); without it, fp16 autocast
    on CUDA and fp32 on the CPU. ``ema``: ``model`` is the EMA of the weights ([new] --model_ema), and the lines say
    so (``* EMA Acc@1 ..``, ``Accuracy of the EMA weights ..``)."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = misc.MetricLogger(delimiter="  ")
    header = 'Test (EMA):' if ema else 'Test:'
    autocast = misc.autocast(args if args is not None else SimpleNamespace(device=str(device)))

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
    print(('* EMA' if ema else '*') + ' Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss '
          '{losses.global_avg:.3f}'.format(top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))
    print(f"Accuracy of the {'EMA weights' if ema else 'network'} on the {len(data_loader.dataset)} test images: "
          f"{metric_logger.acc1.global_avg:.1f}%")

    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


# the TensorBoard points of an evaluation (as ``perf/test_<name>``), in the reference's order; the EMA's after them
TEST_POINTS = ('acc1', 'acc5', 'loss', 'acc1_ema', 'acc5_ema', 'loss_ema')


def evaluate_epoch(saver, epoch, data_loader_val, model, device, args, model_ema=None):
    """The evaluation after epoch ``epoch``'s training (``evaluate``). A bad validation image keeps the epoch's
    training (``saver.keep_trained_epoch``). ``model_ema`` ([new] --model_ema): its weights are evaluated too
    (``acc1_ema``, ...), with the random streams put back after it, so that the raw weights' training and numbers
    are those of a run without it."""
    try:
        test_stats = evaluate(data_loader_val, model, device, args)
        if model_ema is not None:  # (a second pass of the loader draws its base seed from torch's stream)
            streams = rng_state()
            ema_stats = evaluate(data_loader_val, model_ema.module, device, args, ema=True)
            set_rng_state(streams)
            test_stats.update({f'{k}_ema': v for k, v in ema_stats.items()})
    except UsageError:  # a bad validation image: the epoch's training is not lost
        saver.keep_trained_epoch(epoch)
        raise
    return test_stats
