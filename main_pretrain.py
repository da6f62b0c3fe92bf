"""MAE pre-training: ``python main_pretrain.py ...`` on one process, ``torchrun ... main_pretrain.py ...`` on many.

The flags, their defaults and the training behaviour (data order, augmentation, schedule, checkpoints, logs) are the
reference's (facebookresearch/mae, main_pretrain.py); flags that are not in the reference are marked [new].
"""
import datetime
import time

import torch

import models_mae
import util.data.loaders as loaders
import util.misc as misc
import util.checkpoints.resume as resume
from engine_pretrain import train_one_epoch
from util.compat import param_groups_weight_decay
from util.data import data_stats
from util.evaluation import knn_monitor
from util.datasets import pretrain_transform
from util.errors import UsageError
from util.flag_checks import check_common
from util.flags import Parser, Range, add_common_args
from util.data.image_sources import check_pretrain_path, check_run_outside_data
from util.checkpoints.from_checkpoint import init_from_checkpoint
from util.training.process import run_main, setup_process
from util.checkpoints.saver import CheckpointSaver
from util.training.output_dir import append_log
from util.training.run import add_points, open_records, print_epoch_time


def get_args_parser():
    parser = Parser('MAE pre-training', add_help=False)
    add_common_args(parser, models_mae.MODELS,
                    dict(batch_size=64, epochs=400, model='mae_vit_large_patch16', weight_decay=0.05, blr=1e-3,
                         min_lr=0., warmup_epochs=40),
                    data_help='dataset path: an ImageFolder tree with a train/ folder (the reference), [new] a '
                              'folder of images (searched recursively), a .txt list of image paths, tar shards or a '
                              'Hugging Face dataset (docs/data-shards.md)', save_freq=20,
                    optimizer='adamw', checkpointing=True, data_loaders=loaders.LOADER_HELP)

    # Model parameters
    parser.add_argument('--mask_ratio', default=0.75, type=Range(float, 0, 1, high_open=True),
                        help='Masking ratio (percentage of removed patches).')
    parser.add_argument('--norm_pix_loss', action='store_true',
                        help='Use (per-patch) normalized pixels as targets for computing loss')
    parser.set_defaults(norm_pix_loss=False)
    parser.add_argument('--mask_type', default='random', choices=models_mae.MASK_TYPES,
                        help='[new] how the removed patches are chosen (the paper\'s Table 1f): random (the paper\'s '
                             'and the reference\'s, default), block (BEiT-style rectangles) or grid (keep one patch of '
                             'every 2x2 cell; masks 75%% by construction). Every image keeps exactly '
                             'int(L * (1 - mask_ratio)) patches')
    parser.add_argument('--decoder_depth', default=None, type=Range(int, 1), metavar='N',
                        help='[new] number of decoder blocks (the paper\'s Table 1a; default: the model\'s own, 8 for '
                             'the paper\'s models)')
    parser.add_argument('--decoder_embed_dim', default=None, type=Range(int, 1), metavar='D',
                        help='[new] decoder width (the paper\'s Table 1b; default: the model\'s own, 512 for the '
                             'paper\'s models). The attention heads keep their width (32 for the paper\'s models: '
                             '16 heads at 512, 8 at 256), so D must be a multiple of it')
    parser.add_argument('--init_from', default='', metavar='FILE',
                        help='[new] start from the weights of an MAE checkpoint (a released full or encoder-only '
                             'one, or ours; position embeddings resized to --input_size, patch embedding adapted to '
                             '--in_chans), with a fresh optimizer, schedule and epoch count; a resumed run restores '
                             'its own checkpoint instead (docs/own-images.md)')
    parser.add_argument('--shuffle_every_epoch', action='store_true',
                        help='[new] draw a new data order every epoch also on a single process (the reference '
                             'reshuffles only when distributed, so one process sees the same order every epoch)')

    # [new] the kNN monitor (util/evaluation/knn_monitor.py)
    parser.add_argument('--knn_every', default=0, type=Range(int, 1, special=(0,), meaning='0 (off)'), metavar='N',
                        help='[new] every N epochs and after the last, a weighted k-NN classifier (k=20, T=0.07, '
                             'DINO\'s protocol) on the encoder\'s unmasked features of --knn_data_path: knn_top1/'
                             'knn_top5 (class token) and knn_mean_top1/5 (mean of patch tokens) in log.txt and '
                             'TensorBoard; it does not change training (default 0: off)')
    parser.add_argument('--knn_data_path', default='', metavar='DIR',
                        help='[new] an ImageFolder tree with train/ and val/ (the same class folders) for '
                             '--knn_every; may be a small labelled subset')
    parser.add_argument('--knn_train_subset', default=0, type=Range(int, 1, special=(0,), meaning='0 (all)'),
                        metavar='M', help='[new] use M images of --knn_data_path/train, drawn once with a fixed seed '
                                          '(default 0: all), to bound the monitor\'s cost')
    parser.add_argument('--knn_val_subset', default=0, type=Range(int, 1, special=(0,), meaning='0 (all)'),
                        metavar='M', help='[new] the same for --knn_data_path/val')
    return parser


