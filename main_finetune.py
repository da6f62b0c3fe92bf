"""Fine-tuning (end to end or partial) and evaluation of a ViT classifier from an MAE encoder:
``python main_finetune.py ...`` on one process, ``torchrun ... main_finetune.py ...`` on many.

The flags, their defaults and the training behaviour (data order and augmentation, the random streams, layer-wise lr
decay, Mixup/CutMix, label smoothing, checkpoints, logs) are the reference's (facebookresearch/mae,
main_finetune.py); flags that are not in the reference are marked [new].
"""
import argparse
import datetime
import json
import os
import time

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import util.lr_decay as lrd
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from util.runs import (add_common_args, add_run_control_args, check_batches, open_log_writer, resolve_resume,
                       set_lr, start_run, wrap_ddp)
from util.datasets import build_dataset
from util.image_folder import log_epoch_count, skipped_state, start_epoch_count
from util.pretrained import load_pretrained_encoder


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

    add_common_args(parser, data_help='dataset path (an ImageFolder tree with train/ and val/ folders)')
    add_run_control_args(parser, save_freq=1)
    return parser


# ---------------------------------------------------------------------------------------------------- shared checks
def check_model_name(args):
    if args.model not in models_vit.MODELS:
        raise misc.UsageError(f"--model {args.model} is not a classification model; choose one of: "
                              + ', '.join(models_vit.MODELS))


def check_common_args(args):
    """Checks main_finetune.py and main_linprobe.py share."""
    check_model_name(args)
    for flag in ('batch_size', 'accum_iter', 'epochs', 'nb_classes', 'save_freq'):
        if getattr(args, flag) < 1:
            raise misc.UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def check_classes(args, dataset_train, dataset_val):
    """Every class folder must have an output: ``--nb_classes`` at least the number of classes found."""
    for dataset in (dataset_train, dataset_val):
        if dataset is not None and len(dataset.classes) > args.nb_classes:
            raise misc.UsageError(f"--nb_classes {args.nb_classes} is smaller than the {len(dataset.classes)} "
                                  f"classes in {dataset.root}")
    if dataset_train is not None and dataset_train.classes != dataset_val.classes:
        # ImageFolder numbers each split's folders on its own: the labels of train/ and val/ would not agree
        print(f"Warning: {dataset_train.root} and {dataset_val.root} do not hold the same class folders; class "
              f"indices are assigned per folder, so they differ between the two")


def build_loaders(args, dataset_train, dataset_val, device):
    """The reference's loaders: a DistributedSampler for training also on one process (its fixed seed gives the
    reference's data order), sequential evaluation unless ``--dist_eval``."""
    num_tasks = misc.get_world_size()
    global_rank = misc.get_rank()
    pin_memory = args.pin_mem and device.type == 'cuda'
    data_loader_train = None
    if dataset_train is not None:
        check_batches(args, dataset_train, num_tasks)
        # (wrapped so that an epoch resumed in the middle skips what was trained on)
        sampler_train = misc.SkippableSampler(torch.utils.data.DistributedSampler(
            dataset_train, num_replicas=num_tasks, rank=global_rank, shuffle=True))
        print("Sampler_train = %s" % str(sampler_train))
        data_loader_train = torch.utils.data.DataLoader(
            dataset_train, sampler=sampler_train, batch_size=args.batch_size, num_workers=args.num_workers,
            pin_memory=pin_memory, drop_last=True)
    if args.dist_eval:
        if len(dataset_val) % num_tasks != 0:
            print('Warning: Enabling distributed evaluation with an eval dataset not divisible by process number. '
                  'This will slightly alter validation results as extra duplicate entries are added to achieve '
                  'equal num of samples per-process.')
        # shuffle=True to reduce monitor bias
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=num_tasks, rank=global_rank,
                                                          shuffle=True)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    data_loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=pin_memory, drop_last=False)
    return data_loader_train, data_loader_val


def load_finetune_weights(args, model, head_init_std):
    """The reference's start of training from ``--finetune``: load the encoder, then draw the head's weights with
    ``trunc_normal_(std=head_init_std)``. When resuming, the file is not read (the checkpoint's weights replace
    everything), but the head is still drawn, so that the random stream goes on as in the reference's resumed run."""
    if not args.finetune or args.eval:
        return
    if args.resume:
        print(f"Resuming from {args.resume}: --finetune {args.finetune} is not loaded")
    else:
        load_pretrained_encoder(model, args.finetune, model_name=args.model)
    trunc_normal_(model.head.weight, std=head_init_std)


