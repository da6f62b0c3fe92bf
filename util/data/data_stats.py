"""The statistics the images are normalised with, and their channel count: the one place that holds the defaults.

- default: ImageNet's mean and std (timm's constants, bit for bit the reference's), for 3 channels;
- ``--mean``/``--std`` [new]: one value per channel, in the [0, 1] units of ``ToTensor``;
- ``--data_stats auto`` [new]: measured on ``SAMPLE_SIZE`` images of the training set, evenly spaced in its sorted
  order (no random draw: the random streams stay the reference's), printed, and cached in ``--output_dir`` as
  ``data_stats.json``, which a resumed run (or a rerun into the same folder) reads instead of measuring again.

Why 1000 images: the mean is an average over images, so its standard error is the spread of the images' own means
over sqrt(1000) ~ 32. For photos that spread is about 0.1-0.25 of the pixel range, so the error is below 0.01, a few
percent of a channel's std (~0.25): far below anything that changes training (the normalisation only has to put the
inputs near zero mean and unit variance); the line printed after measuring gives the standard error of this data
set. Measuring more only costs start-up time (benchmarks/bench_data.py measures it).

Every value is resolved before the data are read (pre-training's by ``util.data.loaders.train_loader``; a
continued run takes those of its checkpoint, ``util.checkpoints.resume.take_normalisation``, and given ones must
match them), and stored in the run's ``args``, so the checkpoints carry them; fine-tuning, linear probing,
visualisation and feature extraction read them back with ``stats_from_checkpoint``.
"""
import json
import math
import os
import time

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import util.misc as misc
from util.checkpoints.checkpoint import load, stored_args
from util.data.image_decode import BAD_FILE_ERRORS, as_tensor, bad_file_message, bad_file_reason, read_image
from util.data.image_folder import image_folder
from util.errors import UsageError

DEFAULT_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
DEFAULT_STD = tuple(IMAGENET_DEFAULT_STD)
DEFAULT_IN_CHANS = 3
SAMPLE_SIZE = 1000
CACHE_NAME = 'data_stats.json'


def check_args(args):
    """One line for values that cannot normalise: a channel count below 1, --mean and --std of different lengths
    (or not the --in_chans given), a zero, negative or non-finite std, --data_stats with explicit values."""
    in_chans = getattr(args, 'in_chans', None)
    if in_chans is not None and in_chans < 1:
        raise UsageError(f"--in_chans must be at least 1, got {in_chans}")
    mean, std = getattr(args, 'mean', None), getattr(args, 'std', None)
    if (mean is None) != (std is None):
        raise UsageError(f"--{'std' if mean is not None else 'mean'} is missing: give --mean and --std together "
                         f"(one value per channel each)")
    if mean is None:
        return
    if getattr(args, 'data_stats', None):
        raise UsageError("--data_stats auto measures the mean and std: leave out --mean/--std, or --data_stats")
    check_values(mean, std, in_chans)
    check_units(mean, std)


def check_units(mean, std):
    """--mean/--std as given: images are read into [0, 1] (``ToTensor``'s units), so a value above 1 is in 0-255
    pixel units (``--mean 124 116 104 --std 58 57 57``), which would make the input nearly constant and train
    silently wrong. (Only the flags: measured and stored values of float ``.npy`` arrays, taken as they are, may
    lie beyond 1.)"""
    high = {flag: values for flag, values in (('--mean', mean), ('--std', std)) if max(values) > 1}
    if not high:
        return
    given = ' '.join(f"{flag} {' '.join(f'{v:g}' for v in values)}" for flag, values in high.items())
    scaled = ' '.join(f"{flag} {' '.join(f'{v / 255:.4f}' for v in values)}" for flag, values in high.items())
    raise UsageError(f"{given}: images are read into [0, 1], so give {' and '.join(high)} in 0-1 units: divide by "
                     f"255 ({scaled}); float .npy arrays in other units: --data_stats auto measures them")


def check_given(args):
    """Where no checkpoint supplies them (pre-training): a channel count other than 3 needs --mean/--std or
    --data_stats auto."""
    in_chans = getattr(args, 'in_chans', None) or DEFAULT_IN_CHANS
    if args.mean is not None:
        check_values(args.mean, args.std, in_chans)
    elif in_chans != DEFAULT_IN_CHANS and not getattr(args, 'data_stats', None):
        raise UsageError(no_stats_message(in_chans))


def no_stats_message(in_chans):
    return (f"--in_chans {in_chans}: ImageNet's mean and std are for 3 channels; give --mean and --std (one value "
            f"per channel) or --data_stats auto")


