"""A process's life around an entry point's ``main``: ``run_main`` parses the command line, runs ``main`` and reports
its errors in one line each; ``setup_process`` starts it as the reference's ``main`` begins (join the process group,
torchrun, SLURM or OpenMPI, or one process; print only on the first process; lock the output folder; print the
flags; seed the random streams; [new] the stop signals of a training run)."""
import builtins
import datetime
import os
import random
import sys
import urllib.parse
import warnings

import numpy as np
import torch
import torch.distributed as dist

import util.misc as misc
from util.errors import RunComplete, RunInterrupted, TrainingStopped, UsageError, one_line
from util.training.output_dir import lock_output_dir, probe_write, release_output_dir


def run_main(main, parser, argv=None):
    """Parse the command line with ``parser`` (plus ``-h/--help``: the parsers are built without it, as the
    reference's, so that the submitit scripts can extend them) and run the entry point's ``main(args)``. A
    ``UsageError`` becomes one line on stderr and exit code 2, a ``TrainingStopped`` or ``RunInterrupted`` one line
    and exit code 1, a ``RunComplete`` one line on stdout and exit code 0, a second Ctrl-C one line and exit code
    130."""
    parser.add_argument('-h', '--help', action='help', help='show this help message and exit')
    args = parser.parse_args(argv)
    try:
        main(args)
    except RunComplete as e:
        print(one_line(e))
    except (UsageError, TrainingStopped, RunInterrupted) as e:
        if misc.is_main_process() or not isinstance(e, RunInterrupted):  # every rank stops together: say it once
            sys.stderr.write(f"{'stopped' if isinstance(e, RunInterrupted) else 'error'}: {one_line(e)}\n")
            sys.stderr.flush()
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves and stops at the next optimizer step)
        sys.stderr.write("stopped: interrupted (Ctrl-C twice), nothing saved since the last checkpoint\n")
        sys.exit(130)
    finally:
        release_output_dir()  # (a process that runs several entry points, e.g. the tests, lets go of each folder)
        misc.shutdown_distributed()


def setup_process(args, script, seed_python=False):
    """Join the process group (``init_distributed_mode``: it fills in ``args.rank``, ``world_size``, ``gpu`` and
    ``distributed``), fill in ``--log_dir`` (default: ``--output_dir``), take ``--output_dir`` for this run when
    training (one run at a time in a folder), print the job dir and the flags, and seed torch and numpy with ``--seed``
    + rank (also python's ``random`` with ``seed_python``), as the reference does at the top of its ``main``; [new]
    when training, SIGUSR1 (SLURM's warning before the time limit), SIGTERM and Ctrl-C ask it to save at the next
    optimizer step and stop (``misc.install_stop_handlers``). Returns the device."""
    init_distributed_mode(args)
    if args.log_dir is None:  # TensorBoard's events beside the checkpoints
        args.log_dir = args.output_dir
    if args.output_dir and not getattr(args, 'eval', False):
        lock_output_dir(args.output_dir)
    if args.log_dir and not getattr(args, 'eval', False):
        check_log_dir(args.log_dir)
    print('job dir: {}'.format(os.path.dirname(os.path.realpath(script))))
    print("{}".format(args).replace(', ', ',\n'))
    device = torch.device(args.device)
    if device.type != 'cuda':
        print(precision_line(args, device))
    seed = args.seed + misc.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    if seed_python:
        random.seed(seed)
    torch.backends.cudnn.benchmark = True
    if not getattr(args, 'eval', False):
        misc.install_stop_handlers()
    return device


def check_log_dir(path):
    """One line, before anything is computed, when --log_dir cannot be made or written in (rank 0 writes the
    TensorBoard events; every rank gets the same answer): TensorBoard would fail once the model and data are
    ready."""
    error = None
    if misc.is_main_process():
        try:
            os.makedirs(path, exist_ok=True)
            probe_write(path)
        except OSError as e:
            error = f"--log_dir {path} is not writable ({e.strerror or e})"
    if misc.get_world_size() > 1:
        error = misc.all_gather(error)[0]
    if error:
        raise UsageError(error)


