"""Shared plumbing of the entry points: distributed set-up, metric logging, the AMP loss scaler, checkpoints and the
log file. One checkpoint format serves pre-training, fine-tuning and linear probing.
"""
import argparse
import builtins
import datetime
import json
import math
import os
import random
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """A mistake the user can fix (a flag, a path, a file): reported as one line, exit code 2, nothing written."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss): reported as one line, exit code 1."""


def _one_line(e):
    # an exception raised in a DataLoader worker comes back with the worker's traceback in its message;
    # its last line is the message itself
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run_main(main, args):
    """Run an entry point's ``main(args)``; a ``UsageError`` becomes one line on stderr and exit code 2, a
    ``TrainingStopped`` one line and exit code 1."""
    try:
        main(args)
    except (UsageError, TrainingStopped, RunInterrupted) as e:
        sys.stderr.write(f"{'stopped' if isinstance(e, RunInterrupted) else 'error'}: {_one_line(e)}\n")
        sys.stderr.flush()
        sys.exit(2 if isinstance(e, UsageError) else 1)
    finally:
        shutdown_distributed()


def shutdown_distributed():
    """Leave the process group before exiting: a process that exits with gloo's threads still running can abort
    ('terminate called without an active exception')."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- metrics
class SmoothedValue:
    """Track a series of values; give the median/average over a window and the global average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over all processes (the window is not synchronised)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=dist_device())
        dist.barrier()
        dist.all_reduce(t)
        t = t.tolist()
        self.count = int(t[0])
        self.total = t[1]

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / self.count

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            assert isinstance(v, (float, int)), f"meter {k} got {type(v)}"
            self.meters[k].update(v)

    def __getattr__(self, attr):
        meters = self.__dict__.get('meters', {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header='', total=None, start=0):
        """Yield from ``iterable``, printing progress, ETA, the meters and the time per iteration every
        ``print_freq`` iterations. ``total`` is the epoch's length and ``start`` the iteration the iterable
        begins at (both differ from the defaults only when an epoch is resumed in the middle)."""
        total = len(iterable) if total is None else total
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        space_fmt = ':' + str(len(str(total))) + 'd'
        parts = [header, '[{0' + space_fmt + '}/{1}]', 'eta: {eta}', '{meters}', 'time: {time}', 'data: {data}']
        if torch.cuda.is_available():
            parts.append('max mem: {memory:.0f}')
        log_msg = self.delimiter.join(parts)
        i = start
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i)
                memory = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0
                print(log_msg.format(i, total, eta=str(datetime.timedelta(seconds=int(eta_seconds))),
                                     meters=str(self), time=str(iter_time), data=str(data_time), memory=memory))
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        print('{} Total time: {} ({:.4f} s / it)'.format(
            header, str(datetime.timedelta(seconds=int(total_time))), total_time / max(i - start, 1)))

    def state(self):
        """The meters' running sums, to continue an epoch's averages after a mid-epoch resume."""
        return {name: {'total': m.total, 'count': m.count, 'deque': list(m.deque)} for name, m in self.meters.items()}

    def load_state(self, state):
        for name, st in state.items():
            meter = self.meters[name]
            meter.total, meter.count = st['total'], st['count']
            meter.deque.extend(st['deque'])


# ---------------------------------------------------------------------------------------------------- distributed
def setup_for_distributed(is_master):
    """Silence ``print`` on every process but the first (``print(..., force=True)`` still prints), and prefix a
    time stamp, as the reference does."""
    builtin_print = getattr(builtins.print, '_mae_builtin', builtins.print)

    def print(*args, **kwargs):
        force = kwargs.pop('force', False) or get_world_size() > 8
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print('[{}] '.format(now), end='')
            builtin_print(*args, **kwargs)

    print._mae_builtin = builtin_print
    builtins.print = print


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def dist_device():
    """The device collective tensors must live on: the GPU for NCCL, the CPU for gloo."""
    if is_dist_avail_and_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def check_device(args):
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was asked for but no CUDA GPU is available; use --device cpu")


