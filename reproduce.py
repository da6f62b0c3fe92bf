"""Reproduce the paper's ablations and comparisons with one command: ``python reproduce.py --study mask_ratio ...``.

Each study is a table or figure of the paper (Figure 5, Tables 1a/1b/1d/1f, Figure 9, Table 3). Every cell of it
runs through the project's own entry points, as subprocesses: ``main_pretrain.py`` with the cell's flags, then
``main_finetune.py`` and/or ``main_linprobe.py`` from its last checkpoint. The final top-1 of each evaluation is read
from its ``log.txt`` and written, beside the paper's number, to ``<study>.md`` (and ``<study>.png`` for the curves).

Scales:
- ``--scale paper``: the paper's recipes (ViT-L, 800 epochs of pre-training at an effective batch of 4096; the
  fine-tuning and linear-probing recipes of FINETUNE.md), each run submitted as a SLURM job through
  ``submitit_*.py``; an evaluation job waits for its pre-training job (``--dependency afterok:<job>``).
- ``--scale small``: a small ViT (``mae_vit_small_patch4``) on 32x32 images, run here one after the other, with
  short schedules for a CPU or one GPU (``SMALL`` below says which and why); ``--pretrain_epochs`` lengthens the
  pre-training where there is more compute.
- ``--quick``: the tiny model on a tiny data set, one epoch each: a smoke test of the whole pipeline.

Cells are shared: a pre-training that several cells or studies need (the baseline) runs once. A run whose
``log.txt`` has its last epoch and whose final checkpoint exists is done and is not run again; an interrupted run
continues where it stopped (the entry points' auto-resume), so the same command picks a study up again.
"""
import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import util.misc as misc
from util.misc import RunInterrupted, TrainingStopped, UsageError

REPO = Path(__file__).resolve().parent
TINY_DATA = REPO / 'tests' / 'data' / 'tiny_imagefolder'

# ---------------------------------------------------------------------------------------------------- recipes
# A recipe is the flags an entry point gets, before a cell's own. 'effective_batch' is not a flag: it is split into
# --batch_size (at most the 'batch_size' given, per GPU) and --accum_iter for the number of GPUs of the job.

# The paper's ViT-L pre-training (PRETRAIN.md; Section 4 and Appendix A.1: 800 epochs for the ablations of Table 1
# and Figure 5, base lr 1.5e-4, batch 4096, 40 warm-up epochs, weight decay 0.05). Table 1's default target is the
# unnormalised pixels ("pixel (w/o norm)", 84.9 / 73.5, marked as the default); --norm_pix_loss is Table 1d's
# other row and the recipe of the released models (Table 3).
PAPER_PRETRAIN = dict(model='mae_vit_large_patch16', input_size=224, mask_ratio=0.75, epochs=800, warmup_epochs=40,
                      blr=1.5e-4, weight_decay=0.05, batch_size=64, effective_batch=4096)
# FINETUNE.md, ViT-L: 50 epochs, base lr 1e-3, layer decay 0.75, drop path 0.2, RandAugment, random erasing 0.25,
# Mixup 0.8 / CutMix 1.0, batch 1024
PAPER_FINETUNE = dict(model='vit_large_patch16', input_size=224, epochs=50, warmup_epochs=5, blr=1e-3,
                      layer_decay=0.75, weight_decay=0.05, drop_path=0.2, reprob=0.25, mixup=0.8, cutmix=1.0,
                      dist_eval=True, batch_size=32, effective_batch=1024)
# FINETUNE.md, ViT-B: 100 epochs, base lr 5e-4, layer decay 0.65, drop path 0.1 (Table 3's ViT-B row)
PAPER_FINETUNE_BASE = dict(PAPER_FINETUNE, model='vit_base_patch16', epochs=100, blr=5e-4, layer_decay=0.65,
                           drop_path=0.1)
# FINETUNE.md, linear probing of ViT-L: class token, LARS, base lr 0.1, no weight decay, 50 epochs, batch 16384
PAPER_LINPROBE = dict(model='vit_large_patch16', input_size=224, cls_token=True, epochs=50, warmup_epochs=10,
                      blr=0.1, weight_decay=0.0, dist_eval=True, batch_size=512, effective_batch=16384)

# Small scale: CIFAR-like data (32x32, 10 classes) on a CPU of 2 cores or one GPU. The model is ViT-S-like at
# patch 4 (an 8x8 grid, as 14x14 at 224/16) with a 128-d decoder of 4 blocks (the paper's 512-d / 8 blocks scaled
# with the encoder). The schedules are what a shared 2-core CPU runs in about an hour for a study of 4-5 cells on
# 5,000 training images (an epoch: about 30 s of pre-training at 75% masking, 50 s of fine-tuning, 40 s of linear
# probing): far from the paper's 800 epochs, so the numbers are those of an early MAE, and the base lr of
# pre-training is raised accordingly (1.5e-3, as the Quick start's tiny run). Fine-tuning keeps the paper's recipe
# (layer decay, RandAugment, label smoothing, drop path) but not Mixup/CutMix and random erasing, regularisers that
# need long schedules and cost several points in a few epochs. Linear probing keeps the paper's absolute lr (6.4:
# base lr 0.1 at batch 16384) instead of scaling it down with the batch: LARS changes each weight matrix by about
# lr x 0.001 of its norm per step, so the scaled-down lr (0.05) over the ~200 steps here would leave the head where it
# was initialised (the paper's probe takes ~7,000 steps at 6.4).
SMALL_PRETRAIN = dict(model='mae_vit_small_patch4', input_size=32, mask_ratio=0.75, epochs=8, warmup_epochs=1,
                      blr=1.5e-3, weight_decay=0.05, batch_size=128, effective_batch=128)
SMALL_FINETUNE = dict(model='vit_small_patch4', input_size=32, epochs=5, warmup_epochs=1, blr=1e-3,
                      layer_decay=0.75, weight_decay=0.05, drop_path=0.1, reprob=0.0, mixup=0.0, cutmix=0.0,
                      batch_size=128, effective_batch=128)
