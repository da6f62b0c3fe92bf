"""The kNN monitor of pre-training [new]: ``main_pretrain.py --knn_every N --knn_data_path DIR``.

Every N epochs, and after the last one, the encoder being trained embeds the images of ``DIR/train`` and ``DIR/val``
(an ImageFolder tree, e.g. a small labelled subset; the evaluation transform of fine-tuning: short side resized to
``input_size / 0.875``, centre crop) with every patch kept (no masking), and the weighted k-NN classifier of DINO's
``eval_knn.py`` (``util.evaluation.knn``: cosine similarity, k = 20, temperature 0.07) classifies ``val`` from
``train``. Its numbers go to the epoch's ``log.txt`` row and to TensorBoard (step = epoch):

- ``knn_top1`` / ``knn_top5``: the class token after the encoder's final norm. This is the headline: it is the
  feature the paper's linear probe reads (main_linprobe.py's default, ``--cls_token``), so the monitor follows the
  number the paper reports for frozen features;
- ``knn_mean_top1`` / ``knn_mean_top5``: the mean of the patch tokens after that norm (what fine-tuning's global
  pooling starts from); for MAE it is often the better frozen feature early in training.

It does not change training: it draws nothing from the global random streams (subsets chosen with their own
generator, loaders given their own generator; the torch, CUDA, numpy and python states are also saved before and put
back after it), it puts the model's train/eval mode back, and it changes no weight, so every other number of the
run (log.txt, TensorBoard, checkpoints) is the same as without it, and resuming stays exact. Under torchrun each
process embeds every world_size-th image and the features are gathered. Off (the default) it costs nothing: no
dataset is scanned, nothing runs. ``extract_features.py --knn`` gives the same numbers for a checkpoint.
"""
import math
import os
import time

import numpy as np
import torch

import util.misc as misc
from util.checkpoints.saver import rng_state, set_rng_state
from util.data.data_stats import DEFAULT_MEAN, DEFAULT_STD, normalisation
from util.datasets import eval_transform
from util.checkpoints.from_checkpoint import features
from util.data.image_decode import ImageReader
from util.data.image_folder import image_folder, other_source
from util.evaluation.knn import K, TEMPERATURE, knn_accuracy
from util.errors import UsageError

POOLS = ('cls', 'mean')  # the headline (cls) first
SUBSET_SEED = 0


def check_args(args):
    """One line for flags of the monitor that cannot work together, or a folder it cannot use (before anything is
    computed; their ranges are declared with the flags, checked while parsing)."""
    extra = [f for f in ('knn_data_path', 'knn_train_subset', 'knn_val_subset') if getattr(args, f)]
    if args.knn_every == 0:
        if extra:
            raise UsageError(f"--{extra[0]} is for the kNN monitor, which is off: add --knn_every N")
        return
    if args.knn_every > args.epochs:
        raise UsageError(f"--knn_every {args.knn_every} is larger than --epochs {args.epochs}: the monitor would "
                         f"only run after the last epoch (use --knn_every {args.epochs} for that)")
    check_data_path(args.knn_data_path, '--knn_data_path')


def check_data_path(path, flag):
    if not path:
        raise UsageError(f"{flag} is needed: an ImageFolder tree with train/ and val/ folders")
    if other_source(path):  # [new] tar shards, a Hugging Face dataset
        return other_source(path).check(path, ['train', 'val'], labelled=True)
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: " + ('a file, not a folder with train/ and val/' if os.path.exists(path)
                                               else 'no such folder'))
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(path, split)):
            raise UsageError(f"{flag} {path} has no '{split}/' folder ({flag} needs "
                             f"{os.path.join(path, 'train')}/<class>/<image> and {os.path.join(path, 'val')}/...)")


def subset(dataset, size, seed=SUBSET_SEED):
    """``size`` images of ``dataset`` drawn without replacement by their own generator (in the dataset's order), or
    all of them when ``size`` is 0 or at least its length."""
    if not size or size >= len(dataset):
        return dataset
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size, replace=False))
    return torch.utils.data.Subset(dataset, indices.tolist())


def knn_datasets(path, input_size, train_subset=0, val_subset=0, flag='--knn_data_path', in_chans=3,
                 mean=DEFAULT_MEAN, std=DEFAULT_STD, to_grayscale=False):
    """The train and val ImageFolders of ``path`` with the evaluation transform (the images read with ``in_chans``
    channels, colour converted with ``to_grayscale``, and normalised with ``mean``/``std``, as the model was
    trained), subsets as asked."""
    check_data_path(path, flag)
    transform = eval_transform(input_size, mean, std)
    train, val = (image_folder(path, split, transform, loader=ImageReader(in_chans, to_grayscale))
                  for split in ('train', 'val'))
    if train.classes != val.classes:
        raise UsageError(f"{flag} {path}: train/ and val/ hold other class folders ({len(train.classes)} and "
                         f"{len(val.classes)}); {flag} needs the same classes in both")
    return subset(train, train_subset), subset(val, val_subset), len(train.classes)


