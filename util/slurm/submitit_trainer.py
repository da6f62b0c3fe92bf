"""The job submitit runs on every task of a ``submitit_*.py`` submission (``Trainer``): the trainer's ``main(args)``
with the job's rank and output folder, saving and requeueing itself before SLURM's time limit or on preemption.
What the job needs on its node (``import_submitit``, ``import_trainer``, ``get_init_file``) is here too; the
submitting side, ``util/slurm/submitit_job.py``, imports them from this module (never the other way round).

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
(``util.misc.request_stop``). The loop finishes the current step, all ranks agree, ``checkpoint-last.pth`` is written
(resumable in the middle of an epoch) and ``errors.RunInterrupted`` comes out of ``main(args)``. Then, unless the
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
import copy
import importlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from util.errors import RunInterrupted, UsageError

REPO = Path(__file__).resolve().parents[1]
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


def import_trainer(module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if getattr(e, 'name', None) == module:
            raise UsageError(f"{module}.py is not available in {REPO}") from None
        raise


def get_init_file(shared_folder) -> Path:
    """A new file name for ``init_process_group(init_method='file://...')``: the file must not exist, its folder
    must."""
    shared_folder = Path(shared_folder)
    os.makedirs(shared_folder, exist_ok=True)
    init_file = shared_folder / f"{uuid.uuid4().hex}_init"
    if init_file.exists():
        os.remove(init_file)
    return init_file.absolute()


class Trainer:
    """The callable submitit runs on every task: ``<module>.main(args)`` with the rank and output folder of the job;
    saves and requeues itself on submitit's signal (see the module's docstring)."""

    def __init__(self, args, module, shared_folder):
        self.args = args
        self.module = module
        self.shared_folder = str(shared_folder)

    def __call__(self):
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        trainer = import_trainer(self.module)
        import util.misc as misc
        from util.training.output_dir import release_output_dir

        self._setup_gpu_args()
        previous, submitit_handler, usr_sig = self._take_over_signals()
        try:
            # main() changes its args (lr, resume, ...): keep ours as submitted, for checkpoint()
            trainer.main(copy.deepcopy(self.args))
        except RunInterrupted as e:
            # the signal this process received; None when only another rank received one (all ranks stop together)
            signum = misc.stop_signal()
            print(f"Run interrupted (signal {signum} here): {e}", flush=True)
            if signum != signal.SIGTERM:
                self._requeue(submitit_handler, signum if signum in (usr_sig, signal.SIGUSR1) else usr_sig)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            release_output_dir()  # (as run_main: the debug executor runs the job in the submitting process)
            misc.shutdown_distributed()

    def _take_over_signals(self):
        submitit = import_submitit()
        usr_sig = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG, signal.SIGUSR2)
        submitit_handler = signal.getsignal(usr_sig)
        import util.misc as misc
        previous = {}
        for sig in (usr_sig, signal.SIGUSR1, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, misc.request_stop)
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
