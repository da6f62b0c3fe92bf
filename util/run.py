"""A training run's loop hooks and outputs: where each epoch starts, what happens after each optimizer step and each
finished epoch, and what the run writes (``log.txt`` rows, TensorBoard points, checkpoints through
``util.checkpoint_saver.CheckpointSaver``), with the stop signals and the time left.

``LoopHooks`` declares what the engines' loops use (through ``util.step_log.EpochLog``); by itself it is a run that
keeps nothing (benchmarks, tests). ``Run`` is the entry points' run in ``--output_dir``.

The rules that keep a run's history whole whatever instant it is killed:
- one run at a time in a folder: rank 0 holds an OS lock on ``<output_dir>/.run.lock`` (``util/output_dir.py``,
  taken by ``util.process.setup_process``);
- an epoch's ``log.txt`` row is written before its checkpoint; a run that continues from a checkpoint moves the
  rows written after it (by a run that died before its checkpoint was complete) to a side file and writes them
  again, and TensorBoard is told to hide the points after it (``purge_step``); the event files are kept;
- a checkpoint is never written with non-finite weights or optimizer state, so the newest one is always good;
- SIGUSR1, SIGTERM and a first Ctrl-C save at the next optimizer step and stop; a second Ctrl-C stops at once.
"""
import datetime
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import util.loaders as loaders
import util.misc as misc
import util.rng as rng
from util.checkpoint_saver import CheckpointSaver
from util.errors import RunInterrupted, TrainingStopped
from util.output_dir import append_log, move_log_rows_after

LOG_DIR_OWNER = '.output_dir'  # in a --log_dir apart from --output_dir: the run folder whose events it holds


class TrainedEpoch(NamedTuple):
    """An epoch's training just finished, before its evaluation: what a checkpoint inside it needs."""
    epoch: int
    next_iter: int
    metric_logger: object
    rng: dict


# ---------------------------------------------------------------------------------------------------- stop requests
_stop = {'signal': None}


def request_stop(signum=signal.SIGUSR1, frame=None):
    """Signal handler: ask the training loop to save and stop at the next optimizer step. A second Ctrl-C (SIGINT)
    stops at once, as Ctrl-C usually does."""
    if signum == signal.SIGINT and _stop['signal'] == signal.SIGINT:
        raise KeyboardInterrupt
    _stop['signal'] = signum
    if signum == signal.SIGINT and misc.is_main_process():
        sys.stderr.write("Ctrl-C: saving at the next optimizer step, then stopping (Ctrl-C again: stop at once, "
                         "unsaved)\n")
        sys.stderr.flush()


def stop_signal():
    """The signal that asked this process to stop, or None."""
    return _stop['signal']


def stop_requested():
    """The signal number once any rank has been asked to stop, else 0 (a collective: call on all ranks)."""
    return int(misc.all_reduce_max(_stop['signal'] or 0))


# ---------------------------------------------------------------------------------------------------- the hooks
class LoopHooks:
    """What a training loop is told and asks, declared once. By itself: every epoch fresh, no checkpoints, no
    TensorBoard, a non-finite loss skipped while fewer than ``skip_nonfinite`` were skipped this epoch."""

    log_writer = None  # a TensorBoard SummaryWriter, or None

    def __init__(self, skip_nonfinite=0):
        self.skip_limit = skip_nonfinite
        self._skipped_steps = 0

    def epoch_batches(self, epoch, data_loader, metric_logger):
        """Start an epoch: ``(batches, first iteration, iterations in the epoch)``."""
        self._skipped_steps = 0
        return iter(data_loader), 0, len(data_loader)

    def skip_nonfinite(self, loss_value, epoch, step):
        """A non-finite loss (the mean over ranks, so every rank agrees): skip the step while fewer than the limit
        were skipped this epoch, else stop, naming the last good checkpoint."""
        if self._skipped_steps < self.skip_limit:
            self._skipped_steps += 1
            print(f"Loss is {loss_value} at epoch {epoch} iteration {step}: skipping this step "
                  f"({self._skipped_steps} of at most {self.skip_limit})")
            return
        raise TrainingStopped(f"Loss is {loss_value} at epoch {epoch} iteration {step}, stopping training; "
                              + self.last_good() + (" (--skip_nonfinite N skips up to N such steps)"
                                                    if self.skip_limit == 0 else ""))

    def last_good(self):
        return "no checkpoint was written yet"

    def checkpoint_due(self, next_iter):
        """Whether a checkpoint is due after the optimizer step before iteration ``next_iter``."""
        return False

    def after_step(self, epoch, next_iter, metric_logger):
        """After each optimizer step (every rank)."""


