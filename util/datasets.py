"""Datasets and transforms for fine-tuning and evaluation, as in the reference (DeiT's recipe)."""
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from util.image_folder import image_folder


def build_dataset(is_train, args):
    """``<data_path>/train`` or ``<data_path>/val`` as an ImageFolder with the fine-tuning transforms."""
    dataset = image_folder(args.data_path, 'train' if is_train else 'val', build_transform(is_train, args),
                           skip_bad=getattr(args, 'skip_bad_images', False))
    print(dataset)
    return dataset


def build_transform(is_train, args):
    """Training: timm's ImageNet recipe (random resized crop, flip, RandAugment ``--aa``, random erasing
    ``--reprob``/``--remode``/``--recount``, bicubic). Evaluation: ``eval_transform(args.input_size)``."""
    if is_train:
        # with an --aa policy this dispatches to timm's transforms_imagenet_train
        return create_transform(
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
