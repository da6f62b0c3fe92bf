"""The DataLoaders of the three entry points: which ``--data_loader`` may run here, the training loader (the
reference's PIL pipeline or a fast one of ``util/data/fast_data.py``) with its resumable sampler, the evaluation loader,
and what an epoch of the training loader needs to start, resume in the middle and count its bad files."""
import functools
import os
import signal

import torch

import util.misc as misc
from util import compat
from util.data import image_folder as images
from util.errors import UsageError
from util.data.image_decode import ImageReader
from util.data.image_sources import pretrain_dataset
from util.data import data_stats
from util.data.data_stats import normalisation
from util.data.fast_data import (CropFlip, DaliLoader, OnDevice, augmentation, collate_encoded, collate_pixels,
                             decode_on_device, normalise)

LOADERS = ('pil', 'fast_cpu', 'gpu', 'dali')
DALI_INSTALL = 'pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12)'
LOADER_HELP = {
    'pil': 'the reference (PIL, float tensors)',
    'fast_cpu': 'libjpeg-turbo decode (reduced-size DCT decode when the crop allows), uint8 crop/resize/flip in the '
                'workers, normalised on the device',
    'gpu': 'JPEGs decoded in batches on the GPU (nvJPEG), crop/resize/flip/normalise there',
    'dali': 'NVIDIA DALI, crop-window decode on the GPU (pip install nvidia-dali-cuda130)',
}


def check_data_loader(args):
    """One line before anything runs when the chosen ``--data_loader`` (not the reference's 'pil') cannot run
    here."""
    kind, device = args.data_loader, str(args.device).split(':')[0]
    if kind in ('gpu', 'dali') and device != 'cuda':
        raise UsageError(f"--data_loader {kind} decodes on a CUDA GPU and --device is {device}: use "
                         f"--data_loader fast_cpu (or --device cuda on a GPU machine)")
    if kind in ('fast_cpu', 'gpu'):
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError:
            import torchvision
            raise UsageError(f"--data_loader {kind} decodes with torchvision.io.decode_jpeg, which this torchvision "
                             f"({torchvision.__version__}) no longer has: use --data_loader pil") from None
    if kind == 'gpu' and compat.torchvision_version() < compat.BATCHED_JPEG_DECODE:
        import torchvision
        raise UsageError(f"--data_loader gpu decodes each batch's JPEGs in one call (torchvision.io.decode_jpeg of a "
                         f"list, torchvision >= 0.19); this torchvision is {torchvision.__version__}: upgrade "
                         f"torchvision, or use --data_loader fast_cpu")
    if kind == 'dali':
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise UsageError(f"--data_loader dali needs NVIDIA DALI, which is not installed: {DALI_INSTALL}") from None
        if args.skip_bad_images:
            raise UsageError("--skip_bad_images works with --data_loader pil, fast_cpu or gpu, not dali (DALI stops "
                             "on a file it cannot decode)")
        if args.in_chans not in (None, 3):
            raise UsageError(f"--data_loader dali decodes RGB JPEGs; --in_chans {args.in_chans} needs --data_loader "
                             f"pil, fast_cpu or gpu")


# ---------------------------------------------------------------------------------------------------- training
class ResumableSampler(torch.utils.data.Sampler):
    """Wraps the training sampler so that an epoch resumed in the middle starts after the samples already trained
    on (``skip``, this rank's count); otherwise it yields exactly the wrapped sampler's indices. ``reshuffle``: a new
    order every epoch (``set_epoch``); without it every epoch has the first epoch's order."""

    def __init__(self, sampler, reshuffle):
        self.sampler, self.reshuffle = sampler, reshuffle
        self.skip = self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch  # (the training epoch, also without reshuffling: DALI seeds its crops with it)
        if self.reshuffle:
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = iter(self.sampler)
        for _ in range(self.skip):
            next(indices)
        return indices

    def __len__(self):
        return len(self.sampler) - self.skip


def batch_problem(args, num_images, world_size):
    """Why ``num_images`` training images give no training (None if they do): no full batch per process
    (``drop_last`` would leave nothing), or fewer iterations per epoch than ``--accum_iter`` (the optimizer would
    never step)."""
    per_rank = num_images // world_size
    if per_rank < args.batch_size:
        return (f"{num_images} training images give {per_rank} per process over {world_size} process(es), fewer "
                f"than --batch_size {args.batch_size}: no full batch to train on (lower --batch_size)")
    iters = per_rank // args.batch_size
    if args.accum_iter > iters:
        return (f"--accum_iter {args.accum_iter} is more than the {iters} iterations of an epoch ({num_images} "
                f"images, --batch_size {args.batch_size}, {world_size} process(es)): the optimizer would never step")
    return None


