"""Write images into tar shards (or a Hugging Face dataset) that every script reads as --data_path [new]:

    python make_shards.py /data/imagenet /data/imagenet-shards                 # train/ and val/, 256 MB shards
    python make_shards.py photos/ photos-shards --samples_per_shard 1000      # a flat folder (no classes)
    python make_shards.py list.txt list-shards                                # a .txt list of image paths
    python make_shards.py /data/imagenet /data/imagenet-hf --to hf            # a save_to_disk DatasetDict

SRC is what pre-training takes as --data_path: an ImageFolder tree (``train/<class>/<image>``, and ``val/`` when it
is there), a folder of images (searched recursively) or a ``.txt`` list of image paths. ``--to shards`` (default)
writes ``OUT/<split>/<split>-000000.tar``, ... in the WebDataset convention (``webdataset.ShardWriter``): sample k
of a split is ``<k:08d>.<ext>`` (the file's bytes as they are, not re-encoded) and, for a tree, ``<k:08d>.cls`` (its
class number), in the order the scripts list the files, so a run on the shards sees the same images at the same
indices as on the folder (the same data order for the same seed). ``OUT/classes.json`` lists the class names (index
= number; val/'s classes take train/'s numbers), and each shard's index lies beside it (``<shard>.index.json``,
``util/data/shards.py``: the runs read it instead of scanning the tar headers). ``--to hf`` writes a ``DatasetDict``
(``train``, ``validation``) with an ``image`` column (the files' bytes) and, for a tree, a ``label`` ClassLabel column.
Needs ``pip install webdataset`` (``--to hf``: ``pip install datasets``).
"""
import argparse
import json
import os
import re

from util.training.process import run_main
from util.data import shards
from util.errors import UsageError
from util.data.image_folder import image_folder
from util.data.image_sources import pretrain_dataset

SIZE_UNITS = {'': 1, 'B': 1, 'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'KIB': 2 ** 10, 'MIB': 2 ** 20,
              'GIB': 2 ** 30}


def get_args_parser():
    parser = argparse.ArgumentParser('MAE shards', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('src', help='an ImageFolder tree (train/, val/), a folder of images, or a .txt list')
    parser.add_argument('out', help='the folder to write (must not exist, or be empty)')
    parser.add_argument('--to', default='shards', choices=('shards', 'hf'),
                        help='tar shards (default), or a Hugging Face save_to_disk dataset')
    parser.add_argument('--shard_size', default='256MB', metavar='SIZE',
                        help='the largest shard (default 256MB; units B, KB, MB, GB, KiB, MiB, GiB)')
    parser.add_argument('--samples_per_shard', default=0, type=int, metavar='N',
                        help='at most N samples per shard as well (default 0: no limit but --shard_size)')
    return parser


def parse_size(text):
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*', text.upper())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--shard_size {text}: give a size such as 256MB, 1GB or 500000")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def splits_of(src):
    """``{split: ([(path, class number)], class names)}`` of ``src``, as the scripts list it."""
    train = pretrain_dataset(src)
    found = {'train': ([(str(p), t) for p, t in train.samples], list(train.classes))}
    if train.classes and os.path.isdir(os.path.join(src, 'val')):
        val = image_folder(src, 'val', None, numbered_as='train')
        found['val'] = ([(str(p), t) for p, t in val.samples], list(train.classes))
    return found


def read(path):
    with open(path, 'rb') as f:
        return f.read()


def write_shards(samples, labelled, folder, split, max_size, max_count):
    try:
        import webdataset as wds
    except ImportError:
        raise UsageError("make_shards.py needs webdataset: pip install webdataset") from None
    os.makedirs(folder, exist_ok=True)
    pattern = os.path.join(folder, f'{split}-%06d.tar')
    with wds.ShardWriter(pattern, maxsize=max_size, maxcount=max_count or 10 ** 12, verbose=0) as sink:
        for k, (path, label) in enumerate(samples):
            ext = os.path.splitext(path)[1][1:].lower()
            sample = {'__key__': f'{k:08d}', ext: read(path)}
            if labelled:
                sample['cls'] = label
            sink.write(sample)
        return sink.shard


def write_hf(found, out):
    try:
        import datasets
    except ImportError:
        raise UsageError("make_shards.py --to hf needs datasets: pip install datasets") from None
    classes = found['train'][1]
    features = {'image': datasets.Image()}
    if classes:
        features['label'] = datasets.ClassLabel(names=classes)

    def rows(samples):
        for path, label in samples:
            yield {'image': {'bytes': read(path), 'path': os.path.basename(path)},
                   **({'label': label} if classes else {})}

    splits = {('validation' if split == 'val' else split): datasets.Dataset.from_generator(
        rows, gen_kwargs={'samples': samples}, features=datasets.Features(features))
        for split, (samples, _) in found.items()}
    datasets.DatasetDict(splits).save_to_disk(out)


def main(args):
    max_size = parse_size(args.shard_size)
    if args.samples_per_shard < 0:
        raise UsageError(f"--samples_per_shard {args.samples_per_shard}: give a count of at least 1 (0: no limit)")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"{args.out} exists and is not an empty folder: give a new one")
    if not os.path.exists(args.src):
        raise UsageError(f"{args.src}: no such file or folder")
    found = splits_of(args.src)
    if args.to == 'hf':
        write_hf(found, args.out)
        print(f"wrote {args.out}: " + ', '.join(f"{split} {len(s)} images" for split, (s, _) in found.items()))
        return
    classes = found['train'][1]
    for split, (samples, _) in found.items():
        count = write_shards(samples, bool(classes), os.path.join(args.out, split), split, max_size,
                             args.samples_per_shard)
        for shard in shards.split_urls(args.out, split):  # their indexes beside them: no run needs to scan them
            shards.index(shard)
        print(f"wrote {count} {split} shard(s) of {len(samples)} images in {os.path.join(args.out, split)}")
    if classes:
        with open(os.path.join(args.out, 'classes.json'), 'w') as f:
            json.dump(classes, f, indent=0)
        print(f"wrote {os.path.join(args.out, 'classes.json')}: {len(classes)} class names")


if __name__ == '__main__':
    run_main(main, get_args_parser())