SMALL_LINPROBE = dict(model='vit_small_patch4', input_size=32, cls_token=True, epochs=5, warmup_epochs=1, lr=6.4,
                      weight_decay=0.0, batch_size=128, effective_batch=128)

# --quick: the tiny model on tests/data/tiny_imagefolder (16 training images), one epoch of each
QUICK_PRETRAIN = dict(SMALL_PRETRAIN, model='mae_vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4,
                      effective_batch=4)
QUICK_FINETUNE = dict(SMALL_FINETUNE, model='vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4,
                      effective_batch=4)
QUICK_LINPROBE = dict(SMALL_LINPROBE, model='vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4,
                      effective_batch=4)


@dataclass(frozen=True)
class Scale:
    name: str
    pretrain: dict
    finetune: dict
    linprobe: dict
    depth: int  # encoder blocks (partial fine-tuning's K)
    decoder_depth: int  # the model's own decoder (the baseline's)
    decoder_embed_dim: int  # (Table 1b's widths are scaled by it / 512)
    model_label: str


SCALES = {
    'paper': Scale('paper', PAPER_PRETRAIN, PAPER_FINETUNE, PAPER_LINPROBE, 24, 8, 512, 'ViT-L/16'),
    'small': Scale('small', SMALL_PRETRAIN, SMALL_FINETUNE, SMALL_LINPROBE, 6, 4, 128,
                   'ViT-S/4 (192-d, 6 blocks; decoder 128-d, 4 blocks)'),
    'quick': Scale('quick', QUICK_PRETRAIN, QUICK_FINETUNE, QUICK_LINPROBE, 2, 2, 32,
                   'ViT-tiny/4 (64-d, 2 blocks; decoder 32-d, 2 blocks)'),
}

# ---------------------------------------------------------------------------------------------------- studies
# The paper's numbers (ImageNet-1K top-1, ViT-L/16 unless said). Values read off a figure are approximate and
# marked so; the tables' are exact.
APPROX = 'approx'


@dataclass(frozen=True)
class Measure:
    """One number of a table: an evaluation (``kind``: finetune or linprobe, with ``flags`` on top of the recipe) of
    the encoder pre-trained with ``pretrain`` (flags on top of the recipe), or of a randomly initialised one when
    ``pretrain`` is None (training from scratch)."""
    kind: str
    pretrain: tuple = ()  # sorted (flag, value) pairs; None: from scratch
    flags: tuple = ()  # sorted (flag, value) pairs


def measure(kind, pretrain=None, scratch=False, **flags):
    return Measure(kind, None if scratch else tuple(sorted((pretrain or {}).items())), tuple(sorted(flags.items())))


@dataclass
class Cell:
    """A row of a study's table: its label, what is measured in each column, and the paper's numbers."""
    label: str
    measures: dict  # column -> Measure (missing: not measured here)
    paper: dict  # column -> number, or (number, APPROX)


@dataclass
class Study:
    name: str
    title: str
    columns: list  # (column key, header)
    cells: list
    row_header: str
    curve: dict = None  # for the plotted studies: {'x': label of the x axis, 'values': x of each cell}
    note: str = ''


FT_LIN = [('finetune', 'fine-tuning'), ('linprobe', 'linear probing')]

# Figure 5 (ViT-L, 800 epochs): only the 75% points are exact (Table 1's baseline, 84.9 / 73.5); the others are
# read off the figure's curves and may be off by about half a point (fine-tuning) or a point (linear probing)
FIGURE5 = {0.1: (83.0, 54.6), 0.2: (83.3, 58.9), 0.3: (83.7, 63.6), 0.4: (84.2, 66.5), 0.5: (84.5, 69.9),
           0.6: (84.7, 71.8), 0.7: (84.9, 73.0), 0.75: (84.9, 73.5), 0.8: (84.7, 71.8), 0.9: (84.4, 66.1)}
TABLE1A = {1: (84.8, 65.5), 2: (84.9, 70.0), 4: (84.9, 71.9), 8: (84.9, 73.5)}
TABLE1B = {128: (84.9, 69.1), 256: (84.8, 71.3), 512: (84.9, 73.5), 768: (84.4, 73.1), 1024: (84.3, 73.1)}
TABLE1D = [('pixel (w/o norm)', {}, (84.9, 73.5)), ('pixel (w/ norm)', {'norm_pix_loss': True}, (85.4, 73.9)),
           ('PCA', None, (84.6, 72.3)), ('dVAE token', None, (85.3, 71.6))]
TABLE1F = [('random', 0.75, (84.9, 73.5)), ('block', 0.5, (83.9, 72.3)), ('block', 0.75, (82.8, 63.9)),
           ('grid', 0.75, (84.0, 66.0))]
# Figure 9, MAE ViT-L: top-1 with the last K blocks fine-tuned (K=0: the linear probe)
FIGURE9 = {0: 73.5, 1: 81.0, 2: 83.1, 4: 84.2, 6: 84.4, 12: 84.6, 18: 84.7, 24: 84.9}
# Table 3: from scratch (the paper's own from-scratch recipe, Appendix A.2) vs MAE (1600 epochs, normalised pixels)
TABLE3 = {'ViT-B/16': (82.3, 83.6), 'ViT-L/16': (82.6, 85.9)}

STUDIES = ('mask_ratio', 'decoder_depth', 'decoder_width', 'target', 'mask_sampling', 'partial_ft', 'scratch')
VALUE_STUDIES = ('mask_ratio', 'decoder_depth', 'decoder_width', 'partial_ft')  # the ones --values applies to


def default_mark(label, is_default):
    return f"{label} (default)" if is_default else label


def paper_pair(pair, approx=False):
    ft, lin = pair
    return {'finetune': (ft, APPROX) if approx else ft, 'linprobe': (lin, APPROX) if approx else lin}


