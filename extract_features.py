"""Features of images from a trained encoder, without masking [new]:

    python extract_features.py --checkpoint output_dir/checkpoint-last.pth demo/data/val --out val.npz
    python extract_features.py --checkpoint mae_pretrain_vit_base.pth --pool mean photos/ cat.jpg --device cuda
    python extract_features.py --checkpoint output_dir/checkpoint-last.pth --knn demo/data

Any checkpoint with a ViT encoder (``util.from_checkpoint``): main_pretrain.py's (full MAE), main_finetune.py's and
main_linprobe.py's (classifiers), the reference's released ``mae_pretrain_vit_*.pth`` (encoder only),
``mae_visualize_vit_*.pth`` (full) and fine-tuned ones; the model is recognised from the weights' shapes when the
file does not say. Images are read as for evaluation (RGB, short side resized to ``input_size / 0.875``, centre
crop, ImageNet normalisation), in batches, on ``--device``.

The ``.npz`` holds ``features`` (float32: (N, D) for ``--pool cls`` or ``mean``, (N, 1 + L, D) for ``tokens``, the
class token first), ``paths`` (the image files, in order: folders searched recursively in sorted order), and when
every input is a folder of class folders (an ImageFolder tree), ``labels`` (int64, indices into ``classes``: the
sorted class folder names of all the inputs), plus ``pool``, ``model`` and ``checkpoint``.

``--knn DIR`` instead classifies ``DIR/val`` from ``DIR/train`` with the weighted k-NN classifier of the kNN monitor
(``main_pretrain.py --knn_every``: k = 20, temperature 0.07, class token and mean of patch tokens) and prints its
numbers: for a pre-training checkpoint, the same numbers the monitor logged for that epoch.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from util import data_stats, from_checkpoint, knn_monitor
from util.datasets import eval_transform
from util.image_decode import BAD_FILE_ERRORS, bad_file_reason, read_image
from util.errors import UsageError, run_main
from util.flag_checks import check_device, check_ranges

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def get_args_parser():
    parser = argparse.ArgumentParser('MAE feature extraction', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('images', nargs='+',
                        help='image files and/or folders (searched recursively, in sorted order); with --knn, one '
                             'folder with train/ and val/')
    parser.add_argument('--checkpoint', required=True, help='any checkpoint with a ViT encoder (see above)')
    parser.add_argument('--model', default=None,
                        help="the architecture (default: the checkpoint's, else recognised from its weights)")
    parser.add_argument('--input_size', default=None, type=int,
                        help="image size the encoder sees (default: the checkpoint's, else that of its position "
                             "embedding)")
    parser.add_argument('--pool', default='cls', choices=from_checkpoint.POOLS,
                        help='cls: the class token after the final norm (default); mean: the mean of the patch '
                             'tokens; tokens: every token (N, 1 + L, D)')
    parser.add_argument('--out', default='features.npz', help='the .npz to write (default ./features.npz)')
    parser.add_argument('--batch_size', default=64, type=int)
    parser.add_argument('--num_workers', default=2, type=int, help='processes that read the images')
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    parser.add_argument('--knn', action='store_true',
                        help='classify <images>/val from <images>/train with the kNN monitor\'s classifier and print '
                             'top-1/top-5 (no .npz is written)')
    parser.add_argument('--knn_train_subset', default=0, type=int, metavar='M',
                        help='with --knn: M images of train/, drawn as the monitor draws them (default all)')
    parser.add_argument('--knn_val_subset', default=0, type=int, metavar='M', help='the same for val/')
    return parser


# ---------------------------------------------------------------------------------------------------- inputs
def find_images(paths):
    """``(files, labels, classes)``: the image files of ``paths`` (files as given, folders searched recursively in
    sorted order); when every path is a folder whose images all lie in class folders, each file's class index into
    ``classes`` (the sorted names of all those class folders), else ``labels`` is None."""
    found, class_of = [], []
    for p in paths:
        if os.path.isfile(p):
            found.append(p)
            class_of.append(None)
        elif os.path.isdir(p):
            inside = []
            for root, _, files in os.walk(p, followlinks=True):
                inside += [os.path.join(root, f) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
            inside.sort(key=lambda f: Path(os.path.relpath(f, p)).parts)
            if not inside:
                raise UsageError(f"{p}: no image files ({', '.join(IMG_EXTENSIONS)}) in this folder or below")
            found += inside
            for f in inside:
                parts = Path(os.path.relpath(f, p)).parts
                class_of.append(parts[0] if len(parts) > 1 else None)
        else:
            raise UsageError(f"{p}: no such file or folder")
    if any(c is None for c in class_of):
        return found, None, []
    classes = sorted(set(class_of))
    return found, [classes.index(c) for c in class_of], classes


class Images(torch.utils.data.Dataset):
    def __init__(self, files, transform, in_chans=3):
        self.files, self.transform, self.in_chans = files, transform, in_chans

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = read_image(self.files[i], self.in_chans)
        except BAD_FILE_ERRORS as e:
            raise UsageError(f"bad image file {self.files[i]} ({bad_file_reason(self.files[i], e)})") from None
        return self.transform(img)


def progress(iterable, total, what):
    """tqdm's bar on stderr (tqdm comes with timm's huggingface_hub); a printed count every ~10% without it."""
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=what, unit='batch', file=sys.stderr)
    except ImportError:
        def counted():
            step = max(1, total // 10)
            for i, item in enumerate(iterable, 1):
                yield item
                if i % step == 0 or i == total:
                    print(f"{what}: {i}/{total} batches", flush=True)
        return counted()


# ---------------------------------------------------------------------------------------------------- main
def check_args(args):
    check_ranges(args)  # --batch_size, --num_workers, --input_size, --knn_*_subset (util/flag_checks.py's RANGES)
    check_device(args)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device available (use --device cpu)")
    if args.knn:
        if len(args.images) != 1:
            raise UsageError(f"--knn takes one folder with train/ and val/, got {len(args.images)} paths")
        knn_monitor.check_data_path(args.images[0], '--knn')
    elif not args.out.endswith('.npz'):
        raise UsageError(f"--out {args.out}: give a .npz file name")
    return device


def extract(model, files, input_size, pool, device, batch_size=64, num_workers=0, stats=None):
    """The ``pool`` features of ``files`` (float32, on the CPU, in order); ``stats``: the channels and normalisation
    the model was trained with (``util.data_stats.stats_from_checkpoint``; ImageNet's RGB when None)."""
    stats = stats or data_stats.stats_from_checkpoint({})
    images = Images(files, eval_transform(input_size, stats['mean'], stats['std']), stats['in_chans'])
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, generator=torch.Generator())
    out = []
    for images in progress(loader, len(loader), 'features'):
        out.append(from_checkpoint.features(model, images.to(device), pool).float().cpu())
    return torch.cat(out)


