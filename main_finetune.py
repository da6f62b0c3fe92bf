"""Fine-tuning (end to end or partial) and evaluation of a ViT classifier from an MAE encoder:
``python main_finetune.py ...`` on one process, ``torchrun ... main_finetune.py ...`` on many.

The flags, their defaults and the training behaviour (data order and augmentation, the random streams, layer-wise lr
decay, Mixup/CutMix, label smoothing, checkpoints, logs) are the reference's (facebookresearch/mae,
main_finetune.py); flags that are not in the reference are marked [new].
"""
import argparse

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import util.lr_decay as lrd
import util.misc as misc
import util.speed as speed
from engine_finetune import evaluate, train_and_evaluate
from util import data_stats, fast_data
from util.datasets import build_transform, check_classes, val_loader
from util.flags import add_common_args, check_common
from util.image_folder import ImageReader, image_folder
from util.lr_sched import set_lr
from util.pretrained import load_finetune_weights
from util.run import Run


def get_args_parser():
    parser = argparse.ArgumentParser('MAE fine-tuning for image classification', add_help=False)
    parser.add_argument('--batch_size', default=64, type=int,
                        help='Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus')
    parser.add_argument('--epochs', default=50, type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='Accumulate gradient iterations (for increasing the effective batch size under memory '
                             'constraints)')

    # Model parameters
    parser.add_argument('--model', default='vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train: ' + ', '.join(models_vit.MODELS))
    parser.add_argument('--input_size', default=224, type=int, help='images input size')
    parser.add_argument('--drop_path', type=float, default=0.1, metavar='PCT', help='Drop path rate (default: 0.1)')
    parser.add_argument('--train_blocks', type=int, default=-1, metavar='K',
                        help='[new] partial fine-tuning: train only the last K Transformer blocks, the final norm and '
                             'the head, everything else frozen (K=0: norm and head only). Default -1: train all '
                             '(the reference)')

    # Optimizer parameters
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                        help='Clip gradient norm (default: None, no clipping)')
    parser.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=float, default=1e-3, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--layer_decay', type=float, default=0.75, help='layer-wise lr decay from ELECTRA/BEiT')
    parser.add_argument('--min_lr', type=float, default=1e-6, metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=int, default=5, metavar='N', help='epochs to warmup LR')

    # Augmentation parameters
    parser.add_argument('--color_jitter', type=float, default=None, metavar='PCT',
                        help='Color jitter factor (enabled only when not using Auto/RandAug)')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='Use AutoAugment policy. "v0" or "original". (default: rand-m9-mstd0.5-inc1)')
    parser.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')

    # * Random Erase params
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='Random erase prob (default: 0.25)')
    parser.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    parser.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='Do not random erase first (clean) augmentation split (accepted, as in the reference, '
                             'but without effect: no augmentation splits are used)')

    # * Mixup params
    parser.add_argument('--mixup', type=float, default=0, help='mixup alpha, mixup enabled if > 0.')
    parser.add_argument('--cutmix', type=float, default=0, help='cutmix alpha, cutmix enabled if > 0.')
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None,
                        help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    parser.add_argument('--mixup_prob', type=float, default=1.0,
                        help='Probability of performing mixup or cutmix when either/both is enabled')
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5,
                        help='Probability of switching to cutmix when both mixup and cutmix enabled')
    parser.add_argument('--mixup_mode', type=str, default='batch',
                        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    # * Finetuning params
    parser.add_argument('--finetune', default='', help='finetune from checkpoint')
    parser.add_argument('--global_pool', action='store_true')
    parser.set_defaults(global_pool=True)
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='Use class token instead of global pool for classification')

    # Dataset parameters
    parser.add_argument('--nb_classes', default=1000, type=int, help='number of the classification types')
    parser.add_argument('--eval', action='store_true', help='Perform evaluation only')
    parser.add_argument('--dist_eval', action='store_true', default=False,
                        help='Enabling distributed evaluation (recommended during training for faster monitor')

    # (the input keeps timm's RandAugment: PIL only)
    add_common_args(parser, data_help='dataset path (an ImageFolder tree with train/ and val/ folders)', save_freq=1,
                    optimizer='adamw', checkpointing=True)
    data_stats.add_args(parser, checkpoint_flag='--finetune')
    return parser


def check_args(args):
    check_common(args, models_vit.MODELS, 'classification', splits=['val'] if args.eval else ['val', 'train'])
    if args.train_blocks < -1:
        raise misc.UsageError(f"--train_blocks must be -1 (all) or a number of blocks >= 0, got {args.train_blocks}")


def main(args):
    check_args(args)
    # [new] seed_python: RandAugment and random erasing draw from python's `random`; the reference leaves it
    # unseeded, so with --num_workers 0 its runs differ from one another (DataLoader workers seed it themselves)
    # --in_chans and the normalisation: given, else --finetune's (said in one line), before Run compares them with a
    # checkpoint to continue
    data_stats.resolve_supervised(args)
    run = Run(args, __file__, seed_python=True)
    device = run.device

    # (evaluation only needs val/)
    data_loader_train = None if args.eval else fast_data.train_loader(args, build_transform(True, args), None, device)
    dataset_val = image_folder(args.data_path, 'val', build_transform(False, args), skip_bad=args.skip_bad_images,
                               loader=ImageReader(args.in_chans))
    print(dataset_val)
    check_classes(args, data_loader_train and data_loader_train.dataset, dataset_val)
    data_loader_val = val_loader(args, dataset_val, device)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        print("Mixup is activated!")
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.nb_classes)

    model = models_vit.MODELS[args.model](
        img_size=args.input_size,
        in_chans=args.in_chans,
        num_classes=args.nb_classes,
        drop_path_rate=args.drop_path,
        global_pool=args.global_pool,
    )
    if args.train_blocks > len(model.blocks):
        raise misc.UsageError(f"--train_blocks {args.train_blocks}: {args.model} has only {len(model.blocks)} blocks")
    load_finetune_weights(args, model, head_init_std=2e-5, resuming=run.checkpoint is not None)

    if args.train_blocks >= 0:
        trainable = models_vit.train_last_blocks(model, args.train_blocks)
        print(f"Partial fine-tuning: training the last {args.train_blocks} of {len(model.blocks)} blocks, the final "
              f"norm and the head ({len(trainable)} tensors); everything else is frozen")

    model.set_grad_checkpointing(args.grad_checkpointing)
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

    # layer-wise lr decay; frozen parameters (partial fine-tuning) are left out
    param_groups = lrd.param_groups_lrd(model_without_ddp, args.weight_decay,
                                        no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                        layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr,
                                  fused=speed.fused_adamw(args.device) if args.fused_adamw else None)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is in the mixed targets
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    run.restore(model_without_ddp, optimizer, loss_scaler, data_loader_train, track_accuracy=True)

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return

    train_and_evaluate(model, criterion, data_loader_train, data_loader_val, optimizer, device, loss_scaler, run,
                       args, n_parameters, max_norm=args.clip_grad, mixup_fn=mixup_fn)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
