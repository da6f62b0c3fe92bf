"""The data of the runs: the ``--data_path`` the entry points get (links to a split or a subset, made once in the
work dir, which owns ``data/SOURCE.json``), and how it is described in the reports."""
import json
import os
import random
import shutil
from pathlib import Path

from util.errors import UsageError
from util.data.image_sources import check_outputs_outside_data


def class_folders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def prepare_data(args, work_dir, dry_run):
    """The ``--data_path`` the entry points get: the given one when it has train/ and val/ as they are, else a folder
    in the work dir of links to it: ``val`` -> the ``--val_split`` folder (e.g. CIFAR's test/), and with
    ``--train_subset``/``--val_subset`` a class-balanced random subset of links to the images (seed 0)."""
    src = Path(args.data_path).absolute()
    for split in ('train', args.val_split):
        message = None
        if not (src / split).is_dir():
            message = f"--data_path {args.data_path} has no '{split}/' folder (expected {src / split}/<class>/<image>)"
        elif not class_folders(src / split):  # (every run would fail on it, one after the other)
            message = (f"--data_path {args.data_path}: {split}/ has no class folders (expected "
                       f"{src / split}/<class>/<image>)")
        if message and not dry_run:
            raise UsageError(message)
        if message:
            print(f"# note: {message}; the runs would stop on it")
    if args.val_split == 'val' and not args.train_subset and not args.val_subset:
        return src
    data = work_dir / 'data'
    spec = {'data_path': str(src), 'val_split': args.val_split, 'train_subset': args.train_subset,
            'val_subset': args.val_subset}
    spec_file = data / 'SOURCE.json'
    if spec_file.is_file():
        try:
            made = json.loads(spec_file.read_bytes().decode('utf-8'))
        except ValueError as e:  # (UnicodeDecodeError, json.JSONDecodeError)
            raise UsageError(f"{spec_file} is damaged (not UTF-8 JSON: {e}); it says which data the runs of "
                             f"{work_dir} were made from: if from these flags' data, move {data} aside (it is made "
                             f"again), else pass another --work_dir") from None
        if made != spec:
            raise UsageError(f"{work_dir} was made from other data ({made}); its runs would mix the two: pass "
                             f"another --work_dir")
        return data
    if dry_run:
        print(f"# would make {data}: links to {src} (train/ -> train/{' subset' if args.train_subset else ''}, "
              f"val/ -> {args.val_split}/{' subset' if args.val_subset else ''})")
        return data
    tmp = work_dir / '.data.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, target, subset in (('train', 'train', args.train_subset), ('val', args.val_split, args.val_subset)):
        if not subset:
            os.symlink(src / target, tmp / split)
            continue
        classes = class_folders(src / target)
        rng = random.Random(0)
        for i, cls in enumerate(classes):
            files = sorted(e.name for e in os.scandir(src / target / cls) if e.is_file())
            n = subset // len(classes) + (i < subset % len(classes))
            (tmp / split / cls).mkdir(parents=True)
            for name in sorted(rng.sample(files, min(n, len(files)))):
                os.symlink(src / target / cls / name, tmp / split / cls / name)
    (tmp / 'SOURCE.json').write_text(json.dumps(spec) + '\n')
    os.replace(tmp, data)
    return data


def check_outside_data(args):
    """One line when --work_dir or --results_dir is, or lies inside, a split of --data_path that the runs read
    (train/, --val_split): the runs' folders would be taken for classes, the charts for images."""
    if not args.data_path:
        return
    check_outputs_outside_data([('--work_dir', args.work_dir), ('--results_dir', args.results_dir)],
                               [('--data_path', os.path.join(args.data_path, split))
                                for split in ('train', args.val_split)])


def count_images(data_path, split):
    root = Path(data_path) / split
    if not root.is_dir():
        return '?'
    return sum(len(files) for _, _, files in os.walk(root, followlinks=True))


def data_summary(args, data_path, nb_classes, scale):
    """E.g. "`cifar10_jpg`: 5000 training images of train/ (a class-balanced subset), 1000 evaluation images of
    test/ (a class-balanced subset), 10 classes"."""
    def split(name, folder, subset):
        # (walking ImageNet's folders would take minutes on a cluster's file system)
        count = '' if scale.name == 'paper' else f"{count_images(data_path, name)} "
        return f"{count}{'training' if name == 'train' else 'evaluation'} images of {folder}/" + (
            ' (a class-balanced subset)' if subset else '')
    return (f"`{args.data_path}`: {split('train', 'train', args.train_subset)}, "
            f"{split('val', args.val_split, args.val_subset)}, {nb_classes} classes")

