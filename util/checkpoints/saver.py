"""Writing a run's checkpoints (``CheckpointSaver``, one object for it as timm's): after each epoch, and inside an
epoch on request or on a stop signal; never one with non-finite weights; with every rank's random streams
(``rng_state``; ``set_rng_state`` puts them back) and which training images the data order was drawn over
(``data_identity``). The files themselves (atomic writes, safe reads, checks) are
``util/checkpoints/checkpoint.py``'s."""
import hashlib
import os
import random
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

import util.misc as misc
from util.checkpoints.checkpoint import LAST, args_to_dict, atomic_save, fmt_keys, link_or_copy, newest, nonfinite, \
    optimizer_tensors
from util.errors import RunInterrupted, TrainingStopped
from util.data.image_folder import skipped_indices


class TrainedEpoch(NamedTuple):
    """An epoch's training just finished, before its evaluation: what a checkpoint inside it needs."""
    epoch: int
    next_iter: int
    metric_logger: object
    rng: dict


_identities = weakref.WeakKeyDictionary()  # a data set's identity, computed once per run


def data_identity(dataset):
    """``{'data_size', 'data_fingerprint'}`` of a training set (anything with ``samples``, (path, label) pairs in
    the order the sampler's indices refer to; {} otherwise): its length and a hash of its file list, relative to
    the folder all the files lie in (so that moving the data keeps it), with the labels. A position inside an epoch
    is an index into this list: with other files, the rest of the epoch would be drawn from another permutation.
    No file is read (about a second for ImageNet's 1.28 million paths)."""
    samples = getattr(dataset, 'samples', None)
    if samples is None:
        return {}
    if dataset not in _identities:
        paths = [str(path) for path, _ in samples]
        top = os.path.commonprefix([min(paths), max(paths)]) if paths else ''
        cut = max(top.rfind('/'), top.rfind(os.sep)) + 1
        digest = hashlib.sha256('\n'.join(f"{p[cut:]}\t{label}" for p, (_, label) in zip(paths, samples)).encode(
            'utf-8', 'surrogateescape')).hexdigest()
        _identities[dataset] = {'data_size': len(samples), 'data_fingerprint': digest[:16]}
    return _identities[dataset]