def build_study(name, scale, values=None):
    """The cells of study ``name`` at ``scale`` (a ``Scale``); ``values`` replaces the study's x values."""
    base = scale.pretrain
    if name == 'mask_ratio':
        xs = values or sorted(FIGURE5)
        cells = [Cell(default_mark(f"{x:g}", x == base['mask_ratio']),
                      {c: measure(c, {} if x == base['mask_ratio'] else {'mask_ratio': x}) for c, _ in FT_LIN},
                      paper_pair(FIGURE5[x], approx=x != 0.75) if x in FIGURE5 else {}) for x in xs]
        return Study(name, "Masking ratio (paper: Figure 5)", FT_LIN, cells, 'mask ratio',
                     curve={'x': 'masking ratio', 'values': list(xs)},
                     note="The paper's values other than 75% are read off Figure 5 (approximate).")
    if name == 'decoder_depth':
        xs = [int(x) for x in values] if values else sorted(TABLE1A)
        cells = [Cell(default_mark(str(x), x == scale.decoder_depth),
                      {c: measure(c, {} if x == scale.decoder_depth else {'decoder_depth': x}) for c, _ in FT_LIN},
                      paper_pair(TABLE1A[x]) if x in TABLE1A else {}) for x in xs]
        return Study(name, "Decoder depth (paper: Table 1a)", FT_LIN, cells, 'decoder blocks')
    if name == 'decoder_width':
        # the paper's widths with its 512-d decoder; at other scales the same fractions of the model's own decoder
        factor = scale.decoder_embed_dim / 512
        xs = [int(x) for x in values] if values else [int(w * factor) for w in sorted(TABLE1B)]
        cells = []
        for x in xs:
            paper_width = x / factor
            label = str(x) if factor == 1 else f"{x} (paper's {paper_width:g})"
            flags = {} if x == scale.decoder_embed_dim else {'decoder_embed_dim': x}
            cells.append(Cell(default_mark(label, not flags), {c: measure(c, flags) for c, _ in FT_LIN},
                              paper_pair(TABLE1B[paper_width]) if paper_width in TABLE1B else {}))
        return Study(name, "Decoder width (paper: Table 1b)", FT_LIN, cells, 'decoder width',
                     note=f"Widths scale with the model's own decoder ({scale.decoder_embed_dim}-d, the paper's "
                          f"512-d); the attention heads keep their width, so wider decoders have more heads.")
    if name == 'target':
        cells = [Cell(default_mark(label, flags == {}),
                      {} if flags is None else {c: measure(c, flags) for c, _ in FT_LIN}, paper_pair(pair))
                 for label, flags, pair in TABLE1D]
        return Study(name, "Reconstruction target (paper: Table 1d)", FT_LIN, cells, 'target',
                     note="PCA and dVAE-token targets are not implemented here (the paper's rows are shown for "
                          "reference).")
    if name == 'mask_sampling':
        cells = []
        for kind, ratio, pair in TABLE1F:
            flags = {} if kind == 'random' else {'mask_type': kind}
            if ratio != base['mask_ratio']:
                flags['mask_ratio'] = ratio
            cells.append(Cell(default_mark(f"{kind} {ratio:.0%}", not flags),
                              {c: measure(c, flags) for c, _ in FT_LIN}, paper_pair(pair)))
        return Study(name, "Mask sampling (paper: Table 1f)", FT_LIN, cells, 'sampling (ratio)')
    if name == 'partial_ft':
        ks = [int(k) for k in values] if values else (sorted(FIGURE9) if scale.name == 'paper'
                                                       else sorted({0, 1, 2, 4, scale.depth} & set(
                                                           range(scale.depth + 1))))
        for k in ks:
            if not 0 <= k <= scale.depth:
                raise UsageError(f"--values {k}: partial fine-tuning trains the last 0..{scale.depth} blocks of "
                                 f"{scale.model_label}")
        cells = []
        for k in ks:
            if k == 0:  # the paper's 0-block point is the linear probe
                m = measure('linprobe')
            elif k == scale.depth:  # all blocks: end-to-end fine-tuning
                m = measure('finetune')
            else:
                m = measure('finetune', train_blocks=k)
            paper = FIGURE9.get(k) if scale.name == 'paper' else None
            cells.append(Cell(f"{k}" + (' (linear probe)' if k == 0 else ' (all)' if k == scale.depth else ''),
                              {'top1': m}, {'top1': paper} if paper is not None else {}))
        note = "K=0 is the linear probe; K=all is end-to-end fine-tuning (the same run as the other studies')."
        if scale.name != 'paper':
            note += (f" The paper's curve is for the 24 blocks of ViT-L (K = 0/1/2/4/6/12/18/24: "
                     f"{' / '.join(str(v) for v in FIGURE9.values())}); our model has {scale.depth}.")
        return Study(name, "Partial fine-tuning (paper: Figure 9)", [('top1', 'top-1')], cells,
                     'blocks fine-tuned (K)', curve={'x': 'blocks fine-tuned', 'values': ks}, note=note)
    if name == 'scratch':
        columns = [('scratch', 'from scratch'), ('mae', 'fine-tuned from MAE')]
        if scale.name == 'paper':
            # Table 3's MAE: 1600 epochs with normalised pixels
            table3 = {'norm_pix_loss': True, 'epochs': 1600}
            rows = [('ViT-B/16', dict(table3, model='mae_vit_base_patch16'), PAPER_FINETUNE_BASE),
                    ('ViT-L/16', table3, {})]
            cells = [Cell(label, {'scratch': measure('finetune', scratch=True, **ft),
                                  'mae': measure('finetune', pt, **ft)},
                          {'scratch': TABLE3[label][0], 'mae': TABLE3[label][1]}) for label, pt, ft in rows]
            note = ("Both columns use the fine-tuning recipe of FINETUNE.md; the paper's from-scratch numbers come "
                    "from its own from-scratch recipe (Appendix A.2: 300/200 epochs, weight decay 0.3, EMA), "
                    "which this recipe does not match, so expect ours from scratch to be lower.")
        else:
            cells = [Cell(scale.model_label, {'scratch': measure('finetune', scratch=True),
                                              'mae': measure('finetune')}, {})]
            note = (f"The same ViT and fine-tuning recipe, from random weights or from the baseline MAE. The paper's "
                    f"Table 3: ViT-B/16 {TABLE3['ViT-B/16'][0]} vs {TABLE3['ViT-B/16'][1]}, ViT-L/16 "
                    f"{TABLE3['ViT-L/16'][0]} vs {TABLE3['ViT-L/16'][1]} (from its own from-scratch recipe vs MAE "
                    f"after 1600 epochs).")
        return Study(name, "Training from scratch vs MAE (paper: Table 3)", columns, cells, 'model', note=note)
    raise UsageError(f"unknown study {name}")


