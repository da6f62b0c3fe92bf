"""Checkpoint files: the reference's layout (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``) plus what an
exact resume needs (every rank's random streams, the position inside an epoch), written atomically and read safely
(``torch.load(weights_only=True)``). One format serves pre-training, fine-tuning and linear probing.
A run's checkpoints are written by ``util/checkpoints/saver.py``'s ``CheckpointSaver``."""
import argparse
import errno
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import zipfile
from pathlib import Path

import torch

from util import compat
from util.errors import TrainingStopped, UsageError

LAST = 'checkpoint-last.pth'

_PLAIN = (bool, int, float, str, type(None))
# what the reference's checkpoints pickle besides tensors: its flags as an argparse.Namespace, whose values are
# pathlib paths when its submitit scripts made them
_REFERENCE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                      pathlib.PureWindowsPath]


def args_to_dict(args):
    """The run's flags as plain values (``torch.load(weights_only=True)`` refuses a pickled Namespace)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, _PLAIN):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, _PLAIN) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def stored_args(checkpoint):
    """A checkpoint's flags as a dict, also for the reference's (a Namespace, maybe holding paths)."""
    args = checkpoint.get('args') if checkpoint else None
    if isinstance(args, argparse.Namespace):
        return args_to_dict(args)
    return dict(args) if isinstance(args, dict) else {}


# ---------------------------------------------------------------------------------------------------- checks
def nonfinite(named_tensors):
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in named_tensors
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def optimizer_tensors(optimizer):
    for i, state in enumerate(optimizer.state.values()):
        for key, t in state.items():
            yield f'optimizer state {i}.{key}', t


def fmt_keys(keys, most=6):
    keys = sorted(keys)
    return ', '.join(keys[:most]) + (f' (+{len(keys) - most} more)' if len(keys) > most else '')


def state_dict_mismatch(model, state_dict):
    """How ``state_dict`` differs from ``model``'s (missing, unexpected, other shapes); '' if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = ([f"missing keys: {fmt_keys(missing)}"] if missing else []) + \
            ([f"unexpected keys: {fmt_keys(unexpected)}"] if unexpected else []) + \
            ([f"other shapes (checkpoint vs model): {fmt_keys(shapes, 4)}"] if shapes else [])
    return '; '.join(parts)


# ---------------------------------------------------------------------------------------------------- files
def atomic_save(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``: a kill at any
    instant leaves either the old file or the new one, never a partial one. A full disk (or any write error) stops
    the run with one line saying so; the previous file is untouched."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        error = _write_error(e, path.parent)
        if error is None:
            raise
        full = ' (the disk is full)' if error.errno in (errno.ENOSPC, errno.EDQUOT) else ''
        raise TrainingStopped(f"cannot write {path}{full}: {error.strerror or error}; free space in {path.parent} "
                              f"and run the same command again: the previous checkpoint there is intact") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _write_error(e, folder):
    """The ``OSError`` behind a failed write: ``e`` itself, or the one torch's zip writer met in the file's
    ``write`` and turned into a ``RuntimeError`` ('[enforce fail at inline_container.cc:...] unexpected pos ...'),
    which keeps it as its context; where that context is lost, the writer's message and the free space of
    ``folder`` stand for it. None for any other error."""
    cause = e
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__context__
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _WRITER_FAILURES):
        if shutil.disk_usage(folder).free < 2 ** 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return OSError(errno.EIO, str(e).splitlines()[0])
    return None


_WRITER_FAILURES = ('unexpected pos', 'PytorchStreamWriter failed')


