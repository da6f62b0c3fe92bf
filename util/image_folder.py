"""ImageFolder trees with clear errors for missing folders and for bad image files.

Every image is read with PIL and converted to RGB (grayscale, 16-bit grayscale, CMYK, palette, alpha), exactly as
torchvision's default loader does for ordinary files. A file that cannot be read as an image (truncated, not an
image, empty, unreadable) stops the run with one line naming it, or, with ``skip_bad=True``
(``--skip_bad_images``), is replaced by the next readable sample, reported once, and counted per epoch.
"""
import multiprocessing
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

import util.misc as misc
from util.errors import UsageError

SKIP_FLAG = '--skip_bad_images'
MAX_PIXELS_ENV = 'MAE_MAX_IMAGE_PIXELS'
if os.environ.get(MAX_PIXELS_ENV):  # the user's own limit for PIL's decompression-bomb guard (DataLoader workers too)
    Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_ENV])

# 16-bit (and 32-bit integer) grayscale: PIL's own conversion to RGB clips at 255, which turns most such images
# white; they are scaled from 0..65535 to 0..255 instead
_WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')

# what reading a bad file raises: OSError covers truncated data ("image file is truncated"), unidentifiable files
# (UnidentifiedImageError), missing or unreadable files (FileNotFoundError, PermissionError); some decoders raise
# the others on corrupt data
BAD_FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(img):
    """``img`` as an 8-bit RGB image. For RGB, grayscale, CMYK and alpha images this is ``img.convert('RGB')``
    (what torchvision's default loader does; alpha is dropped); palette images with transparency go through RGBA
    (PIL warns otherwise); 16-bit grayscale is scaled to 8 bits."""
    if img.mode in _WIDE_GRAY_MODES:
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert('RGB')
    if img.mode in ('P', 'PA') and (img.mode == 'PA' or 'transparency' in img.info):
        return img.convert('RGBA').convert('RGB')
    if img.mode in ('La', 'RGBa'):  # premultiplied alpha: no direct conversion for 'La'
        return img.convert('RGBA').convert('RGB')
    return img.convert('RGB')


def load_rgb(path):
    """Open ``path`` with PIL and return it as RGB (the same pixels as torchvision's ``pil_loader`` for RGB,
    grayscale and CMYK files). Large images load without PIL's decompression-bomb warning, up to PIL's limit."""
    with open(path, 'rb') as f, warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        return to_rgb(Image.open(f))


def bad_file_reason(path, e):
    if isinstance(e, Image.UnidentifiedImageError):
        try:
            if os.path.getsize(path) == 0:
                return 'empty file'
        except OSError:
            pass
        return 'not an image file PIL can read'
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def bad_file_message(path, reason):
    return (f"bad image file {path} ({reason}): remove or replace it, or pass {SKIP_FLAG} to skip such files")


def too_large_message(path, e):
    size = str(e).split(' exceeds')[0]  # "Image size (N pixels)"
    return (f"image file {path} is larger than PIL reads by default ({size}, limit {Image.MAX_IMAGE_PIXELS} pixels, "
            f"a guard against decompression bombs): shrink it, raise the limit with {MAX_PIXELS_ENV}=<pixels> if "
            f"you trust the file, or pass {SKIP_FLAG} to skip such files")


class ImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose loader converts every image to RGB robustly and reports bad files.

    ``skip_bad=False``: a bad file raises ``UsageError`` with one line naming it and the fix (also from DataLoader
    workers, whose re-raised message ends with that line).
    ``skip_bad=True``: a bad file is replaced by the next readable sample (index + 1, + 2, ... modulo the length),
    so batches keep their size and the substitute is the same whatever the worker; each bad file is announced once
    on stderr and counted once per epoch, in flags shared with the DataLoader workers (``skipped_images``).
    """

    def __init__(self, root, transform=None, skip_bad=False, loader=load_rgb):
        try:
            super().__init__(root, transform=transform, loader=loader)
        except FileNotFoundError as e:  # no class folders, or a class folder without an image
            raise UsageError(f"{root}: {e}") from None
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


def image_folder(data_path, split, transform, skip_bad=False, loader=load_rgb):
    """``ImageFolder(data_path/split)``: a one-line ``UsageError`` names the folder when it is missing, has no class
    folders, or a class folder holds no image, and the file when an image cannot be read (unless ``skip_bad``: see
    ``ImageFolder``). ``loader(path)`` reads a file (``util.fast_data``'s also augment it). The entry points check
    that the folders exist with their flags first (``util.flags.check_common``)."""
    return ImageFolder(os.path.join(data_path, split), transform=transform, skip_bad=skip_bad, loader=loader)


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
