"""MAE pre-training: ``python main_pretrain.py ...`` on one process, ``torchrun ... main_pretrain.py ...`` on many.

The flags, their defaults and the training behaviour (data order, augmentation, schedule, checkpoints, logs) are the
reference's (facebookresearch/mae, main_pretrain.py); flags that are not in the reference are marked [new].
"""
import argparse
import datetime
import time

import torch

import models_mae
import util.misc as misc
import util.speed as speed
from engine_pretrain import train_one_epoch
from util.compat import param_groups_weight_decay
from util import data_stats, fast_data
from util.datasets import pretrain_transform
from util.flags import add_common_args, check_common
from util.image_folder import check_pretrain_path, pretrain_dataset
from util.lr_sched import set_lr
from util.pretrained import init_from_checkpoint
from util.run import Run


def get_args_parser():
    parser = argparse.ArgumentParser('MAE pre-training', add_help=False)
    parser.add_argument('--batch_size', default=64, type=int,
                        help='Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus')
    parser.add_argument('--epochs', default=400, type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='Accumulate gradient iterations (for increasing the effective batch size under memory '
                             'constraints)')

    # Model parameters
    parser.add_argument('--model', default='mae_vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train: ' + ', '.join(models_mae.MODELS))
    parser.add_argument('--input_size', default=224, type=int, help='images input size')
    parser.add_argument('--mask_ratio', default=0.75, type=float,
                        help='Masking ratio (percentage of removed patches).')
    parser.add_argument('--norm_pix_loss', action='store_true',
                        help='Use (per-patch) normalized pixels as targets for computing loss')
    parser.set_defaults(norm_pix_loss=False)
    parser.add_argument('--mask_type', default='random', choices=models_mae.MASK_TYPES,
                        help='[new] how the removed patches are chosen (the paper\'s Table 1f): random (the paper\'s '
                             'and the reference\'s, default), block (BEiT-style rectangles) or grid (keep one patch of '
                             'every 2x2 cell; masks 75%% by construction). Every image keeps exactly '
                             'int(L * (1 - mask_ratio)) patches')
    parser.add_argument('--decoder_depth', default=None, type=int, metavar='N',
                        help='[new] number of decoder blocks (the paper\'s Table 1a; default: the model\'s own, 8 for '
                             'the paper\'s models)')
    parser.add_argument('--decoder_embed_dim', default=None, type=int, metavar='D',
                        help='[new] decoder width (the paper\'s Table 1b; default: the model\'s own, 512 for the '
                             'paper\'s models). The attention heads keep their width (32 for the paper\'s models: '
                             '16 heads at 512, 8 at 256), so D must be a multiple of it')

    # Optimizer parameters
    parser.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=float, default=1e-3, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=float, default=0., metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=int, default=40, metavar='N', help='epochs to warmup LR')

    # Dataset parameters
    add_common_args(parser, data_help='dataset path: an ImageFolder tree with a train/ folder (the reference), '
                    '[new] a folder of images (searched recursively) or a .txt list of image paths', save_freq=20,
                    optimizer='adamw', checkpointing=True, data_loaders=fast_data.LOADERS)
    data_stats.add_args(parser)
    parser.add_argument('--init_from', default='', metavar='FILE',
                        help='[new] start from the weights of an MAE checkpoint (a released full or encoder-only '
                             'one, or ours; position embeddings resized to --input_size, patch embedding adapted to '
                             '--in_chans), with a fresh optimizer, schedule and epoch count; a resumed run restores '
                             'its own checkpoint instead (README, "Your own images")')
    parser.add_argument('--shuffle_every_epoch', action='store_true',
                        help='[new] draw a new data order every epoch also on a single process (the reference '
                             'reshuffles only when distributed, so one process sees the same order every epoch)')
    return parser


