"""The checks of the flags, before anything is written or computed: the constraints between flags, the model, the
paths and the device; a mistake is one line (``UsageError``). Each numeric flag's own range is declared with the flag
(``util.flags.Range``) and checked while parsing."""
import os
import re

import torch

from util.data import data_stats, hf_datasets
from util.training import tracking
from util.errors import UsageError
from util.flags import SEED_MAX
from util.data.image_folder import other_source
from util.data.loaders import check_data_loader


MIXUP_MODES = ('batch', 'pair', 'elem')  # timm's Mixup: any other name silently mixes per batch


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
    processes = max(int(os.environ.get('WORLD_SIZE') or 1), args.world_size,
                    getattr(args, 'nodes', 1) * getattr(args, 'ngpus', 1))
    if args.seed + processes - 1 > SEED_MAX:
        raise UsageError(f"--seed {args.seed}: process k seeds numpy with --seed + k, at most {SEED_MAX}; with "
                         f"{processes} processes --seed must be at most {SEED_MAX - processes + 1}")


def check_common(args, models, kind, splits):
    """The checks every entry point makes on its flags, before anything is written: ``models`` are the names
    ``--model`` may take (``kind`` says what they are), ``splits`` the folders of ``--data_path`` it reads."""
    if getattr(args, 'data_loader', 'pil') != 'pil':
        check_data_loader(args)
    if args.model not in models:
        raise UsageError(f"--model {args.model} is not a {kind} model; choose one of: " + ', '.join(models))
    check_between(args)
    data_stats.check_args(args)  # --in_chans, --mean, --std, --data_stats together
    tracking.check_args(args)  # [new] --wandb_project needs wandb
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
    for flag in ('finetune', 'init_from'):  # the weights a run starts from must outlive its first checkpoint
        path = getattr(args, flag, '')
        name = os.path.basename(str(path or ''))
        in_output_dir = args.output_dir and path and os.path.isfile(path) and \
            os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(args.output_dir)
        # (with auto-resume, a folder holding another run's checkpoints is refused, more precisely, before training)
        if in_output_dir and not args.auto_resume and name.startswith('checkpoint-') and name.endswith('.pth'):
            raise UsageError(f"--{flag} {path} lies in --output_dir {args.output_dir}, whose checkpoint files this "
                             f"run writes over: copy it elsewhere, or give another --output_dir")
    check_other_source(args, splits)  # [new] tar shards, a Hugging Face dataset
    for split in ([] if other_source(args.data_path) else splits):
        root = os.path.join(args.data_path, split)
        if os.path.isfile(args.data_path):
            raise UsageError(f"--data_path {args.data_path} is a file: give the folder that holds "
                             f"{' and '.join(s + '/' for s in sorted(splits, key=('train', 'val').index))} (or tar "
                             f"shards, a saved Hugging Face dataset)")
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