# ---------------------------------------------------------------------------------------------------- runs
ENTRY_POINT = {'pretrain': 'main_pretrain.py', 'finetune': 'main_finetune.py', 'linprobe': 'main_linprobe.py'}
SUBMITIT_SCRIPT = {'pretrain': 'submitit_pretrain.py', 'finetune': 'submitit_finetune.py',
                   'linprobe': 'submitit_linprobe.py'}


@dataclass(eq=False)  # runs are shared by identity (a pre-training several cells need)
class Run:
    """One run of an entry point: its flags (the recipe's and the cell's), its folder, and the pre-training run
    whose last checkpoint it starts from (``source``)."""
    kind: str  # pretrain, finetune, linprobe
    flags: dict
    out: Path
    source: 'Run' = None
    job_id: str = ''  # the SLURM job, once submitted (paper scale)
    status: str = 'todo'  # todo, done, ran, failed, interrupted, skipped, submitted
    message: str = ''

    @property
    def epochs(self):
        return int(self.flags['epochs'])

    @property
    def final_checkpoint(self):
        return self.out / f'checkpoint-{self.epochs - 1}.pth'

    def rows(self):
        path = self.out / 'log.txt'
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding='utf-8').splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a kill
                pass
        return rows

    def finished(self):
        """Its log has the last epoch and its final checkpoint is written (the row comes first, so both)."""
        return any(r.get('epoch') == self.epochs - 1 for r in self.rows()) and self.final_checkpoint.is_file()

    def accuracy(self):
        """(top-1 of the last epoch, best top-1) of an evaluation run, or None."""
        accs = [r['test_acc1'] for r in self.rows() if 'test_acc1' in r]
        return (accs[-1], max(accs)) if accs else None


def key_of(pairs):
    """A folder name for a set of flags: 'baseline' for none, else e.g. 'mask_ratio_0.5+mask_type_block'."""
    if not pairs:
        return 'baseline'
    return '+'.join(k if v is True else f"{k}_{v:g}" if isinstance(v, float) else f"{k}_{v}" for k, v in pairs)


class Plan:
    """The runs the studies need, each once (a pre-training shared by several cells or studies runs once)."""

    def __init__(self, scale, work_dir):
        self.scale = scale
        self.runs_dir = Path(work_dir) / 'runs'
        self.runs = {}  # folder -> Run, in the order first needed

    def _add(self, run):
        return self.runs.setdefault(run.out, run)

    def pretrain_run(self, pairs):
        flags = dict(self.scale.pretrain, **dict(pairs))
        if self.scale.pretrain != SCALES[self.scale.name].pretrain:
            # --pretrain_epochs: folders of their own, so that a longer schedule never continues a shorter one
            pairs = (('pretrain_epochs', self.scale.pretrain['epochs']),) + tuple(pairs)
        return self._add(Run('pretrain', flags, self.runs_dir / key_of(pairs) / 'pretrain'))

    def eval_run(self, m):
        recipe = self.scale.finetune if m.kind == 'finetune' else self.scale.linprobe
        flags = dict(recipe, **dict(m.flags))
        name = m.kind + ''.join(f"_last{v}" if k == 'train_blocks' else '' for k, v in m.flags)
        if m.pretrain is None:
            return self._add(Run(m.kind, flags, self.runs_dir / f"scratch-{flags['model']}" / name))
        source = self.pretrain_run(m.pretrain)
        return self._add(Run(m.kind, flags, source.out.parent / name, source=source))

    def add_study(self, study):
        for cell in study.cells:
            for m in cell.measures.values():
                self.eval_run(m)

    def result(self, m):
        return self.runs[self.eval_run(m).out]


# ---------------------------------------------------------------------------------------------------- commands
def flag_argv(flags):
    argv = []
    for k, v in flags.items():
        if k == 'effective_batch' or v is None or v is False:
            continue
        argv += [f'--{k}'] if v is True else [f'--{k}', f"{v:g}" if isinstance(v, float) else str(v)]
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


def command(run, setup):
    """The command line of ``run``: the entry point locally, its submitit script at paper scale."""
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
        return [sys.executable, SUBMITIT_SCRIPT[run.kind], '--job_dir', str(run.out), *setup.submitit,
                *dependency, *argv]
    return [sys.executable, ENTRY_POINT[run.kind], *argv, '--output_dir', str(run.out), '--log_dir',
            str(run.out), '--device', setup.device, '--num_workers', str(setup.num_workers)]


def shown(cmd):
    """A command as one would type it (``python`` for this interpreter, paths relative to the repo)."""
    parts = ['python'] + [os.path.relpath(p, REPO) if os.path.isabs(p) and p.startswith(str(REPO) + os.sep) else p
                          for p in cmd[1:]]
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------------- data
def class_folders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def prepare_data(args, work_dir, dry_run):
    """The ``--data_path`` the entry points get: the given one when it has train/ and val/ as they are, else a folder
    in the work dir of links to it: ``val`` -> the ``--val_split`` folder (e.g. CIFAR's test/), and with
    ``--train_subset``/``--val_subset`` a class-balanced random subset of links to the images (seed 0)."""
    src = Path(args.data_path).absolute()
    for split in ('train', args.val_split):
        if not (src / split).is_dir():
            message = f"--data_path {args.data_path} has no '{split}/' folder (expected {src / split}/<class>/<image>)"
            if not dry_run:
                raise UsageError(message)
            print(f"# note: {message}; the runs would stop on it")
    if args.val_split == 'val' and not args.train_subset and not args.val_subset:
        return src
    data = work_dir / 'data'
    spec = {'data_path': str(src), 'val_split': args.val_split, 'train_subset': args.train_subset,
            'val_subset': args.val_subset}
    spec_file = data / 'SOURCE.json'
    if spec_file.is_file():
        made = json.loads(spec_file.read_text())
        if made != spec:
            raise UsageError(f"{work_dir} was made from other data ({made}); its runs would mix the two: pass "
                             f"another --work_dir")
        return data
    if dry_run:
        print(f"# would make {data}: links to {src} (train/ -> train/{' subset' if args.train_subset else ''}, "
              f"val/ -> {args.val_split}/{' subset' if args.val_subset else ''})")
        return data
    tmp = work_dir / '.data.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, target, subset in (('train', 'train', args.train_subset), ('val', args.val_split, args.val_subset)):
        if not subset:
            os.symlink(src / target, tmp / split)
            continue
        classes = class_folders(src / target)
        rng = random.Random(0)
        for i, cls in enumerate(classes):
            files = sorted(e.name for e in os.scandir(src / target / cls) if e.is_file())
            n = subset // len(classes) + (i < subset % len(classes))
            (tmp / split / cls).mkdir(parents=True)
            for name in sorted(rng.sample(files, min(n, len(files)))):
                os.symlink(src / target / cls / name, tmp / split / cls / name)
    (tmp / 'SOURCE.json').write_text(json.dumps(spec) + '\n')
    os.replace(tmp, data)
    return data


