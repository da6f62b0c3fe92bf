"""Features of images from a trained encoder, without masking [new]:

    python extract_features.py --checkpoint output_dir/checkpoint-last.pth demo/data/val --out val.npz
    python extract_features.py --checkpoint mae_pretrain_vit_base.pth --pool mean photos/ cat.jpg --device cuda
    python extract_features.py --checkpoint output_dir/checkpoint-last.pth --knn demo/data

Any checkpoint with a ViT encoder (``util.checkpoints.from_checkpoint``): main_pretrain.py's (full MAE),
main_finetune.py's and main_linprobe.py's (classifiers), the reference's released ``mae_pretrain_vit_*.pth`` (encoder
only), ``mae_visualize_vit_*.pth`` (full) and fine-tuned ones; the model is recognised from the weights' shapes when the
file does not say. Images are read as for evaluation (RGB, short side resized to ``input_size / 0.875``, centre
crop, ImageNet normalisation), in batches, on ``--device``.

The ``.npz`` holds ``features`` (float32: (N, D) for ``--pool cls`` or ``mean``, (N, 1 + L, D) for ``tokens``, the
class token first), ``paths`` (the image files, in order: folders searched recursively in sorted order, ``.txt``
lists line by line: ``util.data.image_sources.image_paths``, as demo/visualize.py), and when every input is a folder of
class folders (an ImageFolder tree), ``labels`` (int64, indices into ``classes``: the
sorted class folder names of all the inputs), plus ``pool``, ``model`` and ``checkpoint``.

``--knn DIR`` instead classifies ``DIR/val`` from ``DIR/train`` with the weighted k-NN classifier of the kNN monitor
(``main_pretrain.py --knn_every``: k = 20, temperature 0.07, class token and mean of patch tokens) and prints its
numbers: for a pre-training checkpoint, the same numbers the monitor logged for that epoch.

``--probe DIR`` [new] fits a linear probe on the cached features of ``DIR/train`` and evaluates it on ``DIR/val``
(``util.evaluation.feature_probe``: logistic regression of the standardised features, full batch, L-BFGS from zero
weights: seconds, deterministic; class token, and mean of patch tokens) and prints its numbers. ``--results FILE.json``
[new] also writes the numbers of ``--knn`` or ``--probe`` there, with the number of images of each split (what
``reproduce.py --evals knn probe`` reads), and ``--random_init`` [new] evaluates an encoder of ``--model`` with
random weights instead of a checkpoint's (the baseline of frozen features):

    python extract_features.py --checkpoint output_dir/checkpoint-last.pth --probe demo/data --results probe.json
    python extract_features.py --random_init --model vit_small_patch4 --input_size 32 --knn cifar10
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import models_vit
from util.training.process import run_main
from util.data import data_stats
from util.evaluation import feature_probe, knn_monitor
from util.checkpoints import from_checkpoint
from util.datasets import eval_transform
from util.data.image_decode import BAD_FILE_ERRORS, bad_file_reason, read_image
from util.data.image_sources import image_paths
from util.errors import UsageError
from util.flag_checks import check_device
from util.flags import Parser, Range
from util.training.output_dir import check_outputs

def get_args_parser():
    parser = Parser('MAE feature extraction', description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('images', nargs='+',
                        help='image files, folders (searched recursively, in sorted order; the folders below one '
                             'are its classes), .txt lists of image paths (one per line), or tar shards / a Hugging '
                             'Face dataset; with --knn or --probe, one folder with train/ and val/')
    parser.add_argument('--checkpoint', default=None, help='any checkpoint with a ViT encoder (see above)')
    parser.add_argument('--random_init', action='store_true',
                        help='[new] instead of --checkpoint: an encoder of --model with random weights (seed 0, '
                             'the model\'s own initialisation), at --input_size (default: the model\'s)')
    parser.add_argument('--ema', action='store_true',
                        help='[new] the EMA of the weights that main_finetune.py --model_ema keeps in its '
                             'checkpoints, instead of the weights themselves')
    parser.add_argument('--model', default=None,
                        help="the architecture (default: the checkpoint's, else recognised from its weights)")
    parser.add_argument('--input_size', default=None, type=Range(int, 1),
                        help="image size the encoder sees (default: the checkpoint's, else that of its position "
                             "embedding)")
    parser.add_argument('--pool', default='cls', choices=from_checkpoint.POOLS,
                        help='cls: the class token after the final norm (default); mean: the mean of the patch '
                             'tokens; tokens: every token (N, 1 + L, D)')
    parser.add_argument('--out', default='features.npz', help='the .npz to write (default ./features.npz)')
    parser.add_argument('--batch_size', default=64, type=Range(int, 1))
    parser.add_argument('--num_workers', default=2, type=Range(int, 0, 256), help='processes that read the images')
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    parser.add_argument('--knn', action='store_true',
                        help='classify <images>/val from <images>/train with the kNN monitor\'s classifier and print '
                             'top-1/top-5 (no .npz is written)')
    parser.add_argument('--knn_train_subset', default=0, type=Range(int, 1, special=(0,), meaning='0 (all)'),
                        metavar='M',
                        help='with --knn: M images of train/, drawn as the monitor draws them (default all)')
    parser.add_argument('--knn_val_subset', default=0, type=Range(int, 1, special=(0,), meaning='0 (all)'), metavar='M',
                        help='the same for val/')
    parser.add_argument('--probe', action='store_true',
                        help='[new] fit a linear probe (logistic regression of the standardised features, full '
                             'batch, L-BFGS) on <images>/train\'s features and print its top-1/top-5 on '
                             '<images>/val (class token; mean of patch tokens)')
    parser.add_argument('--results', default=None, metavar='FILE.json',
                        help='[new] with --knn or --probe: also write the numbers and the images counted to this JSON '
                             'file')
    return parser


# ---------------------------------------------------------------------------------------------------- inputs
class Images(torch.utils.data.Dataset):
    def __init__(self, files, transform, in_chans=3, to_grayscale=False):
        self.files, self.transform, self.in_chans, self.to_grayscale = files, transform, in_chans, to_grayscale

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = read_image(self.files[i], self.in_chans, self.to_grayscale)
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
    check_device(args)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device available (use --device cpu)")
    if args.random_init:
        if args.checkpoint:
            raise UsageError("--random_init and --checkpoint: give one (random weights, or a checkpoint's)")
        if args.ema:
            raise UsageError("--ema reads a checkpoint's EMA of the weights; --random_init has none")
        random_init_model(args.model)
    elif not args.checkpoint:
        raise UsageError("--checkpoint is required (a checkpoint with a ViT encoder), unless --random_init")
    if args.knn and args.probe:
        raise UsageError("--knn and --probe: give one (each is its own evaluation)")
    mode = '--knn' if args.knn else '--probe' if args.probe else None
    if mode:
        if len(args.images) != 1:
            raise UsageError(f"{mode} takes one folder with train/ and val/, got {len(args.images)} paths")
        knn_monitor.check_data_path(args.images[0], mode)
        if args.results is not None:
            if not args.results.endswith('.json'):
                raise UsageError(f"--results {args.results}: give a .json file name")
            if not os.path.isdir(os.path.dirname(os.path.abspath(args.results))):
                raise UsageError(f"--results {args.results}: no folder {os.path.dirname(args.results) or '.'}")
            check_outputs([args.results], '--results', [('--checkpoint', args.checkpoint)])
    elif args.results is not None:
        raise UsageError("--results is for the numbers of --knn or --probe")
    elif not args.out.endswith('.npz'):
        raise UsageError(f"--out {args.out}: give a .npz file name")
    return device


def extract(model, files, input_size, pool, device, batch_size=64, num_workers=0, stats=None):
    """The ``pool`` features of ``files`` (float32, on the CPU, in order); ``stats``: the channels and normalisation
    the model was trained with (``util.data.data_stats.stats_from_checkpoint``; ImageNet's RGB when None)."""
    stats = stats or data_stats.stats_from_checkpoint({})
    images = Images(files, eval_transform(input_size, stats['mean'], stats['std']), stats['in_chans'],
                    stats.get('to_grayscale', False))
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, generator=torch.Generator())
    out = []
    for images in progress(loader, len(loader), 'features'):
        out.append(from_checkpoint.features(model, images.to(device), pool).float().cpu())
    return torch.cat(out)


