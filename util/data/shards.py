"""Tar shards as ``--data_path`` [new]: the WebDataset convention (each sample a group of tar members sharing a key,
``KEY.jpg``/``.png``/``.webp``/... the image, ``KEY.cls`` its class index), read as a map-style dataset.

Where the shards are: a folder whose ``train/`` (and ``val/``) hold ``*.tar`` (or, for pre-training, a folder of
``*.tar``), a brace pattern (``shards/train-{000000..000127}.tar``; for a classification split other than train,
the same pattern with ``train`` replaced by the split's name in the file name and its folder's), a single ``.tar``, or
``pipe:``/``http(s)://`` shard URLs (webdataset's ``gopen`` opens them; each is copied once into a local cache,
``MAE_SHARD_CACHE`` or ``~/.cache/mae-shards``, since samples are read by position). Class names: ``classes.json``
beside the shards (a list, index = class number; ``make_shards.py`` writes it), else the numbers themselves.

Why map-style, not an iterable pipeline: a dataset with a length and samples by index takes the reference's
DistributedSampler and ``util.data.loaders.ResumableSampler`` unchanged, so every rank runs the same number of steps
(uneven shards too), every sample is seen once per epoch, the order is a function of the seed and epoch, and an
epoch resumed in the middle skips exactly what was trained on. The price is random reads inside the shards (one
``pread`` per sample: sequential enough on local and parallel file systems; object stores go through the cache).

The index: each shard's members (key, image member, byte offset and size, class) are found once by reading the tar
headers with the standard library's ``tarfile`` (it seeks over the data), kept in memory for the process, and
cached beside the shard as ``<shard>.index.json`` when that folder is writable (checked against the shard's size and
modification time; else rebuilt by each run). webdataset 1.0.2 no longer ships ``wids`` (its indexed reader is the
separate ``wids`` package), so the index is this module's own: some 60 lines over ``tarfile``.

A sample's image is a ``Member``: a ``str`` naming it (``shard.tar:KEY.jpg``, what bad-image messages show) that
``util.data.image_decode.read_bytes`` reads, so decoding, channels, 16-bit, ``--skip_bad_images`` and the fast loaders
are those of image files.
"""
import errno
import json
import os
import tarfile

from util.errors import UsageError
from util.data.image_decode import IMG_EXTENSIONS

SHARD_SUFFIX = '.tar'
CLASSES_FILE = 'classes.json'
INDEX_SUFFIX = '.index.json'
URL_PREFIXES = ('pipe:', 'http://', 'https://')
CACHE_ENV = 'MAE_SHARD_CACHE'
INSTALL = 'pip install webdataset'
_IMAGE_EXTS = tuple(e[1:] for e in IMG_EXTENSIONS)
_INDEX = {}  # shard path -> its samples, built once per process


class Member(str):
    """A shard's image member as a path: ``str`` its name (``<shard>:<member>``), ``read()`` its bytes."""

    def __new__(cls, name, shard='', offset=0, size=0):
        self = super().__new__(cls, name)
        self.shard, self.offset, self.size = shard, offset, size
        return self

    def read(self):
        # pread: no file offset shared by forked DataLoader workers; one descriptor per shard and process
        data = os.pread(_descriptor(self.shard), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(errno.EIO, f"{self.shard} ends inside this member (truncated)")
        return data


_FDS = {}


def _descriptor(shard):
    key = (os.getpid(), shard)
    if key not in _FDS:
        _FDS[key] = os.open(shard, os.O_RDONLY)
    return _FDS[key]


# ---------------------------------------------------------------------------------------------------- where
def is_url(path):
    return str(path).startswith(URL_PREFIXES)


def is_shards(path):
    """Whether ``--data_path`` names tar shards (see the module's docstring)."""
    path = str(path)
    if is_url(path) or (path.endswith(SHARD_SUFFIX) and ('{' in path or os.path.isfile(path))):
        return True
    if not os.path.isdir(path):
        return False
    folder = os.path.join(path, 'train') if os.path.isdir(os.path.join(path, 'train')) else path
    # (a folder of images that also holds an archive stays a folder of images)
    return bool(_tars_in(folder)) and not any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(folder))


