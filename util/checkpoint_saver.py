"""Writing a run's checkpoints, one object for it (as timm's ``CheckpointSaver``): the reference's keys plus what an
exact resume needs, never a checkpoint with non-finite weights or optimizer state (so the newest one is always
good), ``checkpoint-last.pth`` replaced atomically, kept epochs as ``checkpoint-<epoch>.pth`` with ``last`` a hard
link to the newest of them, and which training images the data order was drawn over (``data_identity``)."""
import hashlib
import os
import weakref
from pathlib import Path

import util.checkpoint as ckpt_io
import util.misc as misc
import util.rng as rng_streams
from util.errors import TrainingStopped


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


class CheckpointSaver:
    """Saves ``model``, ``optimizer`` and ``loss_scaler`` with the run's flags (``args``) into ``output_dir``
    (``''``: nothing is saved); ``script`` names the entry point that wrote them (a resume checks it). ``model_ema``
    ([new] --model_ema, timm's ``ModelEmaV3``): the average's weights too, as ``model_ema`` (the keys of ``model``).
    ``data``: the training set, whose ``data_identity`` is saved (a resume compares it).
    """

    def __init__(self, model, optimizer, loss_scaler, args, output_dir, script, model_ema=None, data=None):
        self.model, self.optimizer, self.loss_scaler, self.args = model, optimizer, loss_scaler, args
        self.output_dir, self.script, self.model_ema = output_dir, script, model_ema
        self.data = data_identity(data) if data is not None and output_dir else {}

    def save(self, epoch, keep, at, rng=None, **extra):
        """A checkpoint after epoch ``epoch`` (``at`` says where, for the messages) with the reference's keys
        (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``), the EMA's weights (with ``model_ema``), every
        rank's random streams (``rng``: this rank's now, or the ones given), the script and ``extra``;
        ``checkpoint-last.pth`` always, ``checkpoint-<epoch>.pth`` too with ``keep``. Every rank calls it (the random
        streams are gathered); rank 0 writes."""
        bad = ckpt_io.nonfinite(self.model.state_dict().items()) + ckpt_io.nonfinite(
            ckpt_io.optimizer_tensors(self.optimizer))
        if bad:
            raise TrainingStopped(f"non-finite values in {ckpt_io.fmt_keys(bad, 3)} at {at} (the loss was still "
                                  f"finite): not saved; {self.last_good()}")
        states = misc.all_gather(rng if rng is not None else rng_streams.rng_state())
        if not misc.is_main_process():
            return
        to_save = {
            'model': self.model.state_dict(),
            **({'model_ema': self.model_ema.module.state_dict()} if self.model_ema is not None else {}),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'scaler': self.loss_scaler.state_dict(),
            'args': ckpt_io.args_to_dict(self.args),
            'rng': states,
            'script': self.script,
            **self.data,
            **extra,
        }
        last = Path(self.output_dir) / ckpt_io.LAST
        if keep:
            kept = Path(self.output_dir) / f'checkpoint-{epoch}.pth'
            ckpt_io.atomic_save(to_save, kept)
            ckpt_io.link_or_copy(kept, last)
        else:
            ckpt_io.atomic_save(to_save, last)

    def last_good(self):
        """Which checkpoint a run stopped now would continue from, in words."""
        last = ckpt_io.newest(self.output_dir) if self.output_dir else ''
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"

    @property
    def last_path(self):
        return os.path.join(self.output_dir, ckpt_io.LAST)
