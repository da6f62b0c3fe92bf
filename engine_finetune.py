"""Supervised training (fine-tuning, linear probing): one epoch, the evaluation loop, and what follows each epoch's
training (its evaluation, the best accuracy, its log row), as in the reference."""
import contextlib
from types import SimpleNamespace
from typing import Iterable, Optional

import torch
from timm.data import Mixup
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
import util.rng as rng
from util.errors import UsageError
from util.step_log import EpochLog, drop_gradients


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, loss_scaler, run,
                    max_norm: Optional[float] = None, mixup_fn: Optional[Mixup] = None, args=None, model_ema=None):
    """``max_norm``: clip the gradient norm to it (None: no clipping). ``mixup_fn``: Mixup/CutMix applied to each
    batch (the targets become soft). ``run`` (``util.run.LoopHooks``): where the epoch starts, non-finite losses,
    checkpoints after optimizer steps. ``model_ema`` ([new] --model_ema, timm's ``ModelEmaV3``): the average of the
    weights, updated after each optimizer step, before that step's checkpoint (a step skipped for a non-finite
    loss is none). Returns the epoch's averaged meters (``lr``, ``loss``)."""
    model.train(True)
    accum_iter = args.accum_iter
    optimizer.zero_grad()

    log = EpochLog(run, epoch, data_loader, args, loss_tag='loss')
    for data_iter_step, (samples, targets) in log.batches:
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / log.iters_per_epoch + epoch, args)

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)

        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            with loss_scaler.autocast:  # the forward's precision: fp16 on CUDA (the reference), --amp bf16, none
                outputs = model(samples)
                loss = criterion(outputs, targets)
            # with layer-wise decay the groups' lrs differ: report the largest (the head's)
            max_lr = max(group["lr"] for group in optimizer.param_groups)
            loss, skip = log.add(loss, max_lr, data_iter_step, update)
            if skip:  # a non-finite loss (--skip_nonfinite)
                drop_gradients(loss, model, optimizer)
                continue
            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        update_grad=update)

        if update:
            optimizer.zero_grad()
            if model_ema is not None:  # (through DDP's and --compile's wrappers: the same tensors, in the same order)
                model_ema.update(model)
            log.after_update(data_iter_step)

    return log.finish()


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


def evaluate_epoch(run, epoch, train_stats, data_loader_val, model, device, args, n_parameters, model_ema=None):
    """After epoch ``epoch``'s training: evaluate, keep the best accuracy, and hand the epoch's ``log.txt`` row and
    test points to ``run`` (which then writes its checkpoint). A bad validation image keeps the epoch's training.
    ``model_ema`` ([new] --model_ema): its weights are evaluated too (``test_acc1_ema``, ...; the best accuracy
    stays the raw weights'), with the random streams put back after it, so that the raw weights' training and
    numbers are those of a run without it."""
    try:
        test_stats = evaluate(data_loader_val, model, device, args)
        if model_ema is not None:  # (a second pass of the loader draws its base seed from torch's stream)
            streams = rng.rng_state()
            ema_stats = evaluate(data_loader_val, model_ema.module, device, args, ema=True)
            rng.set_rng_state(streams)
            test_stats.update({f'{k}_ema': v for k, v in ema_stats.items()})
    except UsageError:  # a bad validation image: the epoch's training is not lost
        run.keep_trained_epoch(epoch)
        raise
    run.max_accuracy = max(run.max_accuracy, test_stats["acc1"])
    print(f'Max accuracy: {run.max_accuracy:.2f}%')

    log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                 **{f'test_{k}': v for k, v in test_stats.items()},
                 'epoch': epoch,
                 'n_parameters': n_parameters}
    points = [k + suffix for suffix in ('', '_ema') for k in ('acc1', 'acc5', 'loss') if k + suffix in test_stats]
    run.end_epoch(epoch, log_stats, points={f'perf/test_{k}': test_stats[k] for k in points})
