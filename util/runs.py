"""What every entry point does around its training loop: the run-control flags they share, finding the checkpoint
to resume from, and the TensorBoard writer."""
import os
import random

import numpy as np
import torch

import util.misc as misc


def start_run(args, script, seed_python=False):
    """The reference's start of every entry point: join the process group, check --output_dir, print the job and
    its flags, seed torch and numpy with ``seed + rank`` (and python's ``random`` with ``seed_python``), turn on
    cudnn's autotuner. Returns the device."""
    misc.init_distributed_mode(args)
    misc.check_output_dir(args.output_dir)

    print('job dir: {}'.format(os.path.dirname(os.path.realpath(script))))
    print("{}".format(args).replace(', ', ',\n'))

    seed = args.seed + misc.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    if seed_python:
        random.seed(seed)

    torch.backends.cudnn.benchmark = True
    return torch.device(args.device)


def set_lr(args):
    """The linear scaling rule: unless ``--lr`` is given, ``lr = blr * effective batch size / 256``."""
    eff_batch_size = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:  # only base_lr is specified
        args.lr = args.blr * eff_batch_size / 256
    print("base lr: %.2e" % (args.lr * 256 / eff_batch_size))
    print("actual lr: %.2e" % args.lr)
    print("accumulate grad iterations: %d" % args.accum_iter)
    print("effective batch size: %d" % eff_batch_size)


def wrap_ddp(model, args, device, **ddp_kwargs):
    """``(model, model_without_ddp)``: the model in DistributedDataParallel when distributed (on the process's GPU,
    or the CPU with gloo)."""
    if not args.distributed:
        return model, model
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if device.type == 'cuda' else None, **ddp_kwargs)
    return ddp, ddp.module


def check_batches(args, dataset, world_size):
    """Refuse a dataset that gives no full batch per process (``drop_last`` would leave nothing to train on)."""
    per_rank = len(dataset) // world_size
    if per_rank < args.batch_size:
        raise misc.UsageError(
            f"{len(dataset)} training images give {per_rank} per process over {world_size} process(es), fewer "
            f"than --batch_size {args.batch_size}: no full batch to train on (lower --batch_size)")


def add_common_args(parser, data_help):
    """The reference's flags every entry point has (data, output, device, seed, resuming, loading, distributed),
    with the reference's defaults."""
    parser.add_argument('--data_path', default='/datasets01/imagenet_full_size/061417/', type=str, help=data_help)
    parser.add_argument('--output_dir', default='./output_dir', help='path where to save, empty for no saving')
    parser.add_argument('--log_dir', default='./output_dir', help='path where to tensorboard log')
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


def add_run_control_args(parser, save_freq):
    """[new] flags shared by the entry points: precision, checkpoint cadence, resuming, fault handling."""
    parser.add_argument('--amp', default='fp16', choices=['fp16', 'bf16', 'none'],
                        help='[new] mixed precision on CUDA: fp16 with loss scaling (the reference), bf16, or none '
                             '(fp32). The CPU always runs fp32.')
    parser.add_argument('--save_freq', default=save_freq, type=int,
                        help=f'[new] keep checkpoint-<epoch>.pth every N epochs and at the end (default {save_freq}, '
                             'as the reference); checkpoint-last.pth is rewritten every epoch regardless')
    parser.add_argument('--auto_resume', action='store_true',
                        help='[new] continue from the newest checkpoint in --output_dir if there is one (default on)')
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume')
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


def resolve_resume(args):
    """With auto-resume, a checkpoint already in --output_dir wins over --resume (so a requeued or restarted job
    continues where it stopped)."""
    if args.auto_resume and args.output_dir:
        found = misc.find_resume_checkpoint(args.output_dir)
        if found:
            print(f"Auto-resume: continuing from {found}")
            args.resume = found


def open_log_writer(args, purge_step=None):
    """TensorBoard writer on rank 0. When resuming, ``purge_step`` hides the points at or after the resume point
    (left by the run that died), so that no point appears twice."""
    if not (misc.is_main_process() and args.log_dir):
        return None
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(args.log_dir, exist_ok=True)
    return SummaryWriter(log_dir=args.log_dir, purge_step=purge_step)
