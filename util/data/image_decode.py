"""How an image file is decoded (``read_image``) and how its channels fit ``--in_chans``; what a bad file is and
the one line that names it.

An 8-bit image PIL reads (JPEG, PNG, TIFF, WebP, BMP, ...) with ``--in_chans 3`` is converted to RGB (grayscale,
CMYK, palette, alpha) exactly as torchvision's default loader does for ordinary files, and stays a PIL image, so the
reference's transforms and pixels are unchanged. Everything else becomes a float tensor (C, H, W) in [0, 1], for the
transforms' tensor path: 16-bit PNG/TIFF scaled by their bit depth (/65535, not cut to 8 bits), multi-band TIFF
(with tifffile installed), ``.npy`` arrays (H x W or H x W x C, any C; integers scaled by their type's range, floats
taken as they are), and 8-bit images with ``--in_chans`` other than 3 (``--in_chans 1`` keeps grayscale as one
channel, as a PIL 'L' image). A file whose channels do not fit ``--in_chans`` is a bad file like any other: one line
naming it, or skipped and counted with --skip_bad_images.

Under ``--in_chans 1``, a colour file whose channels are all equal (grayscale stored as RGB, as most X-ray and
microscopy sets ship) is read as its one channel; a file of real colour is refused, naming ``--to_grayscale`` [new],
which converts it (PIL's 'L': 0.299 R + 0.587 G + 0.114 B). The comparison costs a pass over the pixels, only there:
3-channel files with ``--in_chans 3`` (the default) are read as before.
"""
import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageChops

from util import compat

SKIP_FLAG = '--skip_bad_images'
MAX_PIXELS_ENV = 'MAE_MAX_IMAGE_PIXELS'
if os.environ.get(MAX_PIXELS_ENV):  # the user's own limit for PIL's decompression-bomb guard (DataLoader workers too)
    Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_ENV])

# 16-bit (and 32-bit integer) grayscale: PIL's own conversion to RGB clips at 255, which turns most such images
# white; they are scaled from 0..65535 to 0..255 instead
_WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')

# the files the sources take (torchvision's ImageFolder extensions, plus numpy arrays)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.npy')

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
    # (a tar shard's member or a dataset row [new]: its bytes, ``read_bytes``)
    with (io.BytesIO(path.read()) if hasattr(path, 'read') else open(path, 'rb')) as f, warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        return to_rgb(Image.open(f))


# ---------------------------------------------------------------------------------------------------- decoding
class ChannelMismatch(ValueError):
    """A file whose channels do not fit ``--in_chans`` (a bad file: named, or skipped with --skip_bad_images)."""


GRAYSCALE_FLAG = '--to_grayscale'
COLOUR_MESSAGE = f"colour: 3 channels that differ, --in_chans is 1; {GRAYSCALE_FLAG} converts colour to grey"
# PIL's 'L' conversion of RGB (ITU-R 601-2 luma), for images that are arrays (16-bit, TIFF, .npy)
LUMA = (0.299, 0.587, 0.114)


