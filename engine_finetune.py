"""One epoch of supervised training (fine-tuning, linear probing) and the evaluation loop, as in the reference."""
from types import SimpleNamespace
from typing import Iterable, Optional

import torch
from timm.data import Mixup
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from engine_pretrain import backward_step, grad_sync, new_metric_logger, start_batches


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, loss_scaler,
                    max_norm: Optional[float] = None, mixup_fn: Optional[Mixup] = None, log_writer=None, args=None,
                    checkpointer=None, resume=None):
    """``max_norm``: clip the gradient norm to it (None: no clipping). ``mixup_fn``: Mixup/CutMix applied to each
    batch (the targets become soft). ``checkpointer`` (``misc.EpochCheckpointer``): mid-epoch checkpoints and stop
    requests; ``resume``: where an epoch resumed in the middle starts (``misc.prepare_resume``). Returns the epoch's
    averaged meters (``lr``, ``loss``)."""
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
    for data_iter_step, (samples, targets) in enumerate(logged, start=start_iter):
        # per-iteration (not per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / iters_per_epoch + epoch, args)

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)

        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        with grad_sync(model, update):
            with misc.autocast(args):
                outputs = model(samples)
                loss = criterion(outputs, targets)
            loss_value, loss_value_reduce, skipped, stepped = backward_step(
                model, loss, optimizer, loss_scaler, args, epoch, data_iter_step, update, skipped, clip_grad=max_norm)
        if not stepped:
            continue

        if device.type == 'cuda':
            torch.cuda.synchronize()

        metric_logger.update(loss=loss_value)
        # with layer-wise decay the groups' lrs differ: report the largest (the head's)
        max_lr = max(group["lr"] for group in optimizer.param_groups)
        metric_logger.update(lr=max_lr)

        if log_writer is not None and update:
            # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
            epoch_1000x = int((data_iter_step / iters_per_epoch + epoch) * 1000)
            log_writer.add_scalar('loss', loss_value_reduce, epoch_1000x)
            log_writer.add_scalar('lr', max_lr, epoch_1000x)

        if update:
            misc.fault_point('step', epoch, data_iter_step + 1)  # crash tests only (MAE_FAULT)
        if checkpointer is not None and update:
            checkpointer.after_step(epoch, data_iter_step + 1, iters_per_epoch, metric_logger)

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
    if args is None:
        args = SimpleNamespace(device=str(device))

    model.eval()

    for batch in metric_logger.log_every(data_loader, 10, header):
        images = batch[0]
        target = batch[-1]
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)

        with misc.autocast(args):
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
