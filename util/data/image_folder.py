"""The ImageFolder of the entry points: a one-line error naming a bad file (or the file skipped and counted with
``--skip_bad_images``), class folders checked for link loops and numbered by another split's names, and the
counts of skipped files per epoch. How a file is decoded: ``util/data/image_decode.py``; pre-training's other sources
(flat folders, lists): ``util/data/image_sources.py``.

A file that cannot be read as an image (truncated, not an image, empty, unreadable) stops the run with one line
naming it, or, with ``skip_bad=True`` (``--skip_bad_images``), is replaced by the next readable sample, reported
once, and counted per epoch.
"""
import multiprocessing
import os
import sys

import torch
from PIL import Image
from torchvision import datasets

import util.misc as misc
from util.data import hf_datasets, shards
from util.errors import UsageError
from util.data.image_decode import (BAD_FILE_ERRORS, SKIP_FLAG, bad_file_message, bad_file_reason, is_image_file,
                               load_rgb, too_large_message)


class ImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose loader converts every image to RGB robustly and reports bad files.

    ``skip_bad=False``: a bad file raises ``UsageError`` with one line naming it and the fix (also from DataLoader
    workers, whose re-raised message ends with that line).
    ``skip_bad=True``: a bad file is replaced by the next readable sample (index + 1, + 2, ... modulo the length),
    so batches keep their size and the substitute is the same whatever the worker; each bad file is announced once
    on stderr and counted once per epoch, in flags shared with the DataLoader workers (``skipped_images``).
    """

    def __init__(self, root, transform=None, skip_bad=False, loader=load_rgb, numbered_as=None):
        self.numbered_as = numbered_as
        try:
            # (is_image_file: torchvision's extensions and .npy; a tree without .npy files gives the same samples)
            super().__init__(root, transform=transform, loader=loader, is_valid_file=is_image_file)
        except FileNotFoundError as e:  # no class folders, or a class folder without an image
            raise UsageError(f"{root}: {e}") from None
        self._init_skip(skip_bad)

    def _init_skip(self, skip_bad):
        self.skip_bad = skip_bad
        n = len(self.samples)
        # one byte per sample, in shared memory so that DataLoader workers' marks are seen by the main process
        # (inherited with fork; passed as a shared-memory handle by torch.multiprocessing with spawn)
        self._bad_this_epoch = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self._bad_ever = torch.zeros(n, dtype=torch.uint8).share_memory_()
        # two workers can meet the same bad file at once (one reads it, the other walks onto it from the index
        # before): the test-and-set of its flag is under a lock, so that exactly one of them announces it. A spawn
        # context lock is inherited by forked workers and handed to spawned ones alike.
        self._announce_lock = multiprocessing.get_context('spawn').Lock() if skip_bad else None

    def find_classes(self, directory):
        """The class folders, as torchvision finds them, each checked for a link loop (``link_loop``). With
        ``numbered_as`` (another split's folder, e.g. train/ for val/), each class gets the number it has there, so
        that labels mean the same classes in both; a class that folder lacks is refused: its images would be scored
        against whichever class the model's output of that number stands for (a typo'd or extra folder is the
        likely cause, and counting its images as errors would give an accuracy of a different task)."""
        classes, class_to_idx = super().find_classes(directory)
        for name in classes:
            loop = link_loop(os.path.join(directory, name))
            if loop:
                raise UsageError(f"{loop[0]} is a symbolic link to {loop[1]}, a folder it is inside of: its images "
                                 f"would be listed again and again; remove the link")
        if self.numbered_as is None or not os.path.isdir(self.numbered_as):
            return classes, class_to_idx
        try:
            numbers = datasets.folder.find_classes(self.numbered_as)[1]
        except FileNotFoundError:  # no class folders there (the entry points say so for train/ themselves)
            return classes, class_to_idx
        unknown = [name for name in classes if name not in numbers]
        if unknown:
            raise UsageError(f"{directory} has class folder{'s' if len(unknown) > 1 else ''} that "
                             f"{self.numbered_as} lacks: {', '.join(unknown[:5])}"
                             f"{f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else ''}; the model has no "
                             f"output for {'them' if len(unknown) > 1 else 'it'}: rename or remove "
                             f"{'them' if len(unknown) > 1 else 'it'} (class folders are matched by name)")
        return classes, {name: numbers[name] for name in classes}

    def _load(self, index):
        path = self.samples[index][0]
        try:
            return self.loader(path)
        except BAD_FILE_ERRORS as e:
            reason = bad_file_reason(path, e)
            if not self.skip_bad:
                message = too_large_message(path, e) if isinstance(e, Image.DecompressionBombError) else \
                    bad_file_message(path, reason)
                raise UsageError(message) from None
            self._mark_bad(index, path, reason)
            return None

    def _mark_bad(self, index, path, reason):
        self._bad_this_epoch[index] = 1
        with self._announce_lock:
            first = not self._bad_ever[index]
            self._bad_ever[index] = 1
        if first:
            sys.stderr.write(f"warning: skipping bad image file {path} ({reason})\n")
            sys.stderr.flush()

    def __getitem__(self, index):
        n = len(self.samples)
        sample = None
        for k in range(n):
            i = (index + k) % n
            if self.skip_bad and self._bad_ever[i]:  # known bad: counted again, not read again
                self._bad_this_epoch[i] = 1
                continue
            sample = self._load(i)
            if sample is not None:
                break
        if sample is None:
            raise UsageError(f"{self.root}: none of its {n} image files can be read")
        target = self.samples[i][1]
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class ListedImages(ImageFolder):
    """[new] Images not found in folders: ``samples`` as ``[(image, class number)]``, whose images are ``str``s that
    ``read()`` their bytes (a tar shard's members, ``util/data/shards.py``; a Hugging Face dataset's rows,
    ``util/data/hf_datasets.py``), and the class names. Read, transformed and skipped as ``ImageFolder``'s files."""

    def __init__(self, root, samples, classes, transform=None, skip_bad=False, loader=load_rgb):
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.loader, self.numbered_as = loader, None
        self.classes, self.class_to_idx = classes, {name: k for k, name in enumerate(classes)}
        self.samples = self.imgs = samples
        self.targets = [target for _, target in samples]
        self._init_skip(skip_bad)