# ---------------------------------------------------------------------------------------------------- building
def train_loader(args, transform, device, pretraining=False):
    """The training loader of ``<data_path>/train`` (with ``pretraining`` [new], of any source of
    ``util.data.image_folder.pretrain_dataset``: also a flat folder or a .txt list) for ``--data_loader``: the
    reference's (an ImageFolder with the PIL ``transform``, float batches), or a fast one applying what
    ``util.data.fast_data.augmentation`` reads from ``transform`` (and refusing what it cannot apply, before anything is
    read): the same crop and flip drawn by ``CropFlip`` with uint8 batches finished on the device ('fast_cpu',
    'gpu'), or DALI's. ``args.in_chans`` [new]: how images are read. Its sampler is a DistributedSampler also on one
    process (its fixed seed gives the reference's data order), wrapped so that an epoch resumed in the middle skips
    what was trained on. With ``pretraining``, ``transform`` is the function that makes the transform from
    ``(input_size, mean, std)`` (``util.datasets.pretrain_transform``), called once ``data_stats.resolve`` has set
    ``args.in_chans``/``mean``/``std`` (a continued run's come from its checkpoint: ``util.checkpoints.resume``)."""
    if pretraining:  # [new] the normalisation first: given, ImageNet's, or measured on the images (--data_stats auto)
        data_stats.resolve(args, lambda: [path for path, _ in pretrain_dataset(args.data_path, announce=False).samples])
        transform = transform(args.input_size, args.mean, args.std)
    kind = getattr(args, 'data_loader', 'pil')
    in_chans = normalisation(args)[0]
    crop, mean, std = augmentation(transform, kind) if kind != 'pil' else (None, None, None)

    to_grayscale = getattr(args, 'to_grayscale', False)

    def dataset_of(transform=None, skip_bad=False, loader=ImageReader(in_chans, to_grayscale)):
        if pretraining:
            return pretrain_dataset(args.data_path, transform, skip_bad=skip_bad, loader=loader)
        if images.other_source(args.data_path):  # [new] tar shards, a Hugging Face dataset
            return images.listed(args.data_path, 'train', transform, skip_bad=skip_bad, loader=loader)
        return images.ImageFolder(os.path.join(args.data_path, 'train'), transform, skip_bad=skip_bad, loader=loader)

    if kind == 'pil':
        dataset = dataset_of(transform, skip_bad=args.skip_bad_images)
    elif kind == 'dali':  # only the file list and labels: DALI reads the files
        dataset = dataset_of()
    else:
        dataset = dataset_of(skip_bad=args.skip_bad_images, loader=CropFlip(**crop, encoded=kind == 'gpu',
                                                                             in_chans=in_chans,
                                                                             to_grayscale=to_grayscale))
    print(dataset)

    num_tasks, global_rank = misc.get_world_size(), misc.get_rank()
    if len(dataset) // num_tasks // args.batch_size < args.accum_iter:  # no full batch, or no optimizer step
        raise UsageError(batch_problem(args, len(dataset), num_tasks))
    # a new order every epoch when distributed, as the reference, or with --shuffle_every_epoch [new]
    reshuffle = getattr(args, 'distributed', False) or getattr(args, 'shuffle_every_epoch', False)
    sampler = ResumableSampler(torch.utils.data.DistributedSampler(
        dataset, num_replicas=num_tasks, rank=global_rank, shuffle=True), reshuffle)
    if kind == 'dali':
        return DaliLoader(dataset, sampler, args, crop, mean, std)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == 'cuda', drop_last=True, worker_init_fn=ignore_ctrl_c,
        collate_fn=collate_encoded if kind == 'gpu' else collate_pixels if kind == 'fast_cpu' else None)
    if kind == 'fast_cpu':
        return OnDevice(loader, device, functools.partial(normalise, mean=mean, std=std))
    if kind == 'gpu':
        return OnDevice(loader, device, functools.partial(decode_on_device, size=crop['size'], mean=mean, std=std,
                                                          in_chans=in_chans))
    return loader


def ignore_ctrl_c(worker_id):
    """A DataLoader worker's start: Ctrl-C reaches the whole process group, and the main process alone decides what
    it means (save at the next optimizer step); a worker that took it would end and fail the epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_epoch(loader, epoch, resume_at=0, skipped=()):
    """Before epoch ``epoch``'s iterator is made: its data order (``ResumableSampler.set_epoch``), starting after
    this rank's first ``resume_at`` samples (an epoch resumed in the middle; 0 otherwise), and the count of bad files
    skipped afresh, or, resuming, from ``skipped`` (``image_folder.skipped_indices``, saved with the position)."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = resume_at
    images.reset_skipped(loader.dataset)  # (both only with --skip_bad_images)
    images.restore_skipped(loader.dataset, skipped)


def add_skipped_count(log_stats, loader, epoch):
    """With --skip_bad_images, the epoch's count in its log row (a collective); else the row stays the reference's."""
    images.log_skipped_count(log_stats, loader.dataset, epoch)


# ---------------------------------------------------------------------------------------------------- evaluation
def val_loader(args, dataset_val, device):
    """The reference's evaluation loader: sequential, unless ``--dist_eval``."""
    num_tasks = misc.get_world_size()
    if args.dist_eval:
        if len(dataset_val) % num_tasks != 0:
            print('Warning: Enabling distributed evaluation with an eval dataset not divisible by process number. '
                  'This will slightly alter validation results as extra duplicate entries are added to achieve '
                  'equal num of samples per-process.')
        # shuffle=True to reduce monitor bias
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=num_tasks,
                                                          rank=misc.get_rank(), shuffle=True)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    return torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == 'cuda', drop_last=False, worker_init_fn=ignore_ctrl_c)
