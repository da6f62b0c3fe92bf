"""Linear probing of an MAE encoder: a BatchNorm (no affine) + linear head trained with LARS on the frozen encoder.
``python main_linprobe.py ...`` on one process, ``torchrun ... main_linprobe.py ...`` on many.

The flags, their defaults and the training behaviour (TF-style crop and flip only, the random streams, LARS, the
head's initialisation, checkpoints, logs) are the reference's (facebookresearch/mae, main_linprobe.py); flags that are
not in the reference are marked [new]. Two reference defects are fixed: with ``--global_pool`` the freshly created
``fc_norm`` is trained (the reference froze it at its initial identity, issue #186), and ``--resume`` is documented
and tested for the BatchNorm head.
"""
import argparse
import datetime
import time

import torch

import models_vit
import util.loaders as loaders
import util.misc as misc
import util.resume as resume
from engine_finetune import evaluate, evaluate_epoch, train_one_epoch
from util.crop import RandomResizedCrop
from util.datasets import check_classes, eval_transform, linprobe_transform
from util.errors import run_main
from util.flags import add_common_args, check_common
from util.image_folder import image_folder
from util.lars import LARS
from util.lr_sched import set_lr
from util.pretrained import load_finetune_weights
from util.process import parallel_model, setup_process
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
    if args.log_dir is None:  # TensorBoard's events beside the checkpoints
        args.log_dir = args.output_dir
    device = setup_process(args, __file__)  # process group, printing, seeds
    run = Run(args, __file__)  # --output_dir (locked); log.txt, TensorBoard, checkpoints
    args.resume, checkpoint = resume.choose_checkpoint(args, run.output_dir, run.script)  # the run to continue

    # (evaluation only needs val/); --data_loader fast_cpu draws the same TF-style crops
    data_loader_train = None if args.eval else loaders.train_loader(
        args, linprobe_transform(args.input_size), dict(scale=(0.08, 1.0), get_params=RandomResizedCrop.get_params),
        device)
    dataset_val = image_folder(args.data_path, 'val', eval_transform(args.input_size), skip_bad=args.skip_bad_images)
    print(dataset_val)
    check_classes(args, data_loader_train and data_loader_train.dataset, dataset_val)
    data_loader_val = loaders.val_loader(args, dataset_val, device)

    model = models_vit.MODELS[args.model](
        img_size=args.input_size,
        num_classes=args.nb_classes,
        global_pool=args.global_pool,
    )
    # following MoCo v3
    load_finetune_weights(args, model, head_init_std=0.01, resuming=checkpoint is not None)
    trainable = add_probe_head(model)

    model.to(device)

    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    print("Model = %s" % str(model_without_ddp))
    print('number of params (M): %.2f' % (n_parameters / 1.e6))

    set_lr(args, misc.get_world_size())

    model = parallel_model(model, args, device)  # DistributedDataParallel across processes; --compile [new]

    optimizer = LARS(trainable, lr=args.lr, weight_decay=args.weight_decay)
    print(optimizer)
    loss_scaler = misc.NativeScalerWithGradNormCount(args)

    criterion = torch.nn.CrossEntropyLoss()
    print("criterion = %s" % str(criterion))

    # the model already has its BatchNorm head here, so a linear-probe checkpoint loads as it is
    start = resume.restart_from_checkpoint(checkpoint, args.resume, args, model_without_ddp, optimizer, loss_scaler,
                                           len(data_loader_train) if data_loader_train else 0)
    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return
    args.start_epoch = start.epoch
    run.begin(start, model_without_ddp, optimizer, loss_scaler, data_loader_train, track_accuracy=True)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            data_loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      run, args=args)
        evaluate_epoch(run, epoch, train_stats, data_loader_val, model, device, args, n_parameters)
    run.close()

    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))


if __name__ == '__main__':
    run_main(main, get_args_parser())
