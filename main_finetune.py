"""Fine-tuning (end to end or partial) and evaluation of a ViT classifier from an MAE encoder:
``python main_finetune.py ...`` on one process, ``torchrun ... main_finetune.py ...`` on many.

The flags, their defaults and the training behaviour (data order and augmentation, the random streams, layer-wise lr
decay, Mixup/CutMix, label smoothing, checkpoints, logs) are the reference's (facebookresearch/mae,
main_finetune.py); flags that are not in the reference are marked [new].
"""
import datetime
import time

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import models_vit
import util.data.loaders as loaders
import util.lr_decay as lrd
import util.misc as misc
import util.checkpoints.resume as resume
from engine_finetune import TEST_POINTS, evaluate, evaluate_epoch, train_one_epoch
from util.data import data_stats
from util.checkpoints.saver import CheckpointSaver
from util.datasets import build_transform, check_augmentation, check_classes
from util.errors import UsageError
from util.flag_checks import check_common
from util.flags import Parser, Range, add_classifier_args, add_common_args
from util.data.image_decode import ImageReader
from util.data.image_folder import image_folder
from util.data.image_sources import check_run_outside_data
from util.training.output_dir import append_log
from util.checkpoints.from_checkpoint import load_finetune_weights
from util.training.process import run_main, setup_process
from util.training.run import add_points, open_records, print_epoch_time