def check_args(args):
    """Refuse what cannot run, in one line, before anything is computed (each flag's range is checked while
    parsing); [new] returns the checkpoint this run continues (auto-resume: the newest in --output_dir), checked to
    be of this script, model and training flags, or None."""
    check_common(args, models_mae.MODELS, 'pre-training', splits=[])
    check_pretrain_path(args.data_path)  # [new] a folder (ImageFolder tree or images), a .txt list, shards, HF
    data_stats.check_given(args)  # other channel counts than ImageNet's 3 need their own statistics
    knn_monitor.check_args(args)
    check_run_outside_data(args)  # [new] the run's folders are not among those it reads images from
    if args.mask_type == 'grid' and args.mask_ratio != models_mae.GRID_MASK_RATIO:
        raise UsageError(f"--mask_type grid keeps one patch of every four, so it masks "
                         f"{models_mae.GRID_MASK_RATIO} by construction; --mask_ratio {args.mask_ratio} cannot "
                         f"be (leave --mask_ratio out)")
    if args.mask_type != 'random' or args.decoder_depth is not None or args.decoder_embed_dim is not None \
            or args.init_from:
        # the model's own checks (decoder width vs head width, an even patch grid for grid masks) and the
        # --init_from file fitting it, before any compute: on the meta device the model takes no memory and no time
        try:
            with torch.device('meta'):
                model = models_mae.MODELS[args.model](
                    img_size=args.input_size, mask_type=args.mask_type, decoder_depth=args.decoder_depth,
                    decoder_embed_dim=args.decoder_embed_dim, in_chans=args.in_chans or 3)
        except ValueError as e:
            raise UsageError(f"--decoder_embed_dim {args.decoder_embed_dim} does not fit --model {args.model}: "
                             f"{e}") from None
        grid_h, grid_w = model.patch_embed.grid_size
        if args.mask_type == 'grid' and (grid_h % 2 or grid_w % 2):
            raise UsageError(f"--mask_type grid needs an even patch grid (2x2 cells); --input_size "
                             f"{args.input_size} gives {grid_h}x{grid_w} patches with --model {args.model}")
        if args.init_from:
            with torch.device('meta'):
                init_from_checkpoint(model, args.init_from, check_only=True)
    args.resume, checkpoint = resume.choose_checkpoint(args, __file__)
    return checkpoint


def main(args):
    checkpoint = check_args(args)  # (and the checkpoint to continue, if any)
    # process group, --output_dir locked, flags printed, seeds; [new] SIGUSR1, SIGTERM, Ctrl-C: save at the next
    # optimizer step, then stop
    device = setup_process(args, __file__)

    # the reference's simple augmentation (PIL) with the normalisation given, ImageNet's, or [new] measured on the
    # images (--data_stats auto); a fast --data_loader applies the same steps, read from it
    data_loader_train = loaders.train_loader(args, pretrain_transform, device, pretraining=True)
    knn = knn_monitor.KnnMonitor(args, device) if args.knn_every else None  # [new] draws no random number

    # --decoder_depth/--decoder_embed_dim/--mask_type/--in_chans [new] left out: the reference's model
    model = models_mae.MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                          mask_type=args.mask_type, decoder_depth=args.decoder_depth,
                                          decoder_embed_dim=args.decoder_embed_dim, in_chans=args.in_chans)
    if args.init_from and checkpoint is None:  # a resumed run restores its own weights: never re-initialised
        init_from_checkpoint(model, args.init_from)
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(device)
    model_without_ddp = model
    print("Model = %s" % str(model_without_ddp))

    eff_batch_size = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:  # only base_lr is specified
        args.lr = args.blr * eff_batch_size / 256
    print("base lr: %.2e" % (args.lr * 256 / eff_batch_size))
    print("actual lr: %.2e" % args.lr)
    print("accumulate grad iterations: %d" % args.accum_iter)
    print("effective batch size: %d" % eff_batch_size)

    if args.distributed:  # (the reference's find_unused_parameters=True searched in vain: every parameter is used)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda'
                                                          else None)
    if args.compile:  # [new] after the DDP wrap, so that its buckets still overlap the backward
        model = torch.compile(model)

    # no weight decay on biases and norm layers (timm's rule, as the reference)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95),
                                  fused=misc.fused_adamw(args.device) if args.fused_adamw else None)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    start = resume.restart_from_checkpoint(checkpoint, args.resume, args, model_without_ddp, optimizer, loss_scaler,
                                           len(data_loader_train), data=data_loader_train.dataset)
    # log.txt cut back to the checkpoint [new], args.yaml [new], TensorBoard (hiding its points after the checkpoint)
    log_writer = open_records(args, start)
    saver = CheckpointSaver(args, __file__, model_without_ddp, optimizer, loss_scaler, data_loader_train,
                            log_writer=log_writer)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):  # (each epoch's data order: util.training.run.epoch_batches)
        epoch_start = time.time()
        train_stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer=log_writer, args=args, saver=saver, position=start.position)
        knn_stats = knn(model_without_ddp, epoch) if knn else {}  # [new] its own random streams: training unchanged

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch, **knn_stats}
        loaders.add_skipped_count(log_stats, data_loader_train, epoch)  # [new] --skip_bad_images
        append_log(args.output_dir, log_stats, log_writer)  # (before the checkpoint: a resume trims what follows)
        saver.save(epoch)  # every --save_freq epochs and the last kept; always checkpoint-last.pth
        add_points(log_writer, knn_stats, epoch)  # (after the checkpoint: below a resumed run's purge step)
        print_epoch_time(epoch, args.epochs, epoch_start)

    if log_writer is not None:
        log_writer.close()
    print('Training time {}'.format(datetime.timedelta(seconds=int(time.time() - start_time))))


if __name__ == '__main__':
    run_main(main, get_args_parser())
