"""Linear probing of an MAE encoder: a BatchNorm (no affine) + linear head trained with LARS on the frozen encoder.
``python main_linprobe.py ...`` on one process, ``torchrun ... main_linprobe.py ...`` on many.

The flags, their defaults and the training behaviour (TF-style crop and flip only, the random streams, LARS, the
head's initialisation, checkpoints, logs) are the reference's (facebookresearch/mae, main_linprobe.py); flags that are
not in the reference are marked [new]. Two reference defects are fixed: with ``--global_pool`` the freshly created
``fc_norm`` is trained (the reference froze it at its initial identity, issue #186), and ``--resume`` is documented
and tested for the BatchNorm head.
"""
import datetime
import time

import torch

import models_vit
import util.data.loaders as loaders
import util.misc as misc
import util.checkpoints.resume as resume
from engine_finetune import TEST_POINTS, evaluate, evaluate_epoch, train_one_epoch
from util.data import data_stats
from util.checkpoints.saver import CheckpointSaver
from util.datasets import check_classes, eval_transform, linprobe_transform
from util.flag_checks import check_common
from util.flags import Parser, add_classifier_args, add_common_args
from util.data.image_decode import ImageReader
from util.data.image_folder import image_folder
from util.data.image_sources import check_run_outside_data
from util.lars import LARS
from util.training.output_dir import append_log
from util.checkpoints.from_checkpoint import load_finetune_weights
from util.training.process import run_main, setup_process
from util.training.run import add_points, open_records, print_epoch_time


def get_args_parser():
    parser = Parser('MAE linear probing for image classification', add_help=False)
    # (weight decay 0 for the linear probe, following MoCo v1)
    add_common_args(parser, models_vit.MODELS,
                    dict(batch_size=512, epochs=90, model='vit_large_patch16', weight_decay=0, blr=0.1, min_lr=0.,
                         warmup_epochs=10),
                    data_help='dataset path (an ImageFolder tree with train/ and val/ folders)', save_freq=1,
                    optimizer='lars', checkpointing=False,
                    data_loaders={k: loaders.LOADER_HELP[k] for k in ('pil', 'fast_cpu')}, stats_from='--finetune')

    add_classifier_args(parser, global_pool=False,
                        global_pool_help='pool the mean of the patch tokens (its fc_norm is trained with the head)')
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
    """Refuse what cannot run, in one line, before anything is computed (each flag's range is checked while
    parsing); [new] returns the checkpoint this run continues (auto-resume, or --resume), checked to be of this
    script, model and training flags, or None."""
    check_common(args, models_vit.MODELS, 'classification', splits=['val'] if args.eval else ['val', 'train'])
    check_run_outside_data(args, ['val'] if args.eval else ['val', 'train'])  # [new] not written among its images
    args.resume, checkpoint = resume.choose_checkpoint(args, __file__)  # [new] the run to continue, if any
    return checkpoint


def main(args):
    checkpoint = check_args(args)  # (and the checkpoint to continue, if any)
    # process group, --output_dir locked, flags printed, seeds; [new] SIGUSR1, SIGTERM, Ctrl-C: save at the next
    # optimizer step, then stop
    device = setup_process(args, __file__)
    # [new] --in_chans and the normalisation: given, a continued run's, else --finetune's (said in one line)
    data_stats.resolve_supervised(args)

    # (evaluation only needs val/); --data_loader fast_cpu applies the same steps (TF-style crops), read from it
    data_loader_train = None if args.eval else loaders.train_loader(
        args, linprobe_transform(args.input_size, args.mean, args.std), device)
    # [new] val/'s classes take train/'s numbers, by name (the reference numbers each split's folders on its own)
    dataset_val = image_folder(args.data_path, 'val', eval_transform(args.input_size, args.mean, args.std),
                               skip_bad=args.skip_bad_images, numbered_as='train', loader=ImageReader.of(args))
    print(dataset_val)
    check_classes(args, data_loader_train and data_loader_train.dataset, dataset_val)
    data_loader_val = loaders.val_loader(args, dataset_val, device)

    model = models_vit.MODELS[args.model](
        img_size=args.input_size,
        in_chans=args.in_chans,
        num_classes=args.nb_classes,
        global_pool=args.global_pool,
    )
    # following MoCo v3
    load_finetune_weights(args, model, head_init_std=0.01, resuming=checkpoint is not None)
    trainable = add_probe_head(model)
    if args.eval:  # the accuracy of the --resume checkpoint (with its BatchNorm head), nothing trained
        resume.restart_from_checkpoint(checkpoint, args.resume, args, model)
        return evaluate(data_loader_val, model.to(device), device, args)

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
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda'
                                                          else None)
    if args.compile:  # [new] after the DDP wrap, so that its buckets still overlap the backward
        model = torch.compile(model)

    criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))
    optimizer = LARS(trainable, lr=args.lr, weight_decay=args.weight_decay)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    start = resume.restart_from_checkpoint(checkpoint, args.resume, args, model_without_ddp, optimizer, loss_scaler,
                                           len(data_loader_train), data=data_loader_train.dataset)
    # log.txt cut back to the checkpoint [new], args.yaml [new], TensorBoard (hiding its points after the checkpoint)
    log_writer = open_records(args, start)
    saver = CheckpointSaver(args, __file__, model_without_ddp, optimizer, loss_scaler, data_loader_train,
                            max_accuracy=start.max_accuracy, log_writer=log_writer)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    max_accuracy = start.max_accuracy
    for epoch in range(args.start_epoch, args.epochs):  # (each epoch's data order: util.training.run.epoch_batches)
        epoch_start = time.time()
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer=log_writer, args=args, saver=saver, position=start.position)
        test_stats = evaluate_epoch(saver, epoch, data_loader_val, model, device, args)
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
