"""Reproduce the paper's ablations and comparisons with one command: ``python reproduce.py --study mask_ratio ...``.

Each study is a table or figure of the paper (Figure 5, Tables 1a/1b/1d/1f, Figure 9, Table 3). Every cell of it
runs through the project's own entry points, as subprocesses: ``main_pretrain.py`` with the cell's flags, then
its evaluations (``--evals``: ``main_finetune.py``, ``main_linprobe.py``, or the cheap ones of frozen features,
``extract_features.py --knn`` and ``--probe``) from its last checkpoint. The top-1 of each evaluation (the last
epoch's in its ``log.txt``, or its ``result.json``) is written with its standard error, beside the paper's number,
to ``<study>.md`` (and ``<study>.png`` for the curves).

Scales:
- ``--scale paper``: the paper's recipes (ViT-L, 800 epochs of pre-training at an effective batch of 4096; the
  fine-tuning and linear-probing recipes of FINETUNE.md; Table 3's from-scratch baseline, Appendix A.2's supervised
  recipe with an EMA of the weights), each run submitted as a SLURM job through
  ``submitit_*.py``; an evaluation job waits for its pre-training job (``--dependency afterok:<job>``).
- ``--scale small``: a small ViT (``mae_vit_small_patch4``) on 32x32 images, run here one after the other, with
  short schedules for a CPU or one GPU (``studies/recipes.py`` says which and why); ``--pretrain_epochs`` lengthens the
  pre-training where there is more compute.
- ``--quick``: the tiny model on a tiny data set, one epoch each: a smoke test of the whole pipeline.

Cells are shared: a pre-training that several cells or studies need (the baseline) runs once. A run whose
``log.txt`` has its last epoch and whose final checkpoint exists is done and is not run again; an interrupted run
continues where it stopped (the entry points' auto-resume), so the same command picks a study up again.

This file is the command (its flags, their checks, the order of the steps); the package ``studies`` holds the rest.
"""
import shutil
from pathlib import Path

import util.training.process as process
from studies.data import check_outside_data, class_folders, count_images, data_summary, prepare_data
from studies.paper import STUDIES, VALUE_STUDIES, build_study, evals_per_study
from studies.plan import REPO, Plan, Setup, command, print_commands
from studies.recipes import EVALUATIONS, SCALES, with_pretrain_epochs
from studies.report import markdown_table, report_name, write_report
from studies.runner import Runner
from util.errors import TrainingStopped, UsageError
from util.flags import SEED_MAX, Parser, Range
from util.training.output_dir import check_outputs

TINY_DATA = REPO / 'tests' / 'data' / 'tiny_imagefolder'
IMAGENET_VAL_IMAGES = 50000


