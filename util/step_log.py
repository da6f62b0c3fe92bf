"""The training loop's log of one epoch, for both engines: each step's loss and lr on their way to the meters, the
console, TensorBoard, the non-finite check and the run's per-step hooks (``util.run.LoopHooks``).

Two modes, one path through the engines' loops:
- the reference's (default): each step's loss is read at once (``loss.item()`` and the mean over processes); a
  non-finite loss skips the step (``--skip_nonfinite``) or stops the run;
- ``--no_host_sync``: the losses stay on the device and are read ``every`` steps, at the steps the console prints
  (one host sync and one all-reduce per read), in the same order, so the meters, TensorBoard points and reports are
  the reference's, up to ``every`` steps late. Every step goes on: a non-finite loss's gradients are turned to NaN,
  so that its optimizer step (with accumulation, that of its whole window) is skipped on the device
  (``util.misc.NativeScalerWithGradNormCount``). The run's ``after_step`` runs at the optimizer step after each read,
  or earlier when a checkpoint is due or the epoch ends.
"""
import math

import torch

import util.misc as misc


class EpochLog:
    """One epoch of ``run`` (a ``util.run.LoopHooks``) over ``data_loader``: ``batches`` gives ``(iteration,
    batch)`` with the console's progress lines; per step, ``add`` the loss, and after each optimizer step call
    ``after_update``; ``finish`` returns the epoch's averaged meters. ``loss_tag`` names the loss's TensorBoard
    curve."""

    def __init__(self, run, epoch, data_loader, args, loss_tag, print_freq=20):
        self.run, self.epoch, self.loss_tag = run, epoch, loss_tag
        self.accum_iter = args.accum_iter
        self.every = print_freq if getattr(args, 'no_host_sync', False) else None
        self.metric_logger = misc.MetricLogger(delimiter="  ")
        self.metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
        if run.log_writer is not None:
            print('log_dir: {}'.format(run.log_writer.log_dir))
        # (after a resume in the middle of the epoch, its batches start further on, with the meters so far)
        batches, self.start, self.iters_per_epoch = run.epoch_batches(epoch, data_loader, self.metric_logger)
        self.batches = enumerate(self.metric_logger.log_every(batches, print_freq, 'Epoch: [{}]'.format(epoch),
                                                              self.iters_per_epoch, self.start), start=self.start)
        self._pending = []  # --no_host_sync: (loss on the device, lr, iteration, whether it updates)
        self._fresh = False  # read since the last run.after_step

    def add(self, loss, lr, step, update):
        """Iteration ``step``'s loss (a 0-d tensor) and lr. Returns ``(loss to back-propagate, skip)``: ``skip``
        when the reference's mode met a non-finite loss and skips this step (else the run stops here); on the
        device-side mode never, the loss then being x 1.0 (bit-identical gradients) or x NaN."""
        if self.every is None:
            value = loss.item()
            mean = misc.all_reduce_mean(value)
            if not math.isfinite(mean):  # the mean over ranks: every rank skips (or stops) here
                self.run.skip_nonfinite(mean, self.epoch, step)
                return loss, True
            self._record(value, mean, lr, step, update)
            return loss, False
        self._pending.append((loss.detach(), lr, step, update))
        if step % self.every == 0 or step == self.iters_per_epoch - 1:  # where log_every prints
            self._read()
        return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan), False

    def after_update(self, step):
        """After the optimizer step of iteration ``step``: the run's ``after_step`` (checkpoints within the epoch,
        stop requests); on the device-side mode once the losses up to it were read, or when a checkpoint is due or
        the epoch ends (then they are read first: the meters a checkpoint keeps are complete up to this step)."""
        next_iter = step + 1
        if self.every is not None:
            if not (self._fresh or self.run.checkpoint_due(next_iter)
                    or next_iter + self.accum_iter > self.iters_per_epoch):  # the epoch's last step
                return
            self._read()
            self._fresh = False
        self.run.after_step(self.epoch, next_iter, self.metric_logger)

    def finish(self):
        """The epoch's meters averaged over all processes (printed)."""
        self.metric_logger.synchronize_between_processes()
        print("Averaged stats:", self.metric_logger)
        return {k: meter.global_avg for k, meter in self.metric_logger.meters.items()}

    def _read(self):
        """Hand the pending device-side losses to the meters and TensorBoard, the non-finite ones to the run."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._fresh = True
        local = torch.stack([loss.float() for loss, *_ in pending])
        values, means = local.tolist(), misc.all_reduce_mean(local).tolist()
        for (_, lr, step, update), value, mean in zip(pending, values, means):
            if not math.isfinite(mean):  # on any process: every process takes this branch
                self.run.skip_nonfinite(mean, self.epoch, step)  # or stop
                continue
            self._record(value, mean, lr, step, update)

    def _record(self, value, mean, lr, step, update):
        self.metric_logger.update(loss=value)
        self.metric_logger.update(lr=lr)
        log_writer = self.run.log_writer
        if log_writer is not None and update:
            # x axis: 1000 x epoch, so that curves of runs with different batch sizes line up
            epoch_1000x = int((step / self.iters_per_epoch + self.epoch) * 1000)
            log_writer.add_scalar(self.loss_tag, mean, epoch_1000x)
            log_writer.add_scalar('lr', lr, epoch_1000x)


def drop_gradients(loss, model, optimizer):
    """A skipped step (a non-finite loss): the gradients of its accumulation window are dropped. DDP expects a
    backward after each forward, so it still gets one."""
    if hasattr(model, 'no_sync'):
        loss.backward()
    optimizer.zero_grad()
