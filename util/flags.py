"""The flags every entry point shares (the reference's and the [new] run-control ones), and the checks that turn a
wrong value into one line before anything is written or computed."""
import os
import re

from util import data_stats
from util.misc import UsageError


def add_common_args(parser, data_help, save_freq, optimizer='adamw', checkpointing=True, data_loaders=('pil',)):
    """The flags every entry point has: the reference's (data, output, device, seed, resuming, loading, distributed),
    with its defaults, the [new] run-control flags (precision, checkpoint cadence, resuming, fault handling), and
    the [new] fast path (README, "Speed"), off by default: each flag, and ``--fast`` for all of them but
    ``--grad_checkpointing`` (a memory saving that costs a second forward of the encoder). ``optimizer``: the
    script's ('adamw' has a fused kernel; LARS has none); ``checkpointing``: whether gradients flow through the
    encoder blocks; ``data_loaders``: the --data_loader choices, the reference's 'pil' first."""
    parser.add_argument('--data_path', default='/datasets01/imagenet_full_size/061417/', type=str, help=data_help)
    parser.add_argument('--output_dir', default='./output_dir', help='path where to save, empty for no saving')
    parser.add_argument('--log_dir', default=None,
                        help='path where to tensorboard log (default: --output_dir; the reference: ./output_dir)')
    parser.add_argument('--device', default='cuda', help='device to use for training / testing')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', default='', help='resume from checkpoint')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--pin_mem', action='store_true',
                        help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    # distributed training
    parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--local_rank', default=-1, type=int)
    parser.add_argument('--dist_on_itp', action='store_true')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--amp', default='fp16', choices=['fp16', 'bf16', 'none'],
                        help='[new] mixed precision on CUDA: fp16 with loss scaling (the reference), bf16, or none '
                             '(fp32). The CPU always runs fp32.')
    parser.add_argument('--save_freq', default=save_freq, type=int,
                        help=f'[new] keep checkpoint-<epoch>.pth every N epochs and at the end (default {save_freq}, '
                             'as the reference); checkpoint-last.pth is rewritten every epoch regardless')
    parser.add_argument('--auto_resume', action='store_true',
                        help='[new] continue the run of the same script, model and training flags whose newest '
                             'checkpoint is in --output_dir (default on; see README, "Long runs")')
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                        help='[new] start afresh (or from --resume) even if --output_dir holds a run; its log.txt '
                             'rows are moved to a side file')
    parser.set_defaults(auto_resume=True)
    parser.add_argument('--save_every_iters', default=0, type=int, metavar='N',
                        help='[new] also rewrite checkpoint-last.pth every N optimizer steps within an epoch '
                             '(default 0: only at the end of each epoch)')
    parser.add_argument('--skip_nonfinite', default=0, type=int, metavar='N',
                        help='[new] skip up to N steps with a non-finite loss before stopping (default 0: stop)')
    parser.add_argument('--skip_bad_images', action='store_true',
                        help='[new] skip image files that cannot be read (truncated, not an image, empty, unreadable): '
                             'each is replaced by the next readable image, named once on stderr, and counted per '
                             'epoch (train_skipped_images in log.txt). Default: stop with an error naming the file')

    group = parser.add_argument_group('speed [new]', 'off by default: the reference\'s numerics and host syncs')
    fast = ['--amp bf16'] + (['--fused_adamw'] if optimizer == 'adamw' else []) + ['--compile', '--no_host_sync']
    group.add_argument('--fast', action='store_true',
                       help='[new] the fast path in one flag: ' + ' '.join(fast) + ' (see each; the data loader '
                            'and --grad_checkpointing are chosen separately)')
    if optimizer == 'adamw':
        group.add_argument('--fused_adamw', action='store_true',
                           help='[new] AdamW(fused=True): one kernel for all tensors, where this torch has it for '
                                'the device (CUDA; the CPU from torch 2.4), else the default AdamW with a note')
    group.add_argument('--compile', action='store_true',
                       help='[new] torch.compile the model (the first steps take minutes to compile; masks and '
                            'drop-path draw from inductor\'s random generator, not eager\'s)')
    group.add_argument('--no_host_sync', action='store_true',
                       help='[new] no per-step loss.item(), all-reduce or host sync: losses stay on the device and '
                            'reach the console, log and TensorBoard every 20 steps (same values); a step with a '
                            'non-finite loss or gradient is skipped on the device and reported (--skip_nonfinite) '
                            'at most 20 steps late; stop requests are seen every 20 steps. Without fused AdamW or '
                            'fp16\'s GradScaler the skip decision costs one sync per optimizer step')
    if checkpointing:
        group.add_argument('--grad_checkpointing', action='store_true',
                           help='[new] recompute each encoder block\'s activations in the backward instead of '
                                'keeping them: less activation memory, for bigger batches per GPU (e.g. ViT-H at '
                                '256), for about one more encoder forward of compute; the same numbers')
    if len(data_loaders) > 1:
        group.add_argument('--data_loader', default=data_loaders[0], choices=data_loaders,
                           help='[new] how training images are decoded and augmented: ' + '; '.join(
                               f'{k}: {LOADER_HELP[k]}' for k in data_loaders) + '. The same crop and flip '
                           'distribution; the pixels differ slightly (resampling)')


