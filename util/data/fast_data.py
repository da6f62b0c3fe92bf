"""The fast input paths of pre-training and linear probing (``--data_loader``); the reference's is 'pil'.

The reference's pipeline (PIL decode, RandomResizedCrop bicubic, flip, ToTensor, Normalize) spends most of a worker's
time outside the JPEG decoder: PIL's resampling and the float conversions of a 224x224 image. Here:

- ``fast_cpu``: the workers decode with libjpeg-turbo (``torchvision.io.decode_jpeg``), or, when the crop is at least
  twice the output size, let the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT (PIL's ``draft``: far fewer pixels
  decoded); crop, resize (bicubic, antialiased, on uint8) and flip; the uint8 batch travels to the device (4x fewer
  bytes than float) and is normalised there (``OnDevice``).
- ``gpu``: the workers only read the file and draw the crop and flip; the batch's JPEGs are decoded together on the
  GPU (nvJPEG, ``decode_jpeg(list, device='cuda')``) and cropped, resized, flipped and normalised there.
- ``dali``: NVIDIA DALI decodes only the crop window on the GPU (``fn.decoders.image_random_crop``).

The augmentation is defined once, as the 'pil' path's torchvision Compose in util/datasets.py; ``augmentation``
reads what every fast loader applies from it (the crop's size, scale, ratio and draw, the flip's probability, the
normalisation) and refuses, in one line naming the step and the loader, any step a loader does not implement.
The crop and flip are drawn exactly as the 'pil' transform draws them (its ``RandomResizedCrop.get_params`` on the
image's size from its header, then ``torch.rand(1) < p``), from the same random stream, so with the same seed
'fast_cpu' and 'gpu' crop the same windows as 'pil'; only the resampling differs (torch's antialiased bicubic is
PIL's filter on uint8, within a few grey levels; see tests/test_fast_path.py). DALI draws its own crops (same
ranges of scale and ratio) from its own generator.

Files that are not plain JPEGs are read by ``util.data.image_folder.read_image`` as on the reference's path: 8-bit ones
travel as uint8, 16-bit and multi-band ones as float32 on the same 0-255 scale (their precision kept), with
``--in_chans`` channels; the normalisation is the transform's ``Normalize`` (the run's ``--mean``/``--std``).
"""
import functools
import io
import math

import torch
from PIL import Image
from torchvision import transforms
try:  # torchvision 0.29 deprecated its image decoding for TorchCodec; where it is gone, only the fast loaders stop
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # (util.data.loaders.check_data_loader says so before anything runs)
    ImageReadMode = decode_jpeg = None
from torchvision.transforms.v2 import functional as F2

import util.crop as tf_crop
from util import datasets
from util.data.data_stats import DEFAULT_MEAN, DEFAULT_STD
from util.errors import UsageError
from util.data.image_decode import read_bytes, read_image, to_rgb

JPEG_END = b'\xff\xd9'  # a JPEG without its end marker is truncated: PIL's decoder refuses it, libjpeg would pad it


# ---------------------------------------------------------------------------------------------------- the recipe
# the steps of the 'pil' transform each fast loader implements, by kind, in the order they must come (the flip may
# be left out); DALI draws its own crops, torchvision's way only
STEPS = {
    'crop': (transforms.RandomResizedCrop, tf_crop.RandomResizedCrop),
    'flip': (transforms.RandomHorizontalFlip,),
    'to_tensor': (transforms.ToTensor, datasets.ToTensor),
    'normalize': (transforms.Normalize,),
}
DALI_CROPS = (transforms.RandomResizedCrop,)


