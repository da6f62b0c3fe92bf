"""The data of the three entry points, as in the reference: training and evaluation transforms (DeiT's recipe for
fine-tuning), the class checks and the evaluation loader of supervised training."""
from PIL import ImageOps
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import util.errors as errors
from util.crop import RandomResizedCrop


def check_classes(args, dataset_train, dataset_val):
    """Every class folder must have an output: ``--nb_classes`` at least the number of classes found; more is
    allowed (the reference's default is ImageNet's 1000) but said."""
    for dataset in (dataset_train, dataset_val):
        if dataset is not None and len(dataset.classes) > args.nb_classes:
            raise errors.UsageError(f"--nb_classes {args.nb_classes} is smaller than the {len(dataset.classes)} "
                                  f"classes in {dataset.root}")
    found = len((dataset_train or dataset_val).classes)
    if args.nb_classes > found:
        print(f"Note: --nb_classes {args.nb_classes} is {args.nb_classes - found} more than the {found} class folders "
              f"in {(dataset_train or dataset_val).root}: the head has outputs no image is labelled with (pass "
              f"--nb_classes {found} unless that is what you want)")
    if dataset_train is not None and dataset_train.classes != dataset_val.classes:
        # ImageFolder numbers each split's folders on its own: the labels of train/ and val/ would not agree
        print(f"Warning: {dataset_train.root} and {dataset_val.root} do not hold the same class folders; class "
              f"indices are assigned per folder, so they differ between the two")


def pretrain_transform(input_size):
    """Pre-training's simple augmentation: random resized crop (scale 0.2-1, bicubic) and a horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def linprobe_transform(input_size):
    """Linear probing's weak augmentation: the TF-style random resized crop and a horizontal flip."""
    return transforms.Compose([
        RandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def build_transform(is_train, args):
    """Training: timm's ImageNet recipe (random resized crop, flip, RandAugment ``--aa``, random erasing
    ``--reprob``/``--remode``/``--recount``, bicubic). Evaluation: ``eval_transform(args.input_size)``."""
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
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )
        return keep_zero_bit_posterize(transform)
    return eval_transform(args.input_size)


def eval_transform(input_size):
    """Resize the short side to ``input_size / 0.875`` (256 for 224, the ratio of the 224 ImageNet protocol), then
    take the central ``input_size`` square; above 224 the image is resized to ``input_size`` itself (crop ratio 1)."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
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