def check_values(mean, std, in_chans=None, where=''):
    if in_chans is not None and len(mean) != in_chans:
        raise UsageError(f"--mean has {len(mean)} value{'s' if len(mean) != 1 else ''}{where}, --in_chans is "
                         f"{in_chans}: give one per channel")
    if len(std) != len(mean):
        raise UsageError(f"--std has {len(std)} values and --mean {len(mean)}{where}: give one per channel each")
    for k, (m, s) in enumerate(zip(mean, std)):
        if not math.isfinite(m):
            raise UsageError(f"--mean {' '.join(map(str, mean))}{where}: value {k + 1} is not a number")
        if not (math.isfinite(s) and s > 0):
            raise UsageError(f"--std {' '.join(map(str, std))}{where}: value {k + 1} must be positive and finite "
                             f"(the images are divided by it)")


def normalisation(args):
    """``(in_chans, mean, std)`` that ``args`` reads and normalises its images with: the values ``resolve`` set, or,
    for callers that set none (benchmarks, tests), 3 channels and ImageNet's statistics."""
    return (getattr(args, 'in_chans', None) or DEFAULT_IN_CHANS, getattr(args, 'mean', None) or DEFAULT_MEAN,
            getattr(args, 'std', None) or DEFAULT_STD)


def stats_from_checkpoint(args_dict, state_dict=None):
    """The normalisation and channel count a checkpoint was trained with: ``{'mean', 'std', 'in_chans',
    'stored'}``. ``args_dict``: its stored flags (``util.checkpoints.checkpoint.stored_args``); ``state_dict``: its
    weights, whose patch embedding says the channel count when the flags do not. Checkpoints without stored values (the
    reference's, the released ones, ours from before --mean) were trained on ImageNet's, which are returned, with
    ``stored`` False."""
    args_dict = args_dict or {}
    in_chans = args_dict.get('in_chans')
    if in_chans is None and state_dict is not None and 'patch_embed.proj.weight' in state_dict:
        in_chans = int(state_dict['patch_embed.proj.weight'].shape[1])
    mean, std = args_dict.get('mean'), args_dict.get('std')
    stored = isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple))
    if not stored:
        mean, std = DEFAULT_MEAN, DEFAULT_STD
    return {'mean': [float(m) for m in mean], 'std': [float(s) for s in std],
            'in_chans': int(in_chans or DEFAULT_IN_CHANS), 'stored': stored}


def fmt(values):
    return '[' + ', '.join(f"{v:.4f}" for v in values) + ']'


def resolve(args, training_images=None, checkpoint=None, what='--finetune'):
    """Set ``args.in_chans``, ``args.mean`` and ``args.std`` (lists) to what the run uses, before its data are read:
    the flags given; else, with ``checkpoint`` (a loaded checkpoint whose ``what`` flag named it), its values, said
    in one line; else 3 channels and ImageNet's statistics. ``--data_stats auto`` measures (or reads the cache)
    on ``training_images()``, a callable returning the training set's paths (called only when measuring)."""
    saved = None
    if checkpoint is not None:
        saved = stats_from_checkpoint(stored_args(checkpoint), checkpoint.get('model'))
    if args.in_chans is None:
        args.in_chans = saved['in_chans'] if saved else DEFAULT_IN_CHANS
        if saved and args.in_chans != DEFAULT_IN_CHANS:
            print(f"--in_chans {args.in_chans}: from {what} (pass --in_chans to override)")
    where = ''  # where values that do not fit came from, for the one line of check_values
    if args.mean is not None:
        mean, std = args.mean, args.std
    elif getattr(args, 'data_stats', None) == 'auto':
        mean, std = auto_stats(args, training_images)
        where = ' (--data_stats auto)'
    elif saved and (saved['stored'] or args.in_chans == DEFAULT_IN_CHANS):
        mean, std = saved['mean'], saved['std']
        where = f" ({what})"
        print(f"Normalisation: mean {fmt(mean)} std {fmt(std)} from {what} "
              + ("(stored in it" if saved['stored'] else "(it stores none: ImageNet's, as it was trained with")
              + "; pass --mean/--std to override)")
    elif args.in_chans == DEFAULT_IN_CHANS:
        mean, std = DEFAULT_MEAN, DEFAULT_STD
    else:
        raise UsageError(no_stats_message(args.in_chans))
    check_values(mean, std, args.in_chans, where=where)
    args.mean, args.std = [float(m) for m in mean], [float(s) for s in std]


def resolve_supervised(args):
    """Fine-tuning's and linear probing's ``resolve``: the values of the checkpoint they start from (--finetune;
    with --eval, --resume) unless given; --data_stats auto measures ``<data_path>/train``."""
    flag, path = ('--finetune', args.finetune) if args.finetune else ('--resume', args.resume) if args.eval else \
        ('', '')
    given = args.in_chans is not None and (args.mean is not None or getattr(args, 'data_stats', None))
    checkpoint = load(path, what=flag) if path and not given else None
    resolve(args, lambda: [p for p, _ in image_folder(args.data_path, 'train', None).samples], checkpoint,
            what=f"{flag} {path}")