def random_init_model(name):
    """The models_vit name of ``--model`` for ``--random_init`` (an MAE's name gives its encoder's)."""
    vit = from_checkpoint.vit_name(name) if name and name.startswith('mae_') else name
    if vit not in models_vit.MODELS:
        raise UsageError(f"--random_init needs --model, one of: {', '.join(models_vit.MODELS)}"
                         + (f" (got {name})" if name else ''))
    return vit


def random_encoder(name, input_size):
    """An encoder of ``name`` (a models_vit or models_mae name) with the model's own random initialisation (torch
    seed 0, from a stream of its own), without head, in eval mode, and its ``info``."""
    vit = random_init_model(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:  # (the model's own image size without --input_size: 224, or 32 for the small ones)
            net = models_vit.MODELS[vit](num_classes=0, global_pool=False,
                                         **({'img_size': input_size} if input_size else {}))
        except (ValueError, AssertionError) as e:
            raise UsageError(f"--model {name} at --input_size {input_size}: {e}") from None
    return net.eval(), {'vit_model': vit, 'input_size': net.patch_embed.img_size[0], 'args': {},
                        'path': 'random weights'}


def evaluate_frozen(args, device):
    """``--knn`` or ``--probe``: the numbers of the encoder's features of <images>/train and <images>/val."""
    if args.random_init:
        model, info = random_encoder(args.model, args.input_size)
        source = f"random weights of {info['vit_model']}"
    else:
        model, info = from_checkpoint.load_encoder(args.checkpoint, args.model, args.input_size, ema=args.ema)
        source = str(args.checkpoint)
    flag = '--knn' if args.knn else '--probe'
    norm = trained_stats(model, info)
    train, val, num_classes = knn_monitor.knn_datasets(
        args.images[0], info['input_size'], args.knn_train_subset, args.knn_val_subset, flag=flag,
        in_chans=norm['in_chans'], mean=norm['mean'], std=norm['std'])
    start = time.time()
    model = model.to(device)
    if args.knn:
        stats = knn_monitor.knn_evaluate(model, train, val, num_classes, device, args.batch_size, args.num_workers)
        what, described = 'kNN', knn_monitor.describe(stats)
    else:
        train_feats, train_labels = knn_monitor.embed(model, train, device, args.batch_size, args.num_workers)
        val_feats, val_labels = knn_monitor.embed(model, val, device, args.batch_size, args.num_workers)
        stats = {}
        for pool in knn_monitor.POOLS:
            result = feature_probe.probe_accuracy(train_feats[pool], train_labels, val_feats[pool], val_labels,
                                                  num_classes)
            prefix = 'probe' if pool == knn_monitor.POOLS[0] else f'probe_{pool}'
            stats.update({f'{prefix}_{k}': v for k, v in result.items()})
        what = 'Linear probe'
        described = (f"top-1 {stats['probe_top1']:.2f}% top-5 {stats['probe_top5']:.2f}% (class token; "
                     f"{stats['probe_train_top1']:.2f}% on train/); mean of patch tokens: top-1 "
                     f"{stats['probe_mean_top1']:.2f}% top-5 {stats['probe_mean_top5']:.2f}%")
    took = time.time() - start
    print(f"{what} of {source} ({info['vit_model']}, {info['input_size']}px) on {args.images[0]}: {len(train)} train "
          f"and {len(val)} val images: {described}; took {took:.1f}s")
    if args.results:
        record = dict(stats, evaluation=flag[2:], source=source, model=info['vit_model'],
                      input_size=info['input_size'], data=str(args.images[0]), train_images=len(train),
                      val_images=len(val), num_classes=num_classes, seconds=round(took, 1))
        tmp = args.results + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(json.dumps(record, indent=1, sort_keys=True) + '\n')
        os.replace(tmp, args.results)  # whole or not at all: a reader never sees half a file
    return stats


def trained_stats(model, info):
    """The channels and normalisation the checkpoint was trained with (its --in_chans/--mean/--std; ImageNet's RGB
    for checkpoints that store none; colour converted to grey when it was, --to_grayscale), said in one line when
    they are not ImageNet's."""
    stats = data_stats.stats_from_checkpoint(info['args'], model.state_dict())
    stats['to_grayscale'] = bool((info['args'] or {}).get('to_grayscale'))
    if stats['stored']:
        print(f"Images: {stats['in_chans']} channel(s), normalised with mean {data_stats.fmt(stats['mean'])} std "
              f"{data_stats.fmt(stats['std'])} (from {info['path']})")
    return stats


def main(args):
    device = check_args(args)
    if args.knn or args.probe:
        return evaluate_frozen(args, device)

    files, _, labels, classes = image_paths(args.images)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {args.out}: no folder {out_dir}")
    check_outputs([args.out], '--out', [('--checkpoint', args.checkpoint)])  # (an image is never a .npz)
    if args.random_init:
        model, info = random_encoder(args.model, args.input_size)
    else:
        model, info = from_checkpoint.load_encoder(args.checkpoint, args.model, args.input_size, ema=args.ema)
    feats = extract(model.to(device), files, info['input_size'], args.pool, device, args.batch_size,
                    args.num_workers, stats=trained_stats(model, info))
    result = {'features': feats.numpy(), 'paths': np.array(files), 'pool': np.array(args.pool),
              'model': np.array(info['vit_model']),
              'checkpoint': np.array(str(args.checkpoint) if args.checkpoint else 'random_init')}
    if labels is not None:
        result.update(labels=np.array(labels, dtype=np.int64), classes=np.array(classes))
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{os.path.basename(args.out)}")
    try:  # whole or not at all, and never written through a hard link of another file
        with open(tmp, 'wb') as f:
            np.savez(f, **result)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out}: features {tuple(feats.shape)} ({args.pool}) of {len(files)} images"
          + (f", labels of {len(classes)} classes" if labels is not None else ''))


if __name__ == '__main__':
    run_main(main, get_args_parser())