def other_source(data_path):
    """[new] The module that reads ``--data_path`` when it is not a folder of image files: ``util.data.shards`` (tar
    shards), ``util.data.hf_datasets`` (a Hugging Face dataset), or None."""
    return shards if shards.is_shards(data_path) else hf_datasets if hf_datasets.is_hf(data_path) else None


def listed(data_path, split, transform=None, skip_bad=False, loader=load_rgb, labelled=True):
    """[new] ``split`` of tar shards or a Hugging Face dataset (``other_source``) as ``ListedImages``."""
    root, samples, classes = other_source(data_path).split_samples(data_path, split, labelled)
    return ListedImages(root, samples, classes, transform=transform, skip_bad=skip_bad, loader=loader)


def image_folder(data_path, split, transform, skip_bad=False, loader=load_rgb, numbered_as=None):
    """``ImageFolder(data_path/split)``: a one-line ``UsageError`` names the folder when it is missing, has no class
    folders, or a class folder holds no image, and the file when an image cannot be read (unless ``skip_bad``: see
    ``ImageFolder``). ``loader(path)`` reads a file (``util.data.fast_data``'s also augment it). ``numbered_as``: the
    split whose class numbers the classes take, when it is there (an evaluation split takes 'train''s). The entry
    points check that the folders exist with their flags first (``util.flag_checks.check_common``). [new] Tar shards
    or a Hugging Face dataset: ``listed`` (their class numbers are the same in every split)."""
    if other_source(data_path):
        return listed(data_path, split, transform, skip_bad, loader)
    return ImageFolder(os.path.join(data_path, split), transform=transform, skip_bad=skip_bad, loader=loader,
                       numbered_as=numbered_as and os.path.join(data_path, numbered_as))


def link_loop(folder):
    """The first symbolic link at or below ``folder`` that leads back to a folder it is inside of, as ``(link,
    target)``, or None. torchvision lists a class folder's images with ``os.walk(followlinks=True)``, which follows
    such a link round and round until the path is too long: the images it leads back to would count many times,
    and a link at the top (``train/loop -> ..``) would be a class of its own. A link to a folder elsewhere is
    followed, as torchvision does."""
    return _link_loop(folder, [os.path.realpath(os.path.dirname(folder))])


def _link_loop(path, chain):
    # chain: the real paths of the folders the walk went through to reach ``path``, its parent's last
    if os.path.islink(path):
        real = os.path.realpath(path)
        if any(inside == real or inside.startswith(real.rstrip(os.sep) + os.sep) for inside in chain):
            return path, real
    else:
        real = os.path.join(chain[-1], os.path.basename(path))
    try:
        folders = sorted(entry.path for entry in os.scandir(path) if _is_dir(entry))
    except OSError:
        return None
    for sub in folders:
        found = _link_loop(sub, chain + [real])
        if found:
            return found
    return None


def _is_dir(entry):
    try:
        return entry.is_dir()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- skip counts
def _bad_indices(dataset):
    return torch.nonzero(dataset._bad_this_epoch).flatten().tolist()


def skipped_indices(dataset):
    """The sample indices skipped since the last ``reset_skipped`` (the epoch), over all processes, sorted: a
    collective when distributed, so call it on every rank. A mid-epoch checkpoint can keep them, for
    ``restore_skipped`` to continue the epoch's count after a resume."""
    if not getattr(dataset, 'skip_bad', False):
        return []
    indices = set()
    for part in misc.all_gather(_bad_indices(dataset)):
        indices.update(part)
    return sorted(indices)


def skipped_images(dataset):
    """How many distinct files of ``dataset`` were skipped since the last ``reset_skipped`` (the epoch), over all
    processes: a collective when distributed, so call it on every rank. 0 for a dataset without skip mode."""
    return len(skipped_indices(dataset))


def restore_skipped(dataset, indices):
    """Continue an epoch's count (``skipped_indices`` saved before an interruption); the files are not announced
    again."""
    if getattr(dataset, 'skip_bad', False) and indices:
        dataset._bad_this_epoch[list(indices)] = 1
        dataset._bad_ever[list(indices)] = 1


def reset_skipped(dataset):
    """Start counting a new epoch (call on every rank before the epoch)."""
    if getattr(dataset, 'skip_bad', False):
        dataset._bad_this_epoch.zero_()


def log_skipped_count(log_stats, dataset, epoch):
    """In skip mode, add the epoch's count to its log row (``train_skipped_images``) and print the report line; a
    collective, so every rank calls it. Without skip mode the row stays the reference's."""
    if getattr(dataset, 'skip_bad', False):
        log_stats['train_skipped_images'] = skipped_images(dataset)
        print(skipped_report(log_stats['train_skipped_images'], epoch))


def skipped_report(count, epoch):
    """The line printed after an epoch in skip mode."""
    return (f"Epoch {epoch}: skipped {count} bad image file{'' if count == 1 else 's'} "
            f"({SKIP_FLAG}; each was replaced by the next readable image)")
