"""The way of each training step's loss and lr to the meters, TensorBoard, the non-finite check and the run's
checkpoints: read at once (the reference), or from the device a few steps at a time (``--no_host_sync``)."""
import math

import torch

from util.misc import all_reduce_mean


class StepLog:
    """Each training step's loss and lr on their way to the meters, TensorBoard, the non-finite check
    (``run.skip_nonfinite``) and ``run.after_step`` (checkpoints within the epoch, stop requests).

    ``every=1`` (the reference): ``add`` reads the loss at once (``loss.item()`` and its mean over the processes)
    and returns False for a non-finite one, whose step the caller skips. ``every=N`` (``--no_host_sync``): the
    losses stay on the device and are read N steps at a time (one host sync and one all-reduce per read), at the
    steps the console prints, in the same order, so the meters, TensorBoard points and reports are the reference's,
    up to N steps late; ``run.after_step`` runs at the optimizer step after each read, or earlier when a checkpoint
    is due. Every step then goes on, and ``guard`` turns a non-finite loss's gradients to NaN, so that its optimizer
    step (with accumulation, that of its whole window) is skipped on the device (``NativeScalerWithGradNormCount``).
    """

    def __init__(self, metric_logger, run, epoch, iters_per_epoch, accum_iter, loss_tag, every=1):
        self.metric_logger, self.run, self.epoch = metric_logger, run, epoch
        self.iters_per_epoch, self.accum_iter, self.loss_tag, self.every = iters_per_epoch, accum_iter, loss_tag, every
        self._pending = []  # (loss on the device, lr, iteration, whether it updates)
        self._fresh = False  # read since the last run.after_step

    def add(self, loss, lr, step, update):
        """Log iteration ``step``'s loss (a 0-d tensor) and lr; False if the step must be skipped (read at once)."""
        if self.every == 1:
            value = loss.item()
            return self._log(value, all_reduce_mean(value), lr, step, update)
        self._pending.append((loss.detach(), lr, step, update))
        if step % self.every == 0 or step == self.iters_per_epoch - 1:  # where log_every prints
            self.read()
        return True

    def guard(self, loss):
        """The loss to back-propagate: on the device-side path, a non-finite loss gives NaN gradients (x 1.0 leaves
        a finite one and its gradients bit-identical); else ``loss`` itself."""
        if self.every == 1:
            return loss
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
            self._log(value, mean, lr, step, update)

    def _log(self, value, mean, lr, step, update):
        if not math.isfinite(mean):  # on any process: every process takes this branch
            self.run.skip_nonfinite(mean, self.epoch, step)  # or stop
            return False
        self.metric_logger.update(loss=value)
        self.metric_logger.update(lr=lr)
        log_writer = self.run.log_writer
        if log_writer is not None and update:
            # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
            epoch_1000x = int((step / self.iters_per_epoch + self.epoch) * 1000)
            log_writer.add_scalar(self.loss_tag, mean, epoch_1000x)
            log_writer.add_scalar('lr', lr, epoch_1000x)
        return True

    def after_update(self, step):
        """After the optimizer step of iteration ``step``: ``run.after_step`` (every step on the reference's path)."""
        next_iter = step + 1
        if self.every > 1 and not (self._fresh or self.run.checkpoint_due(next_iter)
                                   or next_iter + self.accum_iter > self.iters_per_epoch):  # the epoch's last step
            return
        self.read()  # the meters a checkpoint keeps are complete up to this step
        self._fresh = False
        self.run.after_step(self.epoch, next_iter, self.metric_logger)
