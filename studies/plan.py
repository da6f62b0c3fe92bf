"""The runs the studies need (each once), their folders, and the command line of each.

Every cell runs through the project's entry points, as subprocesses: ``main_pretrain.py`` with the cell's flags,
then its evaluations (``main_finetune.py``, ``main_linprobe.py``, ``extract_features.py --knn`` or ``--probe``) from
the last checkpoint. A pre-training that several cells or studies need (the baseline) is one run.
"""
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from studies.recipes import EVALUATIONS, SCALES, Scale
from util.errors import UsageError
from util.training.output_dir import read_log_row

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_ENTRY_POINT, PRETRAIN_SUBMITIT_SCRIPT = 'main_pretrain.py', 'submitit_pretrain.py'


@dataclass(eq=False)  # runs are shared by identity (a pre-training several cells need)
class PlannedRun:
    """One run of an entry point that a study needs: its flags (the recipe's and the cell's), its folder, and the
    pre-training run whose last checkpoint it starts from (``source``); what became of it is set by the runner."""
    kind: str  # pretrain, or a kind of EVALUATIONS
    flags: dict
    out: Path
    source: 'PlannedRun' = None
    job_id: str = ''  # the SLURM job, once submitted (paper scale)
    status: str = 'todo'  # todo, done, ran, failed, interrupted, skipped, submitted
    message: str = ''
    seconds: float = None  # the compute it took so far, timed by the runner (None: not timed)

    @property
    def trains(self):
        """A training run (pre-training, fine-tuning, linear probing: epochs, checkpoints, log.txt), not an
        evaluation of frozen features (extract_features.py: result.json)."""
        return self.kind == 'pretrain' or not EVALUATIONS[self.kind].mode

    @property
    def epochs(self):
        return int(self.flags['epochs'])

    @property
    def final_checkpoint(self):
        return self.out / f'checkpoint-{self.epochs - 1}.pth'

    @property
    def result_file(self):
        return self.out / 'result.json'

    def describe(self):
        return f"{self.epochs} epochs" if self.trains else "features of train/ and val/"

    def result(self):
        """What extract_features.py --results wrote (written whole or not at all), or None where there is none or it
        cannot be read: not JSON of an object with its top-1 (``metric``) a number, and its image count, if any, a
        whole number (then the runner sets it aside and runs the evaluation again)."""
        try:
            result = json.loads(self.result_file.read_bytes().decode('utf-8'))
        except (OSError, ValueError):  # (UnicodeDecodeError, json.JSONDecodeError)
            return None
        if not isinstance(result, dict) or not is_number(result.get(EVALUATIONS[self.kind].metric)):
            return None
        images = result.get('val_images')
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            return None
        return result

    def rows(self):
        """The readable rows of its ``log.txt`` (not those cut short by a kill or damaged)."""
        path = self.out / 'log.txt'
        try:
            lines = path.read_bytes().split(b'\n') if path.is_file() else []
        except OSError:
            return []
        return [row for row, _ in map(read_log_row, lines) if row is not None]

    def finished(self):
        """Its log has the last epoch and its final checkpoint is written (the row comes first, so both); for an
        evaluation of frozen features, its result.json is written."""
        if not self.trains:
            return self.result() is not None
        return any(r.get('epoch') == self.epochs - 1 for r in self.rows()) and self.final_checkpoint.is_file()

    def accuracy(self):
        """(top-1 of the last epoch, best top-1) of an evaluation run, or None: with --model_ema, its average's (as
        the paper's from-scratch numbers, Appendix A.2); a frozen-feature run's: its top-1 twice."""
        if not self.trains:
            value = (self.result() or {}).get(EVALUATIONS[self.kind].metric)
            return (value, value) if value is not None else None
        key = 'test_acc1_ema' if self.flags.get('model_ema') else 'test_acc1'
        accs = [r[key] for r in self.rows() if key in r]
        if not accs or not all(map(is_number, accs)):
            return None  # (the report says "no top-1")
        return accs[-1], max(accs)

    def eval_images(self):
        """The number of images its top-1 is measured on, where the run says (result.json), else None."""
        return (self.result() or {}).get('val_images') if not self.trains else None


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def key_of(pairs):
    """A folder name for a set of flags: 'baseline' for none, else e.g. 'mask_ratio_0.5+mask_type_block'."""
    if not pairs:
        return 'baseline'
    return '+'.join(k if v is True else f"{k}_{v:g}" if isinstance(v, float) else f"{k}_{v}" for k, v in pairs)


