"""``--no_host_sync``: the training steps' losses read from the device a few steps at a time instead of at every
step (the reference's ``loss.item()``, which waits for the GPU)."""
import math

import torch

from util.misc import all_reduce_mean


class DeviceLosses:
    """Each training step's loss and lr on their way to the meters, TensorBoard, the non-finite check
    (``run.skip_nonfinite``) and ``run.after_step`` (checkpoints within the epoch, stop requests), read ``every``
    steps: the losses stay on the device and are read at the steps the console prints (one host sync and one
    all-reduce per read), in the same order, so the meters, TensorBoard points and reports are the reference's, up
    to ``every`` steps late. ``run.after_step`` runs at the optimizer step after each read, or earlier when a
    checkpoint is due. Every step goes on: ``add`` turns a non-finite loss's gradients to NaN, so that its optimizer
    step (with accumulation, that of its whole window) is skipped on the device (``NativeScalerWithGradNormCount``).
    """

    def __init__(self, metric_logger, run, epoch, iters_per_epoch, accum_iter, loss_tag, every):
        self.metric_logger, self.run, self.epoch = metric_logger, run, epoch
        self.iters_per_epoch, self.accum_iter, self.loss_tag, self.every = iters_per_epoch, accum_iter, loss_tag, every
        self._pending = []  # (loss on the device, lr, iteration, whether it updates)
        self._fresh = False  # read since the last run.after_step

    def add(self, loss, lr, step, update):
        """Keep iteration ``step``'s loss (a 0-d tensor) and lr; returns the loss to back-propagate: x 1.0 for a
        finite one (bit-identical gradients), x NaN for a non-finite one."""
        self._pending.append((loss.detach(), lr, step, update))
        if step % self.every == 0 or step == self.iters_per_epoch - 1:  # where log_every prints
            self.read()
        return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)

    def read(self):
        """Hand the pending losses to the meters and TensorBoard, and the non-finite ones to run.skip_nonfinite."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._fresh = True
        local = torch.stack([loss.float() for loss, *_ in pending])
        values, means = local.tolist(), all_reduce_mean(local).tolist()
        for (_, lr, step, update), value, mean in zip(pending, values, means):
            if not math.isfinite(mean):  # on any process: every process takes this branch
                self.run.skip_nonfinite(mean, self.epoch, step)  # or stop
                continue
            self.metric_logger.update(loss=value)
            self.metric_logger.update(lr=lr)
            log_writer = self.run.log_writer
            if log_writer is not None and update:
                epoch_1000x = int((step / self.iters_per_epoch + self.epoch) * 1000)
                log_writer.add_scalar(self.loss_tag, mean, epoch_1000x)
                log_writer.add_scalar('lr', lr, epoch_1000x)

    def after_update(self, step):
        """After the optimizer step of iteration ``step``: ``run.after_step`` once the losses up to it were read,
        or when a checkpoint is due or the epoch ends (then they are read first: the meters a checkpoint keeps are
        complete up to this step)."""
        next_iter = step + 1
        if not (self._fresh or self.run.checkpoint_due(next_iter)
                or next_iter + self.accum_iter > self.iters_per_epoch):  # the epoch's last step
            return
        self.read()
        self._fresh = False
        self.run.after_step(self.epoch, next_iter, self.metric_logger)
