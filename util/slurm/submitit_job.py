"""What ``submitit_pretrain.py``, ``submitit_finetune.py`` and ``submitit_linprobe.py`` share: their flags, the shared
folder, the checks before anything is queued, and the submission of the job (``util.slurm.submitit_trainer.Trainer``).

submitit is an optional dependency (``pip install submitit``); nothing here imports it at module level.

The job itself, and how it saves and requeues, is ``util/slurm/submitit_trainer.py``.
"""
import contextlib
import copy
import functools
import getpass
import os
import sys
from pathlib import Path

from util.errors import UsageError
from util.flags import Parser, Range
from util.slurm.submitit_trainer import REPO, Trainer, get_init_file, import_submitit, import_trainer

CHECKPOINT_ROOT = Path('/checkpoint')  # the reference's shared file system


# ---------------------------------------------------------------------------------------------------- flags
def add_submitit_args(parser):
    parser.add_argument("--ngpus", default=8, type=Range(int, 1), help="Number of gpus to request on each node")
    parser.add_argument("--nodes", default=2, type=Range(int, 1), help="Number of nodes to request")
    parser.add_argument("--timeout", default=4320, type=Range(int, 1), help="Duration of the job")
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


def get_args_parser(module, description):
    """The trainer's flags (``module.get_args_parser()``) plus the reference's submitit flags."""
    parser = Parser(description, parents=[import_trainer(module).get_args_parser()])
    return add_submitit_args(parser)


def parse_args(module, description, argv=None):
    return get_args_parser(module, description).parse_args(argv)


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


# ---------------------------------------------------------------------------------------------------- submitting
@contextlib.contextmanager
def _repo_on_pythonpath():
    """The jobs unpickle ``util.slurm.submitit_trainer.Trainer`` and import the trainer: put the repo on their
    PYTHONPATH (sbatch and the local executor pass the submitting environment on)."""
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
    if args.dependency:
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
    trainer.check_args(copy.deepcopy(args))  # (the checks fill in what the job's own main will: the resume file)
    if not getattr(args, 'eval', False):
        from util.data.loaders import batch_problem
        from util.data.image_folder import image_folder
        from util.data.image_sources import pretrain_dataset
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
    check_before_submitting(args, module)  # (before the shared folder is created: a mistake leaves nothing behind)
    shared = get_shared_folder(args.job_dir)
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


def entry_points(module, description):
    """A ``submitit_*.py`` script's ``parse_args(argv=None)`` and ``main(argv=None)`` for the trainer ``module``."""
    return functools.partial(parse_args, module, description), functools.partial(main, module, description)


def main(module, description, argv=None):
    """The submitit_*.py scripts: parse, submit, print the job id; a mistake is one line and exit code 2."""
    from util.errors import RunInterrupted, TrainingStopped
    try:
        args = parse_args(module, description, argv)
        submit(args, module)
    except (UsageError, TrainingStopped, RunInterrupted) as e:  # (the last two from a job run in the foreground)
        sys.stderr.write(f"{'stopped' if isinstance(e, RunInterrupted) else 'error'}: {e}\n")
        sys.exit(2 if isinstance(e, UsageError) else 1)
