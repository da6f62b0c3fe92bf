"""Linear probing of an MAE encoder: a BatchNorm (no affine) + linear head trained with LARS on the frozen encoder.
``python main_linprobe.py ...`` on one process, ``torchrun ... main_linprobe.py ...`` on many.

The flags, their defaults and the training behaviour (TF-style crop and flip only, the random streams, LARS, the
head's initialisation, checkpoints, logs) are the reference's (facebookresearch/mae, main_linprobe.py); flags that are
not in the reference are marked [new]. Two reference defects are fixed: with ``--global_pool`` the freshly created
``fc_norm`` is trained (the reference froze it at its initial identity, issue #186), and ``--resume`` is documented
and tested for the BatchNorm head.
"""
import argparse

import torch

import models_vit
import util.misc as misc
from engine_finetune import evaluate, train_and_evaluate
from util import data_stats, fast_data
from util.crop import RandomResizedCrop
from util.datasets import check_classes, eval_transform, linprobe_transform, val_loader
from util.flags import add_common_args, check_common
from util.image_folder import ImageReader, image_folder
from util.lars import LARS
from util.lr_sched import set_lr
from util.pretrained import load_finetune_weights
from util.run import Run


def get_args_parser():
    parser = argparse.ArgumentParser('MAE linear probing for image classification', add_help=False)
    parser.add_argument('--batch_size', default=512, type=int,
                        help='Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus')
    parser.add_argument('--epochs', default=90, type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='Accumulate gradient iterations (for increasing the effective batch size under memory '
                             'constraints)')

    # Model parameters
    parser.add_argument('--model', default='vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train: ' + ', '.join(models_vit.MODELS))
    parser.add_argument('--input_size', default=224, type=int,
                        help='[new] images input size (the reference is fixed at 224)')

    # Optimizer parameters
    parser.add_argument('--weight_decay', type=float, default=0,
                        help='weight decay (default: 0 for linear probe following MoCo v1)')
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=float, default=0.1, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=float, default=0., metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=int, default=10, metavar='N', help='epochs to warmup LR')

    # * Finetuning params
    parser.add_argument('--finetune', default='', help='finetune from checkpoint')
    parser.add_argument('--global_pool', action='store_true',
                        help='pool the mean of the patch tokens (its fc_norm is trained with the head)')
    parser.set_defaults(global_pool=False)
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='Use class token instead of global pool for classification')

    # Dataset parameters
    parser.add_argument('--nb_classes', default=1000, type=int, help='number of the classification types')
    parser.add_argument('--eval', action='store_true', help='Perform evaluation only')
    parser.add_argument('--dist_eval', action='store_true', default=False,
                        help='Enabling distributed evaluation (recommended during training for faster monitor')

    add_common_args(parser, data_help='dataset path (an ImageFolder tree with train/ and val/ folders)', save_freq=1,
                    optimizer='lars', checkpointing=False, data_loaders=('pil', 'fast_cpu'))
    data_stats.add_args(parser, checkpoint_flag='--finetune')
    return parser


def add_probe_head(model):
    """Put a BatchNorm without affine parameters in front of the linear head (MoCo v3's linear probe; the head's
    input is then whitened per feature), and freeze everything but the head and, with global pooling, ``fc_norm``.
    Returns the trainable parameters, the head's first.

    ``fc_norm`` is created afresh for global pooling (the MAE encoder has no such layer); the reference freezes it at
    its initial identity (issue #186). Here it is trained. The BatchNorm right after it normalises each feature again,
    which cancels a per-feature scale and shift (up to sign and eps), so its gradients are tiny and the numbers
    barely move; the default class-token probe is unaffected.
    """
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
        p.requires_grad = False
    trainable = list(model.head.parameters())
    if model.global_pool:
        trainable += list(model.fc_norm.parameters())
    for p in trainable:
        p.requires_grad = True
    return trainable


def check_args(args):
    check_common(args, models_vit.MODELS, 'classification', splits=['val'] if args.eval else ['val', 'train'])


def main(args):
    check_args(args)
    # --in_chans and the normalisation: given, else --finetune's (said in one line), before Run compares them with a
    # checkpoint to continue
    data_stats.resolve_supervised(args)
    run = Run(args, __file__)
    device = run.device

    # (evaluation only needs val/); --data_loader fast_cpu draws the same TF-style crops
    data_loader_train = None if args.eval else fast_data.train_loader(
        args, linprobe_transform(args.input_size, args.mean, args.std), dict(scale=(0.08, 1.0), get_params=RandomResizedCrop.get_params),
        device)
    dataset_val = image_folder(args.data_path, 'val', eval_transform(args.input_size, args.mean, args.std),
                               skip_bad=args.skip_bad_images, loader=ImageReader(args.in_chans))
    print(dataset_val)
    check_classes(args, data_loader_train and data_loader_train.dataset, dataset_val)
    data_loader_val = val_loader(args, dataset_val, device)

    model = models_vit.MODELS[args.model](
        img_size=args.input_size,
        in_chans=args.in_chans,
        num_classes=args.nb_classes,
        global_pool=args.global_pool,
    )
    # following MoCo v3
    load_finetune_weights(args, model, head_init_std=0.01, resuming=run.checkpoint is not None)
    trainable = add_probe_head(model)

    model.to(device)

    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    print("Model = %s" % str(model_without_ddp))
    print('number of params (M): %.2f' % (n_parameters / 1.e6))

    set_lr(args, misc.get_world_size())

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module
    if args.compile:  # [new] after the DDP wrap, so that DDP's buckets still overlap the backward
        model = torch.compile(model)

    optimizer = LARS(trainable, lr=args.lr, weight_decay=args.weight_decay)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    # the model already has its BatchNorm head here, so a linear-probe checkpoint loads as it is
    run.restore(model_without_ddp, optimizer, loss_scaler, data_loader_train, track_accuracy=True)

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return

    train_and_evaluate(model, criterion, data_loader_train, data_loader_val, optimizer, device, loss_scaler, run,
                       args, n_parameters)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
