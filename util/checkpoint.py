"""Checkpoint files: the reference's layout (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``) plus what an
exact resume needs (every rank's random streams, the position inside an epoch), written atomically and read safely
(``torch.load(weights_only=True)``). One format serves pre-training, fine-tuning and linear probing."""
import argparse
import errno
import os
import pathlib
import random
import shutil
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------------- random streams
def rng_state():
    """This process's random streams (torch CPU and CUDA, numpy, python) as tensors and plain values."""
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


def load_optimizer_state(optimizer, state, what):
    """``optimizer.load_state_dict(state)``; a saved optimizer that holds the first tensors of each of this
    optimizer's groups only (a reference linear probe with ``--global_pool`` kept ``fc_norm`` frozen, so its LARS
    has the head's 2 tensors where this run trains 4) is loaded for those, the others start fresh, and a note says
    so. Anything else that does not fit is a ``UsageError``."""
    saved, own = state['param_groups'], optimizer.state_dict()['param_groups']
    if len(saved) == len(own) and any(len(s['params']) < len(o['params']) for s, o in zip(saved, own)):
        groups, remap, fresh = [], {}, 0
        for s, o in zip(saved, own):
            if len(s['params']) > len(o['params']):
                break
            remap.update(zip(s['params'], o['params']))
            groups.append({**s, 'params': list(o['params'])})
            fresh += len(o['params']) - len(s['params'])
        else:
            state = {'state': {remap[k]: v for k, v in state['state'].items() if k in remap}, 'param_groups': groups}
            print(f"Note: {what}'s optimizer holds {sum(len(s['params']) for s in saved)} of this run's "
                  f"{sum(len(o['params']) for o in own)} trained tensors (a reference linear probe with --global_pool "
                  f"froze fc_norm); their state is restored, the {fresh} others start fresh")
    # how the update is computed (--fused_adamw) is this run's choice, not the checkpoint's: load_state_dict would
    # take the saved groups' settings
    implementation = [{k: g[k] for k in ('fused', 'foreach') if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{what}: its optimizer state does not fit this run ({e})") from None
    for group, own in zip(optimizer.param_groups, implementation):
        group.update(own)
        if own.get('fused'):  # the fused kernel keeps the step count beside the weights, as a float
            for p in group['params']:
                step = optimizer.state.get(p, {}).get('step')
                if torch.is_tensor(step):
                    optimizer.state[p]['step'] = step.to(p.device, torch.float32)


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
    except OSError as e:
        full = ' (the disk is full)' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''
        raise TrainingStopped(f"cannot write {path}{full}: {e.strerror or e}; free space in {path.parent} and run "
                              f"the same command again: the previous checkpoint there is intact") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


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


def _unpickling_reason(e):
    # torch's message suggests weights_only=False, which runs arbitrary code from the file: keep only its reason
    for line in str(e).splitlines():
        if 'WeightsUnpickler error:' in line:
            return line.split('WeightsUnpickler error:', 1)[1].strip() or 'not a PyTorch checkpoint'
    return (str(e).splitlines() or [type(e).__name__])[0]


def _safe_load(path, **kwargs):
    return compat.load_weights_only(path, allowed=_REFERENCE_GLOBALS, **kwargs)


def load(path, what='--resume'):
    """Load a checkpoint file (ours, the reference's, or a released one) onto the CPU, safely: only tensors,
    plain values and the reference's Namespace of flags (with path values) are unpickled."""
    if str(path).startswith('https'):
        return torch.hub.load_state_dict_from_url(str(path), map_location='cpu', check_hash=True)
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; give a checkpoint file (e.g. {os.path.join(path, LAST)})")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: no such file")
    try:
        checkpoint = _safe_load(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault here
        raise UsageError(f"{what} {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{_unpickling_reason(e)})") from None
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise UsageError(f"{what} {path}: not an MAE checkpoint (no 'model' entry)")
    return checkpoint


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
    """The newest complete checkpoint in ``output_dir`` (by how far it is), or '' if there is none."""
    if not output_dir or not os.path.isdir(output_dir):
        return ''
    best, best_at = '', None
    for name in sorted(os.listdir(output_dir)):
        if not (name.startswith('checkpoint-') and name.endswith('.pth')):
            continue
        path = os.path.join(output_dir, name)
        try:
            at = position(_safe_load(path, mmap=True))
        except Exception as e:  # noqa: BLE001 - a damaged file is passed over, the next newest is used
            print(f"Note: skipping unreadable checkpoint {path} ({type(e).__name__})")
            continue
        if best_at is None or at > best_at or (at == best_at and name == LAST):
            best, best_at = path, at
    return best