def get_args_parser():
    parser = Parser("Reproduce the paper's tables and figures", add_help=False)
    parser.add_argument('--study', nargs='+', default=None, metavar='NAME',
                        help='one or more of: ' + ', '.join(STUDIES) + ', or all')
    parser.add_argument('--scale', default='small', choices=['paper', 'small'],
                        help="paper: the paper's recipes (ViT-L, ImageNet), submitted to SLURM; small: a small ViT "
                             "on 32x32 images (e.g. CIFAR-10), run here (default)")
    parser.add_argument('--quick', action='store_true',
                        help='a smoke test: the tiny model, one epoch of each run, on tests/data/tiny_imagefolder '
                             'unless --data_path is given')
    parser.add_argument('--evals', nargs='+', default=None, metavar='KIND',
                        help='[new] the evaluations of each cell, the first the headline, of: '
                             + ', '.join(EVALUATIONS) + ' (knn: k-NN of the frozen class token; probe: a linear '
                             'classifier on its cached features, seconds; both at small scale only); KIND for every '
                             'study, STUDY=KIND[,KIND] for one (e.g. --evals probe knn finetune scratch=finetune). '
                             "Default: at paper scale the paper's columns (scratch: finetune; partial_ft: linprobe "
                             'for K=0, finetune for K>0; the others: finetune linprobe); at small scale the same '
                             'for scratch and partial_ft and probe knn for the others')
    parser.add_argument('--dry_run', action='store_true', help='print every command it would run, run nothing')
    parser.add_argument('--values', nargs='+', type=Range(float, 0), default=None,
                        help='the x values of a curve or sweep (' + ', '.join(VALUE_STUDIES) + ') instead of the '
                             "paper's, e.g. --values 0.25 0.5 0.75 0.9 for mask_ratio")
    parser.add_argument('--data_path', default=None,
                        help='an ImageFolder tree with train/ and the evaluation split (--val_split)')
    parser.add_argument('--val_split', default='val',
                        help="the folder evaluated on (default val; e.g. test for CIFAR's train/ and test/)")
    parser.add_argument('--train_subset', default=0, type=Range(int, 1, special=(0,), meaning='0 (all)'), metavar='N',
                        help='use N training images (class-balanced, a fixed random choice) instead of all')
    parser.add_argument('--val_subset', default=0, type=Range(int, 1, special=(0,), meaning='0 (all)'), metavar='N',
                        help='the same for the evaluation split')
    parser.add_argument('--pretrain_epochs', default=None, type=Range(int, 1), metavar='N',
                        help="pre-train for N epochs instead of the scale's (small 8, paper 800), the warm-up "
                             "keeping its share of the schedule; such runs get folders of their own (e.g. "
                             "runs/pretrain_epochs_50/), evaluations and from-scratch runs are unchanged")
    parser.add_argument('--seed', default=0, type=Range(int, 0, SEED_MAX),
                        help="[new] the --seed of every training run (default 0, the entry points'); another seed's "
                             "runs get folders of their own (runs/seed_1+...) and its reports files of their own "
                             "(e.g. mask_ratio_seed1.md), so that two seeds of a cell give its seed-to-seed spread")
    parser.add_argument('--amp', default=None, choices=['fp16', 'bf16', 'none'],
                        help="[new] the --amp of every training run (default: the entry points' own, fp16 on CUDA "
                             "and fp32 on the CPU); its runs get folders and reports of their own, as --seed's")
    parser.add_argument('--work_dir', default=None,
                        help='where the runs go (default: reproduce_output/<scale>, reproduce_output/quick)')
    parser.add_argument('--results_dir', default=None,
                        help='where the tables and plots go (default: the work dir)')
    parser.add_argument('--device', default=None,
                        help='small scale: the device of the runs (default cpu); paper scale: cuda')
    parser.add_argument('--num_workers', default=0, type=Range(int, 0, 256),
                        help='data loading workers of each run at small scale (default 0)')
    # paper scale: the submitit flags of every job
    parser.add_argument('--nodes', default=8, type=Range(int, 1), help='paper scale: nodes per job (default 8)')
    parser.add_argument('--ngpus', default=8, type=Range(int, 1), help='paper scale: GPUs per node (default 8)')
    parser.add_argument('--partition', default=None, help='paper scale: SLURM partition')
    parser.add_argument('--use_volta32', action='store_true', help='paper scale: ask for 32 GB V100s')
    parser.add_argument('--timeout', default=None, type=Range(int, 1), help='paper scale: job time limit in minutes')
    return parser


def command_line(args):
    """The flags of this invocation that differ from the defaults, for the report."""
    parser = get_args_parser()
    defaults = vars(parser.parse_args([]))
    argv = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value == defaults.get(action.dest):
            continue
        flag = action.option_strings[0]
        if value is True:
            argv.append(flag)
        else:
            argv += [flag] + ([f"{v:g}" if isinstance(v, float) else str(v) for v in value]
                              if isinstance(value, list) else [str(value)])
    return argv


def check_args(args):
    """The studies to run, each with its evaluations ({study: kinds}), once every flag is checked."""
    if not args.study:
        raise UsageError("--study is required: one or more of " + ', '.join(STUDIES) + ", or all")
    studies = list(STUDIES) if args.study == ['all'] else args.study
    for name in studies:
        if name not in STUDIES:
            raise UsageError(f"--study {name}: no such study; choose from " + ', '.join(STUDIES) + ", or all")
    if args.values is not None:
        if len(studies) != 1 or studies[0] not in VALUE_STUDIES:
            raise UsageError("--values goes with one study of: " + ', '.join(VALUE_STUDIES))
        if studies[0] == 'mask_ratio' and not all(0 < v < 1 for v in args.values):
            raise UsageError(f"--values: mask ratios are between 0 and 1, got {args.values}")
        if studies[0] != 'mask_ratio' and not all(v == int(v) for v in args.values):
            raise UsageError(f"--values: {studies[0]} takes whole numbers, got {args.values}")
        if studies[0] in ('decoder_depth', 'decoder_width') and min(args.values) < 1:
            raise UsageError(f"--values: {studies[0]} takes numbers of at least 1, got {args.values}")
    if args.quick and args.scale == 'paper':
        raise UsageError("--quick is a small smoke test; it does not go with --scale paper")
    if not args.quick and not args.data_path:
        raise UsageError("--data_path is required (an ImageFolder tree with train/ and --val_split), unless --quick")
    check_outside_data(args)  # the work and results folders are not among the images the runs read
    return evals_per_study(args.evals, studies, 'quick' if args.quick else args.scale)