# ---------------------------------------------------------------------------------------------------- the run
class Run(LoopHooks):
    """The training run of ``script`` in ``--output_dir`` (which ``util.process.setup_process`` has locked),
    started once the model, optimizer and loss scaler exist and ``util.resume`` has said where the run starts
    (``start``): it cuts ``log.txt`` back to that point, opens TensorBoard and installs the stop signals; then, per
    epoch, ``epoch_batches`` and ``after_step`` (through the engine's ``EpochLog``) and ``end_epoch``.
    ``track_accuracy``: keep the best test accuracy across the run (``max_accuracy``, saved in the checkpoints).
    ``model_ema``: the EMA of the weights ([new] --model_ema), saved with them."""

    def __init__(self, args, script, start, model, optimizer, loss_scaler, data_loader, track_accuracy=False,
                 model_ema=None):
        super().__init__(args.skip_nonfinite)
        self.args, self.output_dir = args, args.output_dir
        self.saver = CheckpointSaver(model, optimizer, loss_scaler, args, self.output_dir, os.path.basename(script),
                                     model_ema, data=data_loader.dataset)
        self.data_loader, self.position = data_loader, start.position
        self.max_accuracy = start.max_accuracy if track_accuracy else None
        self._iters_per_epoch = 0
        self._epoch_trained = None  # a TrainedEpoch
        self._epoch_start = time.time()
        if self.output_dir and misc.is_main_process():
            move_log_rows_after(self.output_dir, start.epoch - 1)
        if misc.is_main_process() and args.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.log_writer = SummaryWriter(log_dir=args.log_dir, purge_step=self._purge_step(start.purge_step))
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):  # save and stop at the next optimizer step
            signal.signal(sig, request_stop)
        print(f"Start training for {args.epochs} epochs")
        self._start_time = time.time()

    def _purge_step(self, purge_step):
        """TensorBoard's purge step in ``--log_dir``: the resumed point, or 0 where an earlier run of this folder
        left events (it was started afresh); none in a --log_dir that holds another run folder's events, whose
        points it would hide."""
        log_dir, own = Path(self.args.log_dir), os.path.realpath(self.output_dir or '.')
        os.makedirs(log_dir, exist_ok=True)
        if os.path.realpath(log_dir) != own:
            owner_file = log_dir / LOG_DIR_OWNER
            owner = owner_file.read_text(encoding='utf-8').strip() if owner_file.is_file() else None
            if list(log_dir.glob('events.out.tfevents.*')) and owner != own:
                print(f"Note: --log_dir {log_dir} holds the TensorBoard events of another run "
                      f"({owner or 'unknown'}): this run's points are added beside them, none are hidden "
                      f"(TensorBoard shows one folder as one run: give each run its own --log_dir)")
                return None
            owner_file.write_text(own + '\n', encoding='utf-8')
        if purge_step is None and list(log_dir.glob('events.out.tfevents.*')):
            return 0  # a run that starts afresh where an earlier one logged: hide that one's points
        return purge_step

    # ------------------------------------------------------------------------------------------ each epoch
    def epoch_batches(self, epoch, data_loader, metric_logger):
        """Start an epoch: ``(batches, first iteration, iterations in the epoch)``. An epoch resumed in the middle
        starts after the batches already trained on, with its running averages and skip counts, and its random
        streams restored after the loader's iterator exists (creating it draws the workers' base seed, which the
        interrupted run did at the start of the epoch)."""
        position = self.position if self.position is not None and self.position.epoch == epoch else None
        self.position = None
        self._skipped_steps = 0
        self._epoch_start = time.time()
        start = position.iteration if position else 0
        loaders.start_epoch(data_loader, epoch, start * self.args.batch_size, position.skipped if position else ())
        self._iters_per_epoch = len(data_loader) + start
        batches = iter(data_loader)
        if position:
            rng.set_rng_state(position.rng)
            metric_logger.load_state(position.meters)
        return batches, start, self._iters_per_epoch

    def last_good(self):
        return self.saver.last_good()

    def checkpoint_due(self, next_iter):
        """Whether ``--save_every_iters`` asks for a checkpoint after the optimizer step before ``next_iter``."""
        every = self.args.save_every_iters
        return bool(every) and next_iter % every == 0 and next_iter < self._iters_per_epoch

    def after_step(self, epoch, next_iter, metric_logger):
        """After each optimizer step (every rank): every ``--save_every_iters`` steps, and when a stop was
        requested (then ``RunInterrupted`` is raised), write a checkpoint to continue this epoch from."""
        if next_iter == self._iters_per_epoch:  # (the streams as the evaluation that follows finds them)
            self._epoch_trained = TrainedEpoch(epoch, next_iter, metric_logger, rng.rng_state())
        periodic = self.checkpoint_due(next_iter)
        signum = stop_requested()
        if not (periodic or signum):
            return
        if self.output_dir:
            self._save_position(epoch, next_iter, metric_logger)
        if signum:
            where = (f"saved {self.saver.last_path}; the same command continues from it"
                     if self.output_dir else "nothing was saved (no --output_dir)")
            raise RunInterrupted(f"signal {signum} received, stopped at epoch {epoch} iteration {next_iter}: {where}")

    def _save_position(self, epoch, next_iter, metric_logger, rng=None):
        self._save(epoch - 1, keep=False, at=f"epoch {epoch} iteration {next_iter}", rng=rng,
                   resume_iter=next_iter, resume_epoch=epoch, meters=misc.all_gather(metric_logger.state()),
                   skipped_images=loaders.skipped_files(self.data_loader))

    def keep_trained_epoch(self, epoch):
        """When the evaluation after epoch ``epoch`` fails (a bad validation image): save its training, so that
        the same command, once the file is fixed, continues with that evaluation instead of training it again."""
        if self.output_dir and self._epoch_trained is not None and self._epoch_trained.epoch == epoch:
            self._save_position(*self._epoch_trained)
            print(f"Kept the training of epoch {epoch} in {self.saver.last_path}: the same command continues with "
                  f"its evaluation")

    def end_epoch(self, epoch, log_stats, points=None):
        """After each epoch (every rank): its ``log.txt`` row (with the skip count), then its checkpoint, then the
        TensorBoard ``points`` at step ``epoch`` (after the checkpoint: they lie below a resumed run's purge step).
        """
        loaders.add_skipped_count(log_stats, self.data_loader, epoch)
        if self.output_dir and misc.is_main_process():
            if self.log_writer is not None:
                self.log_writer.flush()
            append_log(self.output_dir, log_stats)
        if self.output_dir:
            keep = epoch % self.args.save_freq == 0 or epoch + 1 == self.args.epochs
            self._save(epoch, keep=keep, at=f"the end of epoch {epoch}")
        if self.log_writer is not None and points:
            for tag, value in points.items():
                self.log_writer.add_scalar(tag, value, epoch)
            self.log_writer.flush()
        took, left = time.time() - self._epoch_start, self.args.epochs - epoch - 1
        print(f"Epoch {epoch} took {datetime.timedelta(seconds=int(took))}; {left} epoch(s) left, the run ends in "
              f"about {datetime.timedelta(seconds=int(took * left))}")

    def _save(self, epoch, keep, at, rng=None, **extra):
        best = {'max_accuracy': self.max_accuracy} if self.max_accuracy is not None else {}
        self.saver.save(epoch, keep, at, rng=rng, **best, **extra)

    def close(self):
        """After the last epoch: TensorBoard's files closed, the training time printed."""
        if self.log_writer is not None:
            self.log_writer.close()
        print('Training time {}'.format(str(datetime.timedelta(seconds=int(time.time() - self._start_time)))))
