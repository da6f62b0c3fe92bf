"""Where pre-training's images come from (``pretrain_dataset``): an ImageFolder tree (``train/<class>/<image>``, the
reference's), a folder of images with no class folders (searched recursively in sorted order, each directory
visited once also through symlinks), or a ``.txt`` list of image paths, one per line (``ImageFiles``; pre-training
uses no labels)."""
import os

from torchvision import datasets

import util.misc as misc
from util.errors import UsageError
from util.data.image_decode import IMG_EXTENSIONS, load_rgb
from util.data.image_folder import ImageFolder, listed, other_source

LIST_SUFFIX = '.txt'


class ImageFiles(ImageFolder):
    """The images ``paths`` with no labels (every target 0): a folder searched recursively, or a list. Bad files
    are handled as ``ImageFolder``'s. ``root`` names the source in messages."""

    def __init__(self, root, paths, transform=None, skip_bad=False, loader=load_rgb):
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.loader = loader
        self.classes, self.class_to_idx = [], {}
        self.samples = [(p, 0) for p in paths]
        self.imgs, self.targets = self.samples, [0] * len(self.samples)
        self._init_skip(skip_bad)


def list_images(root):
    """The image files under the folder ``root`` (``IMG_EXTENSIONS``), searched recursively, sorted by path (the
    names at each level, files and folders together). Symlinks are followed, each directory once (by its real
    path), so a link back up the tree or two links to one folder do not repeat files."""
    return _list_below(root, set(), misc.Progress(f'Listing the images of {root}'))


def _list_below(folder, seen, found):
    seen.add(os.path.realpath(folder))
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UsageError(f"{folder}: cannot be listed ({e.strerror or e})") from None
    out = []
    for e in entries:
        if e.is_dir():
            if os.path.realpath(e.path) not in seen:
                out.extend(_list_below(e.path, seen, found))
        elif e.name.lower().endswith(IMG_EXTENSIONS):
            out.append(e.path)
            found.update()  # [new] a line every 10 s on a terminal
    return out


def read_list(list_path, what='--data_path'):
    """The image paths a ``.txt`` list names, one per line (blank lines and lines starting with # skipped;
    relative paths are relative to the list's folder). A one-line ``UsageError`` when it names none, or names files
    that do not exist (how many, and the first few)."""
    try:
        with open(list_path, encoding='utf-8') as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {list_path}: cannot be read as a text list of image paths ({e})") from None
    base = os.path.dirname(os.path.abspath(list_path))
    paths = [os.path.join(base, line) for line in lines if line and not line.startswith('#')]
    if not paths:
        raise UsageError(f"{what} {list_path}: the list names no image file (one path per line)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"{what} {list_path}: {len(missing)} of its {len(paths)} files do not exist, e.g. "
                         + ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else ''))
    return paths


def has_class_folders(root):
    """Whether ``root`` holds a sub-folder (an ImageFolder's classes)."""
    try:
        with os.scandir(root) as it:
            return any(e.is_dir() for e in it)
    except OSError:
        return False


def pretrain_source(data_path):
    """What pre-training reads from ``--data_path``: ('list', file) for a .txt list, ('folder', <data_path>/train)
    for an ImageFolder tree (the reference's), else ('files', the folder searched recursively: <data_path>/train
    when it exists, else <data_path>)."""
    if os.path.isfile(data_path):
        return 'list', data_path
    train = os.path.join(data_path, 'train')
    if os.path.isdir(train):
        return ('folder' if has_class_folders(train) else 'files'), train
    return 'files', data_path


def check_pretrain_path(data_path):
    """One line before anything runs when pre-training's ``--data_path`` is neither a folder nor a .txt list (nor
    tar shards or a Hugging Face dataset [new], whose problems are found here too)."""
    if other_source(data_path):
        return other_source(data_path).check(data_path, ['train'], labelled=False)
    if os.path.isfile(data_path):
        if not data_path.lower().endswith(LIST_SUFFIX):
            raise UsageError(f"--data_path {data_path} is a file: pre-training reads a folder of images (or an "
                             f"ImageFolder tree with train/) or a {LIST_SUFFIX} list of image paths, one per line")
    elif not os.path.isdir(data_path):
        raise UsageError(f"--data_path {data_path}: no such file or folder")


def pretrain_dataset(data_path, transform=None, skip_bad=False, loader=load_rgb):
    """Pre-training's images (see ``pretrain_source``): an ``ImageFolder`` for a tree with class folders (the
    reference's data order), else ``ImageFiles``. A one-line ``UsageError`` when there is no image. [new] Tar shards
    or a Hugging Face dataset: their train split (``util.data.image_folder.listed``)."""
    if other_source(data_path):
        return listed(data_path, 'train', transform, skip_bad, loader, labelled=False)
    kind, root = pretrain_source(data_path)
    if kind == 'folder':
        return ImageFolder(root, transform=transform, skip_bad=skip_bad, loader=loader)
    paths = read_list(root) if kind == 'list' else list_images(root)
    if not paths:
        raise UsageError(f"--data_path {data_path}: no image files ({', '.join(IMG_EXTENSIONS)}) in {root} or below; "
                         f"pre-training reads an ImageFolder tree (train/<class>/<image>), any folder of images, or "
                         f"a {LIST_SUFFIX} list of image paths")
    print(f"--data_path {data_path}: {len(paths)} images "
          + (f"listed in {root}" if kind == 'list' else f"in {root} (searched recursively; no labels)"))
    return ImageFiles(root, paths, transform=transform, skip_bad=skip_bad, loader=loader)


def check_outputs_outside_data(outputs, inputs):
    """One line when an output folder (``outputs``: ``(flag, path)`` pairs, e.g. --output_dir, --log_dir) is, or
    lies inside, a folder of images the script reads (``inputs``: ``(what reads it, folder)`` pairs): what is
    written there would be read as data, by this run or the next (a folder inside an ImageFolder tree is taken for
    a class, a PNG for an image). Paths are compared as they resolve (symbolic links followed), before anything is
    created."""
    for flag, path in outputs:
        if not path:
            continue
        real = os.path.realpath(path)
        for data_flag, folder in inputs:
            root = os.path.realpath(folder)
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                where = 'is' if real == root else 'lies inside'
                raise UsageError(f"{flag} {path} {where} {folder}, which {data_flag} reads images from: what is "
                                 f"written there would be read as data (a folder as a class, a PNG as an image); "
                                 f"give a {flag} outside it")


def check_run_outside_data(args, splits=None):
    """``check_outputs_outside_data`` for a training run: its --output_dir and --log_dir against the folders it
    reads, ``splits`` of --data_path (None: pre-training's, see ``pretrain_source``; none for a .txt list) and, with
    the kNN monitor, --knn_data_path's train/ and val/."""
    if splits is None:
        kind, root = pretrain_source(args.data_path)
        inputs = [] if kind == 'list' else [('--data_path', root)]
    else:
        inputs = [('--data_path', os.path.join(args.data_path, split)) for split in splits]
    if getattr(args, 'knn_every', 0) and args.knn_data_path:
        inputs += [('--knn_data_path', os.path.join(args.knn_data_path, split)) for split in ('train', 'val')]
    check_outputs_outside_data([('--output_dir', args.output_dir), ('--log_dir', args.log_dir)], inputs)