# 8-bit PIL modes that to_rgb turns into RGB as torchvision's loader does, and those that are one grey channel
_RGB_MODES = ('1', 'L', 'LA', 'La', 'P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_GRAY_MODES = ('1', 'L', 'LA', 'La')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def read_image(path, in_chans=3, to_grayscale=False):
    """The pixels of ``path`` for a model of ``in_chans`` channels: a PIL image (8-bit files PIL reads: RGB for
    ``in_chans`` 3, exactly ``load_rgb``'s; 'L' for ``in_chans`` 1 and a grey file, or a colour one with
    ``to_grayscale``), else a float32 tensor (C, H, W) in [0, 1] (see the module's docstring). Raises
    ``ChannelMismatch`` for a file whose channels do not fit, and what PIL, numpy or tifffile raise for a file they
    cannot read."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext == '.npy':
        array = np.load(io.BytesIO(path.read()) if hasattr(path, 'read') else path, allow_pickle=False)
        return fit_channels(array, in_chans, path, alpha=False, to_grayscale=to_grayscale)
    data = read_bytes(path)
    if data[:8] == PNG_SIGNATURE and len(data) > 25 and data[24] == 16 and data[25] in (2, 6):
        # 16-bit RGB(A) PNG: PIL reads it as 8 bits; torchvision's decoder keeps the 16
        return fit_channels(compat.decode_png_16(data, path), in_chans, path, alpha=True, to_grayscale=to_grayscale)
    if ext in ('.tif', '.tiff') and not pil_reads_tiff(data):
        return fit_channels(read_tiff(data, path), in_chans, path, alpha=False, to_grayscale=to_grayscale)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    if img.mode in _RGB_MODES:
        if in_chans == 3:
            return to_rgb(img)
        if in_chans == 1:
            return one_channel(img, path, to_grayscale)
        bands = np.asarray(img) if img.mode not in ('P', 'PA', '1') else np.asarray(to_rgb(img))
        return fit_channels(bands, in_chans, path, alpha=img.mode in ('LA', 'RGBA', 'PA'))
    # 16-bit (I;16*), 32-bit integer (I) and float (F) grey images
    return fit_channels(np.asarray(img), in_chans, path, alpha=False)


def one_channel(img, path, to_grayscale):
    """An 8-bit PIL image as one grey channel ('L'): grey modes directly; any other (RGB, RGBA, palette, CMYK, ...)
    through its RGB pixels (``to_rgb``), whose first band when all three are equal, PIL's 'L' of them with
    ``to_grayscale``, else ``ChannelMismatch`` naming that flag."""
    if img.mode in _GRAY_MODES:
        return img.convert('L')
    rgb = img if img.mode == 'RGB' else to_rgb(img)
    red, green, blue = rgb.split()
    # (compared by PIL: a seventh of numpy's time, 4 ms for a megapixel)
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(red, blue).getbbox() is None:
        return red
    if to_grayscale:
        return rgb.convert('L')
    raise ChannelMismatch(COLOUR_MESSAGE)


def read_bytes(path):
    """The bytes of the image file ``path``, or of an image held elsewhere [new] (a tar shard's member, a Hugging
    Face dataset's row: a ``str`` naming it whose ``read()`` gives them, ``util/data/shards.py``,
    ``util/data/hf_datasets.py``)."""
    if hasattr(path, 'read'):
        return path.read()
    with open(path, 'rb') as f:
        return f.read()


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


def fit_channels(a, in_chans, path, alpha, to_grayscale=False):
    """An (H, W) or (H, W, C) array as a float32 (in_chans, H, W) tensor in [0, 1]: unsigned integers divided by
    their type's maximum (65535 for 16 bits; an 'I' image's values up to 65535 are taken as 16-bit), floats as they
    are. A grey image fills 3 channels (as PIL's grey to RGB); with ``alpha``, the last channel is opacity and is
    dropped when it is one too many. For one channel, 3 equal ones are one; 3 that differ are refused, or with
    ``to_grayscale`` weighted by ``LUMA``. Any other count that is not ``in_chans`` raises ``ChannelMismatch``."""
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
    if in_chans == 1 and (c == 3 or (alpha and c == 4)):
        a, c = a[:, :, :3], 3  # (opacity dropped, as for grey and alpha)
        if (a[:, :, 1] == a[:, :, 0]).all() and (a[:, :, 2] == a[:, :, 0]).all():
            a, c = a[:, :, :1], 1
        elif not to_grayscale:
            raise ChannelMismatch(COLOUR_MESSAGE)
        else:
            return luma(a)
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


def luma(a):
    """An (H, W, 3) array of colour as a float32 (1, H, W) tensor in [0, 1] (``fit_channels``' scaling of each
    band), weighted as PIL's 'L'."""
    x = fit_channels(a, 3, None, alpha=False)
    return (LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2])[None]


class ImageReader:
    """``read_image`` for ``in_chans`` channels (``to_grayscale``: colour converted to grey for one channel) as a
    dataset's ``loader(path)`` (picklable, for DataLoader workers). ``--in_chans 3`` on 8-bit files gives
    ``load_rgb``'s images."""

    def __init__(self, in_chans=3, to_grayscale=False):
        self.in_chans, self.to_grayscale = in_chans, to_grayscale

    @classmethod
    def of(cls, args):
        """The reader of a run's flags: ``args.in_chans`` (3 when unset) and ``args.to_grayscale``."""
        return cls(getattr(args, 'in_chans', None) or 3, bool(getattr(args, 'to_grayscale', False)))

    def __call__(self, path):
        return read_image(path, self.in_chans, self.to_grayscale)


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


def is_image_file(path):
    return str(path).lower().endswith(IMG_EXTENSIONS)
