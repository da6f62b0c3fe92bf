"""The same images as files and as tar shards: img/s of pre-training's input pipeline (the training loader of
util/data/loaders.py, as main_pretrain.py builds it) with --data_loader pil and fast_cpu at 0, 1 and 2 workers.

    python benchmarks/bench_shards.py                          # 4000 CIFAR-10 JPEGs (32x32, ~1 KB each), crop 32
    python benchmarks/bench_shards.py --images 2000 --imagenet_like --input_size 224   # 500x375 JPEGs (~80 KB)

The images are extracted once from the tarball at --cifar into --cache (default <tmp>/mae_bench_shards; never the
repository) as an ImageFolder tree, and written into shards of --samples_per_shard images by make_shards.py (run as
a script). --imagenet_like takes benchmarks/bench_input.py's upsampled noisy JPEGs instead. Each row times
--images images after a first batch (worker start-up); the sampler draws random indices, as training does. A first line
times reading the bytes alone; each cell is the best of --repeats runs, files and shards in turn. Both
sources are read from the page cache after the first pass (the machine's memory holds them): the difference measured
is the cost of opening a file per image against reading a member of an open shard, not the storage's; on network
file systems and object stores, where each open is a round trip, shards gain more.
"""
import argparse
import contextlib
import datetime
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from bench_input import images_per_second, make_images  # noqa: E402
from util.datasets import pretrain_transform  # noqa: E402
from util.data.image_decode import read_bytes  # noqa: E402
from util.data.image_sources import pretrain_dataset  # noqa: E402
from util.data.loaders import train_loader  # noqa: E402

CIFAR = Path('/work/shared/datasets/cifar10_jpg.tar.gz')


def extract_cifar(cifar, cache, count):
    """``cache/cifar_<count>/train/<class>/<name>.jpg``: the first ``count`` training JPEGs of the tarball."""
    root = Path(cache) / f'cifar_{count}'
    if (root / 'train').is_dir() and sum(1 for _ in (root / 'train').rglob('*.jpg')) == count:
        return root
    done = 0
    with tarfile.open(cifar) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith('.jpg') and '/train/' in member.name:
                target = root / 'train' / member.name.split('/')[-2] / member.name.split('/')[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                done += 1
                if done == count:
                    break
    return root


def shards_of(folder, per_shard):
    out = Path(str(folder) + f'_shards{per_shard}')
    if not out.is_dir():
        r = subprocess.run([sys.executable, str(ROOT / 'make_shards.py'), str(folder), str(out), '--samples_per_shard',
                            str(per_shard)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
    return out


def loader_for(kind, data_path, input_size, batch_size, workers):
    args = argparse.Namespace(data_loader=kind, data_path=str(data_path), input_size=input_size, skip_bad_images=False,
                              batch_size=batch_size, accum_iter=1, num_workers=workers, pin_mem=False, device='cpu',
                              seed=0, rank=0, in_chans=None, mean=None, std=None, data_stats=None, output_dir='')
    with contextlib.redirect_stdout(io.StringIO()):  # (the dataset's description)
        loader = train_loader(args, pretrain_transform, torch.device('cpu'), pretraining=True)
    # an endless stream of random indices instead of one epoch
    loader.sampler.sampler = torch.utils.data.RandomSampler(loader.dataset, replacement=True, num_samples=10 ** 7)
    return loader


def read_rate(data_path, count):
    """img/s of reading the images' bytes alone (``read_bytes``: a file opened, read and closed; or one ``pread``
    from a shard), in a random order, after one pass that fills the page cache."""
    with contextlib.redirect_stdout(io.StringIO()):
        samples = [path for path, _ in pretrain_dataset(str(data_path)).samples]
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()[:count]
    for k in order:
        read_bytes(samples[k])
    start = time.perf_counter()
    for k in order:
        read_bytes(samples[k])
    return len(order) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', default=4000, type=int, help='images to extract, and images timed per row')
    parser.add_argument('--workers', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--loaders', nargs='+', default=['pil', 'fast_cpu'])
    parser.add_argument('--batch_size', default=64, type=int)
    parser.add_argument('--input_size', default=32, type=int)
    parser.add_argument('--samples_per_shard', default=1000, type=int)
    parser.add_argument('--repeats', default=3, type=int, help='each row the best of this many runs of each')
    parser.add_argument('--imagenet_like', action='store_true', help="bench_input.py's 500x375 noisy JPEGs")
    parser.add_argument('--cifar', default=str(CIFAR))
    parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'mae_bench_shards'))
    args = parser.parse_args()

    torch.set_num_threads(1)
    folder = make_images(args.cache, args.images, 16.0, args.cifar) if args.imagenet_like else \
        extract_cifar(args.cifar, args.cache, args.images)
    sharded = shards_of(folder, args.samples_per_shard)
    files = list((folder / 'train').rglob('*.jpg'))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    print(f"{datetime.date.today()}  {os.cpu_count()} cores  torch {torch.__version__}  {len(files)} JPEGs, "
          f"{kb:.1f} KB on average; shards of {args.samples_per_shard}; crop {args.input_size}, batch "
          f"{args.batch_size}; img/s")
    print(f"reading the bytes alone, 1 core: files {read_rate(folder, args.images):.0f} img/s, shards "
          f"{read_rate(sharded, args.images):.0f} img/s")
    print("| workers | " + " | ".join(f"{k} files | {k} shards | shards / files" for k in args.loaders) + " |")
    print("|---:|" + "---:|---:|---:|" * len(args.loaders))
    for workers in args.workers:
        cells = []
        for kind in args.loaders:
            rates = [0, 0]
            for _ in range(args.repeats):  # files and shards in turn, the best of each: load from other jobs shifts
                for k, data in enumerate((folder, sharded)):
                    loader = loader_for(kind, data, args.input_size, args.batch_size, workers)
                    rates[k] = max(rates[k], images_per_second(loader, args.images, torch.device('cpu')))
            cells += [f"{rates[0]:.0f}", f"{rates[1]:.0f}", f"{rates[1] / rates[0]:.2f}x"]
        print(f"| {workers} | " + " | ".join(cells) + " |", flush=True)


if __name__ == '__main__':
    main()