def cpu_has_fast_bf16():
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16, AMX), as torch's oneDNN reports it;
    without, bf16 products are emulated, many times slower than fp32's (0.6 against 44 GFLOP/s on one AVX2 core)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: no warning rather than a wrong one
        return True


def precision_line(args, device):
    """What the forward runs in off CUDA: fp32 unless --amp bf16 on the CPU (util.misc.amp_settings)."""
    _, _, enabled = misc.amp_settings(args)
    if enabled:
        line = (f"Precision: bf16 autocast on the {device.type.upper()} (--amp bf16 [new]: the forward's matrix "
                f"products in bfloat16; weights, gradients and optimizer in fp32)")
        if not cpu_has_fast_bf16():
            line += ("; note: this CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX), so they are emulated "
                     "and much slower than fp32 (the default, --amp fp16, runs fp32 on the CPU)")
        return line
    if args.amp == 'bf16':  # (from --fast)
        return "Precision: fp32 (--fast keeps fp32 on the CPU; --amp bf16 without --fast runs bf16 autocast)"
    if args.amp == 'fp16':
        return "Precision: fp32 (--amp fp16 applies on CUDA only; --amp bf16 runs bf16 autocast on the CPU)"
    return f"Precision: fp32 (--amp {args.amp})"


def check_dist_url(url):
    """Refuse in one line, before joining the process group, a ``--dist_url`` that torch's rendezvous cannot use
    (it would fail on every process with a traceback): env://, tcp://HOST:PORT or file:///PATH (in a folder that
    exists)."""
    usage = "give env:// (torchrun's), tcp://HOST:PORT or file:///PATH/TO/A/NEW/FILE"
    parsed = urllib.parse.urlsplit(str(url))
    if parsed.scheme not in ('env', 'tcp', 'file'):
        raise UsageError(f"--dist_url {url}: not a rendezvous URL torch knows: {usage}")
    if parsed.scheme == 'tcp':
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or not port:
            raise UsageError(f"--dist_url {url}: a tcp:// URL needs a host and a port (1-65535): {usage}")
    if parsed.scheme == 'file':
        folder = os.path.dirname(parsed.path)
        if not parsed.path or not os.path.isdir(folder or '/'):
            raise UsageError(f"--dist_url {url}: a file:// URL needs the path of a file in a folder that exists: "
                             f"{usage}")


def init_distributed_mode(args):
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM (SLURM_PROCID, with
    ``args.world_size``/``args.dist_url`` set by submitit) or OpenMPI (``--dist_on_itp``); otherwise run as one
    process. NCCL on GPUs, gloo on ``--device cpu``."""
    use_cuda = str(args.device).startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was asked for but no CUDA GPU is available; use --device cpu")
    distributed = True
    if args.dist_on_itp:
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
        distributed = False
        args.rank, args.gpu = 0, 0
    args.distributed = distributed

    if distributed:
        if use_cuda:
            torch.cuda.set_device(args.gpu)
            args.dist_backend = 'nccl'
        else:
            args.dist_backend = 'gloo'
        check_dist_url(args.dist_url)
        print('| distributed init (rank {}): {}, {}, {} processes'.format(
            args.rank, args.dist_url, f'gpu {args.gpu}' if use_cuda else 'gloo on the CPU', args.world_size),
            flush=True)
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank)
        dist.barrier()

    # print: time-stamped, and only on the first process (``print(..., force=True)`` prints on any; every process
    # prints beyond 8), as the reference's setup_for_distributed
    builtin_print = getattr(builtins.print, '_mae_builtin', builtins.print)
    is_master, print_everywhere = args.rank == 0, misc.get_world_size() > 8

    def stamped_print(*values, **kwargs):
        force = kwargs.pop('force', False) or print_everywhere
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print('[{}] '.format(now), end='')
            builtin_print(*values, **kwargs)

    stamped_print._mae_builtin = builtin_print
    builtins.print = stamped_print
    # warnings: from the first process only, and the DataLoader's advice on worker counts once (it warns when the
    # loader is built and again for each iterator)
    warnings.filterwarnings('once', message='This DataLoader will create')
    if not is_master:
        warnings.simplefilter('ignore')