def init_distributed_mode(args):
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM (SLURM_PROCID, with
    ``args.world_size``/``args.dist_url`` set by submitit) or OpenMPI (``--dist_on_itp``); otherwise run as one
    process. NCCL on GPUs, gloo on ``--device cpu``."""
    check_device(args)
    use_cuda = str(args.device).startswith('cuda')
    if getattr(args, 'dist_on_itp', False):
        args.rank = int(os.environ['OMPI_COMM_WORLD_RANK'])
        args.world_size = int(os.environ['OMPI_COMM_WORLD_SIZE'])
        args.gpu = int(os.environ['OMPI_COMM_WORLD_LOCAL_RANK'])
        args.dist_url = "tcp://%s:%s" % (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])
        os.environ['LOCAL_RANK'] = str(args.gpu)
        os.environ['RANK'] = str(args.rank)
        os.environ['WORLD_SIZE'] = str(args.world_size)
    elif 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in os.environ:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.gpu = args.rank % torch.cuda.device_count() if use_cuda else 0
    else:
        print('Not using distributed mode')
        setup_for_distributed(is_master=True)
        args.distributed = False
        args.rank, args.gpu = 0, 0
        return

    args.distributed = True
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.dist_backend = 'nccl'
    else:
        args.dist_backend = 'gloo'
    print('| distributed init (rank {}): {}, gpu {}'.format(args.rank, args.dist_url, args.gpu), flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def all_reduce_mean(x):
    world_size = get_world_size()
    if world_size == 1:
        return x
    t = torch.tensor(x, device=dist_device())
    dist.all_reduce(t)
    return (t / world_size).item()


# ---------------------------------------------------------------------------------------------------- AMP
def amp_settings(args):
    """``(device_type, dtype, enabled)`` of the forward pass's autocast: fp16 on CUDA as the reference
    (``--amp fp16``, the default), bf16 with ``--amp bf16``, off with ``--amp none`` and on the CPU (fp32 there, as
    the reference)."""
    amp = getattr(args, 'amp', 'fp16')
    use_cuda = str(args.device).startswith('cuda')
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return ('cuda' if use_cuda else 'cpu'), dtype, use_cuda and amp != 'none'


def autocast(args):
    """The forward pass's autocast context (see ``amp_settings``)."""
    device_type, dtype, enabled = amp_settings(args)
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def _grad_scaler(enabled):
    if hasattr(torch.amp, 'GradScaler'):  # torch >= 2.3
        return torch.amp.GradScaler('cuda', enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


class NativeScalerWithGradNormCount:
    """Backward with loss scaling, optional gradient clipping, optimizer step; returns the gradient norm on the
    steps that update (``None`` on accumulation micro-steps). Scaling is on only for fp16 on CUDA."""
    state_dict_key = "amp_scaler"

    def __init__(self, enabled=None):
        if enabled is None:
            enabled = torch.cuda.is_available()
        self._scaler = _grad_scaler(enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        if clip_grad is not None:
            assert parameters is not None
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = get_grad_norm_(parameters)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        # a checkpoint written on the CPU has an empty scaler state; a fresh scaler is then the right one
        if state_dict and self._scaler.is_enabled():
            self._scaler.load_state_dict(state_dict)


def loss_scaler_for(args):
    return NativeScalerWithGradNormCount(
        enabled=str(args.device).startswith('cuda') and getattr(args, 'amp', 'fp16') == 'fp16')


def get_grad_norm_(parameters, norm_type: float = 2.0) -> torch.Tensor:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if len(parameters) == 0:
        return torch.tensor(0.)
    device = parameters[0].grad.device
    if norm_type == math.inf:
        return max(p.grad.detach().abs().max().to(device) for p in parameters)
    return torch.norm(torch.stack([torch.norm(p.grad.detach(), norm_type).to(device) for p in parameters]),
                      norm_type)


# ---------------------------------------------------------------------------------------------------- RNG state
def rng_state():
    """This process's random streams (torch CPU and CUDA, numpy, python) as tensors and plain values, so that a
    checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
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


def all_rng_states():
    """Every rank's RNG state, gathered (list indexed by rank); call on all ranks."""
    state = rng_state()
    if get_world_size() == 1:
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------------------------------------- fault injection
# For the crash tests: MAE_FAULT='step:<epoch>:<iteration>' kills this process right after that optimizer step;
# MAE_FAULT='save:<n>' kills it during its n-th checkpoint write (the temporary file written, not yet renamed).
# The signal is SIGKILL, or the one named by MAE_FAULT_SIGNAL (e.g. TERM).
_FAULT = os.environ.get('MAE_FAULT', '')
_saves_started = [0]


def fault_point(*where):
    if _FAULT and _FAULT == ':'.join(str(w) for w in where):
        import signal
        os.kill(os.getpid(), getattr(signal, 'SIG' + os.environ.get('MAE_FAULT_SIGNAL', 'KILL')))


# ---------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_LAST = 'checkpoint-last.pth'

_SAFE_TYPES = (bool, int, float, str, type(None))


def args_to_dict(args):
    """The run's flags as plain values (``torch.load(weights_only=True)`` refuses a pickled Namespace)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, _SAFE_TYPES):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, _SAFE_TYPES) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def _atomic_torch_save(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``: a kill at any
    instant leaves either the old file or the new one, never a partial one."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _saves_started[0] += 1
        fault_point('save', _saves_started[0])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


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


def _atomic_link_or_copy(src, dst):
    """Make ``dst`` a second name of the finished file ``src`` (a hard link; a copy where links are refused)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def save_model(args, epoch, model, model_without_ddp, optimizer, loss_scaler, keep=True, extra=None):
    """Save a checkpoint with the reference's keys (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``),
    plus every rank's RNG streams (``rng``) and anything in ``extra``.

    ``checkpoint-last.pth`` is always (re)written; ``keep`` also writes ``checkpoint-<epoch>.pth``. Must be called on
    every rank (the RNG states are gathered); only rank 0 writes.
    """
    states = all_rng_states()
    if not is_main_process():
        return
    output_dir = Path(args.output_dir)
    to_save = {
        'model': model_without_ddp.state_dict(),
        'optimizer': optimizer.state_dict(),
        'epoch': epoch,
        'scaler': loss_scaler.state_dict(),
        'args': args_to_dict(args),
        'rng': states,
    }
    if extra:
        to_save.update(extra)
    last = output_dir / CHECKPOINT_LAST
    if keep:
        kept = output_dir / f'checkpoint-{epoch}.pth'
        _atomic_torch_save(to_save, kept)
        _atomic_link_or_copy(kept, last)
    else:
        _atomic_torch_save(to_save, last)


def _torch_load(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is the reference's pickled Namespace
        if 'Namespace' not in str(e) or not hasattr(torch.serialization, 'safe_globals'):
            raise
    # reference checkpoints pickle an argparse.Namespace under 'args': allow exactly that class
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def load_checkpoint(path, what='--resume'):
    """Load a checkpoint file (ours, the reference's, or a released one) onto the CPU, safely."""
    if str(path).startswith('https'):
        return torch.hub.load_state_dict_from_url(str(path), map_location='cpu', check_hash=True)
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: no such file")
    try:
        checkpoint = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault here
        raise UsageError(f"{what} {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise UsageError(f"{what} {path}: not an MAE checkpoint (no 'model' entry)")
    return checkpoint


def _fmt_keys(keys, most=6):
    keys = sorted(keys)
    shown = ', '.join(keys[:most])
    return shown + (f' (+{len(keys) - most} more)' if len(keys) > most else '')


def state_dict_mismatch(model, state_dict):
    """Describe how ``state_dict`` differs from ``model``'s (missing, unexpected, other shapes); '' if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if shapes:
        parts.append(f"other shapes (checkpoint vs model): {_fmt_keys(shapes, 4)}")
    return '; '.join(parts)


def load_model(args, model_without_ddp, optimizer, loss_scaler):
    """Resume from ``args.resume``: weights, and unless ``--eval`` the optimizer, scaler and ``args.start_epoch``.
    Returns the checkpoint (or None) so that callers can restore what else it holds."""
    if not args.resume:
        return None
    checkpoint = load_checkpoint(args.resume)
    problem = state_dict_mismatch(model_without_ddp, checkpoint['model'])
    if problem:
        raise UsageError(f"--resume {args.resume} does not fit --model {args.model}: {problem}")
    model_without_ddp.load_state_dict(checkpoint['model'])
    print("Resume checkpoint %s" % args.resume)
    if 'optimizer' in checkpoint and 'epoch' in checkpoint and not getattr(args, 'eval', False):
        try:
            optimizer.load_state_dict(checkpoint['optimizer'])
        except (ValueError, KeyError) as e:
            raise UsageError(f"--resume {args.resume}: its optimizer state does not fit this run ({e})") from None
        args.start_epoch = checkpoint['epoch'] + 1
        if 'scaler' in checkpoint:
            loss_scaler.load_state_dict(checkpoint['scaler'])
        print("With optim & sched!")
    return checkpoint


def restore_rng(checkpoint):
    """Continue the random streams saved in ``checkpoint`` on this rank, when it has them for this world size
    (our checkpoints do; the reference's do not, and then the run goes on from the seeds, as the reference)."""
    states = checkpoint.get('rng') if checkpoint else None
    if not states:
        return False
    if len(states) != get_world_size():
        print(f"Note: the checkpoint's random streams are for {len(states)} processes, this run has "
              f"{get_world_size()}; continuing with fresh streams")
        return False
    set_rng_state(states[get_rank()])
    return True


def find_resume_checkpoint(output_dir):
    """The newest complete checkpoint in ``output_dir`` (by the epoch it holds), or '' if there is none."""
    if not output_dir or not os.path.isdir(output_dir):
        return ''
    best, best_epoch = '', -1
    for name in os.listdir(output_dir):
        if not (name.startswith('checkpoint-') and name.endswith('.pth')):
            continue
        path = os.path.join(output_dir, name)
        try:
            epoch = torch.load(path, map_location='cpu', weights_only=True, mmap=True)['epoch']
        except Exception as e:  # noqa: BLE001 - a damaged file is passed over, the next newest is used
            print(f"Note: skipping unreadable checkpoint {path} ({type(e).__name__})")
            continue
        if epoch > best_epoch or (epoch == best_epoch and name == CHECKPOINT_LAST):
            best, best_epoch = path, epoch
    return best


# ---------------------------------------------------------------------------------------------------- log.txt
def append_log(output_dir, stats):
    with open(os.path.join(output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_log(output_dir, last_epoch):
    """Drop the ``log.txt`` rows of epochs after ``last_epoch`` (written by a run that died before its checkpoint
    was complete), so that a resumed run neither duplicates nor drops rows."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut short by the kill
        if row.get('epoch', -1) <= last_epoch:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.writelines(kept)
        os.replace(tmp, path)


def check_output_dir(path, flag='--output_dir'):
    """Create ``path`` and make sure we can write there, before any training time is spent."""
    if not path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f'.write-test-{os.getpid()}'
        probe.write_text('')
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {path} is not writable ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------------- stop requests
_stop = {'requested': False, 'signal': None}


class RunInterrupted(Exception):
    """Raised after a requested stop (SIGUSR1/SIGTERM, e.g. SLURM's warning before the time limit) once a
    checkpoint from which the run can continue has been written."""


def request_stop(signum=None, frame=None):
    """Signal handler: ask the training loop to save and stop at the next step boundary."""
    _stop['requested'] = True
    _stop['signal'] = signum


def install_stop_handlers(signals=None):
    import signal
    for sig in signals or (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, request_stop)


def stop_requested_locally():
    return _stop['requested']


def stop_signal():
    """The signal that asked this process to stop, or None."""
    return _stop['signal']


def stop_requested():
    """True on every rank once any rank has been asked to stop (collective: call on all ranks together)."""
    flag = _stop['requested']
    if get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=dist_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item() > 0
    return flag


def all_gather(obj):
    """``obj`` from every rank, as a list indexed by rank (call on all ranks)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class SkippableSampler(torch.utils.data.Sampler):
    """Wraps the training sampler so that an epoch resumed in the middle starts after the samples already
    trained on (``skip``, this rank's count); otherwise it yields exactly the wrapped sampler's indices."""

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

    def __repr__(self):
        return repr(self.sampler)


class EpochCheckpointer:
    """Mid-epoch checkpoints: every ``--save_every_iters`` optimizer steps, and when a stop was requested (then
    ``RunInterrupted`` is raised once the checkpoint is written). They are ``checkpoint-last.pth`` with
    ``epoch`` = the last complete epoch (so the reference's loader would restart the epoch) plus ``resume_iter``,
    the position in the current epoch, and every rank's running averages."""

    def __init__(self, args, model, model_without_ddp, optimizer, loss_scaler, extra_state=None):
        self.args = args
        self.model, self.model_without_ddp = model, model_without_ddp
        self.optimizer, self.loss_scaler = optimizer, loss_scaler
        self.extra_state = extra_state  # more to keep mid-epoch (a collective callable, e.g. skip counts)

    def after_step(self, epoch, next_iter, iters_per_epoch, metric_logger):
        every = getattr(self.args, 'save_every_iters', 0)
        periodic = bool(every) and next_iter % every == 0 and next_iter < iters_per_epoch
        stop = stop_requested()
        if not (periodic or stop):
            return
        extra = {'resume_iter': next_iter, 'resume_epoch': epoch, 'meters': all_gather(metric_logger.state())}
        if self.extra_state is not None:
            extra.update(self.extra_state())
        if self.args.output_dir:
            save_model(self.args, epoch - 1, self.model, self.model_without_ddp, self.optimizer, self.loss_scaler,
                       keep=False, extra=extra)
        if stop:
            where = (f"saved {os.path.join(self.args.output_dir, CHECKPOINT_LAST)}; the same command continues "
                     f"from it") if self.args.output_dir else "nothing was saved (no --output_dir)"
            raise RunInterrupted(f"signal {_stop['signal']} received, stopped at epoch {epoch} iteration "
                                 f"{next_iter}: {where}")


def prepare_resume(args, checkpoint, data_loader):
    """After ``load_model``: continue a run where its checkpoint left it.

    Drops ``log.txt`` rows after the checkpoint's epoch, and either restores the random streams now (a checkpoint
    at an epoch boundary) or sets up a resume in the middle of an epoch: the sampler skips what was trained on,
    and the returned dict tells the engine where the epoch starts, the running averages so far, and how to
    restore the random streams. Returns ``(resume or None, tensorboard purge_step or None)``."""
    if checkpoint is None or 'optimizer' not in checkpoint or getattr(args, 'eval', False):
        return None, None
    if args.output_dir and is_main_process():
        truncate_log(args.output_dir, checkpoint['epoch'])
    iters_per_epoch = len(data_loader)
    mid_epoch = 'resume_iter' in checkpoint and len(checkpoint.get('rng') or []) == get_world_size()
    if not mid_epoch:
        restore_rng(checkpoint)
        return None, (args.start_epoch * 1000 if args.start_epoch > 0 else None)
    start_iter = checkpoint['resume_iter']
    data_loader.sampler.skip = start_iter * args.batch_size
    rng = {'rng': checkpoint['rng']}
    resume = {'start_iter': start_iter, 'meters': checkpoint['meters'][get_rank()],
              'restore_rng': lambda: restore_rng(rng), 'skipped_images': checkpoint.get('skipped_images')}
    print(f"Resuming epoch {args.start_epoch} at iteration {start_iter} of {iters_per_epoch}")
    purge_step = int(((start_iter - 1) / iters_per_epoch + args.start_epoch) * 1000) + 1
    return resume, purge_step