# ---------------------------------------------------------------------------------------------------- measuring
def sample_indices(n, size=SAMPLE_SIZE):
    """``size`` indices evenly spaced over ``range(n)`` (all of them when ``n <= size``)."""
    return list(range(n)) if n <= size else [k * n // size for k in range(size)]


def measure(paths, in_chans, skip_bad=False, size=SAMPLE_SIZE, to_grayscale=False):
    """Per-channel mean and std (in [0, 1] units) over the pixels of ``size`` of ``paths`` (evenly spaced), each
    image weighing the same whatever its size. Returns (mean, std, images measured, bad files skipped, the largest
    standard error of a channel mean: the spread of the images' means over sqrt(images)). A bad file
    stops with its one line, or is skipped with ``skip_bad``."""
    first = torch.zeros(in_chans, dtype=torch.float64)
    second = torch.zeros(in_chans, dtype=torch.float64)
    means_squared = torch.zeros(in_chans, dtype=torch.float64)  # for the spread of the images' means
    count = bad = 0
    for k in misc.progress(sample_indices(len(paths), size), 'Measuring data stats'):  # [new] on a terminal
        path = paths[k]
        try:
            x = as_tensor(read_image(path, in_chans, to_grayscale)).double()
        except BAD_FILE_ERRORS as e:
            if not skip_bad:
                raise UsageError(bad_file_message(path, bad_file_reason(path, e))) from None
            bad += 1
            continue
        image_mean = x.mean(dim=(1, 2))
        first += image_mean
        means_squared += image_mean * image_mean
        second += (x * x).mean(dim=(1, 2))
        count += 1
    if not count:
        raise UsageError(f"--data_stats auto: none of the {bad} sampled image files can be read")
    mean = first / count
    std = (second / count - mean * mean).clamp_min(0).sqrt()
    spread = (means_squared / count - mean * mean).clamp_min(0).sqrt()
    error = float((spread / math.sqrt(count)).max())  # the standard error of the channel means, the largest
    return mean.tolist(), std.tolist(), count, bad, error


def cache_problem(stored, in_chans):
    """Why a cache's content cannot be used for ``in_chans`` channels, in words (None if it can): another channel
    count, or values that cannot normalise (not numbers, a std that is not positive: a damaged or edited file)."""
    if stored.get('in_chans') != in_chans:
        return f"is for --in_chans {stored.get('in_chans')}"
    mean, std = stored.get('mean'), stored.get('std')
    numbers = [v for v in (mean, std) if isinstance(v, list) and len(v) == in_chans and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)]
    if len(numbers) != 2:
        return f"does not hold {in_chans} numbers as mean and std (mean {mean}, std {std})"
    if min(std) <= 0:
        return f"holds std {std}, which cannot normalise"
    return None


def auto_stats(args, training_images):
    """``--data_stats auto``: the cached statistics of ``--output_dir`` if they are for this channel count, else
    measured now (and cached). Returns (mean, std)."""
    cache = os.path.join(args.output_dir, CACHE_NAME) if args.output_dir else ''
    if cache and os.path.isfile(cache):
        try:
            with open(cache) as f:
                stored = json.load(f)
            problem = cache_problem(stored, args.in_chans)
            if not problem:
                print(f"Data statistics (--data_stats auto) from {cache}: mean {fmt(stored['mean'])} std "
                      f"{fmt(stored['std'])} (measured on {stored.get('images')} images of {stored.get('data_path')})")
                return stored['mean'], stored['std']
            print(f"Note: {cache} {problem}: measuring again")
        except (OSError, ValueError, AttributeError):
            print(f"Note: {cache} cannot be read: measuring again")
    start = time.time()
    paths = training_images()
    mean, std, count, bad, error = measure(paths, args.in_chans, skip_bad=getattr(args, 'skip_bad_images', False),
                                           to_grayscale=getattr(args, 'to_grayscale', False))
    if min(std) == 0:
        raise UsageError(f"--data_stats auto: the {count} sampled images are constant in a channel (std "
                         f"{fmt(std)}): give --mean and --std")
    seconds = time.time() - start
    print(f"Data statistics (--data_stats auto): measured on {count} of {len(paths)} images in {seconds:.1f} s"
          + (f" ({bad} bad files skipped)" if bad else '')
          + f": mean {fmt(mean)} std {fmt(std)} (standard error of the means {error:.4f})"
          + (f"; cached in {cache}" if cache else ''))
    if cache:
        os.makedirs(args.output_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"  # every process of a distributed run measures the same and writes it
        with open(tmp, 'w') as f:
            json.dump({'data_path': args.data_path, 'in_chans': args.in_chans, 'images': count,
                       'of': len(paths), 'mean': mean, 'std': std}, f, indent=1)
        os.replace(tmp, cache)
    return mean, std
