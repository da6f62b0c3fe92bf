"""What the training loops call besides the model, the meters and the checkpoints, each one call in the entry point or
the engine: the run's records (``open_records``: log.txt cut back to where it starts, args.yaml, TensorBoard's writer;
``add_points``), where an epoch starts (``epoch_batches``: in
the middle after a resume) and what a non-finite loss does (``NonFiniteLosses``).

The rules that keep a run's history whole whatever instant it is killed (the entry points' loops follow them):
- one run at a time in a folder: rank 0 holds an OS lock on ``<output_dir>/.run.lock`` (``util/training/output_dir.py``,
  taken by ``util.training.process.setup_process``);
- an epoch's ``log.txt`` row is written before its checkpoint; a run that continues from a checkpoint moves the
  rows written after it (by a run that died before its checkpoint was complete) to a side file and writes them
  again (``util.training.output_dir.move_log_rows_after``), and TensorBoard is told to hide the points after it
  (``purge_step``); the event files are kept; the TensorBoard points of an epoch come after its checkpoint;
- a checkpoint is never written with non-finite weights or optimizer state, so the newest one is always good
  (``util.checkpoints.saver.CheckpointSaver``);
- SIGUSR1, SIGTERM and a first Ctrl-C save at the next optimizer step and stop; a second Ctrl-C stops at once
  (``util.misc.install_stop_handlers``).
"""
import datetime
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import util.config_file as config_file
import util.data.loaders as loaders
import util.misc as misc
from util.checkpoints.saver import set_rng_state
from util.errors import TrainingStopped
from util.training.output_dir import move_log_rows_after
from util.training import tracking

LOG_DIR_OWNER = '.output_dir'  # in a --log_dir apart from --output_dir: the run folder whose events it holds


# ---------------------------------------------------------------------------------------------------- TensorBoard
def open_records(args, start):
    """The run's records from where it starts (``start``: ``util.checkpoints.resume.Start``): [new] the ``log.txt``
    rows written after its checkpoint (by a run killed before its next one) moved to a side file, [new]
    ``args.yaml`` (its flags, to repeat it), and the TensorBoard writer (``summary_writer``), which hides the points
    after the checkpoint. Returns the writer (None on other ranks than 0, or without --log_dir and
    --wandb_project)."""
    move_log_rows_after(args.output_dir, start.epoch - 1)
    config_file.write_args(args, args.output_dir, misc.get_world_size())
    return summary_writer(args, start.purge_step)


def summary_writer(args, purge_step):
    """The reference's ``SummaryWriter(log_dir=args.log_dir)`` on rank 0 (None elsewhere or without --log_dir),
    hiding the points from ``purge_step`` on (those of a run that died after its checkpoint; see ``purge``); with
    [new] --wandb_project, teed to Weights & Biases (``util/training/tracking.py``)."""
    if not (misc.is_main_process() and (args.log_dir or args.wandb_project)):
        return None
    writer = tracking.open_log_writer(args, purge(args, purge_step) if args.log_dir else None, purge_step is not None)
    return LogWriter(writer, args.no_host_sync)


class LogWriter:
    """A TensorBoard writer (``writer``: a ``SummaryWriter``) whose points may wait to be read: with
    ``read_later`` ([new] --no_host_sync) a value left on the device (a tensor, or a ``misc.Later`` value) is
    written once read, at the console's next print, in the order of the calls; a point dropped with its step (a
    skipped non-finite loss) takes the other points of that step given after it. Anything else is ``writer``'s."""

    def __init__(self, writer, read_later=False):
        self.writer, self.read_later, self._queue = writer, read_later, []
        self.log_dir = writer.log_dir

    def __getattr__(self, name):
        return getattr(self.__dict__['writer'], name)

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
        if isinstance(scalar_value, torch.Tensor) and self.read_later:
            scalar_value = misc.Later(scalar_value)
        if isinstance(scalar_value, misc.Later) or self._queue:
            self._queue.append((tag, scalar_value, global_step, args, kwargs))
            return self._write_read()
        self.writer.add_scalar(tag, scalar_value, global_step, *args, **kwargs)

    def _write_read(self):
        dropped_step = None
        while self._queue and not (isinstance(self._queue[0][1], misc.Later) and not self._queue[0][1].done):
            tag, value, step, args, kwargs = self._queue.pop(0)
            if isinstance(value, misc.Later):
                dropped_step = step if value.dropped else None
                value = value.value
            if step != dropped_step:
                self.writer.add_scalar(tag, value, step, *args, **kwargs)

    def flush(self):
        self._write_read()
        self.writer.flush()

    def close(self):
        self._write_read()
        self.writer.close()


