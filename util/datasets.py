"""The data of the three entry points, as in the reference: training and evaluation transforms (DeiT's recipe for
fine-tuning), and the class checks of supervised training.

The transforms take what ``util.data.image_folder.read_image`` returns: a PIL image (8-bit RGB, or grey for --in_chans
1), transformed exactly as in the reference, or a float (C, H, W) tensor in [0, 1] (16-bit, multi-band, arrays),
cropped, resized (bicubic, antialiased), flipped and normalised by torchvision's tensor kernels with the same random
draws. Normalisation takes the run's ``--mean``/``--std`` (``util.data.data_stats``; ImageNet's by default).
"""
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

import util.errors as errors
from util.crop import RandomResizedCrop
from util.data.data_stats import DEFAULT_MEAN, DEFAULT_STD, normalisation


class ToTensor(transforms.ToTensor):
    """``ToTensor`` for PIL images (the reference's); a float tensor from ``read_image`` (already in [0, 1]) is
    clipped back to [0, 1] after bicubic resampling's overshoot, as PIL's uint8 resampling clips."""

    def __call__(self, pic):
        return pic.clamp(0, 1) if isinstance(pic, torch.Tensor) else super().__call__(pic)


class ByInput:
    """Fine-tuning's training transform: timm's PIL recipe (RandAugment needs PIL images) for PIL images, and
    ``tensor`` for the float tensors of other images (16-bit, multi-band)."""

    def __init__(self, pil, tensor):
        self.pil, self.tensor = pil, tensor

    def __call__(self, img):
        return self.pil(img) if isinstance(img, Image.Image) else self.tensor(img)

    @property
    def transforms(self):  # the reference's steps (timm's Compose)
        return self.pil.transforms

    def __repr__(self):
        return f"{self.pil!r}\n(images that are not 8-bit RGB/grey: {self.tensor!r})"


def check_classes(args, dataset_train, dataset_val):
    """Every class folder must have an output: ``--nb_classes`` at least the number of classes found; more is
    allowed (the reference's default is ImageNet's 1000) but said."""
    for dataset in (dataset_train, dataset_val):
        if dataset is not None and len(dataset.classes) > args.nb_classes:
            raise errors.UsageError(f"--nb_classes {args.nb_classes} is smaller than the {len(dataset.classes)} "
                                  f"classes in {dataset.root}")
    numbers = max(dataset_val.class_to_idx.values()) + 1  # (val/'s classes take train/'s numbers)
    if numbers > args.nb_classes:
        raise errors.UsageError(f"--nb_classes {args.nb_classes} is smaller than the {numbers} classes of "
                              f"{dataset_val.numbered_as}, whose numbers the classes of {dataset_val.root} take")
    found = len((dataset_train or dataset_val).classes)
    if args.nb_classes > found:
        print(f"Note: --nb_classes {args.nb_classes} is {args.nb_classes - found} more than the {found} class folders "
              f"in {(dataset_train or dataset_val).root}: the head has outputs no image is labelled with (pass "
              f"--nb_classes {found} unless that is what you want)")
    if dataset_train is not None and dataset_train.classes != dataset_val.classes:
        # (val/'s classes are train/'s, numbered as there: util.data.image_folder refuses any other)
        missing = [name for name in dataset_train.classes if name not in dataset_val.class_to_idx]
        print(f"Note: {dataset_val.root} holds {len(dataset_val.classes)} of the {len(dataset_train.classes)} "
              f"classes of {dataset_train.root} (not: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
              f"its images are labelled with the numbers of their classes there")


RANDOM_ERASE_MODES = ('const', 'rand', 'pixel')


def check_augmentation(args):
    """``--aa`` and ``--remode`` name what timm knows: it asserts otherwise, once the run has started. Checked by
    building the training transform (it reads no image)."""
    if args.remode.lower() not in RANDOM_ERASE_MODES + ('',):
        raise errors.UsageError(f"--remode {args.remode} is not one of {', '.join(RANDOM_ERASE_MODES)}")
    try:
        build_transform(True, args)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise errors.UsageError(f"--aa {args.aa} is not an augmentation policy timm knows ({e or type(e).__name__}): "
                              f"e.g. rand-m9-mstd0.5-inc1, v0, original, or '' for none") from None


def pretrain_transform(input_size, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """Pre-training's simple augmentation: random resized crop (scale 0.2-1, bicubic) and a horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC,
                                     antialias=True),
        transforms.RandomHorizontalFlip(),
        ToTensor(),
        transforms.Normalize(mean=mean, std=std)])


def linprobe_transform(input_size, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """Linear probing's weak augmentation: the TF-style random resized crop and a horizontal flip."""
    return transforms.Compose([
        RandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomHorizontalFlip(),
        ToTensor(),
        transforms.Normalize(mean=mean, std=std)])


def build_transform(is_train, args):
    """Training: timm's ImageNet recipe (random resized crop, flip, RandAugment ``--aa``, random erasing
    ``--reprob``/``--remode``/``--recount``, bicubic) for PIL images; the same crop, flip and random erasing without
    RandAugment (PIL only) for the other images. Evaluation: ``eval_transform(args.input_size)``. ``args.mean`` and
    ``args.std``: the normalisation (ImageNet's when absent)."""
    _, mean, std = normalisation(args)
    if is_train:
        # with an --aa policy this dispatches to timm's transforms_imagenet_train
        transform = create_transform(
            input_size=args.input_size,
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=args.aa,
            interpolation='bicubic',
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            mean=mean,
            std=std,
        )
        tensor = transforms.Compose([
            transforms.RandomResizedCrop(args.input_size, scale=(0.08, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.RandomHorizontalFlip(),
            ToTensor(),
            transforms.Normalize(mean=mean, std=std)]
            + ([RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device='cpu')]
               if args.reprob > 0 else []))
        return ByInput(keep_zero_bit_posterize(transform), tensor)
    return eval_transform(args.input_size, mean, std)


def eval_transform(input_size, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """Resize the short side to ``input_size / 0.875`` (256 for 224, the ratio of the 224 ImageNet protocol), then
    take the central ``input_size`` square; above 224 the image is resized to ``input_size`` itself (crop ratio 1)."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(input_size),
        ToTensor(),
        transforms.Normalize(mean, std),
    ])


# ---------------------------------------------------------------------------------------------------- Pillow 13
def posterize(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits. RandAugment's magnitude noise (``mstd``) reaches level 10, where
    "PosterizeIncreasing" keeps 0 bits (and the AutoAugment "v0" policy asks for 0 bits outright). Pillow <= 12
    returned an all-black image for that, which is what the reference's runs trained on; Pillow 13 raises
    ``ValueError``. Keeping 0 bits masks every pixel value to 0: the same black image, with no random draw, so the
    augmentation stream is unchanged."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform):
    """Every timm ``AugmentOp`` inside ``transform`` (Compose, RandAugment's ops, AutoAugment's sub-policies,
    AugMix's ops)."""
    if hasattr(transform, 'aug_fn'):
        yield transform
    for name in ('transforms', 'ops', 'policy'):
        for child in getattr(transform, name, None) or ():
            for item in (child if isinstance(child, (list, tuple)) else (child,)):
                yield from _augment_ops(item)


def keep_zero_bit_posterize(transform):
    """Hand timm's augmentation ops in ``transform`` the posterize above (see there). Returns ``transform``."""
    for op in _augment_ops(transform):
        if op.name.startswith('Posterize'):
            op.aug_fn = posterize
    return transform