def embed(model, dataset, device, batch_size, num_workers=0, autocast=None):
    """This process's share of ``dataset`` (every world_size-th image) embedded by ``model`` without masking;
    gathered from every process: ``({'cls': (N, D), 'mean': (N, D)}, labels (N,))`` in the dataset's order, on the
    CPU, in float32."""
    rank, world = misc.get_rank(), misc.get_world_size()
    indices = list(range(rank, len(dataset), world))
    # starting workers costs more than they save on a few batches (1.9 s against 6.9 s per evaluation of the
    # 27 demo photos on 2 busy cores): at most one worker per 4 batches
    num_workers = min(num_workers, math.ceil(len(indices) / batch_size) // 4)
    # own generator: creating the iterator would otherwise draw the workers' base seed from torch's global one
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, drop_last=False,
                                         generator=torch.Generator())
    parts, labels = {p: [] for p in POOLS}, []
    for images, targets in misc.progress(loader, 'kNN monitor: embedding', count=lambda batch: len(batch[1]),
                                         total=len(indices)):  # [new] a line on a terminal
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            out = features(model, images.to(device, non_blocking=True), POOLS)
        for p in POOLS:
            parts[p].append(out[p].float().cpu())
        labels.append(targets)
    mine = {p: torch.cat(parts[p]) if parts[p] else torch.zeros(0) for p in POOLS}
    mine_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if world == 1:
        return mine, mine_labels
    gathered = misc.all_gather((indices, mine, mine_labels))
    order = torch.argsort(torch.tensor([i for idx, _, _ in gathered for i in idx]))
    feats = {p: torch.cat([g[1][p] for g in gathered if len(g[0])])[order] for p in POOLS}
    return feats, torch.cat([g[2] for g in gathered])[order]


def knn_evaluate(model, train_set, val_set, num_classes, device, batch_size, num_workers=0, autocast=None, k=K,
                 temperature=TEMPERATURE):
    """``{'knn_top1', 'knn_top5', 'knn_mean_top1', 'knn_mean_top5'}`` (per cent) of ``model``'s features."""
    train, train_labels = embed(model, train_set, device, batch_size, num_workers, autocast)
    val, val_labels = embed(model, val_set, device, batch_size, num_workers, autocast)
    stats = {}
    for pool in POOLS:
        result = knn_accuracy(train[pool], train_labels, val[pool], val_labels, num_classes, k, temperature)
        prefix = 'knn' if pool == POOLS[0] else f'knn_{pool}'
        stats.update({f'{prefix}_top1': result['top1'], f'{prefix}_top5': result['top5']})
    return stats


def describe(stats):
    return (f"top-1 {stats['knn_top1']:.2f}% top-5 {stats['knn_top5']:.2f}% (class token); mean of patch tokens: "
            f"top-1 {stats['knn_mean_top1']:.2f}% top-5 {stats['knn_mean_top5']:.2f}%")


class KnnMonitor:
    """``monitor(model, epoch)``: the kNN numbers of ``model`` (the MAE being trained, not its DDP/compiled
    wrapper) after ``epoch`` when it is due, else ``{}``; see the module's docstring."""

    def __init__(self, args, device):
        self.every, self.epochs, self.device = args.knn_every, args.epochs, device
        self.batch_size, self.num_workers = args.batch_size, args.num_workers
        self.autocast = misc.autocast(args)  # the forward's precision of training (torch 2.1 has no fp16 on the CPU)
        in_chans, mean, std = normalisation(args)
        self.train_set, self.val_set, self.num_classes = knn_datasets(
            args.knn_data_path, args.input_size, args.knn_train_subset, args.knn_val_subset, in_chans=in_chans,
            mean=mean, std=std, to_grayscale=getattr(args, 'to_grayscale', False))
        print(f"kNN monitor: every {self.every} epoch(s) and after the last, {len(self.train_set)} train and "
              f"{len(self.val_set)} val images of {args.knn_data_path} ({self.num_classes} classes), k={K}, "
              f"T={TEMPERATURE}")

    def due(self, epoch):
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs

    def __call__(self, model, epoch):
        if not self.due(epoch):
            return {}
        start = time.time()
        streams = rng_state()  # put back afterwards: nothing of training may depend on the monitor
        try:
            stats = knn_evaluate(model, self.train_set, self.val_set, self.num_classes, self.device,
                                 self.batch_size, self.num_workers, self.autocast)
        finally:
            set_rng_state(streams)
        print(f"kNN monitor after epoch {epoch}: {describe(stats)}; took {time.time() - start:.1f}s")
        return stats