class Plan:
    """The runs the studies need, each once (a pre-training shared by several cells or studies runs once)."""

    def __init__(self, scale, work_dir, run_flags=None):
        self.scale = scale
        # flags of every training run beyond the recipes (reproduce.py --seed, --amp), only where they are not the
        # entry points' defaults: such runs get folders of their own (e.g. runs/seed_1+.../), the others keep theirs
        self.run_flags = dict(run_flags or {})
        self.runs_dir = Path(work_dir) / 'runs'
        self.runs = {}  # folder -> PlannedRun, in the order first needed
        self.cells = []  # (name, its runs in the order they run), the cells of the studies added

    def _add(self, run):
        return self.runs.setdefault(run.out, run)

    def pretrain_run(self, pairs):
        flags = dict(self.scale.pretrain, **dict(pairs), **self._run_flags('pretrain'))
        if self.scale.pretrain != SCALES[self.scale.name].pretrain:
            # --pretrain_epochs: folders of their own, so that a longer schedule never continues a shorter one
            pairs = (('pretrain_epochs', self.scale.pretrain['epochs']),) + tuple(pairs)
        pairs = tuple(self._run_flags('pretrain').items()) + tuple(pairs)
        return self._add(PlannedRun('pretrain', flags, self.runs_dir / key_of(pairs) / 'pretrain'))

    def _run_flags(self, kind):
        """``run_flags`` for a training run; {} for an evaluation of frozen features (extract_features.py:
        deterministic given its checkpoint, in fp32; random weights are seed 0's)."""
        trains = kind == 'pretrain' or not EVALUATIONS[kind].mode
        return self.run_flags if trains else {}

    def eval_run(self, m):
        flags = dict(self.scale.recipes[m.kind], **dict(m.flags), **self._run_flags(m.kind))
        name = m.kind + ''.join(f"_last{v}" if k == 'train_blocks' else '' for k, v in m.flags)
        if m.pretrain is None:
            own = self._run_flags(m.kind)
            prefix = key_of(tuple(own.items())) + '+' if own else ''
            return self._add(PlannedRun(m.kind, flags, self.runs_dir / f"{prefix}scratch-{flags['model']}" / name))
        source = self.pretrain_run(m.pretrain)
        return self._add(PlannedRun(m.kind, flags, source.out.parent / name, source=source))

    def add_study(self, study):
        for cell in study.cells:
            runs = []
            for m in cell.measures.values():
                run = self.eval_run(m)
                runs += ([run.source] if run.source is not None else []) + [run]
            if runs:
                self.cells.append((f"{study.name}: {cell.label}", list(dict.fromkeys(runs))))

    def result(self, m):
        return self.runs[self.eval_run(m).out]

    def study_runs(self, study):
        """The runs of ``study``, each once, pre-trainings before their evaluations."""
        runs = {}
        for cell in study.cells:
            for m in cell.measures.values():
                run = self.result(m)
                if run.source is not None:
                    runs[run.source.out] = run.source
                runs[run.out] = run
        return list(runs.values())


def flag_argv(flags):
    argv = []
    for k, v in flags.items():
        if k == 'effective_batch' or v is None or v is False:
            continue
        values = v if isinstance(v, (list, tuple)) else [v]  # (a flag of several values: --opt_betas 0.9 0.95)
        argv += [f'--{k}'] if v is True else [f'--{k}'] + [f"{x:g}" if isinstance(x, float) else str(x) for x in values]
    return argv