def trained_stats(model, info):
    """The channels and normalisation the checkpoint was trained with (its --in_chans/--mean/--std; ImageNet's RGB
    for checkpoints that store none), said in one line when they are not ImageNet's."""
    stats = data_stats.stats_from_checkpoint(info['args'], model.state_dict())
    if stats['stored']:
        print(f"Images: {stats['in_chans']} channel(s), normalised with mean {data_stats.fmt(stats['mean'])} std "
              f"{data_stats.fmt(stats['std'])} (from {info['path']})")
    return stats


def main(args):
    device = check_args(args)
    if args.knn:
        model, info = from_checkpoint.load_encoder(args.checkpoint, args.model, args.input_size)
        stats = trained_stats(model, info)
        train, val, num_classes = knn_monitor.knn_datasets(
            args.images[0], info['input_size'], args.knn_train_subset, args.knn_val_subset, flag='--knn',
            in_chans=stats['in_chans'], mean=stats['mean'], std=stats['std'])
        start = time.time()
        stats = knn_monitor.knn_evaluate(model.to(device), train, val, num_classes, device, args.batch_size,
                                         args.num_workers)
        print(f"kNN of {args.checkpoint} ({info['vit_model']}, {info['input_size']}px) on {args.images[0]}: "
              f"{len(train)} train and {len(val)} val images: {knn_monitor.describe(stats)}; took "
              f"{time.time() - start:.1f}s")
        return stats

    files, labels, classes = find_images(args.images)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {args.out}: no folder {out_dir}")
    model, info = from_checkpoint.load_encoder(args.checkpoint, args.model, args.input_size)
    feats = extract(model.to(device), files, info['input_size'], args.pool, device, args.batch_size,
                    args.num_workers, stats=trained_stats(model, info))
    result = {'features': feats.numpy(), 'paths': np.array(files), 'pool': np.array(args.pool),
              'model': np.array(info['vit_model']), 'checkpoint': np.array(str(args.checkpoint))}
    if labels is not None:
        result.update(labels=np.array(labels, dtype=np.int64), classes=np.array(classes))
    np.savez(args.out, **result)
    print(f"wrote {args.out}: features {tuple(feats.shape)} ({args.pool}) of {len(files)} images"
          + (f", labels of {len(classes)} classes" if labels is not None else ''))


if __name__ == '__main__':
    run_main(main, get_args_parser())