DALI_INSTALL = 'pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12)'
LOADER_HELP = {
    'pil': 'the reference (PIL, float tensors)',
    'fast_cpu': 'libjpeg-turbo decode (reduced-size DCT decode when the crop allows), uint8 crop/resize/flip in the '
                'workers, normalised on the device',
    'gpu': 'JPEGs decoded in batches on the GPU (nvJPEG), crop/resize/flip/normalise there',
    'dali': 'NVIDIA DALI, crop-window decode on the GPU (pip install nvidia-dali-cuda130)',
}


def resolve_speed_flags(args):
    """Turn ``--fast`` into its flags (see ``add_common_args``)."""
    args.amp = 'bf16'
    args.compile = args.no_host_sync = True
    if hasattr(args, 'fused_adamw'):
        args.fused_adamw = True


def check_data_loader(args):
    """One line before anything runs when the chosen ``--data_loader`` (not the reference's 'pil') cannot run
    here."""
    kind, device = args.data_loader, str(args.device).split(':')[0]
    if kind in ('gpu', 'dali') and device != 'cuda':
        raise UsageError(f"--data_loader {kind} decodes on a CUDA GPU and --device is {device}: use "
                         f"--data_loader fast_cpu (or --device cuda on a GPU machine)")
    if kind in ('fast_cpu', 'gpu'):
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError:
            import torchvision
            raise UsageError(f"--data_loader {kind} decodes with torchvision.io.decode_jpeg, which this torchvision "
                             f"({torchvision.__version__}) no longer has: use --data_loader pil") from None
    if kind == 'dali':
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise UsageError(f"--data_loader dali needs NVIDIA DALI, which is not installed: {DALI_INSTALL}") from None
        if getattr(args, 'skip_bad_images', False):
            raise UsageError("--skip_bad_images works with --data_loader pil, fast_cpu or gpu, not dali (DALI stops "
                             "on a file it cannot decode)")
        if getattr(args, 'in_chans', None) not in (None, 3):
            raise UsageError(f"--data_loader dali decodes RGB JPEGs; --in_chans {args.in_chans} needs --data_loader "
                             f"pil, fast_cpu or gpu")


def check_common(args, models, kind, splits):
    """The checks every entry point makes on its flags, before anything is written: ``models`` are the names
    ``--model`` may take (``kind`` says what they are), ``splits`` the folders of ``--data_path`` it reads."""
    if getattr(args, 'fast', False):
        resolve_speed_flags(args)
    if getattr(args, 'data_loader', 'pil') != 'pil':
        check_data_loader(args)
    if args.model not in models:
        raise UsageError(f"--model {args.model} is not a {kind} model; choose one of: " + ', '.join(models))
    data_stats.check_args(args)  # --in_chans, --mean, --std, --data_stats
    at_least = {'batch_size': 1, 'accum_iter': 1, 'epochs': 1, 'save_freq': 1, 'input_size': 1, 'num_workers': 0,
                'warmup_epochs': 0, 'start_epoch': 0, 'save_every_iters': 0, 'skip_nonfinite': 0, 'nb_classes': 1}
    for flag, low in at_least.items():
        value = getattr(args, flag, low)
        if value < low:
            raise UsageError(f"--{flag} must be at least {low}, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.lr is None and not args.blr > 0:
        raise UsageError(f"--blr must be positive, got {args.blr}")
    for flag in ('min_lr', 'weight_decay'):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    if getattr(args, 'eval', False) and not args.resume:  # a model with random weights would be evaluated
        raise UsageError("--eval evaluates the checkpoint given with --resume; "
                         + ("--finetune only initialises training" if args.finetune else "none was given"))
    patch = int(re.search(r'patch(\d+)', args.model).group(1))  # every model's name says its patch size
    if args.input_size % patch:
        raise UsageError(f"--input_size {args.input_size} is not a multiple of the patch size {patch} of "
                         f"{args.model} (e.g. {max(patch, args.input_size // patch * patch)})")
    if hasattr(args, 'mask_ratio'):  # pre-training
        num_patches = (args.input_size // patch) ** 2
        keep = int(num_patches * (1 - args.mask_ratio))
        if not 0 <= args.mask_ratio < 1 or keep in (0, num_patches):
            raise UsageError(f"--mask_ratio {args.mask_ratio} {'keeps no' if not keep else 'masks no'} patch of the "
                             f"{num_patches} at --input_size {args.input_size}: nothing to learn from")
    for flag in ('output_dir', 'log_dir'):
        path = getattr(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--{flag} {path} is a file, not a folder")
    for split in splits:
        root = os.path.join(args.data_path, split)
        if not os.path.isdir(root):
            raise UsageError(f"--data_path {args.data_path}: no such folder" if not os.path.isdir(args.data_path) else
                             f"--data_path {args.data_path} has no '{split}/' folder (expected {root}/<class>/<image>)")


def batch_problem(args, num_images, world_size):
    """Why ``num_images`` training images give no training (None if they do): no full batch per process
    (``drop_last`` would leave nothing), or fewer iterations per epoch than ``--accum_iter`` (the optimizer would
    never step)."""
    per_rank = num_images // world_size
    if per_rank < args.batch_size:
        return (f"{num_images} training images give {per_rank} per process over {world_size} process(es), fewer "
                f"than --batch_size {args.batch_size}: no full batch to train on (lower --batch_size)")
    iters = per_rank // args.batch_size
    if args.accum_iter > iters:
        return (f"--accum_iter {args.accum_iter} is more than the {iters} iterations of an epoch ({num_images} "
                f"images, --batch_size {args.batch_size}, {world_size} process(es)): the optimizer would never step")
    return None
