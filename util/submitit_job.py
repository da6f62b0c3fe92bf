"""What ``submitit_pretrain.py``, ``submitit_finetune.py`` and ``submitit_linprobe.py`` share: their flags, the shared
folder, and the job (``Trainer``) that submitit runs on every task, which saves and requeues itself before SLURM's
time limit or on preemption.

submitit is an optional dependency (``pip install submitit``); nothing here imports it at module level.

Requeueing, and why it is done this way
---------------------------------------
submitit (``submitit/core/job_environment.py``) installs, in every task, a handler for its pre-timeout/preemption
signal (``SIGUSR2`` by default: ``#SBATCH --signal=USR2@<slurm_signal_delay_s>``; ``$SUBMITIT_PREEMPT_SIGNAL``
changes it), and logs and ignores ``SIGTERM``. On rank 0 that handler calls the job's ``checkpoint()``, writes the
returned ``DelayedSubmission`` over the job's pickle, runs ``scontrol requeue`` and calls ``sys.exit`` right away,
inside the signal handler; on the other ranks it does nothing. A ``checkpoint()`` that only asked the training loop
to save would therefore lose the save: the process exits before the loop gets to it (the reference's
``checkpoint()`` points ``--resume`` at a ``checkpoint.pth`` that nothing writes, so its requeued jobs restarted
from scratch).

So ``Trainer.__call__`` takes the signals over before training: its handlers only ask the training loop to stop
(``util.run.request_stop``). The loop finishes the current step, all ranks agree, ``checkpoint-last.pth`` is written
(resumable in the middle of an epoch) and ``misc.RunInterrupted`` comes out of ``main(args)``. Then, unless the
signal was ``SIGTERM`` (submitit's signal, ``SIGUSR1``, or a signal that reached another rank only), the job hands
over to submitit's own handler, saved when the job started, which does what it would have done on the signal:
checks the timeout count, calls ``checkpoint()`` (a fresh ``Trainer`` with a new ``--dist_url`` init file, the same
``--output_dir``, ``--auto_resume`` on), requeues and exits. The requeued job continues from the newest checkpoint
in its ``--output_dir`` (auto-resume). Under SLURM the other ranks then wait (at most ``PEER_WAIT_S``) to be
stopped by the requeue rather than exit first. A signal that arrives before the handlers are taken over (while the
job is still importing) is handled by submitit as usual: there is nothing to save yet.

``SIGTERM`` saves and stops without requeueing: it is what ``scancel`` sends (a cancel must stay a cancel), what a
preemption with ``PreemptMode=REQUEUE`` sends (SLURM requeues the job itself, which then auto-resumes), and what
the time limit sends when no warning signal came (submitit does not requeue then either).
"""
import argparse
import contextlib
import copy
import getpass
import importlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from util.misc import UsageError

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_ROOT = Path('/checkpoint')  # the reference's shared file system
SUBMITIT_MISSING = "submitit is not installed: pip install submitit"
# how long ranks other than 0 wait, after the checkpoint is written, for SLURM to stop them when rank 0 requeues
# (exiting earlier could make srun end the step before rank 0's `scontrol requeue` has run)
PEER_WAIT_S = 300


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UsageError(SUBMITIT_MISSING) from None
    return submitit


# ---------------------------------------------------------------------------------------------------- flags
def add_submitit_args(parser):
    parser.add_argument("--ngpus", default=8, type=int, help="Number of gpus to request on each node")
    parser.add_argument("--nodes", default=2, type=int, help="Number of nodes to request")
    parser.add_argument("--timeout", default=4320, type=int, help="Duration of the job")
    parser.add_argument("--job_dir", default="", type=str, help="Job dir. Leave empty for automatic.")

    parser.add_argument("--partition", default="learnfair", type=str, help="Partition where to submit")
    parser.add_argument("--use_volta32", action='store_true', help="Request 32G V100 GPUs")
    parser.add_argument('--comment', default="", type=str, help="Comment to pass to scheduler")
    parser.add_argument('--cluster', default=None, choices=['slurm', 'local', 'debug'],
                        help="[new] submitit executor (default: SLURM where `srun` is found, else this machine)")
    parser.add_argument('--dependency', default="", type=str,
                        help="[new] SLURM dependency of the job, e.g. afterok:12345 (start once job 12345 has "
                             "succeeded: a fine-tuning job after its pre-training job)")
    return parser