def _tars_in(folder):
    try:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(SHARD_SUFFIX))
    except OSError:
        return []


def split_urls(path, split):
    """The shards of ``split`` ('train', 'val') of ``--data_path`` ``path``, in order; a one-line ``UsageError``
    when there are none."""
    from braceexpand import braceexpand  # (webdataset's dependency)
    path = str(path)
    if os.path.isdir(path):
        folder = os.path.join(path, split)
        if not os.path.isdir(folder):
            if split != 'train':
                raise UsageError(f"--data_path {path} has no '{split}/' folder of {SHARD_SUFFIX} shards")
            folder = path
        urls = _tars_in(folder)
        if not urls:
            raise UsageError(f"--data_path {path}: no {SHARD_SUFFIX} shards in {folder}")
        return urls
    if split != 'train':
        parent, name = os.path.split(path)  # 'train' in the file name and its folder: shards/train/train-{..}.tar
        if 'train' not in os.path.basename(parent) + name:
            raise UsageError(f"--data_path {path}: a shard pattern for the '{split}' split must contain 'train' (the "
                             f"{split} shards are the same pattern with '{split}'), or give a folder with train/ and "
                             f"{split}/")
        path = os.path.join(os.path.dirname(parent), os.path.basename(parent).replace('train', split),
                            name.replace('train', split))
    urls = list(braceexpand(path))
    local = [u for u in urls if not is_url(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise UsageError(f"--data_path {path}: {len(missing)} of its {len(urls)} shards do not exist, e.g. "
                         + ', '.join(missing[:3]))
    return urls


# ---------------------------------------------------------------------------------------------------- index
def local_file(url):
    """A local path for the shard ``url``: itself, or a ``pipe:``/``http(s)://`` shard copied once into the cache."""
    if not is_url(url):
        return url
    try:
        from webdataset import gopen
    except ImportError:
        raise UsageError(f"shard URL {url}: reading URLs needs webdataset: {INSTALL}") from None
    import hashlib
    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'mae-shards')
    name = hashlib.sha1(url.encode()).hexdigest()[:16] + '-' + os.path.basename(url.split()[-1]).split('?')[0]
    target = os.path.join(cache, name)
    if not os.path.isfile(target):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            with gopen(url, 'rb') as src, open(tmp, 'wb') as dst:
                while True:
                    block = src.read(1 << 22)
                    if not block:
                        break
                    dst.write(block)
        except Exception as e:  # noqa: BLE001 - whatever the pipe or the network says, as one line
            raise UsageError(f"shard {url} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
        os.replace(tmp, target)
    return target


def scan(shard):
    """The samples of the tar ``shard`` in tar order: ``[key, image member, offset, size, class or None]``; a one-line
    ``UsageError`` for a file that is not a tar, a truncated one, or a sample without an image member."""
    samples, by_key = [], {}
    try:
        end = os.path.getsize(shard)
        with tarfile.open(shard, mode='r:') as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                stem, _, ext = base.partition('.')
                key = os.path.join(folder, stem)
                sample = by_key.get(key)
                if sample is None:
                    sample = by_key[key] = [key, None, 0, 0, None]
                    samples.append(sample)
                ext = ext.lower()
                if m.offset_data + m.size > end:
                    raise tarfile.ReadError(f"unexpected end of data in {m.name}")
                if ext == 'cls':
                    text = tar.extractfile(m).read().decode('ascii', 'replace').strip()
                    if not text.isdigit():
                        raise UsageError(f"shard {shard}: {m.name} holds {text[:20]!r}, not a class number")
                    sample[4] = int(text)
                elif ext in _IMAGE_EXTS and sample[1] is None:
                    sample[1:4] = [m.name, m.offset_data, m.size]
    except (tarfile.TarError, EOFError) as e:
        raise UsageError(f"shard {shard} is not a readable tar file ({e}): truncated or not a tar; rewrite it "
                         f"(make_shards.py)") from None
    except OSError as e:
        raise UsageError(f"shard {shard} cannot be read ({e.strerror or e})") from None
    lacking = [s[0] for s in samples if s[1] is None]
    if lacking:
        raise UsageError(f"shard {shard}: {len(lacking)} sample(s) have no image member ({', '.join(IMG_EXTENSIONS)}),"
                         f" e.g. {lacking[0]} (members of one sample share the key before the first dot)")
    return samples


def index(shard):
    """``scan(shard)``, from this process's memory, the cache beside the shard, or scanned now (and cached)."""
    if shard in _INDEX:
        return _INDEX[shard]
    cache = shard + INDEX_SUFFIX
    try:
        stat = os.stat(shard)
    except OSError as e:
        raise UsageError(f"shard {shard} cannot be read ({e.strerror or e})") from None
    stamp = [stat.st_size, stat.st_mtime_ns]
    samples = None
    try:
        with open(cache) as f:
            stored = json.load(f)
        if stored.get('stamp') == stamp:
            samples = stored['samples']
    except (OSError, ValueError, AttributeError):
        pass
    if samples is None:
        samples = scan(shard)
        tmp = f"{cache}.{os.getpid()}.tmp"
        try:  # beside the shard when writable (each process writes the same, atomically); else memory only
            with open(tmp, 'w') as f:
                json.dump({'stamp': stamp, 'samples': samples}, f)
            os.replace(tmp, cache)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    _INDEX[shard] = samples
    return samples


def class_names(urls, labels):
    """The class names of ``classes.json`` beside the first shard, else the numbers as names (0..the largest)."""
    first = urls[0]
    path = os.path.join(os.path.dirname(first), CLASSES_FILE)
    for candidate in (path, os.path.join(os.path.dirname(os.path.dirname(first)), CLASSES_FILE)):
        if not is_url(candidate) and os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    names = json.load(f)
            except (OSError, ValueError) as e:
                raise UsageError(f"{candidate} cannot be read as a JSON list of class names ({e})") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UsageError(f"{candidate}: expected a JSON list of class names (index = class number)")
            top = max(labels, default=-1)
            if top >= len(names):
                raise UsageError(f"{candidate} names {len(names)} classes; the shards hold class number {top}")
            return names
    return [str(k) for k in range(max(labels, default=-1) + 1)]


# ---------------------------------------------------------------------------------------------------- samples
def check(path, splits, labelled):
    """Before anything runs: the shards of each of ``splits`` exist and are indexed (truncated tars, samples
    without an image or, when ``labelled``, without ``.cls`` stop here with one line)."""
    for split in splits:
        split_samples(path, split, labelled)


def split_samples(path, split, labelled):
    """``(root, samples, classes)`` of ``split``: a name for messages, ``[(Member, class)]`` in shard order (class
    0 where there is none and not ``labelled``), the class names."""
    urls = split_urls(path, split)
    samples = []
    for url in urls:
        shard = local_file(url)
        for key, member, offset, size, label in index(shard):
            if label is None and labelled:
                raise UsageError(f"shard {url}: sample {key} has no {key}.cls member (its class number): "
                                 f"fine-tuning, linear probing and kNN need one per sample (make_shards.py from an "
                                 f"ImageFolder tree writes them)")
            samples.append((Member(f"{url}:{member}", shard, offset, size), label or 0))
    if not samples:
        raise UsageError(f"--data_path {path}: the {split} shards hold no sample")
    classes = class_names(urls, [t for _, t in samples]) if labelled else []
    root = os.path.join(path, split) if os.path.isdir(path) and os.path.isdir(os.path.join(path, split)) else path
    return root, samples, classes
