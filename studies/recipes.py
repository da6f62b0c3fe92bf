"""The recipes of the studies at each scale, and the kinds of evaluation a cell can run.

A recipe is the flags an entry point gets, before a cell's own. 'effective_batch' is not a flag: it is split into
--batch_size (at most the 'batch_size' given, per GPU) and --accum_iter for the number of GPUs of the job.
"""
from dataclasses import dataclass, replace

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
# Table 3's from-scratch baseline: the paper's supervised training of ViT from scratch (Appendix A.2, Table 11):
# AdamW with betas 0.9 / 0.95, base lr 1e-4, weight decay 0.3, batch 4096, cosine decay, 20 warm-up epochs, 200
# epochs for ViT-L (300 for ViT-B), RandAugment (9, 0.5) (the default --aa), label smoothing 0.1, Mixup 0.8, CutMix
# 1.0, drop path 0.2 for ViT-L (0.1 for ViT-B), an EMA of the weights with decay 0.9999; the regularisations not
# listed are off (no random erasing), and there is no layer-wise lr decay (no pre-trained layers to keep)
PAPER_SCRATCH = dict(PAPER_FINETUNE, epochs=200, warmup_epochs=20, blr=1e-4, weight_decay=0.3, opt_betas=(0.9, 0.95),
                     layer_decay=1.0, drop_path=0.2, reprob=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0,
                     model_ema=True, model_ema_decay=0.9999, effective_batch=4096)
PAPER_SCRATCH_BASE = dict(PAPER_SCRATCH, model='vit_base_patch16', epochs=300, drop_path=0.1)
# FINETUNE.md, linear probing of ViT-L: class token, LARS, base lr 0.1, no weight decay, 50 epochs, batch 16384
PAPER_LINPROBE = dict(model='vit_large_patch16', input_size=224, cls_token=True, epochs=50, warmup_epochs=10,
                      blr=0.1, weight_decay=0.0, dist_eval=True, batch_size=512, effective_batch=16384)
# FINETUNE.md, ViT-B: 90 epochs (Table 3's ViT-B row, when --evals asks the scratch study for linear probes)
PAPER_LINPROBE_BASE = dict(PAPER_LINPROBE, model='vit_base_patch16', epochs=90)

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

# The evaluations of frozen features (extract_features.py --knn / --probe): the encoder embeds train/ and val/ once
# (the evaluation transform, every patch), then a weighted k-NN classifier (k = 20, T = 0.07, the kNN monitor's) or
# a logistic-regression probe (util/evaluation/feature_probe.py) classifies val/ from train/: seconds to a minute, against
# minutes for a training run. The batch is only the embedding's (no effect on the numbers).
SMALL_KNN = dict(model='vit_small_patch4', input_size=32, batch_size=256)
SMALL_PROBE = dict(SMALL_KNN)

# --quick: the tiny model on tests/data/tiny_imagefolder (16 training images), one epoch of each
QUICK_PRETRAIN = dict(SMALL_PRETRAIN, model='mae_vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4,
                      effective_batch=4)
QUICK_FINETUNE = dict(SMALL_FINETUNE, model='vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4,
                      effective_batch=4)
QUICK_LINPROBE = dict(SMALL_LINPROBE, model='vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4,
                      effective_batch=4)
QUICK_KNN = dict(SMALL_KNN, model='vit_tiny_patch4', batch_size=16)
QUICK_PROBE = dict(QUICK_KNN)


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
