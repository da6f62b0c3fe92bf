"""Hugging Face datasets as ``--data_path`` [new]: a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (splits ``train`` and ``validation``/``val``/``test``), or a hub name ``hf:NAME[:CONFIG]``
loaded by ``datasets.load_dataset`` (from its cache when there is no network).

The image column is the first of ``datasets.Image`` type and the label column the first ``ClassLabel`` (class names
from it), unless ``--hf_image_column``/``--hf_label_column`` name them (a label column of integers: the numbers
are the names). Images are read undecoded (``Image(decode=False)``: their encoded bytes) and decoded by
``util.data.image_decode`` as files are, through ``Row``, a ``str`` naming the row that ``read_bytes`` reads: the same
transforms, channels, bad-image policy and fast loaders. The dataset stays memory-mapped Arrow (``datasets``'
own), so DataLoader workers share it.

The column flags are set once per process by ``use_columns(args)`` (called by the entry points' checks), so the
places that turn ``--data_path`` into a dataset need no extra argument.
"""
import os

from util.errors import UsageError

HUB_PREFIX = 'hf:'
INSTALL = 'pip install datasets'
VAL_SPLITS = ('validation', 'val', 'test')
_COLUMNS = {'image': None, 'label': None}  # --hf_image_column, --hf_label_column
_LOADED = {}  # --data_path -> its Dataset or DatasetDict, loaded once per process


def add_args(parser):
    parser.add_argument('--hf_image_column', default=None, metavar='NAME',
                        help='[new] with a Hugging Face dataset as --data_path: its image column (default: the first '
                             'column of Image type)')
    parser.add_argument('--hf_label_column', default=None, metavar='NAME',
                        help='[new] with a Hugging Face dataset as --data_path: its label column (default: the first '
                             'ClassLabel column)')


def use_columns(args):
    _COLUMNS['image'] = getattr(args, 'hf_image_column', None)
    _COLUMNS['label'] = getattr(args, 'hf_label_column', None)


def is_hf(path):
    """Whether ``--data_path`` names a Hugging Face dataset: ``hf:NAME`` or a ``save_to_disk`` folder."""
    path = str(path)
    return path.startswith(HUB_PREFIX) or any(
        os.path.isfile(os.path.join(path, f)) for f in ('dataset_dict.json', 'state.json'))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data_path names a Hugging Face dataset, which needs the datasets library: {INSTALL}") \
            from None
    return datasets


def load(path):
    """The ``Dataset`` or ``DatasetDict`` of ``path`` (once per process); one line when it cannot be loaded."""
    if path in _LOADED:
        return _LOADED[path]
    datasets = _datasets()
    try:
        if path.startswith(HUB_PREFIX):
            name, _, config = path[len(HUB_PREFIX):].partition(':')
            loaded = datasets.load_dataset(name, config or None)
        else:
            loaded = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - a missing, uncached or unreadable dataset, in one line
        message = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        hint = ' (not in the datasets cache, and no network to download it)' if path.startswith(HUB_PREFIX) else ''
        raise UsageError(f"--data_path {path}: cannot be loaded as a Hugging Face dataset{hint}: {message}") from None
    _LOADED[path] = loaded
    return loaded


def split_of(path, split):
    """``(name, Dataset)`` of ``split`` ('train', or an evaluation split: 'validation', 'val' or 'test')."""
    datasets = _datasets()
    loaded = load(path)
    if isinstance(loaded, datasets.Dataset):
        if split == 'train':
            return split, loaded
        raise UsageError(f"--data_path {path} is one Dataset without splits: the {split} split needs a DatasetDict "
                         f"with train and {'/'.join(VAL_SPLITS)}")
    names = ['train'] if split == 'train' else [split] + [s for s in VAL_SPLITS if s != split]
    for name in names:
        if name in loaded:
            return name, loaded[name]
    raise UsageError(f"--data_path {path} has no {' or '.join(names)} split (it has: {', '.join(loaded)})")


def columns(path, ds, labelled):
    """(image column, label column or None) of ``ds``: the flags', or detected by feature type."""
    datasets = _datasets()
    features = ds.features
    image = _COLUMNS['image'] or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image is None or image not in features:
        raise UsageError(f"--data_path {path}: " + (f"no column {image!r} (--hf_image_column); it has: "
                                                    if image else "no column of Image type (give --hf_image_column); "
                                                    "its columns: ") + ', '.join(features))
    if not isinstance(features[image], datasets.Image):
        raise UsageError(f"--hf_image_column {image}: a column of {type(features[image]).__name__}, not of images")
    label = _COLUMNS['label'] or next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label is not None and label not in features:
        raise UsageError(f"--hf_label_column {label}: no such column in {path}; it has: {', '.join(features)}")
    if labelled and label is None:
        raise UsageError(f"--data_path {path}: no ClassLabel column for the classes (give --hf_label_column)")
    return image, label


class Row(str):
    """A dataset row's image as a path: ``str`` its name (``<data_path>[<split>][<row>]``), ``read()`` its bytes."""

    def __new__(cls, name, table=None, row=0):
        self = super().__new__(cls, name)
        self.table, self.row = table, row
        return self

    def read(self):
        item = self.table[self.row]
        if item.get('bytes') is not None:
            return item['bytes']
        with open(item['path'], 'rb') as f:  # an Image feature that stores paths
            return f.read()


class ImageColumn:
    """The undecoded image column of a Dataset: ``[row]`` its ``{'bytes', 'path'}``."""

    def __init__(self, ds, column):
        self.ds = ds.select_columns([column]).cast_column(column, _datasets().Image(decode=False))
        self.column = column

    def __getitem__(self, row):
        return self.ds[row][self.column]


def check(path, splits, labelled):
    for split in splits:
        split_samples(path, split, labelled)


def split_samples(path, split, labelled):
    """``(root, samples, classes)`` of ``split``, as ``util.data.shards.split_samples``'s."""
    split, ds = split_of(path, split)
    if len(ds) == 0:
        raise UsageError(f"--data_path {path}: its {split} split has no row")
    image, label = columns(path, ds, labelled)
    table = ImageColumn(ds, image)
    if label is None:
        targets, classes = [0] * len(ds), []
    else:
        feature = ds.features[label]
        targets = list(ds[label])
        if not all(isinstance(t, int) and t >= 0 for t in targets):
            raise UsageError(f"--data_path {path}: label column {label} holds values that are not class numbers "
                             f"(integers from 0)")
        names = getattr(feature, 'names', None)
        classes = list(names) if names else [str(k) for k in range(max(targets) + 1)]
    name = f"{path}[{split}]"
    samples = [(Row(f"{name}[{k}]", table, k), t) for k, t in enumerate(targets)]
    return name, samples, classes