def augmentation(transform, loader):
    """What ``--data_loader loader`` applies, read from the 'pil' path's training ``transform`` (a Compose of
    util/datasets.py, where the augmentation is defined): ``(crop, mean, std)``, ``crop`` the keywords of
    ``CropFlip`` (size, scale, ratio, get_params, flip). A step the loader does not implement, or one with settings
    it cannot apply, is a ``UsageError`` naming the step and the loader, before anything is read."""
    def refuse(what):
        raise UsageError(f"--data_loader {loader} cannot apply {what} (the training transform of util/datasets.py): "
                         f"use --data_loader pil, or implement it in util/data/fast_data.py")

    steps = getattr(transform, 'transforms', [transform])
    kinds = []
    for step in steps:
        kind = next((k for k, classes in STEPS.items() if type(step) in classes), None)
        if kind is None or (kind == 'crop' and loader == 'dali' and type(step) not in DALI_CROPS):
            refuse(repr(step))
        if kind == 'crop' and (step.interpolation != transforms.InterpolationMode.BICUBIC or step.antialias is False
                               or step.size[0] != step.size[1]):
            refuse(f"{step!r} (it resizes to a square, bicubic, antialiased)")
        kinds.append(kind)
    if kinds not in (['crop', 'flip', 'to_tensor', 'normalize'], ['crop', 'to_tensor', 'normalize']):
        refuse(f"{', '.join(type(step).__name__ for step in steps)} in this order (it applies RandomResizedCrop, "
               f"RandomHorizontalFlip or none, ToTensor, Normalize)")
    crop, normalize = steps[0], steps[-1]
    flip = steps[1].p if kinds[1] == 'flip' else None
    return (dict(size=crop.size[0], scale=tuple(crop.scale), ratio=tuple(crop.ratio), get_params=crop.get_params,
                 flip=flip), tuple(normalize.mean), tuple(normalize.std))


# ---------------------------------------------------------------------------------------------------- workers
class CropFlip:
    """``loader(path)`` of an ImageFolder: the file's random resized crop (``size`` square, ``scale``/``ratio`` drawn
    by ``get_params`` as ``transforms.RandomResizedCrop`` does) and horizontal flip (probability ``flip``; None:
    no flip, and no draw), as a uint8 (3, size, size) tensor; normalisation is left to the device (``OnDevice``).
    ``augmentation`` reads these settings from the 'pil' transform. A file that is no readable image raises what
    PIL raises, so that ``ImageFolder``'s bad-file handling names or skips it.

    ``encoded=True`` (``--data_loader gpu``): a JPEG comes back undecoded, as (its bytes, [i, j, h, w, flip]), for
    ``decode_on_device``; other files are cropped here as above. ``in_chans`` other than 3: every file is read by
    ``read_image`` (the JPEG shortcuts decode RGB; ``to_grayscale``: its conversion of colour for one channel)."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), get_params=None, flip=0.5, encoded=False,
                 in_chans=3, to_grayscale=False):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.get_params = get_params or transforms.RandomResizedCrop.get_params
        self.encoded = encoded
        self.in_chans, self.to_grayscale = in_chans, to_grayscale

    def __call__(self, path):
        data = bytearray(read_bytes(path))  # (a file, or a shard member's or dataset row's bytes [new])
        frame = jpeg_frame(data) if self.in_chans == 3 else None
        # decode_jpeg for plain YCbCr/grayscale JPEGs that end properly; read_image (PIL with to_rgb for 8-bit
        # files) for everything else
        plain_jpeg = frame is not None and (data.endswith(JPEG_END) or data.rstrip(b'\0').endswith(JPEG_END))
        if plain_jpeg:  # the size from the frame header (parsing it with PIL costs about a tenth of the decode)
            size = torch.zeros(1).expand(3, *frame)  # what get_params reads of an image: its size
        else:
            size = image = read_image(path, self.in_chans, self.to_grayscale)  # (get_params reads its size)
        i, j, h, w = self.get_params(size, self.scale, self.ratio)  # the reference's draws, in its order
        flip = self.flip is not None and bool(torch.rand(1) < self.flip)
        if self.encoded and plain_jpeg:
            return torch.frombuffer(data, dtype=torch.uint8), torch.tensor([i, j, h, w, int(flip)])
        scale = self._dct_scale(h, w) if plain_jpeg else 1
        if scale > 1:
            out = self._draft_crop(Image.open(io.BytesIO(data)), scale, i, j, h, w)
        else:
            pixels = None
            if plain_jpeg:
                try:
                    pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
                except RuntimeError:  # corrupt data: PIL below says what is wrong, as on the reference's path
                    pixels = None
                if pixels is None:
                    pixels = pil_to_uint8(to_rgb(Image.open(io.BytesIO(data))))
            else:
                pixels = pil_to_uint8(image) if isinstance(image, Image.Image) else image * 255
            out = resize(pixels[:, i:i + h, j:j + w], self.size)
            if out.is_floating_point():  # bicubic overshoot, clipped as uint8 resampling clips
                out = out.clamp_(0, 255)
        return out.flip(-1) if flip else out

    def _dct_scale(self, h, w):
        """The largest of 1, 2, 4, 8 that keeps the crop at least ``size`` pixels on each side once decoded at
        1/scale: below that, the crop would be upsampled from fewer pixels than the reference's."""
        fits = min(h, w) // self.size
        return 8 if fits >= 8 else 4 if fits >= 4 else 2 if fits >= 2 else 1

    def _draft_crop(self, header, scale, i, j, h, w):
        width, height = header.size
        header.draft('RGB', (math.ceil(width / scale), math.ceil(height / scale)))  # the decoder scales by 1/scale
        img = to_rgb(header)
        s = img.size[0] / width  # 1/scale, up to PIL's rounding of the reduced size
        # PIL resamples a fractional box exactly: the same window as at full size
        box = (j * s, i * s, (j + w) * s, (i + h) * s)
        return pil_to_uint8(img.resize((self.size, self.size), Image.BICUBIC, box=box))


