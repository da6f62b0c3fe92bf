"""MAE pre-training: ``python main_pretrain.py ...`` on one process, ``torchrun ... main_pretrain.py ...`` on many.

The flags, their defaults and the training behaviour (data order, augmentation, schedule, checkpoints, logs) are the
reference's (facebookresearch/mae, main_pretrain.py); flags that are not in the reference are marked [new].
"""
import datetime
import time

import torch

import models_mae
import util.data.loaders as loaders
import util.config_file as config_file
import util.misc as misc
import util.checkpoints.resume as resume
from engine_pretrain import train_one_epoch
from util.compat import param_groups_weight_decay
from util.data import data_stats
from util.evaluation import knn_monitor
from util.datasets import pretrain_transform
from util.errors import UsageError, run_main
from util.flag_checks import check_common
from util.flags import Parser, Range, add_common_args
from util.data.image_sources import check_pretrain_path, check_run_outside_data, pretrain_dataset
from util.lr_sched import set_lr
from util.checkpoints.from_checkpoint import init_from_checkpoint
from util.training.process import parallel_model, setup_process
from util.checkpoints.saver import CheckpointSaver
from util.training.output_dir import append_log, move_log_rows_after
from util.training.run import add_points, print_epoch_time, summary_writer


def get_args_parser():
    parser = Parser('MAE pre-training', add_help=False)
    add_common_args(parser, models_mae.MODELS,
                    dict(batch_size=64, epochs=400, model='mae_vit_large_patch16', weight_decay=0.05, blr=1e-3,
                         min_lr=0., warmup_epochs=40),
                    data_help='dataset path: an ImageFolder tree with a train/ folder (the reference), [new] a '
                              'folder of images (searched recursively) or a .txt list of image paths', save_freq=20,
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
    data_stats.add_args(parser)  # [new] --in_chans, --mean, --std, --data_stats
    parser.add_argument('--init_from', default='', metavar='FILE',
                        help='[new] start from the weights of an MAE checkpoint (a released full or encoder-only '
                             'one, or ours; position embeddings resized to --input_size, patch embedding adapted to '
                             '--in_chans), with a fresh optimizer, schedule and epoch count; a resumed run restores '
                             'its own checkpoint instead (docs/own-images.md)')
    parser.add_argument('--shuffle_every_epoch', action='store_true',
                        help='[new] draw a new data order every epoch also on a single process (the reference '
                             'reshuffles only when distributed, so one process sees the same order every epoch)')
    knn_monitor.add_args(parser)  # [new] --knn_every, --knn_data_path, --knn_train_subset, --knn_val_subset
    return parser


def check_args(args):
    check_common(args, models_mae.MODELS, 'pre-training', splits=[])
    check_pretrain_path(args.data_path)  # [new] a folder (ImageFolder tree or images) or a .txt list
    data_stats.check_given(args)  # other channel counts than ImageNet's 3 need their own statistics
    knn_monitor.check_args(args)
    check_run_outside_data(args)  # [new] the run's folders are not among those it reads images from
    if args.mask_type == 'grid' and args.mask_ratio != models_mae.GRID_MASK_RATIO:
        raise UsageError(f"--mask_type grid keeps one patch of every four, so it masks "
                         f"{models_mae.GRID_MASK_RATIO} by construction; --mask_ratio {args.mask_ratio} cannot "
                         f"be (leave --mask_ratio out)")
    if args.mask_type != 'random' or args.decoder_depth is not None or args.decoder_embed_dim is not None:
        # the model's own checks (decoder width vs head width, an even patch grid for grid masks) before any
        # compute: built on the meta device, the model takes no memory and no time
        try:
            with torch.device('meta'):
                model = models_mae.MODELS[args.model](
                    img_size=args.input_size, mask_type=args.mask_type, decoder_depth=args.decoder_depth,
                    decoder_embed_dim=args.decoder_embed_dim)
        except ValueError as e:
            raise UsageError(f"--decoder_embed_dim {args.decoder_embed_dim} does not fit --model {args.model}: "
                             f"{e}") from None
        grid_h, grid_w = model.patch_embed.grid_size
        if args.mask_type == 'grid' and (grid_h % 2 or grid_w % 2):
            raise UsageError(f"--mask_type grid needs an even patch grid (2x2 cells); --input_size "
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
    device = setup_process(args, __file__)  # process group, --output_dir locked, flags printed, seeds
    # [new] --in_chans, --mean/--std or --data_stats auto (measured, or read from --output_dir's cache) before the
    # checkpoint to continue is compared with them
    data_stats.resolve(args, lambda: [path for path, _ in pretrain_dataset(args.data_path, announce=False).samples])
    args.resume, checkpoint = resume.choose_checkpoint(args, __file__)  # the run to continue, if any

    # the reference's simple augmentation (PIL); a fast --data_loader applies the same steps, read from it
    data_loader_train = loaders.train_loader(args, pretrain_transform(args.input_size, args.mean, args.std), device,
                                             pretraining=True)
    knn = knn_monitor.KnnMonitor(args, device) if args.knn_every else None  # [new] draws no random number

    model = build_model(args)
    if args.init_from and checkpoint is None:  # a resumed run restores its own weights: never re-initialised
        init_from_checkpoint(model, args.init_from)
    model.set_grad_checkpointing(args.grad_checkpointing)
    print("Model = %s" % str(model))

    set_lr(args, misc.get_world_size())  # unless --lr: --blr x effective batch size / 256

    # on the device, DistributedDataParallel across processes, --compile [new]
    model_without_ddp, model = model, parallel_model(model, args, device)

    # no weight decay on biases and norm layers (timm's rule, as the reference)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95),
                                  fused=misc.fused_adamw(args.device) if args.fused_adamw else None)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    start = resume.restart_from_checkpoint(checkpoint, args.resume, args, model_without_ddp, optimizer, loss_scaler,
                                           len(data_loader_train), data=data_loader_train.dataset)
    # [new] continued from a checkpoint: the log.txt rows written after it (by a run killed before its next
    # checkpoint) go to a side file; TensorBoard hides its points after it
    move_log_rows_after(args.output_dir, start.epoch - 1)
    config_file.write_args(args, args.output_dir, misc.get_world_size())  # [new] args.yaml, to repeat the run
    log_writer = summary_writer(args, start.purge_step)
    saver = CheckpointSaver(args, __file__, model_without_ddp, optimizer, loss_scaler, data_loader_train,
                            log_writer=log_writer)
    misc.install_stop_handlers()  # [new] SIGUSR1, SIGTERM, Ctrl-C: save at the next optimizer step, then stop

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