def import_trainer(module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if getattr(e, 'name', None) == module:
            raise UsageError(f"{module}.py is not available in {REPO}") from None
        raise


def parse_args(module, description, argv=None):
    """The trainer's flags (``module.get_args_parser()``) plus the reference's submitit flags."""
    trainer = import_trainer(module)
    parser = argparse.ArgumentParser(description, parents=[trainer.get_args_parser()])
    add_submitit_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- folders
def get_shared_folder(job_dir='') -> Path:
    """A folder every node of the job sees, for the jobs' files and the distributed init files: the part of
    ``--job_dir`` before any ``%j``, else ``/checkpoint/$USER/experiments`` (the reference's)."""
    if job_dir:
        parts = Path(job_dir).parts
        keep = []
        for part in parts:
            if '%' in part:
                break
            keep.append(part)
        p = Path(*keep) if keep else Path('.')
    elif CHECKPOINT_ROOT.is_dir():
        user = os.getenv("USER") or getpass.getuser()
        p = CHECKPOINT_ROOT / user / "experiments"
    else:
        raise UsageError(
            f"no shared folder for the job: {CHECKPOINT_ROOT} does not exist here; pass --job_dir <a folder every "
            f"node can read and write> (%j in it becomes the job id)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the shared folder {p} ({e.strerror or e}); "
                                   f"pass --job_dir <a writable folder every node can see>") from None
    return p


def get_init_file(shared_folder) -> Path:
    """A new file name for ``init_process_group(init_method='file://...')``: the file must not exist, its folder
    must."""
    shared_folder = Path(shared_folder)
    os.makedirs(shared_folder, exist_ok=True)
    init_file = shared_folder / f"{uuid.uuid4().hex}_init"
    if init_file.exists():
        os.remove(init_file)
    return init_file.absolute()


# ---------------------------------------------------------------------------------------------------- the job
class Trainer:
    """The callable submitit runs on every task: ``<module>.main(args)`` with the rank and output folder of the job;
    saves and requeues itself on submitit's signal (see the module's docstring)."""

    def __init__(self, args, module='main_pretrain', shared_folder=None):
        self.args = args
        self.module = module
        self.shared_folder = str(shared_folder if shared_folder is not None else get_shared_folder(args.job_dir))

    def __call__(self):
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        trainer = import_trainer(self.module)
        import util.misc as misc
        import util.run as run

        self._setup_gpu_args()
        previous, submitit_handler, usr_sig = self._take_over_signals()
        try:
            # main() changes its args (lr, resume, ...): keep ours as submitted, for checkpoint()
            trainer.main(copy.deepcopy(self.args))
        except misc.RunInterrupted as e:
            # the signal this process received; None when only another rank received one (all ranks stop together)
            signum = run.stop_signal()
            print(f"Run interrupted (signal {signum} here): {e}", flush=True)
            if signum != signal.SIGTERM:
                self._requeue(submitit_handler, signum if signum in (usr_sig, signal.SIGUSR1) else usr_sig)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            misc.shutdown_distributed()

    def _take_over_signals(self):
        submitit = import_submitit()
        usr_sig = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG, signal.SIGUSR2)
        submitit_handler = signal.getsignal(usr_sig)
        import util.run as run
        previous = {}
        for sig in (usr_sig, signal.SIGUSR1, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, run.request_stop)
        requeue_on = sorted({signal.Signals(usr_sig).name, 'SIGUSR1'})
        print(f"Stop handlers installed (save then requeue on {', '.join(requeue_on)}; save then stop on SIGTERM)",
              flush=True)
        return previous, submitit_handler, usr_sig

    def _requeue(self, submitit_handler, signum):
        """After the checkpoint is written: requeue through submitit's own signal handler (rank 0 calls our
        ``checkpoint()``, requeues and exits; other ranks wait to be stopped by the requeue)."""
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        if getattr(submitit_handler, '__name__', '') != 'checkpoint_and_try_requeue':
            print("Not requeued: the job does not run under submitit's signal handling (e.g. the debug executor)",
                  flush=True)
            return
        submitit_handler(signum, None)  # rank 0: requeues and exits (or raises: too many timeouts)
        if job_env.global_rank != 0 and job_env.cluster == 'slurm':
            # submitit's handler does nothing on these ranks; SLURM stops them when rank 0 requeues the job
            deadline = time.time() + PEER_WAIT_S
            while time.time() < deadline:
                time.sleep(1)

    def checkpoint(self):
        """Called by submitit (rank 0) to requeue: the same job, a fresh distributed init file, auto-resume on."""
        submitit = import_submitit()
        args = copy.deepcopy(self.args)
        args.dist_url = get_init_file(self.shared_folder).as_uri()
        args.auto_resume = True  # continue from the newest checkpoint in args.output_dir
        print("Requeuing ", args, flush=True)
        empty_trainer = type(self)(args, self.module, self.shared_folder)
        return submitit.helpers.DelayedSubmission(empty_trainer)

    def _setup_gpu_args(self):
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        self.args.output_dir = str(self.args.output_dir).replace("%j", str(job_env.job_id))
        self.args.log_dir = self.args.output_dir
        self.args.gpu = job_env.local_rank
        self.args.rank = job_env.global_rank
        self.args.world_size = job_env.num_tasks
        if job_env.num_tasks > 1 and 'SLURM_PROCID' not in os.environ:
            # submitit's local executor: let init_distributed_mode join the group as under torchrun
            os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                              LOCAL_RANK=str(job_env.local_rank))
        print(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}", flush=True)


