"""MAE pre-training: ``python main_pretrain.py ...`` on one process, ``torchrun ... main_pretrain.py ...`` on many.

The flags, their defaults and the training behaviour (data order, augmentation, schedule, checkpoints, logs) are the
reference's (facebookresearch/mae, main_pretrain.py); flags that are not in the reference are marked [new].
"""
import argparse
import datetime
import time

import torch
from timm.optim import param_groups_weight_decay

import models_mae
import util.misc as misc
from engine_pretrain import train_one_epoch
from util import fast_data
from util.datasets import pretrain_transform
from util.flags import add_common_args, add_speed_args, check_batches, check_common
from util.image_folder import check_split
from util.lr_sched import set_lr
from util.run import ResumableSampler, Run


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

    # Optimizer parameters
    parser.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=float, default=1e-3, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=float, default=0., metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=int, default=40, metavar='N', help='epochs to warmup LR')

    # Dataset parameters

    add_common_args(parser, data_help='dataset path (an ImageFolder tree with a train/ folder)', save_freq=20)
    parser.add_argument('--shuffle_every_epoch', action='store_true',
                        help='[new] draw a new data order every epoch also on a single process (the reference '
                             'reshuffles only when distributed, so one process sees the same order every epoch)')
    add_speed_args(parser, optimizer='adamw', checkpointing=True, data_loaders=fast_data.LOADERS)
    return parser


def check_args(args):
    check_common(args, models_mae.MODELS, 'pre-training')
    check_split(args.data_path, 'train')


def main(args):
    check_args(args)
    run = Run(args, __file__)  # process group, --output_dir, seeds, the checkpoint to continue
    device = run.device
    fast_data.check_data_loader(args, device)

    # the reference's PIL transform, or --data_loader's uint8 crop and flip (the same distribution)
    dataset_train = fast_data.train_dataset(args, pretrain_transform(args.input_size), dict(scale=(0.2, 1.0)))
    print(dataset_train)

    num_tasks = misc.get_world_size()
    global_rank = misc.get_rank()
    check_batches(args, dataset_train, num_tasks)
    # a DistributedSampler also on one process: its fixed seed gives the reference's data order
    sampler_train = ResumableSampler(torch.utils.data.DistributedSampler(
        dataset_train, num_replicas=num_tasks, rank=global_rank, shuffle=True))

    data_loader_train = fast_data.train_loader(args, dataset_train, sampler_train, device)

    model = models_mae.MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(device)
    model_without_ddp = model
    print("Model = %s" % str(model_without_ddp))

    set_lr(args, num_tasks)

    model, model_without_ddp = misc.wrap_ddp(model, args, device, find_unused_parameters=True)
    model = misc.compile_model(model, args)

    # no weight decay on biases and norm layers (timm's rule, as the reference)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = misc.adamw(param_groups, args, lr=args.lr, betas=(0.9, 0.95))
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