def run_epochs(args, model, model_without_ddp, data_loader_train, data_loader_val, optimizer, loss_scaler,
               criterion, n_parameters, resumed, max_norm=None, mixup_fn=None):
    """The training loop both entry points share: train, evaluate, log.txt row, checkpoint, TensorBoard perf/*.

    A run that dies before its checkpoint is complete resumes from the previous epoch, and ``misc.truncate_log``
    drops the log.txt rows written after it. ``resumed`` is what ``resume()`` returned. Within an
    epoch, ``--save_every_iters`` and stop signals (SIGUSR1/SIGTERM) write resumable checkpoints, as in
    pre-training."""
    device = torch.device(args.device)
    mid_epoch, purge_step, max_accuracy = resumed
    log_writer = open_log_writer(args, purge_step)
    dataset_train = data_loader_train.dataset
    checkpointer = misc.EpochCheckpointer(args, model, model_without_ddp, optimizer, loss_scaler,
                                          extra_state=lambda: skipped_state(dataset_train))
    misc.install_stop_handlers()

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            data_loader_train.sampler.set_epoch(epoch)
        start_epoch_count(dataset_train, mid_epoch)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      max_norm, mixup_fn, log_writer=log_writer, args=args,
                                      checkpointer=checkpointer, resume=mid_epoch)
        mid_epoch, data_loader_train.sampler.skip = None, 0

        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: "
              f"{test_stats['acc1']:.1f}%")
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f'Max accuracy: {max_accuracy:.2f}%')

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch,
                     'n_parameters': n_parameters}
        log_epoch_count(log_stats, dataset_train, epoch)
        if args.output_dir and misc.is_main_process():
            if log_writer is not None:
                log_writer.flush()
            misc.append_log(args.output_dir, log_stats)
        if args.output_dir:
            keep = epoch % args.save_freq == 0 or epoch + 1 == args.epochs
            misc.save_model(args=args, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer,
                            loss_scaler=loss_scaler, epoch=epoch, keep=keep,
                            extra={'max_accuracy': max_accuracy})
        # after the checkpoint, unlike the log row: these points are at step `epoch` (the reference's axis), below
        # the purge step (1000 x epoch) of a resumed run, so one written before a kill would appear twice
        if log_writer is not None:
            log_writer.add_scalar('perf/test_acc1', test_stats['acc1'], epoch)
            log_writer.add_scalar('perf/test_acc5', test_stats['acc5'], epoch)
            log_writer.add_scalar('perf/test_loss', test_stats['loss'], epoch)
            log_writer.flush()

    if log_writer is not None:
        log_writer.close()
    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))


def resume(args, model_without_ddp, optimizer, loss_scaler, data_loader_train):
    """``--resume`` (or, when training, the newest checkpoint in --output_dir): weights, and unless ``--eval`` the
    optimizer, scaler, epoch, random streams and position within the epoch, with log.txt cut back to the
    checkpoint (``misc.prepare_resume``). Returns ``(mid-epoch resume or None, TensorBoard purge step or None, best
    test accuracy so far)``; the reference restarts the best accuracy from 0 when resuming, as here for its
    checkpoints, which do not hold it."""
    checkpoint = misc.load_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer,
                                 loss_scaler=loss_scaler)
    if args.eval:
        return None, None, 0.0
    mid_epoch, purge_step = misc.prepare_resume(args, checkpoint, data_loader_train)
    return mid_epoch, purge_step, best_accuracy(args, checkpoint)


def best_accuracy(args, checkpoint):
    """The best test accuracy of the epochs a checkpoint follows: kept in our end-of-epoch checkpoints; for a
    mid-epoch one, the best of the (already truncated) log.txt rows."""
    if not checkpoint:
        return 0.0
    if 'max_accuracy' in checkpoint:
        return float(checkpoint['max_accuracy'])
    log = os.path.join(args.output_dir, 'log.txt') if args.output_dir else ''
    if 'resume_iter' in checkpoint and log and os.path.isfile(log):
        with open(log, encoding='utf-8') as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return max((r['test_acc1'] for r in rows if 'test_acc1' in r), default=0.0)
    return 0.0


# ---------------------------------------------------------------------------------------------------- fine-tuning
def check_args(args):
    check_common_args(args)
    if args.train_blocks < -1:
        raise misc.UsageError(f"--train_blocks must be -1 (all) or a number of blocks >= 0, got {args.train_blocks}")


def main(args):
    check_args(args)
    # [new] seed_python: RandAugment and random erasing draw from python's `random`; the reference leaves it
    # unseeded, so with --num_workers 0 its runs differ from one another (DataLoader workers seed it themselves)
    device = start_run(args, __file__, seed_python=True)

    # (evaluation only needs val/)
    dataset_train = None if args.eval else build_dataset(is_train=True, args=args)
    dataset_val = build_dataset(is_train=False, args=args)
    check_classes(args, dataset_train, dataset_val)
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val, device)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        print("Mixup is activated!")
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.nb_classes)

    if not args.eval:
        resolve_resume(args)  # before the model: a resumed run does not read --finetune

    model = models_vit.MODELS[args.model](
        img_size=args.input_size,
        num_classes=args.nb_classes,
        drop_path_rate=args.drop_path,
        global_pool=args.global_pool,
    )
    if args.train_blocks > len(model.blocks):
        raise misc.UsageError(f"--train_blocks {args.train_blocks}: {args.model} has only {len(model.blocks)} blocks")
    load_finetune_weights(args, model, head_init_std=2e-5)

    if args.train_blocks >= 0:
        trainable = models_vit.train_last_blocks(model, args.train_blocks)
        print(f"Partial fine-tuning: training the last {args.train_blocks} of {len(model.blocks)} blocks, the final "
              f"norm and the head ({len(trainable)} tensors); everything else is frozen")

    model.to(device)

    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    print("Model = %s" % str(model_without_ddp))
    print('number of params (M): %.2f' % (n_parameters / 1.e6))

    set_lr(args)

    model, model_without_ddp = wrap_ddp(model, args, device)

    # layer-wise lr decay; frozen parameters (partial fine-tuning) are left out
    param_groups = lrd.param_groups_lrd(model_without_ddp, args.weight_decay,
                                        no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                        layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr)
    loss_scaler = misc.loss_scaler_for(args)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is in the mixed targets
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    resumed = resume(args, model_without_ddp, optimizer, loss_scaler, data_loader_train)

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return

    run_epochs(args, model, model_without_ddp, data_loader_train, data_loader_val, optimizer, loss_scaler,
               criterion, n_parameters, resumed, max_norm=args.clip_grad, mixup_fn=mixup_fn)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser().parse_args())
