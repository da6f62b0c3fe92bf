"""Reading the images: where they come from, how a file is decoded, and how its channels fit ``--in_chans``.

Sources: an ImageFolder tree (``train/<class>/<image>``, the reference's), a folder of images with no class folders
(searched recursively in sorted order, each directory visited once also through symlinks), or a ``.txt`` list of
image paths, one per line (``ImageFiles``; pre-training only, which uses no labels).

Decoding (``read_image``): an 8-bit image PIL reads (JPEG, PNG, TIFF, WebP, BMP, ...) with ``--in_chans 3`` is
converted to RGB (grayscale, CMYK, palette, alpha) exactly as torchvision's default loader does for ordinary files,
and stays a PIL image, so the reference's transforms and pixels are unchanged. Everything else becomes a float
tensor (C, H, W) in [0, 1], for the transforms' tensor path: 16-bit PNG/TIFF scaled by their bit depth (/65535,
not cut to 8 bits), multi-band TIFF (with tifffile installed), ``.npy`` arrays (H x W or H x W x C, any C; integers
scaled by their type's range, floats taken as they are), and 8-bit images with ``--in_chans`` other than 3
(``--in_chans 1`` keeps grayscale as one channel, as a PIL 'L' image). A file whose channels do not fit
``--in_chans`` is a bad file like any other: one line naming it, or skipped and counted with --skip_bad_images.

A file that cannot be read as an image (truncated, not an image, empty, unreadable) stops the run with one line
naming it, or, with ``skip_bad=True`` (``--skip_bad_images``), is replaced by the next readable sample, reported
once, and counted per epoch.
"""
import io
import multiprocessing
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

import util.misc as misc
from util.misc import UsageError

SKIP_FLAG = '--skip_bad_images'
MAX_PIXELS_ENV = 'MAE_MAX_IMAGE_PIXELS'
if os.environ.get(MAX_PIXELS_ENV):  # the user's own limit for PIL's decompression-bomb guard (DataLoader workers too)
    Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_ENV])

# 16-bit (and 32-bit integer) grayscale: PIL's own conversion to RGB clips at 255, which turns most such images
# white; they are scaled from 0..65535 to 0..255 instead
_WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')

# the files the sources take (torchvision's ImageFolder extensions, plus numpy arrays)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.npy')
LIST_SUFFIX = '.txt'

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


# ---------------------------------------------------------------------------------------------------- decoding
class ChannelMismatch(ValueError):
    """A file whose channels do not fit ``--in_chans`` (a bad file: named, or skipped with --skip_bad_images)."""