def link_or_copy(src, dst):
    """Make ``dst`` a second name of the finished file ``src`` (a hard link; a copy where links are refused)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# torch's refusal of a file that pickles other objects than tensors and plain values goes on to suggest
# ``weights_only=False``, which runs whatever code the file holds: only its reason is kept
_ADVICE = ('weights_only', 'trusted source', 'safe_globals', 'allowlist', 'Check the documentation')


def _unpickling_reason(e):
    text = str(e)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    text = text.replace('Weights only load failed', '')
    for sentence in re.split(r'(?<=[.!?])\s+|\n+', text):
        sentence = sentence.strip(' :.')
        if sentence and not any(word in sentence for word in _ADVICE):
            return sentence
    return 'the file ends early' if isinstance(e, EOFError) else 'not a PyTorch checkpoint'


def _safe_load(path, **kwargs):
    return compat.load_weights_only(path, allowed=_REFERENCE_GLOBALS, **kwargs)


def is_url(path):
    """Whether a checkpoint argument is a URL: only ``http://`` and ``https://`` (``https_ckpts/ck.pth`` is a path)."""
    return str(path).lower().startswith(('http://', 'https://'))


def cached_path(url, what='--resume'):
    """The local copy of ``url`` in torch's hub cache (``torch.hub.get_dir()``/checkpoints, where
    ``torch.hub.load_state_dict_from_url`` keeps it), downloaded there first when absent. The download goes to a
    folder of its own beside it and is renamed into place when whole: a failed one leaves nothing behind. A file
    name with a hash (``name-<sha256 prefix>.pth``, torch's convention) is checked against it."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not urllib.parse.urlparse(url).netloc or not name:
        raise UsageError(f"{what} {url}: not a URL of a file (https://host/.../name.pth)")
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    cached = os.path.join(folder, name)
    if os.path.isfile(cached):
        return cached
    try:
        os.makedirs(folder, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=f'.{name}.', suffix='.partial', dir=folder)
    except OSError as e:
        raise UsageError(f"{what} {url}: cannot download it into {folder} ({e.strerror or e})") from None
    try:
        found = torch.hub.HASH_REGEX.search(name)
        torch.hub.download_url_to_file(url, os.path.join(partial, name), found.group(1) if found else None)
        os.replace(os.path.join(partial, name), cached)
    except Exception as e:  # noqa: BLE001 - no connection, HTTP 404, a wrong hash, a full disk: the URL's fault here
        # (a URLError says its reason best, an HTTPError its own text: 'HTTP Error 404: Not Found')
        reason = None if isinstance(e, urllib.error.HTTPError) else getattr(e, 'reason', None)
        reason = reason or (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{what} {url}: cannot be downloaded ({type(e).__name__}: {reason})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cached


def load(path, what='--resume'):
    """Load a checkpoint file (ours, the reference's, or a released one) onto the CPU, safely: only tensors,
    plain values and the reference's Namespace of flags (with path values) are unpickled; a file that changed
    since it was written (``damage``) is refused. ``what``: how the messages name the file's origin (its flag).
    A URL (``is_url``) is downloaded into torch's hub cache (``cached_path``) and that file read the same way."""
    label = f"{what} {path}"
    if is_url(path):
        path = cached_path(str(path), what)
        label += f" (cached as {path})"
    elif os.path.isdir(path):
        raise UsageError(f"{label} is a folder; give a checkpoint file (e.g. {os.path.join(path, LAST)})")
    if not os.path.isfile(path):
        raise UsageError(f"{label}: no such file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{label}: the file is empty (a copy or download that did not finish?)")
    checkpoint, failure = None, None
    try:
        checkpoint = _safe_load(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault here
        failure = e
    problem = damage(path)
    if problem:
        raise UsageError(f"{label}: damaged since it was written ({problem})")
    if failure is not None:
        raise UsageError(f"{label}: cannot be read as a PyTorch checkpoint ({_read_failure(path, failure)})")
    if not is_mae_checkpoint(checkpoint):
        raise UsageError(f"{label}: not an MAE checkpoint (no 'model' entry)")
    return checkpoint


def _read_failure(path, e):
    """Why torch.load failed on ``path``, in words, without torch's advice."""
    with open(path, 'rb') as f:
        start = f.read(2)
    if start == b'PK' and not zipfile.is_zipfile(path):
        return "a zip archive cut short: a copy or download that did not finish?"
    if start != b'PK' and start[:1] != b'\x80':  # (a pickle's protocol opcode starts torch's legacy format)
        return "neither torch.save's zip archive nor its legacy pickle format"
    reason = f"{type(e).__name__}: {_unpickling_reason(e)}"
    return reason + ("; refused, nothing in it was run" if isinstance(e, pickle.UnpicklingError) else '')


def is_mae_checkpoint(checkpoint):
    return isinstance(checkpoint, dict) and 'model' in checkpoint


def damage(path):
    """Why the file at ``path`` no longer holds what was written, or None if it does (or cannot say). torch.save
    writes a zip archive with a CRC-32 of each record (the pickle of the plain values, the bytes of each tensor),
    which torch.load never checks: here every record is read and checked against its CRC-32 (about 0.5 s per GB,
    benchmarks/checkpoint_integrity.py). This covers every checkpoint torch >= 1.6 wrote, the reference's and the
    released ones included, with nothing added to the file. Files in torch's legacy format, or written without
    CRC-32s (``torch.serialization.set_crc32_options(False)``), have nothing to be checked against."""
    if not zipfile.is_zipfile(path):
        return None  # the legacy format; or a truncated archive, which torch.load itself refuses
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # written without CRC-32s
                    continue
                name = info.filename.split('/', 1)[-1]  # (after the archive's own folder)
                try:
                    with archive.open(info) as record:  # BadZipFile at its end if its bytes do not match
                        while record.read(1 << 24):
                            pass
                except zipfile.BadZipFile as e:
                    return (f"{name} does not match the CRC-32 written with it" if 'CRC' in str(e)
                            else f"{name}: {e}")
    except Exception as e:  # noqa: BLE001 - a broken archive, a read error: damage too
        return str(e) or type(e).__name__
    return None


def position(checkpoint):
    """How far a checkpoint is: ``(completed epoch, optimizer-step iteration inside the next epoch or 0)``."""
    return checkpoint.get('epoch', -1), checkpoint.get('resume_iter', 0)


def describe_position(checkpoint):
    """Where a checkpoint is, in words: 'the end of epoch 3', or 'epoch 4 iteration 120' for one written inside an
    epoch (whose 'epoch' entry is the last completed one)."""
    if 'resume_iter' in checkpoint:
        return f"epoch {checkpoint.get('resume_epoch', checkpoint.get('epoch', -1) + 1)} iteration " \
               f"{checkpoint['resume_iter']}"
    return f"the end of epoch {checkpoint.get('epoch')}"


def newest(output_dir):
    """The newest good checkpoint in ``output_dir`` (by how far it is; ``checkpoint-last.pth`` on a tie), or '' if
    there is none. Files that cannot be read, that are not MAE checkpoints (e.g. a bare ``state_dict``) or that
    changed since they were written (``damage``) are passed over, each with a note; only the chosen one, and any
    damaged one newer than it, is read whole."""
    if not output_dir or not os.path.isdir(output_dir):
        return ''
    found = []
    for name in sorted(os.listdir(output_dir)):
        if not (name.startswith('checkpoint-') and name.endswith('.pth')):
            continue
        path = os.path.join(output_dir, name)
        try:
            checkpoint = _safe_load(path, mmap=True)
            at = position(checkpoint) if is_mae_checkpoint(checkpoint) else None
            if at is not None:
                at = (int(at[0]), int(at[1]))
        except Exception as e:  # noqa: BLE001 - a damaged file is passed over, the next newest is used
            print(f"Note: skipping unreadable checkpoint {path} ({type(e).__name__})")
            continue
        if at is None:
            print(f"Note: skipping {path}: not an MAE checkpoint (no 'model' entry)")
            continue
        found.append((at, name == LAST, path))
    for _, _, path in sorted(found, key=lambda f: f[:2], reverse=True):  # (stable: the first name on a tie)
        problem = damage(path)
        if problem is None:
            return path
        print(f"Note: skipping damaged checkpoint {path} ({problem})")
    return ''
