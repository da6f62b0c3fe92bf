"""A training run's life in ``--output_dir``: ``Run`` starts it (process group, seeds, the folder's lock, which
checkpoint to continue and whether it may be continued), restores everything a checkpoint holds, says where each
epoch starts, is told about every optimizer step and every finished epoch, and writes ``log.txt``, TensorBoard
points and checkpoints.

The rules that keep a run's history whole whatever instant it is killed:
- one run at a time in a folder: rank 0 holds an OS lock on ``<output_dir>/.run.lock`` (released by the OS when the
  process dies, so a killed run never blocks its restart);
- an epoch's ``log.txt`` row is written before its checkpoint; a run that continues from a checkpoint moves the
  rows written after it (by a run that died before its checkpoint was complete) to a side file and writes them
  again, and TensorBoard is told to hide the points after it (``purge_step``); the event files are kept;
- a checkpoint is never written with non-finite weights or optimizer state, so the newest one is always good.
"""
import datetime
import fcntl
import json
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import util.checkpoint as ckpt_io
import util.misc as misc
from util.image_folder import log_skipped_count, reset_skipped, restore_skipped, skipped_indices
from util.misc import RunComplete, RunInterrupted, TrainingStopped, UsageError

LOCK = '.run.lock'

# Flags a continued run may change (README, "Long runs"). Every other flag stored in the checkpoint must be the same.
CHANGEABLE_ON_RESUME = {
    'epochs', 'batch_size', 'accum_iter',  # a longer run; a smaller batch after running out of memory
    'num_workers', 'pin_mem', 'device', 'amp', 'data_path',  # how, and from where, the same data is read
    'output_dir', 'log_dir', 'resume', 'auto_resume', 'start_epoch', 'finetune', 'eval', 'dist_eval',
    'save_freq', 'save_every_iters', 'skip_nonfinite', 'skip_bad_images', 'seed',
    # how fast the same training runs (README, "Speed")
    'fast', 'fused_adamw', 'compile', 'no_host_sync', 'grad_checkpointing', 'data_loader',
    # the process layout (filled in by the launcher)
    'world_size', 'rank', 'gpu', 'local_rank', 'distributed', 'dist_backend', 'dist_url', 'dist_on_itp',
    # submitit's own flags
    'job_dir', 'ngpus', 'nodes', 'timeout', 'partition', 'use_volta32', 'comment', 'cluster', 'dependency',
}


# ---------------------------------------------------------------------------------------------------- stop requests
_stop = {'signal': None}


def request_stop(signum=signal.SIGUSR1, frame=None):
    """Signal handler: ask the training loop to save and stop at the next optimizer step."""
    _stop['signal'] = signum


def stop_signal():
    """The signal that asked this process to stop, or None."""
    return _stop['signal']


def stop_requested():
    """The signal number once any rank has been asked to stop, else 0 (a collective: call on all ranks)."""
    return int(misc.all_reduce_max(_stop['signal'] or 0))