# 8-bit PIL modes that to_rgb turns into RGB as torchvision's loader does, and those that are one grey channel
_RGB_MODES = ('1', 'L', 'LA', 'La', 'P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_GRAY_MODES = ('1', 'L', 'LA', 'La')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def read_image(path, in_chans=3):
    """The pixels of ``path`` for a model of ``in_chans`` channels: a PIL image (8-bit files PIL reads: RGB for
    ``in_chans`` 3, exactly ``load_rgb``'s; 'L' for ``in_chans`` 1 and a grey file), else a float32 tensor
    (C, H, W) in [0, 1] (see the module's docstring). Raises ``ChannelMismatch`` for a file whose channels do not
    fit, and what PIL, numpy or tifffile raise for a file they cannot read."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext == '.npy':
        return fit_channels(np.load(path, allow_pickle=False), in_chans, path, alpha=False)
    with open(path, 'rb') as f:
        data = f.read()
    if data[:8] == PNG_SIGNATURE and len(data) > 25 and data[24] == 16 and data[25] in (2, 6):
        # 16-bit RGB(A) PNG: PIL reads it as 8 bits; torchvision's decoder keeps the 16
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            from torchvision.io import ImageReadMode, decode_png
            pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        return fit_channels(pixels.permute(1, 2, 0).numpy(), in_chans, path, alpha=True)
    if ext in ('.tif', '.tiff') and not pil_reads_tiff(data):
        return fit_channels(read_tiff(data, path), in_chans, path, alpha=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    if img.mode in _RGB_MODES:
        if in_chans == 3:
            return to_rgb(img)
        if in_chans == 1 and img.mode in _GRAY_MODES:
            return img.convert('L')
        if in_chans == 1 and img.mode in ('P', 'PA'):  # a palette of greys is grey
            rgb = np.asarray(to_rgb(img))
            if (rgb == rgb[..., :1]).all():
                return Image.fromarray(rgb[..., 0])
        bands = np.asarray(img) if img.mode not in ('P', 'PA', '1') else np.asarray(to_rgb(img))
        return fit_channels(bands, in_chans, path, alpha=img.mode in ('LA', 'RGBA', 'PA'))
    # 16-bit (I;16*), 32-bit integer (I) and float (F) grey images
    return fit_channels(np.asarray(img), in_chans, path, alpha=False)


def pil_reads_tiff(data):
    """Whether PIL reads this TIFF whole: one grey band, or 3-4 bands of 8 bits, interleaved (what tifffile, when
    installed, says of its first image). PIL reads other TIFFs wrongly (one plane of a planar multi-band file) or not
    at all; without tifffile, PIL is tried (and fails on files it cannot read)."""
    try:
        import tifffile
    except ImportError:
        return True
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            shape, axes, dtype = series.shape, series.axes, series.dtype
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: PIL says what is wrong
        return True
    if len(shape) == 2:
        return dtype.itemsize <= 2
    return len(shape) == 3 and axes.endswith('S') and shape[2] in (3, 4) and dtype == np.uint8


def read_tiff(data, path):
    """A TIFF's first image as an (H, W, C) array, bands from the 'S'/'C' axis or a leading planar axis."""
    try:
        import tifffile
    except ImportError:
        raise ValueError("a TIFF PIL cannot read (multi-band or 16-bit colour): pip install tifffile to read it") \
            from None
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        a, axes = series.asarray(), series.axes
    if a.ndim == 2:
        return a
    if a.ndim != 3 or 'Y' not in axes or 'X' not in axes:
        raise ValueError(f"a TIFF of shape {a.shape} (axes {axes}): expected one image, H x W x bands")
    band = next(k for k, axis in enumerate(axes) if axis not in 'YX')
    return np.moveaxis(a, band, -1)


def fit_channels(a, in_chans, path, alpha):
    """An (H, W) or (H, W, C) array as a float32 (in_chans, H, W) tensor in [0, 1]: unsigned integers divided by
    their type's maximum (65535 for 16 bits; an 'I' image's values up to 65535 are taken as 16-bit), floats as they
    are. A grey image fills 3 channels (as PIL's grey to RGB); with ``alpha``, the last channel is opacity and is
    dropped when it is one too many. Any other count that is not ``in_chans`` raises ``ChannelMismatch``."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ChannelMismatch(f"an array of shape {a.shape}, not H x W x C")
    c = a.shape[2]
    if alpha and c in (2, 4) and c - 1 in (in_chans, 1):
        a, c = a[:, :, :c - 1], c - 1
    if c == 1 and in_chans == 3:
        a, c = np.repeat(a, 3, axis=2), 3
    if c != in_chans:
        raise ChannelMismatch(f"{c} channel{'s' if c != 1 else ''}, --in_chans is {in_chans}")
    if a.dtype == np.bool_:
        x = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.unsignedinteger) or np.issubdtype(a.dtype, np.signedinteger):
        top = 65535 if a.dtype.itemsize > 2 and a.size and a.min() >= 0 and a.max() <= 65535 else \
            np.iinfo(a.dtype).max
        x = a.astype(np.float32) / np.float32(top)
    else:
        x = a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class ImageReader:
    """``read_image`` for ``in_chans`` channels as a dataset's ``loader(path)`` (picklable, for DataLoader
    workers). ``--in_chans 3`` on 8-bit files gives ``load_rgb``'s images."""

    def __init__(self, in_chans=3):
        self.in_chans = in_chans

    def __call__(self, path):
        return read_image(path, self.in_chans)


def as_tensor(img):
    """What ``read_image`` returned, as a float (C, H, W) tensor in [0, 1] (``to_tensor`` for PIL images)."""
    from torchvision.transforms import functional as F
    return img if isinstance(img, torch.Tensor) else F.to_tensor(img)


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


def is_image_file(path):
    return str(path).lower().endswith(IMG_EXTENSIONS)


