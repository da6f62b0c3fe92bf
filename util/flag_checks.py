"""The checks of the flags, before anything is written or computed: every numeric flag's valid range (``RANGES``,
one entry per flag of ``util/flags.py`` and the entry points: a test fails for a flag without one), the constraints
between flags, the model, the paths and the device; a mistake is one line (``UsageError``)."""
import math
import os
import re
from typing import NamedTuple

import torch

from util import data_stats, hf_datasets
from util.errors import UsageError
from util.image_folder import other_source
from util.loaders import check_data_loader


class Range(NamedTuple):
    """The values a numeric flag may take: from ``low`` to ``high`` (``low_open``/``high_open``: that bound
    excluded), finite, or one of ``special``, values with a meaning of their own (``meaning`` says it, e.g.
    '-1 (all)'). ``None``, the default of flags that may be left out, is always allowed: argparse gives it only
    when the flag is not on the command line."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()
    meaning: str = ''

    def admits(self, value):
        if value is None or (value in self.special and not isinstance(value, bool)):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False  # (nan passes no comparison: `nan < 0` and `nan >= 0` are both false)
        return ((value > self.low) if self.low_open else (value >= self.low)) and \
            ((value < self.high) if self.high_open else (value <= self.high))

    def rule(self):
        """The range in words: 'at least 1', 'positive', 'in [0, 1)', '-1 (all) or at least 0'."""
        if self.high == math.inf and self.low == -math.inf:
            words = 'a number'
        elif self.high == math.inf:
            words = (('positive' if self.low == 0 else f'more than {self.low}') if self.low_open
                     else f'at least {self.low}')
        else:
            words = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{self.meaning} or {words}" if self.meaning else words


PROBABILITY = Range(0, 1)
AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
MIXUP_MODES = ('batch', 'pair', 'elem')  # timm's Mixup: any other name silently mixes per batch
# what each numeric flag of every entry point may take, by its argparse dest (main_pretrain.py, main_finetune.py,
# main_linprobe.py, the submitit_*.py scripts, extract_features.py, reproduce.py, demo/visualize.py): checked by
# ``check_ranges`` before anything is written; tests/test_flags.py fails for a numeric flag without an entry here
RANGES = {
    # sizes and counts
    'batch_size': AT_LEAST_1, 'accum_iter': AT_LEAST_1, 'epochs': AT_LEAST_1, 'input_size': AT_LEAST_1,
    'nb_classes': AT_LEAST_1, 'save_freq': AT_LEAST_1, 'start_epoch': AT_LEAST_0,
    # data loading processes of each training process (the reference's 10): thousands would exhaust the processes
    # and memory of any node before the first batch
    'num_workers': Range(0, 256),
    'warmup_epochs': AT_LEAST_0, 'save_every_iters': AT_LEAST_0, 'skip_nonfinite': AT_LEAST_0,
    'decoder_depth': AT_LEAST_1, 'decoder_embed_dim': AT_LEAST_1,
    'train_blocks': Range(0, special=(-1,), meaning='-1 (all)'),
    # numpy seeds each process with --seed + its rank, and takes 0 .. 2**32 - 1 only
    'seed': Range(0, 2 ** 32 - 1),
    # processes (overwritten by torchrun's and submitit's environment) and the submitit jobs
    'world_size': AT_LEAST_1, 'local_rank': Range(-1), 'ngpus': AT_LEAST_1, 'nodes': AT_LEAST_1,
    'timeout': AT_LEAST_1,
    # optimisation: a negative --clip_grad multiplies every gradient by a negative factor (gradient ascent), 0 zeroes
    # them; a --layer_decay outside (0, 1] gives layers a negative lr, or the lower layers the larger one
    'lr': POSITIVE, 'blr': POSITIVE, 'min_lr': AT_LEAST_0, 'weight_decay': AT_LEAST_0, 'clip_grad': POSITIVE,
    'layer_decay': Range(0, 1, low_open=True),
    # AdamW's betas (torch refuses any outside [0, 1)); the EMA's decay (0 or 1: the average is the weights, or never
    # moves)
    'opt_betas': Range(0, 1, high_open=True), 'model_ema_decay': Range(0, 1, low_open=True, high_open=True),
    # regularisation and augmentation: timm's label smoothing asserts < 1; drop-path 1 drops every block; a random
    # erase count of 0 is taken as 1 by timm (turn erasing off with --reprob 0)
    'mask_ratio': Range(0, 1, high_open=True), 'drop_path': Range(0, 1, high_open=True),
    'smoothing': Range(0, 1, high_open=True), 'reprob': PROBABILITY, 'recount': AT_LEAST_1,
    'color_jitter': AT_LEAST_0, 'mixup': AT_LEAST_0, 'cutmix': AT_LEAST_0, 'cutmix_minmax': PROBABILITY,
    'mixup_prob': PROBABILITY, 'mixup_switch_prob': PROBABILITY,
    # [new] your own images (util/data_stats.py checks that they fit together)
    'in_chans': AT_LEAST_1, 'mean': Range(), 'std': POSITIVE,
    # the kNN monitor (main_pretrain.py) and extract_features.py: 0 is off / all images
    'knn_every': Range(1, special=(0,), meaning='0 (off)'),
    'knn_train_subset': Range(1, special=(0,), meaning='0 (all)'),
    'knn_val_subset': Range(1, special=(0,), meaning='0 (all)'),
    # reproduce.py (--values: a study's x values, each study checks its own kind further)
    'values': AT_LEAST_0, 'train_subset': Range(1, special=(0,), meaning='0 (all)'),
    'val_subset': Range(1, special=(0,), meaning='0 (all)'), 'pretrain_epochs': AT_LEAST_1,
    # demo/visualize.py
    'mask_ratios': Range(0, 1, high_open=True), 'scale': Range(1, special=(0,), meaning='0 (automatic)'),
    'colors': Range(2, 256, special=(0,), meaning='0 (full colour)'),
}


def check_ranges(args):
    """One line naming the first flag of ``args`` whose value (each value, for a list) is outside its ``RANGES``
    entry, or not finite. A flag of the same name that is a word in another script (reproduce.py's --scale) is
    not one of them."""
    for flag, allowed in RANGES.items():
        values = getattr(args, flag, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, str) and not allowed.admits(value):
                finite = isinstance(value, (int, float)) and math.isfinite(value)
                raise UsageError(f"--{flag} must be {'' if finite else 'finite and '}{allowed.rule()}, got {value}")


def check_between(args):
    """The constraints between flags that the ranges alone do not say: what timm's Mixup needs (an even batch: it
    mixes each image with the one at the mirrored position; a mode it knows; a --cutmix_minmax it can draw cut sizes
    from), and a seed that stays in numpy's range on every process."""
    mode = getattr(args, 'mixup_mode', 'batch')
    if mode not in MIXUP_MODES:
        raise UsageError(f"--mixup_mode {mode} is not one of {', '.join(MIXUP_MODES)}")
    minmax = getattr(args, 'cutmix_minmax', None)
    if minmax is not None:
        if len(minmax) != 2 or not minmax[0] < minmax[1]:
            raise UsageError(f"--cutmix_minmax takes two values, the smallest and largest side of the cut box as a "
                             f"fraction of the image, the first below the second; got {' '.join(map(str, minmax))}")
        sizes = [int(args.input_size * r) for r in minmax]
        if sizes[0] >= sizes[1]:  # timm draws the side in pixels from [min, max)
            raise UsageError(f"--cutmix_minmax {minmax[0]} {minmax[1]} gives cut boxes {sizes[0]} to {sizes[1]} "
                             f"pixels wide at --input_size {args.input_size}: no size to draw from (widen it)")
    mixing = getattr(args, 'mixup', 0) > 0 or getattr(args, 'cutmix', 0) > 0 or minmax is not None
    if mixing and args.batch_size % 2:
        raise UsageError(f"--mixup/--cutmix mix each image with another of its batch (timm's Mixup), which needs an "
                         f"even --batch_size; got {args.batch_size}")
    processes = max(int(os.environ.get('WORLD_SIZE') or 1), getattr(args, 'world_size', 1),
                    getattr(args, 'nodes', 1) * getattr(args, 'ngpus', 1))
    if getattr(args, 'seed', 0) + processes - 1 > RANGES['seed'].high:
        raise UsageError(f"--seed {args.seed}: process k seeds numpy with --seed + k, at most "
                         f"{RANGES['seed'].high}; with {processes} processes --seed must be at most "
                         f"{RANGES['seed'].high - processes + 1}")