# ---------------------------------------------------------------------------------------------------- submitting
@contextlib.contextmanager
def _repo_on_pythonpath():
    """The jobs unpickle ``util.submitit_job.Trainer`` and import the trainer: put the repo on their PYTHONPATH
    (sbatch and the local executor pass the submitting environment on)."""
    old = os.environ.get('PYTHONPATH')
    os.environ['PYTHONPATH'] = os.pathsep.join([str(REPO)] + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            del os.environ['PYTHONPATH']
        else:
            os.environ['PYTHONPATH'] = old


def make_executor(args, submitit, cluster=None):
    try:
        executor = submitit.AutoExecutor(folder=args.job_dir, cluster=cluster, slurm_max_num_timeout=30)
    except OSError as e:
        raise UsageError(f"--job_dir {args.job_dir} cannot be used ({e.strerror or e})") from None
    if executor.cluster == 'local' and cluster is None:
        print("No SLURM here (no `srun`): the job runs on this machine with submitit's local executor")

    num_gpus_per_node = args.ngpus
    kwargs = {}
    if args.use_volta32:
        kwargs['slurm_constraint'] = 'volta32gb'
    if args.comment:
        kwargs['slurm_comment'] = args.comment
    if getattr(args, 'dependency', ''):
        if executor.cluster != 'slurm':
            raise UsageError(f"--dependency {args.dependency} needs SLURM; the {executor.cluster} executor runs "
                             f"jobs at once")
        kwargs['slurm_additional_parameters'] = {'dependency': args.dependency}
    try:
        executor.update_parameters(
            mem_gb=40 * num_gpus_per_node,
            gpus_per_node=num_gpus_per_node,
            tasks_per_node=num_gpus_per_node,  # one task per GPU
            cpus_per_task=10,
            nodes=args.nodes,
            timeout_min=args.timeout,  # max is 60 * 72
            # Below are cluster dependent parameters
            slurm_partition=args.partition,
            slurm_signal_delay_s=120,
            **kwargs
        )
    except ValueError as e:  # e.g. the local executor and --nodes > 1
        raise UsageError(f"{executor.cluster} executor: {e}") from None
    executor.update_parameters(name="mae")
    return executor


def check_before_submitting(args, module):
    """The checks ``<module>.main`` makes before it computes anything (flags, model, paths, and whether the dataset
    gives every task a full batch), made here before anything is queued: a typo then costs a second, not a queue
    wait."""
    trainer = import_trainer(module)
    trainer.check_args(args)
    if not getattr(args, 'eval', False):
        from util.flags import batch_problem
        from util.image_folder import image_folder, pretrain_dataset
        images = pretrain_dataset(args.data_path) if module == 'main_pretrain' else \
            image_folder(args.data_path, 'train', transform=None)
        problem = batch_problem(args, len(images), args.nodes * args.ngpus)
        if problem:
            raise UsageError(problem)


def submit(args, module, cluster=None):
    """Submit ``<module>.main(args)`` as the reference's scripts do; returns the submitit job. With the debug
    executor the job runs here, in the foreground (submitit's debug jobs run only when their result is asked
    for)."""
    submitit = import_submitit()
    if args.job_dir:
        args.job_dir = str(Path(args.job_dir).expanduser().absolute())
    shared = get_shared_folder(args.job_dir)
    check_before_submitting(args, module)
    if not args.job_dir:
        args.job_dir = str(shared / "%j")
    # Note that the folder will depend on the job_id, to easily track experiments
    executor = make_executor(args, submitit, cluster or args.cluster)

    args.dist_url = get_init_file(shared).as_uri()
    args.output_dir = args.job_dir

    trainer = Trainer(args, module, shared)
    with _repo_on_pythonpath():
        job = executor.submit(trainer)
    print(job.job_id)
    if executor.cluster == 'debug':
        # in the job's environment, as submitit's debug jobs run, but without its post-mortem debugger on errors
        saved = dict(os.environ)
        os.environ['SUBMITIT_DEBUG_JOB_ID'] = job.job_id
        try:
            job.submission().result()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return job


def main(module, description, argv=None):
    """The submitit_*.py scripts: parse, submit, print the job id; a mistake is one line and exit code 2."""
    from util.misc import RunInterrupted, TrainingStopped
    try:
        args = parse_args(module, description, argv)
        submit(args, module)
    except (UsageError, TrainingStopped, RunInterrupted) as e:  # (the last two from a job run in the foreground)
        sys.stderr.write(f"{'stopped' if isinstance(e, RunInterrupted) else 'error'}: {e}\n")
        sys.exit(2 if isinstance(e, UsageError) else 1)