@dataclass
class CheckpointSaver:
    """A run's checkpoints in ``args.output_dir`` (``''``: nothing is saved), one object for them as timm's
    ``CheckpointSaver``: ``save`` after each epoch, ``after_step`` after each optimizer step. Each holds the
    reference's keys (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``) plus what an exact resume needs
    (every rank's random streams, the position inside an epoch, the bad files skipped so far from
    ``data_loader``), ``script`` (the entry point; a resume checks it) and, with ``model_ema`` ([new] --model_ema,
    timm's ``ModelEmaV3``), the average's weights. Never one with non-finite weights or optimizer state (so the
    newest one is always good); ``checkpoint-last.pth`` replaced atomically, kept epochs as
    ``checkpoint-<epoch>.pth`` with ``last`` a hard link to the newest of them. ``max_accuracy``: the best test
    accuracy so far (fine-tuning, linear probing), kept in every checkpoint. ``log_writer``: the run's TensorBoard
    writer, flushed before a checkpoint inside an epoch (a run killed right after it must find every point before
    it on disk: the resumed run writes only those after it)."""

    args: Any  # the run's flags (``--output_dir``, ``--save_freq``, ``--save_every_iters``, ...), saved with it
    script: str  # the entry point's path
    model: Any
    optimizer: Any
    loss_scaler: Any
    data_loader: Any = None
    model_ema: Any = None
    max_accuracy: Optional[float] = None
    log_writer: Any = None
    iters_per_epoch: int = field(default=0, init=False)  # (of the epoch being trained)
    trained: Optional[TrainedEpoch] = field(default=None, init=False)

    @property
    def output_dir(self):
        return self.args.output_dir

    def save(self, epoch, max_accuracy=None):
        """After epoch ``epoch`` (every rank): ``checkpoint-last.pth``, kept as ``checkpoint-<epoch>.pth`` every
        ``--save_freq`` epochs and after the last (the reference's rule)."""
        if max_accuracy is not None:
            self.max_accuracy = max_accuracy
        if self.output_dir:
            keep = epoch % self.args.save_freq == 0 or epoch + 1 == self.args.epochs
            self.write(epoch, keep, at=f"the end of epoch {epoch}")

    def after_step(self, epoch, next_iter, iters_per_epoch, metric_logger):
        """After each optimizer step (every rank): ``save_or_stop``. With ``--no_host_sync`` [new] only where the
        losses were just read, a checkpoint is due, or the epoch ends (asking the other ranks for a stop request is
        a host sync), with the losses read first."""
        self.iters_per_epoch = iters_per_epoch
        if metric_logger.read_later:
            if not (metric_logger.fresh or self.checkpoint_due(next_iter)
                    or next_iter + self.args.accum_iter > iters_per_epoch):  # the epoch's last step
                return
            metric_logger.read()
            metric_logger.fresh = False
        self.save_or_stop(epoch, next_iter, metric_logger)

    def checkpoint_due(self, next_iter):
        """Whether ``--save_every_iters`` asks for a checkpoint after the optimizer step before ``next_iter``."""
        every = self.args.save_every_iters
        return bool(every) and next_iter % every == 0 and next_iter < self.iters_per_epoch

    def save_or_stop(self, epoch, next_iter, metric_logger):
        """Every ``--save_every_iters`` steps, and when a stop was requested (then ``RunInterrupted`` is raised),
        write a checkpoint to continue this epoch from."""
        if next_iter == self.iters_per_epoch:  # (the streams as the evaluation that follows finds them)
            self.trained = TrainedEpoch(epoch, next_iter, metric_logger, rng_state())
        periodic = self.checkpoint_due(next_iter)
        signum = misc.stop_requested()
        if not (periodic or signum):
            return
        if self.output_dir:
            self.write_position(epoch, next_iter, metric_logger)
        if signum:
            where = (f"saved {self.last_path}; the same command continues from it"
                     if self.output_dir else "nothing was saved (no --output_dir)")
            raise RunInterrupted(f"signal {signum} received, stopped at epoch {epoch} iteration {next_iter}: {where}")

    def write_position(self, epoch, next_iter, metric_logger, rng=None):
        if self.log_writer is not None:  # (with --no_host_sync, points read just now may still wait in its queue)
            self.log_writer.flush()
        self.write(epoch - 1, keep=False, at=f"epoch {epoch} iteration {next_iter}", rng=rng,
                   resume_iter=next_iter, resume_epoch=epoch, meters=misc.all_gather(metric_logger.state()),
                   skipped_images=skipped_indices(self.data_loader.dataset))

    def keep_trained_epoch(self, epoch):
        """When the evaluation after epoch ``epoch`` fails (a bad validation image): save its training, so that
        the same command, once the file is fixed, continues with that evaluation instead of training it again."""
        if self.output_dir and self.trained is not None and self.trained.epoch == epoch:
            self.write_position(*self.trained)
            print(f"Kept the training of epoch {epoch} in {self.last_path}: the same command continues with its "
                  f"evaluation")

    def write(self, epoch, keep, at, rng=None, **extra):
        """A checkpoint after epoch ``epoch`` (``at`` says where, for the messages) with every rank's random
        streams (``rng``: this rank's now, or the ones given) and ``extra``; ``checkpoint-last.pth`` always,
        ``checkpoint-<epoch>.pth`` too with ``keep``. Every rank calls it (the random streams are gathered); rank 0
        writes."""
        bad = nonfinite(self.model.state_dict().items()) + nonfinite(optimizer_tensors(self.optimizer))
        if bad:
            raise TrainingStopped(f"non-finite values in {fmt_keys(bad, 3)} at {at} (the loss was still finite): "
                                  f"not saved; {self.last_good()}")
        states = misc.all_gather(rng if rng is not None else rng_state())
        if not misc.is_main_process():
            return
        to_save = {
            'model': self.model.state_dict(),
            **({'model_ema': self.model_ema.module.state_dict()} if self.model_ema is not None else {}),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'scaler': self.loss_scaler.state_dict(),
            'args': args_to_dict(self.args),
            'rng': states,
            'script': os.path.basename(self.script),
            # which training images the data order was drawn over (a resume compares it)
            **(data_identity(self.data_loader.dataset) if self.data_loader is not None else {}),
            **({'max_accuracy': self.max_accuracy} if self.max_accuracy is not None else {}),
            **extra,
        }
        last = Path(self.output_dir) / LAST
        if keep:
            kept = Path(self.output_dir) / f'checkpoint-{epoch}.pth'
            atomic_save(to_save, kept)
            link_or_copy(kept, last)
        else:
            atomic_save(to_save, last)

    def last_good(self):
        """Which checkpoint a run stopped now would continue from, in words."""
        last = newest(self.output_dir) if self.output_dir else ''
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    @property
    def last_path(self):
        return os.path.join(self.output_dir, LAST)


# ---------------------------------------------------------------------------------------------------- random streams
def rng_state():
    """This process's random streams (torch CPU and CUDA, numpy, python) as tensors and plain values, so that a
    checkpoint keeps them (``torch.load(weights_only=True)`` reads them back) and a resumed run draws on."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        'numpy': {'name': np_state[0], 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_version, 'state': torch.tensor(py_state, dtype=torch.int64), 'gauss': py_gauss},
    }


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state'].tolist()), p['gauss']))