class ImageFiles(ImageFolder):
    """The images ``paths`` with no labels (every target 0): a folder searched recursively, or a list. Bad files
    are handled as ``ImageFolder``'s. ``root`` names the source in messages."""

    def __init__(self, root, paths, transform=None, skip_bad=False, loader=load_rgb):
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.loader = loader
        self.classes, self.class_to_idx = [], {}
        self.samples = [(p, 0) for p in paths]
        self.imgs, self.targets = self.samples, [0] * len(self.samples)
        self._init_skip(skip_bad)


def list_images(root):
    """The image files under the folder ``root`` (``IMG_EXTENSIONS``), searched recursively, sorted by path (the
    names at each level, files and folders together). Symlinks are followed, each directory once (by its real
    path), so a link back up the tree or two links to one folder do not repeat files."""
    return _list_below(root, set())


def _list_below(folder, seen):
    seen.add(os.path.realpath(folder))
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UsageError(f"{folder}: cannot be listed ({e.strerror or e})") from None
    out = []
    for e in entries:
        if e.is_dir():
            if os.path.realpath(e.path) not in seen:
                out.extend(_list_below(e.path, seen))
        elif e.name.lower().endswith(IMG_EXTENSIONS):
            out.append(e.path)
    return out


def read_list(list_path, what='--data_path'):
    """The image paths a ``.txt`` list names, one per line (blank lines and lines starting with # skipped;
    relative paths are relative to the list's folder). A one-line ``UsageError`` when it names none, or names files
    that do not exist (how many, and the first few)."""
    try:
        with open(list_path, encoding='utf-8') as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {list_path}: cannot be read as a text list of image paths ({e})") from None
    base = os.path.dirname(os.path.abspath(list_path))
    paths = [os.path.join(base, line) for line in lines if line and not line.startswith('#')]
    if not paths:
        raise UsageError(f"{what} {list_path}: the list names no image file (one path per line)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"{what} {list_path}: {len(missing)} of its {len(paths)} files do not exist, e.g. "
                         + ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else ''))
    return paths


def has_class_folders(root):
    """Whether ``root`` holds a sub-folder (an ImageFolder's classes)."""
    try:
        with os.scandir(root) as it:
            return any(e.is_dir() for e in it)
    except OSError:
        return False


def pretrain_source(data_path):
    """What pre-training reads from ``--data_path``: ('list', file) for a .txt list, ('folder', <data_path>/train)
    for an ImageFolder tree (the reference's), else ('files', the folder searched recursively: <data_path>/train
    when it exists, else <data_path>)."""
    if os.path.isfile(data_path):
        return 'list', data_path
    train = os.path.join(data_path, 'train')
    if os.path.isdir(train):
        return ('folder' if has_class_folders(train) else 'files'), train
    return 'files', data_path


def check_pretrain_path(data_path):
    """One line before anything runs when pre-training's ``--data_path`` is neither a folder nor a .txt list."""
    if os.path.isfile(data_path):
        if not data_path.lower().endswith(LIST_SUFFIX):
            raise UsageError(f"--data_path {data_path} is a file: pre-training reads a folder of images (or an "
                             f"ImageFolder tree with train/) or a {LIST_SUFFIX} list of image paths, one per line")
    elif not os.path.isdir(data_path):
        raise UsageError(f"--data_path {data_path}: no such file or folder")


def pretrain_dataset(data_path, transform=None, skip_bad=False, loader=load_rgb):
    """Pre-training's images (see ``pretrain_source``): an ``ImageFolder`` for a tree with class folders (the
    reference's data order), else ``ImageFiles``. A one-line ``UsageError`` when there is no image."""
    kind, root = pretrain_source(data_path)
    if kind == 'folder':
        return ImageFolder(root, transform=transform, skip_bad=skip_bad, loader=loader)
    paths = read_list(root) if kind == 'list' else list_images(root)
    if not paths:
        raise UsageError(f"--data_path {data_path}: no image files ({', '.join(IMG_EXTENSIONS)}) in {root} or below")
    print(f"--data_path {data_path}: {len(paths)} images "
          + (f"listed in {root}" if kind == 'list' else f"in {root} (searched recursively; no labels)"))
    return ImageFiles(root, paths, transform=transform, skip_bad=skip_bad, loader=loader)


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