# ---------------------------------------------------------------------------------------------------- progress
def relative_cost(run):
    """A run's cost in units of one epoch of baseline pre-training, for the estimate of the time left: the encoder
    sees (1 - mask_ratio) of the patches (and attention is quadratic in them); fine-tuning sees them all (with the
    backward pass); linear probing runs the frozen encoder forward only. Rough, but only ratios matter."""
    if run.kind == 'pretrain':
        visible = 1 - float(run.flags.get('mask_ratio', 0.75))
        return run.epochs * (0.5 + 3 * visible ** 2) / (0.5 + 3 * 0.25 ** 2)
    return run.epochs * (1.6 if run.kind == 'finetune' else 0.6)


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """Elapsed time and an estimate of the time left: the runs left, at the speed measured so far for runs of their
    kind (or of any kind, for a kind not run yet)."""

    def __init__(self, todo):
        self.start = time.time()
        self.left = list(todo)
        self.done = {}  # kind -> [cost, seconds]

    def skipped(self, run):
        self.left.remove(run)

    def finished(self, run, took):
        self.left.remove(run)
        done = self.done.setdefault(run.kind, [0.0, 0.0])
        done[0] += relative_cost(run)
        done[1] += took

    def line(self):
        elapsed = f"elapsed {fmt_time(time.time() - self.start)}"
        if not self.done:
            return elapsed
        overall = sum(t for _, t in self.done.values()) / sum(c for c, _ in self.done.values())
        left = 0.0
        for run in self.left:
            cost, took = self.done.get(run.kind, (0.0, 0.0))
            left += relative_cost(run) * (took / cost if cost else overall)
        return f"{elapsed}, about {fmt_time(left)} left"


# ---------------------------------------------------------------------------------------------------- running
class Runner:
    """Runs (or submits) the plan's runs in order, skipping the finished ones."""

    def __init__(self, plan, setup, cells):
        self.plan, self.setup, self.cells = plan, setup, cells
        self.timings_file = setup.work_dir / 'timings.json'
        self.jobs_file = setup.work_dir / 'jobs.json'
        self.timings = self._read(self.timings_file)
        self.jobs = self._read(self.jobs_file)
        self.child = None
        self.stop_signal = None

    @staticmethod
    def _read(path):
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write(self, path, data):
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')
        os.replace(tmp, path)

    def _rel(self, path):
        return os.path.relpath(path, self.setup.work_dir)

    def _on_signal(self, signum, frame):
        # the child runs in its own session (a Ctrl-C reaches only us): ask it to save and stop, as SLURM would
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run_all(self, on_progress):
        runs = list(self.plan.runs.values())
        todo = [r for r in runs if not r.finished()]
        for r in runs:
            if r not in todo:
                r.status = 'done'
        progress = Progress(todo)
        print(f"{len(runs)} runs in {len(self.cells)} cells: {len(runs) - len(todo)} done before, {len(todo)} to "
              f"{'submit' if self.setup.scale.name == 'paper' else 'run'}")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run_cells(progress, on_progress)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_cells(self, progress, on_progress):
        for i, (cell_name, cell_runs) in enumerate(self.cells, 1):
            for run in cell_runs:
                if run.status != 'todo':
                    continue
                where = f"[cell {i}/{len(self.cells)} {cell_name}] {run.kind} {self._rel(run.out)}"
                if run.source is not None and run.source.status in ('failed', 'skipped'):
                    run.status, run.message = 'skipped', 'its pre-training failed'
                    progress.skipped(run)
                    print(f"{where}: skipped, its pre-training failed")
                    continue
                if self.setup.scale.name == 'paper':
                    self._submit(run, where)
                    continue
                if self.stop_signal:  # it came between two runs
                    raise RunInterrupted(f"signal {self.stop_signal} received before {self._rel(run.out)} started; "
                                         f"the same command continues")
                print(f"{where}: running ({run.epochs} epochs; {progress.line()})", flush=True)
                took = self._run_local(run)
                if self.stop_signal:
                    raise RunInterrupted(f"signal {self.stop_signal} received: {self._rel(run.out)} {run.message}; "
                                         f"the same command continues")
                progress.finished(run, took)
                if run.status == 'failed':
                    print(f"{where}: FAILED after {fmt_time(took)}: {run.message} (see "
                          f"{run.out / 'console.txt'})")
                else:
                    acc = run.accuracy()
                    print(f"{where}: done in {fmt_time(took)}" + (f", top-1 {acc[0]:.2f}" if acc else '')
                          + f"; {progress.line()}", flush=True)
                on_progress()

    def _run_local(self, run):
        run.out.mkdir(parents=True, exist_ok=True)
        cmd = command(run, self.setup)
        before = checkpoints(run.out)
        start = time.time()
        with open(run.out / 'console.txt', 'a', encoding='utf-8') as console:
            console.write(f"\n$ {shown(cmd)}\n")
            console.flush()
            self.child = subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT,
                                          env=dict(os.environ, PYTHONUNBUFFERED='1'), start_new_session=True)
            code = self.child.wait()
            self.child = None
        took = time.time() - start
        key = self._rel(run.out)
        self.timings[key] = self.timings.get(key, 0.0) + took
        self._write(self.timings_file, self.timings)
        if code == 0 and run.finished():
            run.status = 'ran'
        elif self.stop_signal:
            # the entry point saves where it is when asked to stop, unless it had not started training yet
            run.status = 'interrupted'
            if checkpoints(run.out) != before:
                run.message = 'saved where it was'
            elif before:
                run.message = 'saved nothing new (it continues from its last checkpoint)'
            else:
                run.message = 'had nothing saved yet (stopped before its first checkpoint)'
        else:
            run.status, run.message = 'failed', last_message(run.out / 'console.txt', code)
        return took

    def _submit(self, run, where):
        key = self._rel(run.out)
        pending = self.jobs.get(key)
        if pending and slurm_job_alive(pending):
            run.job_id, run.status = pending, 'submitted'
            print(f"{where}: job {pending} is still queued or running; not submitted again")
            return
        run.out.mkdir(parents=True, exist_ok=True)
        cmd = command(run, self.setup)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            run.status = 'failed'
            run.message = (result.stderr.strip().splitlines() or ['no job id printed'])[-1]
            print(f"{where}: NOT submitted: {run.message}")
            return
        run.job_id, run.status = lines[-1].strip(), 'submitted'
        self.jobs[key] = run.job_id
        self._write(self.jobs_file, self.jobs)
        after = f" after job {run.source.job_id}" if run.source is not None and run.source.job_id else ''
        print(f"{where}: submitted as job {run.job_id}{after}")


