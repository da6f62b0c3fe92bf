"""What the reference keeps in its ``util/misc.py``: metric logging, the distributed helpers, and mixed precision
with its loss scaler; [new] the stop requests (signals) and the fused AdamW of ``--fused_adamw``."""
import contextlib
import datetime
import math
import os
import signal
import sys
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from util import compat


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
    """The reference's meters and progress lines. ``read_later`` ([new] --no_host_sync): ``update`` keeps tensors on
    the device (as ``Later`` values) and reads them at the console's next print, all at once (``read_later``); a
    row of values one ``update`` was given is dropped whole where one of its values was dropped (a skipped step)."""

    def __init__(self, delimiter="\t", read_later=False):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.read_later = read_later
        self.fresh = False  # read_later: values were read since the checkpoint/stop check last looked
        self._rows = []  # read_later: the rows of values not read yet, in order
        self._print_step = False  # log_every prints after the current iteration

    def update(self, **kwargs):
        if not self.read_later:
            return self._record(kwargs)
        self._rows.append({k: Later(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        if self._print_step:  # read where the console prints: one host sync per print
            self.read()

    def _record(self, values):
        for k, v in values.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            assert isinstance(v, (float, int)), f"meter {k} got {type(v)}"
            self.meters[k].update(v)

    def read(self):
        """``read_later``: read the values left on the device (one host sync, ``read_later``) and hand them to the
        meters, each row whole or, where one of its values was dropped, not at all (call on all ranks)."""
        self.fresh = self.fresh or bool(_UNREAD)
        read_later()
        rows, self._rows = self._rows, []
        for row in rows:
            if not any(isinstance(v, Later) and v.dropped for v in row.values()):
                self._record({k: v.value if isinstance(v, Later) else v for k, v in row.items()})

    def __getattr__(self, attr):
        meters = self.__dict__.get('meters', {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        self.read()
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header='', total=None, start=0):
        """Yield from ``iterable``, printing progress, ETA, the meters and the time per iteration every
        ``print_freq`` iterations. ``total`` is the epoch's length and ``start`` the iteration the iterable
        begins at (both differ from the defaults only when an epoch is resumed in the middle)."""
        total = len(iterable) + start if total is None else total
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
            self._print_step = i % print_freq == 0 or i == total - 1
            yield obj
            iter_time.update(time.time() - end)
            if self._print_step:
                eta_seconds = iter_time.global_avg * (total - i)
                memory = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0
                print(log_msg.format(i, total, eta=str(datetime.timedelta(seconds=int(eta_seconds))),
                                     meters=str(self), time=str(iter_time), data=str(data_time), memory=memory))
            i += 1
            end = time.time()
        self._print_step = False
        total_time = time.time() - start_time
        print('{} Total time: {} ({:.4f} s / it)'.format(
            header, str(datetime.timedelta(seconds=int(total_time))), total_time / max(i - start, 1)))

    def state(self):
        """The meters' running sums, to continue an epoch's averages after a mid-epoch resume."""
        self.read()
        return {name: {'total': m.total, 'count': m.count, 'deque': list(m.deque)} for name, m in self.meters.items()}

    def load_state(self, state):
        for name, st in state.items():
            meter = self.meters[name]
            meter.total, meter.count = st['total'], st['count']
            meter.deque.extend(st['deque'])


# ---------------------------------------------------------------------------------------------------- device values
_UNREAD = []  # the Later values made and not read yet, in order


class Later:
    """[new] --no_host_sync: a number left on the device until ``read_later`` reads it with all the others (at the
    console's next print). ``mean``: its mean over the processes is wanted (one all-reduce for all of them).
    ``judge(value)``: False drops it (a non-finite loss: its step is skipped), and with it the values that
    ``follow`` it. Read, ``value`` is a float, or None where it was dropped."""

    def __init__(self, tensor, mean=False, judge=None, follows=None):
        self.tensor, self.mean, self.judge, self.follows = tensor.detach(), mean, judge, follows
        self.value, self.dropped, self.done = None, False, False
        _UNREAD.append(self)


def read_later():
    """Read every ``Later`` value made so far, in one host sync; those that want the mean over the processes in one
    all-reduce (call on all ranks, which made the same ones in the same order)."""
    pending = list(_UNREAD)
    del _UNREAD[:]
    if not pending:
        return
    device = pending[0].tensor.device
    local = torch.stack([p.tensor.float().reshape(()).to(device) for p in pending])
    means = [i for i, p in enumerate(pending) if p.mean]
    if means:
        local[means] = all_reduce_mean(local[means])
    for p, value in zip(pending, local.tolist()):
        p.value, p.done = value, True
    for p in pending:
        if p.judge is not None and not p.judge(p.value):
            p.value, p.dropped = None, True
        if p.follows is not None and p.follows.dropped:
            p.value, p.dropped = None, True


# ---------------------------------------------------------------------------------------------------- distributed
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


def print_first(*values):
    """``print`` on the launcher's first process only (torchrun's RANK, SLURM's SLURM_PROCID, OpenMPI's rank; one
    process: itself), also before the process group is joined and ``print`` learns the rank."""
    rank = next((os.environ[v] for v in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK') if v in os.environ), '0')
    if rank == '0':
        print(*values)


def shutdown_distributed():
    """Leave the process group before exiting: a process that exits with gloo's threads still running can abort
    ('terminate called without an active exception')."""
    if is_dist_avail_and_initialized():
        compat.destroy_process_group()


def all_reduce_mean(x):
    """The mean over the processes of a number (a python float back) or of a tensor (a tensor back, on its device;
    no host sync on GPUs)."""
    world_size = get_world_size()
    if world_size == 1:
        return x
    if isinstance(x, torch.Tensor):
        t = x.to(dist_device(), copy=True)  # all_reduce works in place
        dist.all_reduce(t)
        return (t / world_size).to(x.device)
    t = torch.tensor(x, device=dist_device())
    dist.all_reduce(t)
    return (t / world_size).item()


def all_gather(obj):
    """``obj`` from every rank, as a list indexed by rank (call on all ranks)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(x):
    """The largest of the ranks' numbers (call on all ranks)."""
    if get_world_size() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=dist_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---------------------------------------------------------------------------------------------------- stop requests
_stop = {'signal': None}


def install_stop_handlers():
    """SIGUSR1 (SLURM's warning before the time limit), SIGTERM and Ctrl-C: save at the next optimizer step and
    stop (``util.checkpoints.saver.CheckpointSaver.after_step``)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)


def request_stop(signum=signal.SIGUSR1, frame=None):
    """Signal handler: ask the training loop to save and stop at the next optimizer step. A second Ctrl-C (SIGINT)
    stops at once, as Ctrl-C usually does."""
    if signum == signal.SIGINT and _stop['signal'] == signal.SIGINT:
        raise KeyboardInterrupt
    _stop['signal'] = signum
    if signum == signal.SIGINT and is_main_process():
        sys.stderr.write("Ctrl-C: saving at the next optimizer step, then stopping (Ctrl-C again: stop at once, "
                         "unsaved)\n")
        sys.stderr.flush()


def stop_signal():
    """The signal that asked this process to stop, or None."""
    return _stop['signal']


def stop_requested():
    """The signal number once any rank has been asked to stop, else 0 (a collective: call on all ranks)."""
    return int(all_reduce_max(_stop['signal'] or 0))
# ---------------------------------------------------------------------------------------------------- progress
PROGRESS_EVERY = 10.0  # seconds between two progress lines


class Progress:
    """[new] The progress of a long job that otherwise says nothing for minutes (a dataset scan, --data_stats auto,
    the kNN monitor's embedding): ``update(n)`` as it goes; at most every ``every`` seconds a line such as
    'Measuring data stats: 12000/50000 images, 0:01:12 left' (without ``total``: '... 12000 images so far'). Only on
    a terminal (and the first process): logs, piped output and the tests stay as they were."""

    def __init__(self, what, total=None, unit='images', every=None, stream=None):
        self.what, self.total, self.unit = what, total, unit
        self.every = PROGRESS_EVERY if every is None else every
        stream = stream or sys.stdout
        self.shown = is_main_process() and hasattr(stream, 'isatty') and stream.isatty()
        self.done, self.start = 0, time.time()
        self.last = self.start

    def update(self, n=1):
        self.done += n
        now = time.time()
        if self.shown and now - self.last >= self.every:
            self.last = now
            print(self.line(now), flush=True)

    def line(self, now):
        if not self.total:
            return f"{self.what}: {self.done} {self.unit} so far, {datetime.timedelta(seconds=int(now - self.start))}"
        left = (now - self.start) / max(self.done, 1) * (self.total - self.done)
        return f"{self.what}: {self.done}/{self.total} {self.unit}, {datetime.timedelta(seconds=int(left))} left"


def progress(iterable, what, total=None, unit='images', count=None):
    """``iterable``'s items, with a ``Progress`` line on a terminal; ``total``: ``len(iterable)`` by default;
    ``count(item)``: how many ``unit`` an item is (1 by default; e.g. a batch's images)."""
    if total is None and hasattr(iterable, '__len__'):
        total = len(iterable)
    shown = Progress(what, total, unit)
    for item in iterable:
        yield item
        shown.update(count(item) if count else 1)


# ---------------------------------------------------------------------------------------------------- AMP
def amp_settings(args):
    """``(device_type, dtype, enabled)`` of the forward pass's autocast (the engines' ``torch.autocast``):
    fp16 on CUDA as the reference (``--amp fp16``, the default), bf16 with ``--amp bf16``, off with ``--amp none``.
    On the CPU only ``--amp bf16`` turns autocast on (bf16 matrix products: faster on CPUs with AVX-512 BF16 or
    AMX, emulated and much slower without); fp16 and none run fp32 there, as the reference, so that the default
    stays its numbers, and so does ``--fast`` (which implies --amp bf16 for CUDA): a speed flag must not make a CPU
    without bf16 instructions eight times slower."""
    amp = getattr(args, 'amp', 'fp16')
    use_cuda = str(args.device).startswith('cuda')
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    on_cpu = str(args.device).startswith('cpu')
    enabled = (use_cuda and amp != 'none') or (on_cpu and amp == 'bf16' and not getattr(args, 'fast', False))
    return ('cuda' if use_cuda else 'cpu'), dtype, enabled


def autocast(args):
    """The forward pass's autocast context (``amp_settings``), or a context that does nothing."""
    device_type, dtype, enabled = amp_settings(args)
    return torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()


class NativeScalerWithGradNormCount:
    """Backward with loss scaling, optional gradient clipping, optimizer step; returns the gradient norm on the
    steps that update (``None`` on accumulation micro-steps). Scaling is on only for fp16 on CUDA (the forward's
    precision, ``amp_settings(args)``); ``autocast`` is the forward's context that goes with it, chosen once.

    With ``--no_host_sync`` a step whose gradients are not finite (``util.training.run.NonFiniteLosses`` makes those of
    a non-finite loss NaN) is skipped on the device: fp16's GradScaler does that already; without it the check is handed
    to the optimizer as GradScaler hands it (``found_inf``), which fused AdamW applies in its kernel. Other optimizers
    need the answer on the host: one sync per optimizer step."""

    def __init__(self, args):
        device_type, dtype, enabled = amp_settings(args)
        enabled = enabled and dtype == torch.float16
        self._scaler = compat.GradScaler(enabled=enabled)
        self.autocast = autocast(args)  # the forward's context that goes with this scaling
        self._skip_on_device = getattr(args, 'no_host_sync', False)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        if clip_grad is not None:
            assert parameters is not None
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = get_grad_norm_(parameters)
        if self._skip_on_device and not self._scaler.is_enabled():
            step_if_finite(optimizer, norm)
        else:
            self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        # a checkpoint written on the CPU has an empty scaler state; a fresh scaler is then the right one
        if state_dict and self._scaler.is_enabled():
            self._scaler.load_state_dict(state_dict)


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


def step_if_finite(optimizer, grad_norm):
    """``optimizer.step()`` unless ``grad_norm`` (a tensor) is not finite, decided on the device where the optimizer
    takes GradScaler's ``found_inf`` (fused Adam/AdamW: the kernel leaves weights, moments and step count as they
    are), else on the host."""
    found_inf = (~torch.isfinite(grad_norm)).float()
    if getattr(optimizer, '_step_supports_amp_scaling', False):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not found_inf.item():
        optimizer.step()


def fused_adamw(device):
    """[new] ``--fused_adamw``: True (``AdamW(fused=True)``: one kernel for all tensors, and the device-side step
    skip of ``--no_host_sync``) where this torch has fused AdamW for ``device``, else None (the default AdamW) with
    a note. torch checks the device only at the first step (CPU support came in torch 2.4), so one step on a
    one-element tensor tells."""
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, TypeError) as e:
        print(f"Note: --fused_adamw: torch {torch.__version__} has no fused AdamW for --device {device} "
              f"({(str(e).splitlines() or [type(e).__name__])[0]}); using the default AdamW")
        return None
    return True