def purge(args, purge_step):
    """TensorBoard's purge step in ``--log_dir``: the resumed point, or 0 where an earlier run of this folder left
    events (it was started afresh); none in a --log_dir that holds another run folder's events, whose points it
    would hide."""
    log_dir, own = Path(args.log_dir), os.path.realpath(args.output_dir or '.')
    os.makedirs(log_dir, exist_ok=True)
    if os.path.realpath(log_dir) != own:
        owner_file = log_dir / LOG_DIR_OWNER
        owner = owner_file.read_text(encoding='utf-8', errors='replace').strip() if owner_file.is_file() else None
        if list(log_dir.glob('events.out.tfevents.*')) and owner != own:
            print(f"Note: --log_dir {log_dir} holds the TensorBoard events of another run "
                  f"({owner or 'unknown'}): this run's points are added beside them, none are hidden "
                  f"(TensorBoard shows one folder as one run: give each run its own --log_dir)")
            return None
        owner_file.write_text(own + '\n', encoding='utf-8')
    if purge_step is None and list(log_dir.glob('events.out.tfevents.*')):
        return 0  # a run that starts afresh where an earlier one logged: hide that one's points
    return purge_step


def add_points(log_writer, points, epoch):
    """An epoch's TensorBoard points (its evaluations), after its checkpoint: they lie below a resumed run's purge
    step."""
    if log_writer is not None and points:
        for tag, value in points.items():
            log_writer.add_scalar(tag, value, epoch)
        log_writer.flush()


def print_epoch_time(epoch, epochs, epoch_start):
    took, left = time.time() - epoch_start, epochs - epoch - 1
    print(f"Epoch {epoch} took {datetime.timedelta(seconds=int(took))}; {left} epoch(s) left, the run ends in "
          f"about {datetime.timedelta(seconds=int(took * left))}")


# ---------------------------------------------------------------------------------------------------- the loop
def epoch_batches(data_loader, epoch, position, metric_logger, batch_size):
    """Start epoch ``epoch``: ``(batches, first iteration, iterations in the epoch)``. Resumed in the middle
    (``position``, a ``util.checkpoints.resume.Position`` of this epoch), it starts after the batches already trained
    on, with its running averages and skip counts, and its random streams restored after the loader's iterator exists
    (creating it draws the workers' base seed, which the interrupted run did at the start of the epoch). (A list
    of batches, in tests and benchmarks, has no data order to set.)"""
    position = position if position is not None and position.epoch == epoch else None
    start = position.iteration if position else 0
    if hasattr(data_loader, 'sampler'):
        loaders.start_epoch(data_loader, epoch, start * batch_size, position.skipped if position else ())
    iters_per_epoch = len(data_loader) + start
    batches = iter(data_loader)
    if position:
        set_rng_state(position.rng)
        metric_logger.load_state(position.meters)
    return batches, start, iters_per_epoch


@dataclass
class NonFiniteLosses:
    """An epoch's non-finite losses (their mean over the processes, so every rank decides alike): each skips its
    step while fewer than ``limit`` (``--skip_nonfinite``) were skipped this epoch, else the run stops, naming the
    last good checkpoint of ``saver``. ``check`` reads each step's loss: at once (the reference's
    ``loss.item()``), or with ``read_later`` (``--no_host_sync`` [new]) at the console's next print
    (``misc.Later``), the loss then made NaN where it is not finite (its gradients NaN, so the optimizer step of its
    accumulation window is skipped on the device, ``misc.NativeScalerWithGradNormCount``)."""
    limit: int
    epoch: int
    saver: Any = None
    read_later: bool = False
    skipped: int = 0

    def check(self, loss, step):
        """``(loss to back-propagate, loss_value, loss_value_reduce)``: the loss, its value on this process and its
        mean over the processes (floats, or ``misc.Later`` values); ``loss_value`` None for a step to skip."""
        if self.read_later:
            loss_value_reduce = misc.Later(loss, mean=True, judge=lambda mean: self.judge(mean, step))
            loss_value = misc.Later(loss, follows=loss_value_reduce)
            return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan), loss_value, loss_value_reduce
        loss_value = loss.item()
        loss_value_reduce = misc.all_reduce_mean(loss_value)
        if not self.judge(loss_value_reduce, step):
            return loss, None, None
        return loss, loss_value, loss_value_reduce

    def judge(self, loss_value, step):
        """Whether the step goes on: True for a finite loss; False to skip it; or the run stops here."""
        if math.isfinite(loss_value):
            return True
        if self.skipped < self.limit:
            self.skipped += 1
            print(f"Loss is {loss_value} at epoch {self.epoch} iteration {step}: skipping this step "
                  f"({self.skipped} of at most {self.limit})")
            return False
        last_good = self.saver.last_good() if self.saver is not None else "no checkpoint was written yet"
        raise TrainingStopped(f"Loss is {loss_value} at epoch {self.epoch} iteration {step}, stopping training; "
                              + last_good + (" (--skip_nonfinite N skips up to N such steps)"
                                             if self.limit == 0 else ""))


def drop_gradients(loss, model, optimizer):
    """A skipped step (a non-finite loss): the gradients of its accumulation window are dropped. DDP expects a
    backward after each forward, so it still gets one."""
    if hasattr(model, 'no_sync'):
        loss.backward()
    optimizer.zero_grad()