def main(args):
    evals = check_args(args)  # study -> its evaluations
    invocation = command_line(args)
    scale = SCALES['quick' if args.quick else args.scale]
    if args.pretrain_epochs is not None:
        scale = with_pretrain_epochs(scale, args.pretrain_epochs)
    studies = [build_study(name, scale, args.values, kinds) for name, kinds in evals.items()]
    if args.quick and not args.data_path:
        args.data_path = str(TINY_DATA)
    work_dir = Path(args.work_dir or REPO / 'reproduce_output' / scale.name).absolute()
    results_dir = Path(args.results_dir).absolute() if args.results_dir else work_dir
    check_outputs([work_dir], '--work_dir' if args.work_dir else 'the work folder', folder=True)
    if args.results_dir:
        check_outputs([results_dir], '--results_dir', folder=True)
    if not args.dry_run:
        work_dir.mkdir(parents=True, exist_ok=True)
    if scale.name == 'paper' and not args.dry_run and not shutil.which('sbatch'):
        raise UsageError("--scale paper submits SLURM jobs and there is no `sbatch` here: --dry_run prints the "
                         "commands; --scale small runs here")
    data_path = prepare_data(args, work_dir, args.dry_run)
    train_root = Path(args.data_path) / 'train'
    if scale.name == 'paper':
        nb_classes = 1000  # ImageNet-1K
    elif train_root.is_dir():
        nb_classes = len(class_folders(train_root))
    else:
        raise UsageError(f"--data_path {args.data_path} has no 'train/' folder (its class folders give --nb_classes)")

    submitit = []
    if scale.name == 'paper':
        submitit = ['--nodes', str(args.nodes), '--ngpus', str(args.ngpus)]
        submitit += ['--partition', args.partition] if args.partition else []
        submitit += ['--use_volta32'] if args.use_volta32 else []
        submitit += ['--timeout', str(args.timeout)] if args.timeout else []
    setup = Setup(scale, data_path, nb_classes, work_dir,
                  args.device or ('cuda' if scale.name == 'paper' else 'cpu'), args.num_workers,
                  args.nodes * args.ngpus if scale.name == 'paper' else 1, submitit)
    if not args.dry_run:
        setup.data_summary = data_summary(args, data_path, nb_classes, scale)
        # (ImageNet-1K's validation images at paper scale: walking them on a cluster's file system takes minutes)
        counted = IMAGENET_VAL_IMAGES if scale.name == 'paper' else count_images(data_path, 'val')
        setup.eval_images = counted if isinstance(counted, int) and counted > 0 else None

    plan = Plan(scale, work_dir, {k: v for k, v in (('seed', args.seed), ('amp', args.amp)) if v})
    for study in studies:
        plan.add_study(study)
    for run in plan.runs.values():  # every command checked before anything runs (e.g. the batch split)
        command(run, setup)
    if args.dry_run:
        print(f"# {len(plan.runs)} runs for {', '.join(evals)} at scale {scale.name}, in {work_dir}")
        print_commands(plan, setup)
        return

    def report():
        for study in studies:
            write_report(study, plan, setup, invocation, results_dir)

    try:
        Runner(plan, setup).run_all(report)
    finally:
        report()
    for study in studies:
        print(f"{study.title}: {results_dir / (report_name(study, plan) + '.md')}")
        print(markdown_table(study, plan, setup))
    failed = [r for r in plan.runs.values() if r.status == 'failed']
    if failed:
        raise TrainingStopped(f"{len(failed)} of {len(plan.runs)} runs failed: " + '; '.join(
            f"{setup.rel(r.out)}: {r.message}" for r in failed))


if __name__ == '__main__':
    process.run_main(main, get_args_parser())