def checkpoints(folder):
    """The checkpoints in ``folder`` as they are now (name, size and time of each), to tell whether a run wrote one."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob('checkpoint-*.pth')}


def last_message(console, code):
    """The one-line error an entry point printed last (or the last line of its output)."""
    try:
        lines = [line for line in console.read_text(encoding='utf-8').splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith(('error: ', 'stopped: ')):
            return line
    return f"exit code {code}: {lines[-1] if lines else 'no output'}"


def slurm_job_alive(job_id):
    try:
        out = subprocess.run(['squeue', '-h', '-j', str(job_id), '-o', '%T'], capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


# ---------------------------------------------------------------------------------------------------- reporting
def cell_value(run):
    """What a table shows for a run: its final top-1, or its state."""
    acc = run.accuracy() if run.finished() else None
    if acc:
        return f"{acc[0]:.1f}"
    if run.status in ('failed', 'interrupted'):
        return run.status
    if run.status == 'skipped':
        return 'skipped'
    if run.status == 'submitted':
        return f"job {run.job_id}"
    return 'not run'


def paper_value(value):
    if value is None:
        return '—'
    if isinstance(value, tuple):
        return f"≈ {value[0]:.1f}"
    return f"{value:.1f}"


def markdown_table(study, plan):
    header = [study.row_header]
    for key, title in study.columns:
        header += [f"{title} (ours)", f"{title} (paper)"]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' + ':---:|' * (len(header) - 1)]
    for cell in study.cells:
        row = [cell.label]
        for key, _ in study.columns:
            m = cell.measures.get(key)
            row += [cell_value(plan.result(m)) if m else '—', paper_value(cell.paper.get(key))]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def study_runs(study, plan):
    runs = {}
    for cell in study.cells:
        for m in cell.measures.values():
            run = plan.result(m)
            if run.source is not None:
                runs[run.source.out] = run.source
            runs[run.out] = run
    return list(runs.values())


def describe_recipe(recipe, setup):
    return ' '.join(flag_argv(batch_flags(recipe, setup.world)))


def environment():
    versions = []
    for pkg in ('torch', 'torchvision', 'timm', 'numpy', 'Pillow'):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return (f"Python {platform.python_version()}, {', '.join(versions)}; {platform.system()} {platform.release()}, "
            f"{cpu}, {os.cpu_count()} logical CPUs")


def write_report(study, plan, setup, argv, results_dir):
    """``<study>.md`` (the table with the paper's numbers, how it was made) and ``<study>.json``; ``<study>.png``
    for the curves."""
    runs = study_runs(study, plan)
    timings = json.loads((setup.work_dir / 'timings.json').read_text()) if (
        setup.work_dir / 'timings.json').is_file() else {}
    compute = [timings.get(os.path.relpath(r.out, setup.work_dir)) for r in runs]
    known = [t for t in compute if t is not None]
    recipes = {'pre-training': setup.scale.pretrain, 'fine-tuning': setup.scale.finetune,
               'linear probing': setup.scale.linprobe}
    kinds = {r.kind for r in runs}
    approx = any(isinstance(v, tuple) for cell in study.cells for v in cell.paper.values())
    lines = [f"## {study.title}", '',
             f"Scale `{setup.scale.name}`: {setup.scale.model_label}; data {setup.data_summary}. Ours: top-1 (%) of the last epoch on the evaluation split; the paper's: "
             f"ImageNet-1K top-1 of ViT-L/16{' (≈: read off a figure)' if approx else ''}.",
             '', markdown_table(study, plan), '']
    if study.note:
        lines += [study.note, '']
    lines += ['Recipes (the flags every run of a kind starts from; each cell adds its own):', '']
    lines += [f"- {name}: `{describe_recipe(recipe, setup)}`" for name, recipe in recipes.items()
              if {'pre-training': 'pretrain', 'fine-tuning': 'finetune', 'linear probing': 'linprobe'}[name] in kinds]
    lines += ['', f"Command: `python reproduce.py {shlex.join(argv)}`", '',
              f"Compute: {fmt_time(sum(known))} for the {len(known)} of {len(runs)} runs of this study timed by "
              f"the runner (shared runs counted once); device `{setup.device}`.", '',
              f"Environment: {environment()}.", '']
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{study.name}.md").write_text('\n'.join(lines), encoding='utf-8')
    data = {'study': study.name, 'scale': setup.scale.name, 'columns': [k for k, _ in study.columns], 'cells': []}
    for cell in study.cells:
        entry = {'label': cell.label, 'paper': {k: (v[0] if isinstance(v, tuple) else v)
                                                for k, v in cell.paper.items()}, 'ours': {}}
        for key, m in cell.measures.items():
            run = plan.result(m)
            acc = run.accuracy() if run.finished() else None
            entry['ours'][key] = {'final': acc[0], 'best': acc[1]} if acc else None
            entry.setdefault('runs', {})[key] = os.path.relpath(run.out, setup.work_dir)
        data['cells'].append(entry)
    (results_dir / f"{study.name}.json").write_text(json.dumps(data, indent=1) + '\n', encoding='utf-8')
    if study.curve:
        plot_curve(study, data, setup, results_dir / f"{study.name}.png")


def count_images(data_path, split):
    root = Path(data_path) / split
    if not root.is_dir():
        return '?'
    return sum(len(files) for _, _, files in os.walk(root, followlinks=True))


def data_summary(args, data_path, nb_classes, scale):
    """E.g. "`cifar10_jpg`: 5000 training images of train/ (a class-balanced subset), 1000 evaluation images of
    test/ (a class-balanced subset), 10 classes"."""
    def split(name, folder, subset):
        # (walking ImageNet's folders would take minutes on a cluster's file system)
        count = '' if scale.name == 'paper' else f"{count_images(data_path, name)} "
        return f"{count}{'training' if name == 'train' else 'evaluation'} images of {folder}/" + (
            ' (a class-balanced subset)' if subset else '')
    return (f"`{args.data_path}`: {split('train', 'train', args.train_subset)}, "
            f"{split('val', args.val_split, args.val_subset)}, {nb_classes} classes")


# ---------------------------------------------------------------------------------------------------- plots
PLOT_W, PLOT_H, MARGIN = 360, 240, 46
OURS_COLOUR, PAPER_COLOUR = (31, 119, 180), (214, 39, 40)


def plot_curve(study, data, setup, path):
    """The curve studies as the paper draws them: one chart per measure and source (ours, the paper's), top-1
    against the study's x, each with its own y range (the two are on different data and models)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    xs = study.curve['values']
    columns = data['columns']
    titles = dict(study.columns)
    charts = []
    for key in columns:
        ours = [(x, c['ours'].get(key) and c['ours'][key]['final']) for x, c in zip(xs, data['cells'])]
        paper = [(x, c['paper'].get(key)) for x, c in zip(xs, data['cells'])]
        charts.append((f"{titles[key]}: ours ({setup.scale.name} scale)", ours, OURS_COLOUR))
        charts.append((f"{titles[key]}: paper (ImageNet, ViT-L)", paper, PAPER_COLOUR))
    cols = 2
    rows = math.ceil(len(charts) / cols)
    img = Image.new('RGB', (cols * (PLOT_W + 10) + 10, rows * (PLOT_H + 10) + 30), 'white')
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), f"{study.title}; x: {study.curve['x']}, y: top-1 (%)", fill='black', font=font)
    for i, (title, points, colour) in enumerate(charts):
        left, top = 10 + (i % cols) * (PLOT_W + 10), 30 + (i // cols) * (PLOT_H + 10)
        draw_chart(draw, font, (left, top), title, points, colour, categorical=study.name == 'partial_ft')
    img = img.quantize(colors=64)  # a few colours: a small file
    img.save(path, optimize=True)


def draw_chart(draw, font, origin, title, points, colour, categorical):
    left, top = origin
    draw.rectangle([left, top, left + PLOT_W, top + PLOT_H], outline=(200, 200, 200))
    draw.text((left + 6, top + 4), title, fill='black', font=font)
    x0, x1 = left + MARGIN, left + PLOT_W - 14
    y0, y1 = top + PLOT_H - 26, top + 24  # y0: the bottom of the plotting area
    xs = [x for x, _ in points]
    ys = [y for _, y in points if y is not None]
    draw.line([x0, y0, x1, y0], fill='black')
    draw.line([x0, y0, x0, y1], fill='black')
    if categorical:  # e.g. blocks 0, 1, 2, 4, 6, 12, 18, 24: evenly spaced, as the paper draws them
        pos = {x: x0 + (x1 - x0) * (i + 0.5) / len(xs) for i, x in enumerate(xs)}
    else:
        lo, hi = min(xs), max(xs)
        span = (hi - lo) or 1
        pos = {x: x0 + 10 + (x1 - x0 - 20) * (x - lo) / span for x in xs}
    for x in xs:
        draw.line([pos[x], y0, pos[x], y0 + 3], fill='black')
        label = f"{x:g}" if not categorical else str(x)
        draw.text((pos[x] - font.getlength(label) / 2, y0 + 6), label, fill='black', font=font)
    if not ys:
        draw.text((x0 + 10, (y0 + y1) / 2), 'no results yet', fill='gray', font=font)
        return
    lo, hi = min(ys), max(ys)
    pad = max(0.5, (hi - lo) * 0.15)
    lo, hi = lo - pad, hi + pad

    def y_of(v):
        return y0 - (y0 - y1) * (v - lo) / (hi - lo)

    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        yy = y_of(v)
        draw.line([x0 - 3, yy, x0, yy], fill='black')
        draw.line([x0 + 1, yy, x1, yy], fill=(235, 235, 235))
        draw.text((x0 - 6 - font.getlength(f"{v:.1f}"), yy - 5), f"{v:.1f}", fill='black', font=font)
    line = [(pos[x], y_of(y)) for x, y in points if y is not None]
    if len(line) > 1:
        draw.line(line, fill=colour, width=2)
    for x, y in points:
        if y is None:
            continue
        px, py = pos[x], y_of(y)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((px - font.getlength(f"{y:.1f}") / 2, py - 15), f"{y:.1f}", fill=colour, font=font)


# ---------------------------------------------------------------------------------------------------- main
def get_args_parser():
    parser = argparse.ArgumentParser("Reproduce the paper's tables and figures", add_help=False)
    parser.add_argument('--study', nargs='+', default=None, metavar='NAME',
                        help='one or more of: ' + ', '.join(STUDIES) + ', or all')
    parser.add_argument('--scale', default='small', choices=['paper', 'small'],
                        help="paper: the paper's recipes (ViT-L, ImageNet), submitted to SLURM; small: a small ViT "
                             "on 32x32 images (e.g. CIFAR-10), run here (default)")
    parser.add_argument('--quick', action='store_true',
                        help='a smoke test: the tiny model, one epoch of each run, on tests/data/tiny_imagefolder '
                             'unless --data_path is given')
    parser.add_argument('--dry_run', action='store_true', help='print every command it would run, run nothing')
    parser.add_argument('--values', nargs='+', type=float, default=None,
                        help='the x values of a curve or sweep (' + ', '.join(VALUE_STUDIES) + ') instead of the '
                             "paper's, e.g. --values 0.25 0.5 0.75 0.9 for mask_ratio")
    parser.add_argument('--data_path', default=None,
                        help='an ImageFolder tree with train/ and the evaluation split (--val_split)')
    parser.add_argument('--val_split', default='val',
                        help="the folder evaluated on (default val; e.g. test for CIFAR's train/ and test/)")
    parser.add_argument('--train_subset', default=0, type=int, metavar='N',
                        help='use N training images (class-balanced, a fixed random choice) instead of all')
    parser.add_argument('--val_subset', default=0, type=int, metavar='N', help='the same for the evaluation split')
    parser.add_argument('--pretrain_epochs', default=None, type=int, metavar='N',
                        help="pre-train for N epochs instead of the scale's (small 8, paper 800), the warm-up "
                             "keeping its share of the schedule; such runs get folders of their own (e.g. "
                             "runs/pretrain_epochs_50/), evaluations and from-scratch runs are unchanged")
    parser.add_argument('--work_dir', default=None,
                        help='where the runs go (default: reproduce_output/<scale>, reproduce_output/quick)')
    parser.add_argument('--results_dir', default=None,
                        help='where the tables and plots go (default: the work dir)')
    parser.add_argument('--device', default=None,
                        help='small scale: the device of the runs (default cpu); paper scale: cuda')
    parser.add_argument('--num_workers', default=0, type=int,
                        help='data loading workers of each run at small scale (default 0)')
    # paper scale: the submitit flags of every job
    parser.add_argument('--nodes', default=8, type=int, help='paper scale: nodes per job (default 8)')
    parser.add_argument('--ngpus', default=8, type=int, help='paper scale: GPUs per node (default 8)')
    parser.add_argument('--partition', default=None, help='paper scale: SLURM partition')
    parser.add_argument('--use_volta32', action='store_true', help='paper scale: ask for 32 GB V100s')
    parser.add_argument('--timeout', default=None, type=int, help='paper scale: job time limit in minutes')
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


def with_pretrain_epochs(scale, epochs):
    """``scale`` with ``epochs`` of pre-training, the warm-up keeping its share of the schedule (small: 1 of 8)."""
    recipe = scale.pretrain
    warmup = round(epochs * recipe['warmup_epochs'] / recipe['epochs'])
    return replace(scale, pretrain=dict(recipe, epochs=epochs, warmup_epochs=warmup))


def check_args(args):
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
    if args.quick and args.scale == 'paper':
        raise UsageError("--quick is a small smoke test; it does not go with --scale paper")
    if not args.quick and not args.data_path:
        raise UsageError("--data_path is required (an ImageFolder tree with train/ and --val_split), unless --quick")
    for flag in ('train_subset', 'val_subset', 'num_workers'):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    if args.pretrain_epochs is not None and args.pretrain_epochs < 1:
        raise UsageError(f"--pretrain_epochs must be at least 1, got {args.pretrain_epochs}")
    if args.nodes < 1 or args.ngpus < 1:
        raise UsageError("--nodes and --ngpus must be at least 1")
    return studies


def main(args):
    studies = check_args(args)
    invocation = command_line(args)
    scale = SCALES['quick' if args.quick else args.scale]
    if args.pretrain_epochs is not None:
        scale = with_pretrain_epochs(scale, args.pretrain_epochs)
    if args.quick and not args.data_path:
        args.data_path = str(TINY_DATA)
    work_dir = Path(args.work_dir or REPO / 'reproduce_output' / scale.name).absolute()
    results_dir = Path(args.results_dir).absolute() if args.results_dir else work_dir
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

    plan = Plan(scale, work_dir)
    built = [build_study(name, scale, args.values) for name in studies]
    cells = []
    for study in built:
        plan.add_study(study)
        for cell in study.cells:
            runs = []
            for m in cell.measures.values():
                run = plan.result(m)
                runs += ([run.source] if run.source is not None else []) + [run]
            if runs:
                cells.append((f"{study.name}: {cell.label}", list(dict.fromkeys(runs))))
    for run in plan.runs.values():  # every command checked before anything runs (e.g. the batch split)
        command(run, setup)

    if args.dry_run:
        print(f"# {len(plan.runs)} runs for {', '.join(studies)} at scale {scale.name}, in {work_dir}")
        for run in plan.runs.values():
            if run.finished():
                print(f"# done: {run.out}")
                continue
            cmd = command(run, setup)
            if scale.name == 'paper' and run.source is not None and not run.source.finished():
                cmd += ['--dependency', f'afterok:<job of {os.path.relpath(run.source.out, work_dir)}>']
            print(shown(cmd))
        return

    runner = Runner(plan, setup, cells)

    def report():
        for study in built:
            write_report(study, plan, setup, invocation, results_dir)

    try:
        runner.run_all(report)
    finally:
        report()
    for study in built:
        print(f"{study.title}: {results_dir / (study.name + '.md')}")
        print(markdown_table(study, plan))
    failed = [r for r in plan.runs.values() if r.status == 'failed']
    if failed:
        raise TrainingStopped(f"{len(failed)} of {len(plan.runs)} runs failed: " + '; '.join(
            f"{os.path.relpath(r.out, work_dir)}: {r.message}" for r in failed))


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
