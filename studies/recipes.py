"""The recipes of the studies at each scale (read from configs/), and the kinds of evaluation a cell can run.

A recipe is the flags an entry point gets, before a cell's own. 'effective_batch' is not a flag: it is split into
--batch_size (at most the 'batch_size' given, per GPU) and --accum_iter for the number of GPUs of the job.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def recipe(name, effective_batch=None):
    """The flags of ``configs/<name>.yaml`` (a recipe file, by the flags' command-line names), with the effective
    batch the study splits over its job's GPUs (``effective_batch``; none for the frozen-feature evaluations)."""
    with open(CONFIGS / f'{name}.yaml', encoding='utf-8') as f:
        flags = yaml.safe_load(f)
    return dict(flags, effective_batch=effective_batch) if effective_batch else flags


# The paper's recipes (each file says where its values come from). Pre-training: Table 1's ViT-L, 800 epochs, with
# Table 1's default target (unnormalised pixels; the released models' --norm_pix_loss is Table 1d's other row).
# Evaluations: FINETUNE.md's for ViT-L, and for Table 3's ViT-B row (studies.paper.TABLE3_VIT_B). From scratch:
# Table 3's supervised baseline (Appendix A.2).
PAPER_PRETRAIN = recipe('studies/paper/pretrain', effective_batch=4096)
PAPER_FINETUNE = recipe('finetune/vit_large_patch16', effective_batch=1024)
PAPER_FINETUNE_BASE = recipe('finetune/vit_base_patch16', effective_batch=1024)
PAPER_SCRATCH = recipe('studies/paper/scratch_vit_large', effective_batch=4096)
PAPER_SCRATCH_BASE = recipe('studies/paper/scratch_vit_base', effective_batch=4096)
PAPER_LINPROBE = recipe('linprobe/vit_large_patch16', effective_batch=16384)
PAPER_LINPROBE_BASE = recipe('linprobe/vit_base_patch16', effective_batch=16384)

# Small scale (configs/studies/small/): CIFAR-like data (32x32, 10 classes) on a CPU of 2 cores or one GPU. The
# model is ViT-S-like at patch 4 (an 8x8 grid, as 14x14 at 224/16) with a 128-d decoder of 4 blocks (the paper's
# 512-d / 8 blocks scaled with the encoder). The schedules are what a shared 2-core CPU runs in about an hour for a
# study of 4-5 cells on 5,000 training images (an epoch: about 30 s of pre-training at 75% masking, 50 s of
# fine-tuning, 40 s of linear probing): far from the paper's 800 epochs, so the numbers are those of an early MAE,
# and the base lr of pre-training is raised accordingly (1.5e-3, as the Quick start's tiny run). Fine-tuning keeps
# the paper's recipe (layer decay, RandAugment, label smoothing, drop path) but not Mixup/CutMix and random erasing,
# regularisers that need long schedules and cost several points in a few epochs. Linear probing keeps the paper's
# absolute lr (6.4: base lr 0.1 at batch 16384) instead of scaling it down with the batch: LARS changes each weight
# matrix by about lr x 0.001 of its norm per step, so the scaled-down lr (0.05) over the ~200 steps here would leave
# the head where it was initialised (the paper's probe takes ~7,000 steps at 6.4).
# The evaluations of frozen features (extract_features.py --knn / --probe): the encoder embeds train/ and val/ once
# (the evaluation transform, every patch), then a weighted k-NN classifier (k = 20, T = 0.07, the kNN monitor's) or
# a logistic-regression probe (util/evaluation/feature_probe.py) classifies val/ from train/: seconds to a minute,
# against minutes for a training run. The batch is only the embedding's (no effect on the numbers).
SMALL_PRETRAIN = recipe('studies/small/pretrain', effective_batch=128)
SMALL_FINETUNE = recipe('studies/small/finetune', effective_batch=128)
SMALL_LINPROBE = recipe('studies/small/linprobe', effective_batch=128)
SMALL_KNN = recipe('studies/small/knn')
SMALL_PROBE = recipe('studies/small/probe')

# --quick (configs/studies/quick/): the tiny model on tests/data/tiny_imagefolder (16 training images), one epoch
QUICK_PRETRAIN = recipe('studies/quick/pretrain', effective_batch=4)
QUICK_FINETUNE = recipe('studies/quick/finetune', effective_batch=4)
QUICK_LINPROBE = recipe('studies/quick/linprobe', effective_batch=4)
QUICK_KNN = recipe('studies/quick/knn')
QUICK_PROBE = recipe('studies/quick/probe')


@dataclass(frozen=True)
class Evaluation:
    """A kind of evaluation of a pre-trained (or randomly initialised) encoder: the entry point that runs it, here
    and at paper scale, and what it costs in epochs of baseline pre-training (for the estimate of the time left).

    A training evaluation (no ``mode``) costs ``cost`` per epoch (fine-tuning sees all the patches, with the
    backward pass; linear probing runs the frozen encoder forward only) and its top-1 is the ``test_acc1`` its
    ``log.txt`` has for each epoch. A frozen-feature evaluation is ``extract_features.py <mode>``: one pass of the
    encoder over train/ and val/ (``cost`` per run), its numbers in ``result.json`` (``metric``: the top-1's key);
    it has no SLURM script, so it runs at small scale only."""
    title: str  # the header of its column
    entry_point: str
    submitit_script: str  # None: not at --scale paper
    cost: float
    mode: str = ''  # extract_features.py's flag (--knn, --probe); '' for a training run
    metric: str = 'test_acc1'


# The kinds --evals chooses from. A new kind is an entry here, a recipe under its name in each scale below (and for
# Table 3's ViT-B row, studies.paper.TABLE3_VIT_B), and, if it writes neither a log.txt of epochs with test_acc1 nor
# extract_features.py's result.json, its own reading of the result in studies.plan.PlannedRun.
EVALUATIONS = {
    'finetune': Evaluation('fine-tuning', 'main_finetune.py', 'submitit_finetune.py', cost=1.6),
    'linprobe': Evaluation('linear probing', 'main_linprobe.py', 'submitit_linprobe.py', cost=0.6),
    'knn': Evaluation('kNN', 'extract_features.py', None, cost=0.7, mode='--knn', metric='knn_top1'),
    'probe': Evaluation('feature probe', 'extract_features.py', None, cost=0.75, mode='--probe',
                        metric='probe_top1'),
}


@dataclass(frozen=True)
class Scale:
    name: str
    recipes: dict  # 'pretrain' and each kind of EVALUATIONS -> its recipe
    depth: int  # encoder blocks (partial fine-tuning's K)
    decoder_depth: int  # the model's own decoder (the baseline's)
    decoder_embed_dim: int  # (Table 1b's widths are scaled by it / 512)
    model_label: str

    @property
    def pretrain(self):
        return self.recipes['pretrain']


SCALES = {
    'paper': Scale('paper', dict(pretrain=PAPER_PRETRAIN, finetune=PAPER_FINETUNE, linprobe=PAPER_LINPROBE),
                   24, 8, 512, 'ViT-L/16'),
    'small': Scale('small', dict(pretrain=SMALL_PRETRAIN, finetune=SMALL_FINETUNE, linprobe=SMALL_LINPROBE,
                                 knn=SMALL_KNN, probe=SMALL_PROBE),
                   6, 4, 128, 'ViT-S/4 (192-d, 6 blocks; decoder 128-d, 4 blocks)'),
    'quick': Scale('quick', dict(pretrain=QUICK_PRETRAIN, finetune=QUICK_FINETUNE, linprobe=QUICK_LINPROBE,
                                 knn=QUICK_KNN, probe=QUICK_PROBE),
                   2, 2, 32, 'ViT-tiny/4 (64-d, 2 blocks; decoder 32-d, 2 blocks)'),
}


def with_pretrain_epochs(scale, epochs):
    """``scale`` with ``epochs`` of pre-training, the warm-up keeping its share of the schedule (small: 1 of 8)."""
    recipe = scale.pretrain
    warmup = round(epochs * recipe['warmup_epochs'] / recipe['epochs'])
    return replace(scale, recipes=dict(scale.recipes, pretrain=dict(recipe, epochs=epochs, warmup_epochs=warmup)))