def get_args_parser():
    parser = Parser('MAE fine-tuning for image classification', add_help=False)
    add_common_args(parser, models_vit.MODELS,
                    dict(batch_size=64, epochs=50, model='vit_large_patch16', weight_decay=0.05, blr=1e-3, min_lr=1e-6,
                         warmup_epochs=5),
                    data_help='dataset path (an ImageFolder tree with train/ and val/ folders)', save_freq=1,
                    optimizer='adamw', checkpointing=True, stats_from='--finetune')

    # Model parameters (a drop-path rate of 1 drops every block)
    parser.add_argument('--drop_path', type=Range(float, 0, 1, high_open=True), default=0.1, metavar='PCT',
                        help='Drop path rate (default: 0.1)')
    parser.add_argument('--train_blocks', type=Range(int, 0, special=(-1,), meaning='-1 (all)'), default=-1,
                        metavar='K',
                        help='[new] partial fine-tuning: train only the last K Transformer blocks, the final norm and '
                             'the head, everything else frozen (K=0: norm and head only). Default -1: train all '
                             '(the reference)')

    # Optimizer parameters: a negative --clip_grad multiplies every gradient by a negative factor (gradient ascent),
    # 0 zeroes them; a --layer_decay outside (0, 1] gives layers a negative lr, or the lower layers the larger one;
    # torch refuses AdamW betas outside [0, 1)
    parser.add_argument('--clip_grad', type=Range(float, 0, low_open=True), default=None, metavar='NORM',
                        help='Clip gradient norm (default: None, no clipping)')
    parser.add_argument('--layer_decay', type=Range(float, 0, 1, low_open=True), default=0.75,
                        help='layer-wise lr decay from ELECTRA/BEiT')
    parser.add_argument('--opt_betas', type=Range(float, 0, 1, high_open=True), nargs='+', default=None, metavar='BETA',
                        help="[new] AdamW's two betas (default: torch's 0.9 0.999, the reference's; the paper's "
                             "supervised training from scratch, Appendix A.2: 0.9 0.95)")

    # * [new] an exponential moving average of the weights, as the paper's supervised training from scratch
    parser.add_argument('--model_ema', action='store_true',
                        help='[new] keep an exponential moving average (EMA) of the weights (timm\'s ModelEmaV3), '
                             'updated after each optimizer step; it is evaluated after each epoch beside the raw '
                             'weights (log.txt: test_acc1_ema, ...), kept in the checkpoints (model_ema) and, with '
                             '--eval, evaluated too')
    parser.add_argument('--model_ema_decay', type=Range(float, 0, 1, low_open=True, high_open=True), default=0.9999,
                        metavar='DECAY',
                        help='[new] the EMA\'s decay: after each optimizer step, ema = decay * ema + (1 - decay) * '
                             'weights, from the initial weights, no warm-up (default: 0.9999, the paper\'s)')

    # Augmentation parameters (timm's label smoothing asserts < 1)
    parser.add_argument('--color_jitter', type=Range(float, 0), default=None, metavar='PCT',
                        help='Color jitter factor (enabled only when not using Auto/RandAug)')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='Use AutoAugment policy. "v0" or "original". (default: rand-m9-mstd0.5-inc1)')
    parser.add_argument('--smoothing', type=Range(float, 0, 1, high_open=True), default=0.1,
                        help='Label smoothing (default: 0.1)')

    # * Random Erase params (timm takes a count of 0 as 1: turn erasing off with --reprob 0)
    parser.add_argument('--reprob', type=Range(float, 0, 1), default=0.25, metavar='PCT',
                        help='Random erase prob (default: 0.25)')
    parser.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    parser.add_argument('--recount', type=Range(int, 1), default=1, help='Random erase count (default: 1)')
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='Do not random erase first (clean) augmentation split (accepted, as in the reference, '
                             'but without effect: no augmentation splits are used)')

    # * Mixup params
    parser.add_argument('--mixup', type=Range(float, 0), default=0, help='mixup alpha, mixup enabled if > 0.')
    parser.add_argument('--cutmix', type=Range(float, 0), default=0, help='cutmix alpha, cutmix enabled if > 0.')
    parser.add_argument('--cutmix_minmax', type=Range(float, 0, 1), nargs='+', default=None,
                        help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    parser.add_argument('--mixup_prob', type=Range(float, 0, 1), default=1.0,
                        help='Probability of performing mixup or cutmix when either/both is enabled')
    parser.add_argument('--mixup_switch_prob', type=Range(float, 0, 1), default=0.5,
                        help='Probability of switching to cutmix when both mixup and cutmix enabled')
    parser.add_argument('--mixup_mode', type=str, default='batch',
                        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    add_classifier_args(parser, global_pool=True)
    return parser


def check_args(args):
    """Refuse what cannot run, in one line, before anything is computed (each flag's range is checked while
    parsing); [new] returns the checkpoint this run continues (auto-resume, or --resume), checked to be of this
    script, model and training flags, or None."""
    check_common(args, models_vit.MODELS, 'classification', splits=['val'] if args.eval else ['val', 'train'])
    check_run_outside_data(args, ['val'] if args.eval else ['val', 'train'])  # [new] not written among its images
    check_augmentation(args)
    if args.opt_betas is not None and len(args.opt_betas) != 2:
        raise UsageError(f"--opt_betas takes AdamW's two betas (e.g. 0.9 0.95), got "
                         f"{' '.join(map(str, args.opt_betas))}")
    args.resume, checkpoint = resume.choose_checkpoint(args, __file__)  # [new] the run to continue, if any
    return checkpoint


def main(args):
    checkpoint = check_args(args)  # (and the checkpoint to continue, if any)
    # [new] seed_python: RandAugment and random erasing draw from python's `random`; the reference leaves it
    # unseeded, so with --num_workers 0 its runs differ from one another (DataLoader workers seed it themselves)
    # process group, --output_dir locked, flags printed, seeds; [new] SIGUSR1, SIGTERM, Ctrl-C: save at the next
    # optimizer step, then stop
    device = setup_process(args, __file__, seed_python=True)
    # [new] --in_chans and the normalisation: given, a continued run's, else --finetune's (said in one line)
    data_stats.resolve_supervised(args)

    # (evaluation only needs val/)
    data_loader_train = None if args.eval else loaders.train_loader(args, build_transform(True, args), device)
    # [new] val/'s classes take train/'s numbers, by name (the reference numbers each split's folders on its own)
    dataset_val = image_folder(args.data_path, 'val', build_transform(False, args), skip_bad=args.skip_bad_images,
                               numbered_as='train', loader=ImageReader.of(args))
    print(dataset_val)
    check_classes(args, data_loader_train and data_loader_train.dataset, dataset_val)
    data_loader_val = loaders.val_loader(args, dataset_val, device)

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
        raise UsageError(f"--train_blocks {args.train_blocks}: {args.model} has only {len(model.blocks)} blocks")
    load_finetune_weights(args, model, head_init_std=2e-5, resuming=checkpoint is not None)
    if args.eval:  # the accuracy of the --resume checkpoint, nothing trained (with --model_ema, its EMA's too)
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
        resume.restart_from_checkpoint(checkpoint, args.resume, args, model, model_ema=model_ema)
        test_stats = evaluate(data_loader_val, model.to(device), device, args)
        if model_ema is not None:
            evaluate(data_loader_val, model_ema.module.to(device), device, args, ema=True)
        return test_stats

    if args.train_blocks >= 0:
        trainable = models_vit.train_last_blocks(model, args.train_blocks)
        print(f"Partial fine-tuning: training the last {args.train_blocks} of {len(model.blocks)} blocks, the final "
              f"norm and the head ({len(trainable)} tensors); everything else is frozen")

    model.set_grad_checkpointing(args.grad_checkpointing)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    print("Model = %s" % str(model))
    print('number of params (M): %.2f' % (n_parameters / 1.e6))

    eff_batch_size = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:  # only base_lr is specified
        args.lr = args.blr * eff_batch_size / 256
    print("base lr: %.2e" % (args.lr * 256 / eff_batch_size))
    print("actual lr: %.2e" % args.lr)
    print("accumulate grad iterations: %d" % args.accum_iter)
    print("effective batch size: %d" % eff_batch_size)

    model.to(device)
    # [new] --model_ema: the average starts from the initial weights, on the device, before DDP wraps the model
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda'
                                                          else None)
    if args.compile:  # [new] after the DDP wrap, so that its buckets still overlap the backward
        model = torch.compile(model)

    # layer-wise lr decay; frozen parameters (partial fine-tuning) are left out
    param_groups = lrd.param_groups_lrd(model_without_ddp, args.weight_decay,
                                        no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                        layer_decay=args.layer_decay)
    # (--opt_betas [new]; torch's default betas, (0.9, 0.999), are the reference's)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=tuple(args.opt_betas or (0.9, 0.999)),
                                  fused=misc.fused_adamw(args.device) if args.fused_adamw else None)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is in the mixed targets
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    start = resume.restart_from_checkpoint(checkpoint, args.resume, args, model_without_ddp, optimizer, loss_scaler,
                                           len(data_loader_train), model_ema=model_ema,
                                           data=data_loader_train.dataset)
    # log.txt cut back to the checkpoint [new], args.yaml [new], TensorBoard (hiding its points after the checkpoint)
    log_writer = open_records(args, start)
    saver = CheckpointSaver(args, __file__, model_without_ddp, optimizer, loss_scaler, data_loader_train,
                            model_ema=model_ema, max_accuracy=start.max_accuracy, log_writer=log_writer)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    max_accuracy = start.max_accuracy
    for epoch in range(args.start_epoch, args.epochs):  # (each epoch's data order: util.training.run.epoch_batches)
        epoch_start = time.time()
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      args.clip_grad, mixup_fn, log_writer=log_writer, args=args, model_ema=model_ema,
                                      saver=saver, position=start.position)
        test_stats = evaluate_epoch(saver, epoch, data_loader_val, model, device, args, model_ema)  # (and the EMA's)
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f'Max accuracy: {max_accuracy:.2f}%')

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch,
                     'n_parameters': n_parameters}
        loaders.add_skipped_count(log_stats, data_loader_train, epoch)  # [new] --skip_bad_images
        append_log(args.output_dir, log_stats, log_writer)  # (before the checkpoint: a resume trims what follows)
        saver.save(epoch, max_accuracy=max_accuracy)  # every --save_freq epochs and the last kept
        # (after the checkpoint: below a resumed run's purge step)
        add_points(log_writer, {f'perf/test_{k}': test_stats[k] for k in TEST_POINTS if k in test_stats}, epoch)
        print_epoch_time(epoch, args.epochs, epoch_start)

    if log_writer is not None:
        log_writer.close()
    print('Training time {}'.format(datetime.timedelta(seconds=int(time.time() - start_time))))


if __name__ == '__main__':
    run_main(main, get_args_parser())