def check_args(args):
    check_common(args, models_mae.MODELS, 'pre-training', splits=[])
    check_pretrain_path(args.data_path)  # a folder (ImageFolder tree or images) or a .txt list
    data_stats.check_given(args)  # other channel counts than ImageNet's 3 need their own statistics
    if args.mask_type == 'grid' and args.mask_ratio != models_mae.GRID_MASK_RATIO:
        raise misc.UsageError(f"--mask_type grid keeps one patch of every four, so it masks "
                              f"{models_mae.GRID_MASK_RATIO} by construction; --mask_ratio {args.mask_ratio} cannot "
                              f"be (leave --mask_ratio out)")
    if args.decoder_depth is not None and args.decoder_depth < 1:
        raise misc.UsageError(f"--decoder_depth must be at least 1, got {args.decoder_depth}")
    if args.mask_type != 'random' or args.decoder_depth is not None or args.decoder_embed_dim is not None:
        # the model's own checks (decoder width vs head width, an even patch grid for grid masks) before any
        # compute: built on the meta device, the model takes no memory and no time
        try:
            with torch.device('meta'):
                model = models_mae.MODELS[args.model](
                    img_size=args.input_size, mask_type=args.mask_type, decoder_depth=args.decoder_depth,
                    decoder_embed_dim=args.decoder_embed_dim)
        except ValueError as e:
            raise misc.UsageError(f"--decoder_embed_dim {args.decoder_embed_dim} does not fit --model {args.model}: "
                                  f"{e}") from None
        grid_h, grid_w = model.patch_embed.grid_size
        if args.mask_type == 'grid' and (grid_h % 2 or grid_w % 2):
            raise misc.UsageError(f"--mask_type grid needs an even patch grid (2x2 cells); --input_size "
                                  f"{args.input_size} gives {grid_h}x{grid_w} patches with --model {args.model}")
    if args.init_from:  # the file must fit the model (or be adaptable to it) before anything is computed
        with torch.device('meta'):
            init_from_checkpoint(build_model(args), args.init_from, check_only=True)


def build_model(args):
    """The MAE of the flags; --decoder_depth/--decoder_embed_dim/--mask_type/--in_chans [new] left out are the
    reference's model."""
    return models_mae.MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                         mask_type=args.mask_type, decoder_depth=args.decoder_depth,
                                         decoder_embed_dim=args.decoder_embed_dim, in_chans=args.in_chans or 3)


def main(args):
    check_args(args)
    # --in_chans, --mean/--std or --data_stats auto (measured, or read from --output_dir's cache) before Run, which
    # compares them with a checkpoint's to continue
    data_stats.resolve(args, lambda: [path for path, _ in pretrain_dataset(args.data_path).samples])
    run = Run(args, __file__)  # process group, --output_dir, seeds, the checkpoint to continue
    device = run.device

    # the reference's simple augmentation (PIL), or --data_loader's uint8 crop and flip (the same distribution)
    data_loader_train = fast_data.train_loader(args, pretrain_transform(args.input_size, args.mean, args.std),
                                               dict(scale=(0.2, 1.0)), device, pretraining=True)

    model = build_model(args)
    if args.init_from and run.checkpoint is None:  # a resumed run restores its own weights: never re-initialised
        init_from_checkpoint(model, args.init_from)
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(device)
    model_without_ddp = model
    print("Model = %s" % str(model_without_ddp))

    set_lr(args, misc.get_world_size())

    if args.distributed:
        # (the reference passes find_unused_parameters=True; every parameter takes part in every step, so DDP's
        # search for unused ones only costs time and warns on every process: the gradients are the same without it)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module
    if args.compile:  # [new] after the DDP wrap, so that DDP's buckets still overlap the backward
        model = torch.compile(model)

    # no weight decay on biases and norm layers (timm's rule, as the reference)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95),
                                  fused=speed.fused_adamw(args.device) if args.fused_adamw else None)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    run.restore(model_without_ddp, optimizer, loss_scaler, data_loader_train)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed or args.shuffle_every_epoch:
            data_loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler, run, args=args)
        run.end_epoch(epoch, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
    run.close()

    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