def batch_flags(flags, world):
    """--batch_size and --accum_iter that give the recipe's effective batch on ``world`` processes."""
    per_gpu_max, effective = int(flags['batch_size']), int(flags['effective_batch'])
    if effective % world:
        raise UsageError(f"an effective batch of {effective} cannot be split over {world} GPUs (--nodes x --ngpus)")
    per_gpu = min(per_gpu_max, effective // world)
    while (effective // world) % per_gpu:  # a per-GPU batch that divides this GPU's share
        per_gpu -= 1
    return dict(flags, batch_size=per_gpu, accum_iter=effective // world // per_gpu)


@dataclass
class Setup:
    """What every run of this invocation shares: the scale, the data, where and how it runs."""
    scale: Scale
    data_path: Path
    nb_classes: int
    work_dir: Path
    device: str
    num_workers: int
    world: int  # processes of a job (paper scale: --nodes x --ngpus)
    submitit: list  # the submitit flags (paper scale)
    data_summary: str = ''
    eval_images: int = None  # the evaluation split's images (the standard errors), when known

    def rel(self, path):
        return os.path.relpath(path, self.work_dir)


def recipe_argv(kind, setup):
    """The flags every run of ``kind`` starts from (the reports' recipes)."""
    recipe = setup.scale.recipes[kind]
    if kind != 'pretrain' and EVALUATIONS[kind].mode:
        return [EVALUATIONS[kind].mode] + flag_argv(recipe)
    return flag_argv(batch_flags(recipe, setup.world))


def frozen_command(run, setup):
    """``extract_features.py --knn`` / ``--probe`` on the data's train/ and val/, of the final checkpoint of its
    pre-training (or random weights), writing ``result.json``."""
    source = ['--checkpoint', str(run.source.final_checkpoint)] if run.source is not None else ['--random_init']
    return [sys.executable, EVALUATIONS[run.kind].entry_point, EVALUATIONS[run.kind].mode, str(setup.data_path),
            *source, *flag_argv(run.flags), '--results', str(run.result_file), '--device', setup.device,
            '--num_workers', str(setup.num_workers)]


def command(run, setup):
    """The command line of ``run``: the entry point locally, its submitit script at paper scale."""
    if not run.trains:
        return frozen_command(run, setup)
    flags = batch_flags(run.flags, setup.world)
    if run.kind != 'pretrain':
        flags['nb_classes'] = setup.nb_classes
        # one kept checkpoint at the end instead of one per epoch (the entry points' default): a study has dozens
        # of evaluations; checkpoint-last.pth is still written every epoch for resuming
        flags['save_freq'] = run.epochs
        if run.source is not None:
            flags['finetune'] = str(run.source.final_checkpoint)
    argv = flag_argv(flags) + ['--data_path', str(setup.data_path)]
    if setup.scale.name == 'paper':
        dependency = []
        if run.source is not None and run.source.job_id:
            dependency = ['--dependency', f'afterok:{run.source.job_id}']
        script = PRETRAIN_SUBMITIT_SCRIPT if run.kind == 'pretrain' else EVALUATIONS[run.kind].submitit_script
        return [sys.executable, script, '--job_dir', str(run.out), *setup.submitit, *dependency, *argv]
    entry_point = PRETRAIN_ENTRY_POINT if run.kind == 'pretrain' else EVALUATIONS[run.kind].entry_point
    return [sys.executable, entry_point, *argv, '--output_dir', str(run.out), '--log_dir', str(run.out), '--device',
            setup.device, '--num_workers', str(setup.num_workers)]


def shown(cmd):
    """A command as one would type it (``python`` for this interpreter, paths relative to the repo)."""
    parts = ['python'] + [os.path.relpath(p, REPO) if os.path.isabs(p) and p.startswith(str(REPO) + os.sep) else p
                          for p in cmd[1:]]
    return shlex.join(parts)


def print_commands(plan, setup):
    """--dry_run: the command of every run not finished yet."""
    for run in plan.runs.values():
        if run.finished():
            print(f"# done: {run.out}")
            continue
        cmd = command(run, setup)
        if setup.scale.name == 'paper' and run.source is not None and not run.source.finished():
            cmd += ['--dependency', f'afterok:<job of {setup.rel(run.source.out)}>']
        print(shown(cmd))
