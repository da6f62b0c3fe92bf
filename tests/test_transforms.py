"""Soak tests of every training transform the entry points build: tens of thousands of draws on small images of
several sizes and modes, so that an augmentation that fails once in a thousand images fails here, not hours into a
run. Each draw must give a float32 tensor of the right shape with finite values."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
from conftest import parsed_args
from util.datasets import build_transform, eval_transform, linprobe_transform, posterize, pretrain_transform
from util.data.image_decode import to_rgb

SIZE = 16


def _images():
    """RGB images as the loader hands them over (``to_rgb``): several shapes, from several modes, random and flat."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in ((16, 16), (24, 32), (48, 12), (9, 70), (5, 5), (64, 48)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images += [Image.fromarray(rgb),
                   Image.fromarray(rgb[..., 0]),  # grayscale
                   Image.fromarray(rgb).convert('CMYK'),
                   Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE),
                   Image.fromarray(np.dstack([rgb, rgb[..., :1]])),  # RGBA
                   Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)),  # 16-bit grayscale
                   Image.new('RGB', (w, h), (0, 0, 0)), Image.new('RGB', (w, h), (255, 255, 255)),
                   Image.new('RGB', (w, h), (120, 7, 200))]
    return [to_rgb(im) for im in images]


def finetune_args(**kw):
    return parsed_args(main_finetune, input_size=SIZE, **kw)  # main_finetune.py's defaults otherwise


def soak(transform, draws, seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    images = _images()
    for i in range(draws):
        out = transform(images[i % len(images)])
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32, (i, out.shape, out.dtype)
        assert torch.isfinite(out).all(), i


def test_default_finetune_recipe_survives_20000_draws():
    # RandAugment's magnitude noise reaches level 10 about once in 600 images, where posterize keeps 0 bits
    soak(build_transform(True, finetune_args()), 20000)


@pytest.mark.parametrize('policy', [
    'rand-m9-mstd0.5',  # posterize without inc1: bits fall with the level
    'rand-m10-mstd2-inc1', 'rand-m2-n4-mstd3',  # magnitude noise beyond 10 and below 0
    'rand-m9-mstd101-inc1',  # mstd > 100: uniform magnitudes
    'rand-m9-mstd0.5-inc1-mmax20',
    'original', 'originalr', 'v0', 'v0r',  # AutoAugment policies ('v0' asks for 0 posterize bits itself)
    'augmix-m5-w3-d2',
])
def test_other_augmentation_policies(policy):
    soak(build_transform(True, finetune_args(aa=policy)), 4000)


@pytest.mark.parametrize('extra', [
    dict(aa='', color_jitter=0.4), dict(aa='', color_jitter=2.0),  # colour jitter alone (no RandAugment)
    dict(reprob=1.0, remode='pixel', recount=3), dict(reprob=1.0, remode='rand'), dict(reprob=1.0, remode='const'),
])
def test_colour_jitter_and_random_erasing_at_extremes(extra):
    soak(build_transform(True, finetune_args(**extra)), 3000)


def test_pretraining_and_linear_probing_transforms():
    soak(pretrain_transform(SIZE), 10000)
    soak(linprobe_transform(SIZE), 10000)
    soak(eval_transform(SIZE), 2000)


def test_zero_bit_posterize_is_the_black_image_of_older_pillow():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(posterize(img, 0)), np.zeros((6, 5, 3), np.uint8))
    assert np.array_equal(np.asarray(posterize(img, -1)), np.zeros((6, 5, 3), np.uint8))
    # 1..7 bits and 8 bits are Pillow's own: the top bits kept
    assert np.array_equal(np.asarray(posterize(img, 2)), np.asarray(img) & 0b11000000)
    assert posterize(img, 8) is img


def test_every_posterize_op_of_the_default_recipe_is_replaced():
    transform = build_transform(True, finetune_args())
    rand_augment = next(t for t in transform.transforms if hasattr(t, 'ops'))
    ops = {op.name: op.aug_fn for op in rand_augment.ops}
    assert ops['PosterizeIncreasing'] is posterize
    assert ops['SolarizeIncreasing'] is not posterize