def check_common(args, models, kind, splits):
    """The checks every entry point makes on its flags, before anything is written: ``models`` are the names
    ``--model`` may take (``kind`` says what they are), ``splits`` the folders of ``--data_path`` it reads."""
    if getattr(args, 'data_loader', 'pil') != 'pil':
        check_data_loader(args)
    if args.model not in models:
        raise UsageError(f"--model {args.model} is not a {kind} model; choose one of: " + ', '.join(models))
    check_ranges(args)
    check_between(args)
    data_stats.check_args(args)  # --in_chans, --mean, --std, --data_stats together
    if getattr(args, 'eval', False) and not args.resume:  # a model with random weights would be evaluated
        raise UsageError("--eval evaluates the checkpoint given with --resume; "
                         + ("--finetune only initialises training" if args.finetune else "none was given"))
    patch = int(re.search(r'patch(\d+)', args.model).group(1))  # every model's name says its patch size
    if args.input_size % patch:
        raise UsageError(f"--input_size {args.input_size} is not a multiple of the patch size {patch} of "
                         f"{args.model} (e.g. {max(patch, args.input_size // patch * patch)})")
    check_model_fits(models[args.model], args)
    if hasattr(args, 'mask_ratio'):  # pre-training
        num_patches = (args.input_size // patch) ** 2
        keep = int(num_patches * (1 - args.mask_ratio))
        if not 0 <= args.mask_ratio < 1 or keep in (0, num_patches):
            raise UsageError(f"--mask_ratio {args.mask_ratio} {'keeps no' if not keep else 'masks no'} patch of the "
                             f"{num_patches} at --input_size {args.input_size}: nothing to learn from")
    check_device(args)
    for flag in ('output_dir', 'log_dir'):
        path = getattr(args, flag)
        if path:
            found = os.path.abspath(path)  # the folder to be created is inside the nearest one that exists
            while not os.path.exists(found) and os.path.dirname(found) != found:
                found = os.path.dirname(found)
            if os.path.exists(found) and not os.path.isdir(found):
                raise UsageError(f"--{flag} {path} is a file, not a folder" if found == os.path.abspath(path) else
                                 f"--{flag} {path}: {found} is a file, not a folder")
    check_other_source(args, splits)  # [new] tar shards, a Hugging Face dataset
    for split in ([] if other_source(args.data_path) else splits):
        root = os.path.join(args.data_path, split)
        if not os.path.isdir(root):
            raise UsageError(f"--data_path {args.data_path}: no such folder" if not os.path.isdir(args.data_path) else
                             f"--data_path {args.data_path} has no '{split}/' folder (expected {root}/<class>/<image>)")


def check_other_source(args, splits):
    """[new] ``--data_path`` as tar shards or a Hugging Face dataset: its ``splits`` indexed (a problem in one line
    before anything runs), the --hf_* column flags taken (and refused for other data)."""
    source = other_source(args.data_path)
    given = [f for f in ('hf_image_column', 'hf_label_column') if getattr(args, f, None)]
    if given and source is not hf_datasets:
        raise UsageError(f"--{given[0]} is for a Hugging Face dataset as --data_path; {args.data_path} is not one")
    hf_datasets.use_columns(args)
    if source and getattr(args, 'data_loader', 'pil') == 'dali':
        raise UsageError(f"--data_loader dali reads image files; --data_path {args.data_path} is "
                         f"{'tar shards' if source is not hf_datasets else 'a Hugging Face dataset'}: use "
                         f"--data_loader fast_cpu, gpu or pil")
    if source:
        source.check(args.data_path, splits, labelled=True)


def check_model_fits(build, args):
    """The model of ``--model`` at ``--input_size`` (built on the meta device: no memory, no time) fits in this
    machine's memory with what training adds to each trainable weight (its gradient and AdamW's two moments); else
    one line instead of an allocator's traceback (its position embeddings grow with the square of the image size)."""
    too_big = f"--input_size {args.input_size}: --model {args.model} at that size needs {{}}"
    try:
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):  # (no sysconf: not Linux or macOS)
        memory = None
    try:
        with torch.device('meta'):
            model = build(img_size=args.input_size, in_chans=data_stats.normalisation(args)[0])
    except MemoryError:  # the MAE's fixed sin-cos position embeddings are computed (in numpy) even on meta
        raise UsageError(too_big.format("more memory than this machine has for its position embeddings alone")
                         ) from None
    except (NotImplementedError, RuntimeError, AssertionError):
        return  # (older torch/timm cannot build every model on meta, e.g. timm 1.0.3's drop-path .item(): no check)
    if memory is None or hasattr(args, 'job_dir'):  # (a submitit script: the jobs run on the cluster's machines)
        return
    tensors = list(model.parameters()) + list(model.buffers())
    need = sum(t.numel() * t.element_size() * (4 if t.requires_grad else 1) for t in tensors)
    if need > memory:
        raise UsageError(too_big.format(f"{need / 2 ** 30:.0f} GiB for its weights (with their gradients and "
                                        f"optimizer state), more than this machine's {memory / 2 ** 30:.0f} GiB"))


def check_device(args):
    """``--device`` names a device torch has: a typo ('gpu', '') or a backend this torch lacks ('mps' on Linux)
    would fail with a traceback once the run has started; a GPU index this machine lacks too. Whether CUDA is there
    at all is left to the process start-up (``misc.init_distributed_mode``): the submitit scripts check here, on a
    machine that may have no GPU, for jobs that run on GPUs."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {args.device!r} is not a device torch knows; e.g. cuda, cuda:1, cpu") from None
    if device.type == 'cuda' and device.index is not None and torch.cuda.is_available() and \
            device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ('cpu', 'cuda'):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise UsageError(f"--device {args.device}: this torch or machine cannot run on {device.type}; e.g. "
                             f"cuda, cpu") from None