# frame headers of the JPEGs PIL and decode_jpeg both read: baseline, extended sequential and progressive (Huffman)
JPEG_FRAMES = (0xC0, 0xC1, 0xC2)


def jpeg_frame(data):
    """``(height, width)`` of an 8-bit grayscale or YCbCr/RGB JPEG from its frame header, else None (other files,
    other JPEGs: CMYK, 12-bit, lossless, arithmetic-coded, or a header that does not parse)."""
    if data[:2] != b'\xff\xd8':
        return None
    k = 2
    while k + 9 < len(data) and data[k] == 0xFF:
        marker = data[k + 1]
        if marker == 0xFF:  # fill byte
            k += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            precision, height, width, components = data[k + 4], int.from_bytes(data[k + 5:k + 7], 'big'), \
                int.from_bytes(data[k + 7:k + 9], 'big'), data[k + 9]
            ok = marker in JPEG_FRAMES and precision == 8 and components in (1, 3) and height and width
            return (height, width) if ok else None
        if marker == 0xDA:  # scan data before any frame header
            return None
        k += 2 + int.from_bytes(data[k + 2:k + 4], 'big')
    return None


def pil_to_uint8(img):
    """An 8-bit (RGB or grey) PIL image as a uint8 (C, H, W) tensor (what ToTensor does, without the scaling to
    floats)."""
    bands = len(img.getbands())
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(
        img.size[1], img.size[0], bands).permute(2, 0, 1).contiguous()


def resize(pixels, size):
    """Bicubic, antialiased resize of a (3, h, w) tensor to (3, size, size); uint8 stays uint8 (torch's native
    kernel on the CPU, PIL's filter) and an unchanged size returns the input."""
    return F2.resize(pixels, [size, size], interpolation=F2.InterpolationMode.BICUBIC, antialias=True)


def collate_pixels(batch):
    """The default collate, also for a batch that mixes uint8 (8-bit files) and float (16-bit files) pixels: then
    all as float, on the same 0-255 scale."""
    if len({sample.dtype for sample, _ in batch}) > 1:
        batch = [(sample.float(), target) for sample, target in batch]
    return torch.utils.data.default_collate(batch)


def collate_encoded(batch):
    """``--data_loader gpu``: keep the items (JPEG bytes with their crop, or cropped pixels) as a list."""
    return [item for item, _ in batch], torch.tensor([target for _, target in batch])


# ---------------------------------------------------------------------------------------------------- on the device
class OnDevice:
    """A DataLoader whose batches are finished on ``device`` by ``finish(samples, device)``; it passes the
    DataLoader's ``dataset``, ``sampler`` and length through, so the run sees the loader it made."""

    def __init__(self, loader, device, finish):
        self.loader, self.device, self.finish = loader, device, finish
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        # the DataLoader's iterator is made here, not at the first batch: making it draws the workers' seed, and a
        # resumed epoch restores the random streams right after (util.training.run.epoch_batches)
        batches = iter(self.loader)
        return ((self.finish(samples, self.device), targets) for samples, targets in batches)