# ---------------------------------------------------------------------------------------------------- data position
class ResumableSampler(torch.utils.data.Sampler):
    """Wraps the training sampler so that an epoch resumed in the middle starts after the samples already trained
    on (``skip``, this rank's count); otherwise it yields exactly the wrapped sampler's indices."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = iter(self.sampler)
        for _ in range(self.skip):
            next(indices)
        return indices

    def __len__(self):
        return len(self.sampler) - self.skip


@dataclass
class Position:
    """Where an epoch interrupted in the middle continues, on this rank."""
    epoch: int
    iteration: int  # batches trained on (an optimizer-step boundary)
    meters: dict  # the running averages so far
    rng: dict  # the random streams at that point
    skipped: list = field(default_factory=list)  # indices of bad image files skipped so far


# ---------------------------------------------------------------------------------------------------- the folder
def lock_output_dir(path):
    """Create ``path``, check it is writable, and hold its lock for the life of this process (rank 0; every rank
    gets the same answer) or until the entry point's ``main`` ends. Returns the open lock file."""
    error, handle = None, None
    if misc.is_main_process():
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            handle = open(Path(path) / LOCK, 'a+', encoding='utf-8')
        except OSError as e:
            error = f"--output_dir {path} is not writable ({e.strerror or e})"
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or 'a process that holds its lock'
                handle.close()
                error = (f"--output_dir {path} is in use by another run ({holder}): let it finish or stop it, or "
                         f"pass another --output_dir")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(f"process {os.getpid()} on {socket.gethostname()}, started "
                             f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
                handle.flush()
                misc.AT_MAIN_EXIT.append(handle.close)
    if misc.get_world_size() > 1:
        error = misc.all_gather(error)[0]
    if error:
        raise UsageError(error)
    return handle


def move_log_rows_after(output_dir, last_epoch):
    """Move the ``log.txt`` rows of epochs after ``last_epoch`` (and any row cut short by a kill) to a side file
    named on the console, so that the run continued from that epoch neither duplicates nor loses rows."""
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    kept, moved = [], []
    for line in lines:
        try:
            keep = json.loads(line).get('epoch', -1) <= last_epoch
        except json.JSONDecodeError:
            keep = False
        (kept if keep else moved).append(line if line.endswith('\n') else line + '\n')
    if not moved:
        return
    side = os.path.join(output_dir, f"log-moved-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.txt")
    with open(side, 'w', encoding='utf-8') as f:
        f.writelines(moved)
    tmp = os.path.join(output_dir, '.log.txt.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
    os.replace(tmp, path)
    print(f"Note: moved {len(moved)} log.txt row(s) written after the point this run starts from to {side}")


def append_log(output_dir, stats):
    with open(os.path.join(output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------- the run
class Run:
    """One training run (or evaluation) of ``script``; see the module's docstring.

    ``Run(args, __file__)`` joins the process group, locks ``--output_dir``, prints the flags, seeds the random
    streams and chooses the checkpoint to continue (or refuses one that belongs to another run); ``restore(...)``
    loads it into the model, optimizer and loss scaler and sets the data position; then, per epoch,
    ``epoch_batches`` in the engine, ``after_step`` after each optimizer step and ``end_epoch`` at the end."""

    def __init__(self, args, script, seed_python=False):
        self.args = args
        self.script = os.path.basename(script)
        misc.init_distributed_mode(args)
        self.device = torch.device(args.device)
        self.training = not getattr(args, 'eval', False)
        self.output_dir = args.output_dir if self.training else ''
        if args.log_dir is None:  # TensorBoard's events beside the checkpoints
            args.log_dir = args.output_dir
        self._lock = lock_output_dir(self.output_dir) if self.output_dir else None

        print('job dir: {}'.format(os.path.dirname(os.path.realpath(script))))
        print("{}".format(args).replace(', ', ',\n'))
        if self.device.type != 'cuda':
            print(f"Precision: fp32 (--amp {args.amp} applies on CUDA only)")

        seed = args.seed + misc.get_rank()
        torch.manual_seed(seed)
        np.random.seed(seed)
        if seed_python:
            random.seed(seed)
        torch.backends.cudnn.benchmark = True

        found = ckpt_io.newest(self.output_dir) if self.training and args.auto_resume else ''
        self.checkpoint = self._choose_checkpoint(found) if found or args.resume else None
        self.log_writer = None
        self.position = None
        self.max_accuracy = None
        self._skipped_steps = 0
        self._epoch_trained = None  # (epoch, iterations, metric logger, random streams) after an epoch's last step
        self._epoch_start = time.time()

    # ------------------------------------------------------------------------------------------ which checkpoint
    def _choose_checkpoint(self, found):
        """The checkpoint to start from: with auto-resume, ``found`` (the newest in --output_dir), checked to belong
        to this run, unless --resume is further along; else --resume. Sets ``args.resume``."""
        args = self.args
        given = ckpt_io.load(args.resume) if args.resume else None
        if found and not (args.resume and os.path.realpath(found) == os.path.realpath(args.resume)):
            checkpoint = ckpt_io.load(found)
            if given is not None and ckpt_io.position(given) > ckpt_io.position(checkpoint):
                print(f"Note: --resume {args.resume} (epoch {given.get('epoch')}) is further along than {found} in "
                      f"--output_dir: continuing from --resume")
                return given
            self._check_continues(checkpoint, found)
            print(f"Auto-resume: continuing from {found}" + (
                f" (further along than --resume {args.resume}, which is not used; pass --no_auto_resume to start "
                f"from --resume)" if args.resume else ''))
            args.resume = found
            return checkpoint
        if given is not None and found:
            self._check_continues(given, found)
        return given

    def _check_continues(self, checkpoint, path):
        """Refuse to continue a checkpoint in --output_dir that another script, model or set of training flags
        wrote; stop with exit code 0 if it is this very run, finished."""
        args, there = self.args, ckpt_io.stored_args(checkpoint)
        folder = f"--output_dir {self.output_dir}"
        fix = "pass a new --output_dir, or --no_auto_resume to start afresh in that folder"
        script, model = checkpoint.get('script'), there.get('model', args.model)
        if (script and script != self.script) or model != args.model:
            raise UsageError(f"{folder} holds a run of {script or 'another script'} --model {model} "
                             f"({os.path.basename(path)}, epoch {checkpoint.get('epoch')}), not of {self.script} "
                             f"--model {args.model}: {fix}")
        changed = changed_flags(there, args)
        if changed:
            raise UsageError(f"{folder} holds a run with other training flags ({'; '.join(changed)}): run it with its "
                             f"own flags to continue it, or {fix}")
        if 'resume_iter' not in checkpoint and checkpoint.get('epoch', -1) + 1 >= args.epochs:
            raise RunComplete(f"{folder} holds this run, complete: it finished epoch {checkpoint['epoch']} of "
                              f"--epochs {args.epochs}; nothing to do (raise --epochs to train longer)")

    # ------------------------------------------------------------------------------------------ restoring
    def restore(self, model, optimizer=None, loss_scaler=None, data_loader=None, track_accuracy=False):
        """Load the chosen checkpoint: the weights, and when training the optimizer, loss scaler, epoch, random
        streams and position in the epoch (``restart_from_checkpoint`` of one run). Cuts ``log.txt`` back to it
        and opens the TensorBoard writer. ``track_accuracy``: keep the best test accuracy across the run."""
        args, checkpoint = self.args, self.checkpoint
        self.model, self.optimizer, self.loss_scaler = model, optimizer, loss_scaler
        self.data_loader = data_loader
        self.max_accuracy = 0.0 if track_accuracy else None
        purge_step = None
        if checkpoint is not None:
            problem = ckpt_io.state_dict_mismatch(model, checkpoint['model'])
            if problem:
                raise UsageError(f"--resume {args.resume} does not fit --model {args.model}: {problem}")
            model.load_state_dict(checkpoint['model'])
            print("Resume checkpoint %s" % args.resume)
            if self.training and 'optimizer' in checkpoint and 'epoch' in checkpoint:
                ckpt_io.load_optimizer_state(optimizer, checkpoint['optimizer'], f"--resume {args.resume}")
                args.start_epoch = checkpoint['epoch'] + 1
                if 'scaler' in checkpoint:
                    loss_scaler.load_state_dict(checkpoint['scaler'])
                print("With optim & sched!")
                purge_step = self._continue_position(checkpoint)
                if track_accuracy:
                    self.max_accuracy = self._best_accuracy(checkpoint)
        self.checkpoint = None  # free the memory
        if not self.training:
            return
        if self.output_dir and misc.is_main_process() and os.path.isfile(os.path.join(self.output_dir, 'log.txt')):
            move_log_rows_after(self.output_dir, args.start_epoch - 1)
        if misc.is_main_process() and args.log_dir:
            if purge_step is None and list(Path(args.log_dir).glob('events.out.tfevents.*')):
                purge_step = 0  # a run that starts afresh where an earlier one logged: hide that one's points
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(args.log_dir, exist_ok=True)
            self.log_writer = SummaryWriter(log_dir=args.log_dir, purge_step=purge_step)
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # save and stop at the next optimizer step
            signal.signal(sig, request_stop)

    def _continue_position(self, checkpoint):
        """Restore the random streams (at an epoch boundary) or set up the resume in the middle of an epoch.
        Returns the TensorBoard purge step."""
        args, world = self.args, misc.get_world_size()
        there = ckpt_io.stored_args(checkpoint)
        states = checkpoint.get('rng') or []
        layout_note = ''
        if states and len(states) != world:
            layout_note = f"its random streams are for {len(states)} processes, this run has {world}"
        elif 'resume_iter' in checkpoint and (there.get('batch_size'), there.get('accum_iter')) != (
                args.batch_size, args.accum_iter):
            layout_note = (f"its position is in batches of --batch_size {there.get('batch_size')} --accum_iter "
                           f"{there.get('accum_iter')}, this run has {args.batch_size} and {args.accum_iter}")
        if 'resume_iter' in checkpoint and not layout_note and states:
            iters_per_epoch = len(self.data_loader)
            it = checkpoint['resume_iter']
            self.position = Position(args.start_epoch, it, checkpoint['meters'][misc.get_rank()],
                                     states[misc.get_rank()], list(checkpoint.get('skipped_images') or []))
            self.data_loader.sampler.skip = it * args.batch_size
            print(f"Resuming epoch {args.start_epoch} at iteration {it} of {iters_per_epoch}")
            return int(((it - 1) / iters_per_epoch + args.start_epoch) * 1000) + 1
        eff_there = there.get('batch_size', 0) * there.get('accum_iter', 1) * there.get('world_size', 1)
        eff_here = args.batch_size * args.accum_iter * world
        if eff_there and eff_there != eff_here:
            print(f"Note: the effective batch size (batch_size x accum_iter x processes) is {eff_here}, it was "
                  f"{eff_there}: the lr is {args.lr:.2e}, it was {there.get('lr', 0):.2e}. To keep the recipe, "
                  f"keep the effective batch size (e.g. --accum_iter {max(1, eff_there // (args.batch_size * world))})")
        if layout_note:
            where = (f"restarting epoch {args.start_epoch} from its beginning"
                     if 'resume_iter' in checkpoint else "continuing")
            print(f"Note: {layout_note}; {where} with fresh random streams")
        elif states:
            ckpt_io.set_rng_state(states[misc.get_rank()])
        return args.start_epoch * 1000 if args.start_epoch > 0 else None

    def _best_accuracy(self, checkpoint):
        """The best test accuracy of the epochs before the checkpoint: ours keep it; for the reference's, 0 (it
        restarts the best accuracy on resuming)."""
        if 'max_accuracy' in checkpoint:
            return float(checkpoint['max_accuracy'])
        return 0.0

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
        if getattr(data_loader.dataset, 'skip_bad', False):
            reset_skipped(data_loader.dataset)  # (--skip_bad_images: count this epoch's bad files afresh)
        start = position.iteration if position else 0
        self._iters_per_epoch = len(data_loader) + start
        batches = iter(data_loader)
        if position:
            restore_skipped(data_loader.dataset, position.skipped)
            ckpt_io.set_rng_state(position.rng)
            metric_logger.load_state(position.meters)
        return batches, start, self._iters_per_epoch

    def skip_nonfinite(self, loss_value, epoch, step):
        """A non-finite loss (the mean over ranks, so every rank agrees): skip the step while fewer than
        ``--skip_nonfinite`` were skipped this epoch, else stop naming the last good checkpoint."""
        limit = self.args.skip_nonfinite
        if self._skipped_steps < limit:
            self._skipped_steps += 1
            print(f"Loss is {loss_value} at epoch {epoch} iteration {step}: skipping this step "
                  f"({self._skipped_steps} of at most {limit})")
            return
        raise TrainingStopped(f"Loss is {loss_value} at epoch {epoch} iteration {step}, stopping training; "
                              + self._last_good() + (" (--skip_nonfinite N skips up to N such steps)"
                                                     if limit == 0 else ""))

    def _last_good(self):
        last = ckpt_io.newest(self.output_dir) if self.output_dir else ''
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    def checkpoint_due(self, next_iter):
        """Whether ``--save_every_iters`` asks for a checkpoint after the optimizer step before ``next_iter``."""
        every = self.args.save_every_iters
        return bool(every) and next_iter % every == 0 and next_iter < self._iters_per_epoch

    def after_step(self, epoch, next_iter, metric_logger):
        """After each optimizer step (every rank): every ``--save_every_iters`` steps, and when a stop was
        requested (then ``RunInterrupted`` is raised), write a checkpoint to continue this epoch from."""
        if next_iter == self._iters_per_epoch:  # (the streams as the evaluation that follows finds them)
            self._epoch_trained = (epoch, next_iter, metric_logger, ckpt_io.rng_state())
        periodic = self.checkpoint_due(next_iter)
        signum = stop_requested()
        if not (periodic or signum):
            return
        if self.output_dir:
            self._save_position(epoch, next_iter, metric_logger)
        if signum:
            where = (f"saved {os.path.join(self.output_dir, ckpt_io.LAST)}; the same command continues from it"
                     if self.output_dir else "nothing was saved (no --output_dir)")
            raise RunInterrupted(f"signal {signum} received, stopped at epoch {epoch} iteration {next_iter}: {where}")

    def _save_position(self, epoch, next_iter, metric_logger, rng=None):
        self.save(epoch - 1, keep=False, where=f"epoch {epoch} iteration {next_iter}", rng=rng, resume_iter=next_iter,
                  resume_epoch=epoch, meters=misc.all_gather(metric_logger.state()),
                  skipped_images=skipped_indices(self.data_loader.dataset))

    def keep_trained_epoch(self, epoch):
        """When the evaluation after epoch ``epoch`` fails (a bad validation image): save its training, so that
        the same command, once the file is fixed, continues with that evaluation instead of training it again."""
        if self.output_dir and self._epoch_trained is not None and self._epoch_trained[0] == epoch:
            self._save_position(*self._epoch_trained)
            print(f"Kept the training of epoch {epoch} in {os.path.join(self.output_dir, ckpt_io.LAST)}: the same "
                  f"command continues with its evaluation")

    def end_epoch(self, epoch, log_stats, points=None):
        """After each epoch (every rank): its ``log.txt`` row (with the skip count), then its checkpoint, then the
        TensorBoard ``points`` at step ``epoch`` (after the checkpoint: they lie below a resumed run's purge step).
        """
        log_skipped_count(log_stats, self.data_loader.dataset, epoch)
        if self.output_dir and misc.is_main_process():
            if self.log_writer is not None:
                self.log_writer.flush()
            append_log(self.output_dir, log_stats)
        if self.output_dir:
            keep = epoch % self.args.save_freq == 0 or epoch + 1 == self.args.epochs
            self.save(epoch, keep=keep, where=f"the end of epoch {epoch}")
        self.data_loader.sampler.skip = 0
        if self.log_writer is not None and points:
            for tag, value in points.items():
                self.log_writer.add_scalar(tag, value, epoch)
            self.log_writer.flush()
        took, left = time.time() - self._epoch_start, self.args.epochs - epoch - 1
        print(f"Epoch {epoch} took {datetime.timedelta(seconds=int(took))}; {left} epoch(s) left, the run ends in "
              f"about {datetime.timedelta(seconds=int(took * left))}")

    def save(self, epoch, keep, where, rng=None, **extra):
        """A checkpoint with the reference's keys (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``), every
        rank's random streams (``rng``: this rank's now, or the ones given), the script, the best accuracy and
        ``extra``; ``checkpoint-last.pth`` always, ``checkpoint-<epoch>.pth`` too with ``keep``. Every rank calls it;
        rank 0 writes. Non-finite weights or optimizer state are never written."""
        bad = ckpt_io.nonfinite(self.model.state_dict().items()) + ckpt_io.nonfinite(
            ckpt_io.optimizer_tensors(self.optimizer))
        if bad:
            raise TrainingStopped(f"non-finite values in {ckpt_io.fmt_keys(bad, 3)} at {where} (the loss was still "
                                  f"finite): not saved; {self._last_good()}")
        states = misc.all_gather(rng if rng is not None else ckpt_io.rng_state())
        if not misc.is_main_process():
            return
        to_save = {
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'scaler': self.loss_scaler.state_dict(),
            'args': ckpt_io.args_to_dict(self.args),
            'rng': states,
            'script': self.script,
            **({'max_accuracy': self.max_accuracy} if self.max_accuracy is not None else {}),
            **extra,
        }
        last = Path(self.output_dir) / ckpt_io.LAST
        if keep:
            kept = Path(self.output_dir) / f'checkpoint-{epoch}.pth'
            ckpt_io.atomic_save(to_save, kept)
            ckpt_io.link_or_copy(kept, last)
        else:
            ckpt_io.atomic_save(to_save, last)

    def close(self):
        if self.log_writer is not None:
            self.log_writer.close()


def changed_flags(there, args):
    """``--flag <stored> there, <now> here`` for each training flag that differs from a checkpoint's."""
    here = ckpt_io.args_to_dict(args)
    changed = []
    for key, value in there.items():
        if key in CHANGEABLE_ON_RESUME or key not in here or key == 'lr':
            continue
        if here[key] != value:
            changed.append(f"--{key} {value} there, {here[key]} here")
    # the stored lr is the actual one; it came from --lr when it is not the linear scaling of --blr
    stored_lr, blr = there.get('lr'), there.get('blr')
    eff = there.get('batch_size', 0) * there.get('accum_iter', 1) * there.get('world_size', 1)
    lr_was_given = stored_lr is not None and blr is not None and abs(stored_lr - blr * eff / 256) > 1e-12 * abs(
        stored_lr)
    if args.lr is not None and stored_lr is not None and args.lr != stored_lr:
        changed.append(f"--lr {stored_lr} there, {args.lr} here")
    elif args.lr is None and lr_was_given:
        changed.append(f"--lr {stored_lr} there, none here")
    return changed