@functools.lru_cache(maxsize=None)
def _scale_shift(device, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """ToTensor then Normalize as one multiply-add: (x / 255 - mean) / std = x / (255 std) - mean / std (equal
    within float rounding, 1e-6). Made once per device and statistics: a tensor made from a list on a GPU is a
    blocking copy."""
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return 1 / (255 * std), -mean / std


def normalise(images, device, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """uint8 (or 0-255 float) (N, C, H, W) -> float on ``device``: ToTensor's /255, then Normalize's ``mean``
    and ``std`` (tuples; ImageNet's by default)."""
    scale, shift = _scale_shift(device, tuple(mean), tuple(std))
    return torch.addcmul(shift, images.to(device, non_blocking=True).float(), scale)


def decode_on_device(items, device, size, mean=DEFAULT_MEAN, std=DEFAULT_STD, in_chans=3):
    """``--data_loader gpu``: decode the batch's JPEGs together on ``device`` (nvJPEG on CUDA; the CPU works too),
    crop, resize (bicubic, antialiased, in float), flip and normalise. Items that came cropped (not plain JPEGs)
    are only moved and normalised."""
    jpegs = [k for k, item in enumerate(items) if isinstance(item, tuple)]
    decoded = dict(zip(jpegs, decode_jpeg([items[k][0] for k in jpegs], mode=ImageReadMode.RGB, device=device)))
    out = torch.empty(len(items), in_chans, size, size, device=device)
    for k, item in enumerate(items):
        if k in decoded:
            i, j, h, w, flip = item[1].tolist()
            crop = decoded[k][:, i:i + h, j:j + w].float()
            img = torch.nn.functional.interpolate(crop[None], size=(size, size), mode='bicubic', align_corners=False,
                                                  antialias=True)[0].clamp_(0, 255)
            out[k] = img.flip(-1) if flip else img
        else:
            out[k] = item.to(device, non_blocking=True)
    scale, shift = _scale_shift(device, tuple(mean), tuple(std))
    return out.mul_(scale).add_(shift)


# ---------------------------------------------------------------------------------------------------- DALI
class DaliLoader:
    """``--data_loader dali``: the files in the sampler's order (so the data order and a resumed epoch's skip are
    the reference's), read by the main process and decoded by DALI on the GPU, crop window only
    (``decoders.image_random_crop`` with the area and ratio ranges of ``crop``, what ``augmentation`` read from the
    'pil' transform; EXIF orientation ignored, as PIL's loader does), resized bicubic with antialiasing, flipped
    with ``crop['flip']`` and normalised with ``mean``/``std``. DALI draws the crops and
    flips from its own generator (seeded from ``--seed``, the rank and the training epoch, so a resumed run draws its
    epoch's crops). A pipeline is built per epoch, after ``set_epoch``, because DALI starts reading ahead as soon as
    it is built. Not run in this repository's tests (no GPU there)."""

    def __init__(self, dataset, sampler, args, crop, mean, std):
        self.dataset, self.sampler, self.args = dataset, sampler, args
        self.crop, self.mean, self.std = crop, mean, std
        self.device_id = torch.cuda.current_device()

    def __len__(self):
        return len(self.sampler) // self.args.batch_size

    def __iter__(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        import numpy as np

        args, crop, batch_size = self.args, self.crop, self.args.batch_size
        files = [self.dataset.samples[k] for k in iter(self.sampler)][:len(self) * batch_size]

        def batches():
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                yield ([np.fromfile(path, dtype=np.uint8) for path, _ in chunk],
                       [np.array(label, dtype=np.int64) for _, label in chunk])

        @pipeline_def(batch_size=batch_size, num_threads=max(args.num_workers, 1), device_id=self.device_id,
                      seed=args.seed + 1000 * getattr(args, 'rank', 0) + self.sampler.epoch)
        def pipeline():
            jpegs, labels = fn.external_source(source=batches, num_outputs=2, cycle='raise',
                                               dtype=[types.UINT8, types.INT64])
            images = fn.decoders.image_random_crop(jpegs, device='mixed', output_type=types.RGB,
                                                   adjust_orientation=False, random_area=list(crop['scale']),
                                                   random_aspect_ratio=list(crop['ratio']), num_attempts=10)
            images = fn.resize(images, resize_x=crop['size'], resize_y=crop['size'], interp_type=types.INTERP_CUBIC,
                               antialias=True)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout='CHW', mean=[255 * m for m in self.mean],
                std=[255 * s for s in self.std],
                mirror=0 if crop['flip'] is None else fn.random.coin_flip(probability=crop['flip']))
            return images, labels.gpu()

        pipe = pipeline()
        pipe.build()
        iterator = DALIGenericIterator(pipe, ['images', 'labels'], last_batch_policy=LastBatchPolicy.DROP)
        return ((batch[0]['images'], batch[0]['labels']) for batch in iterator)
