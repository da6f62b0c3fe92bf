"""What reading your own images costs at start-up (docs/own-images.md): ``--data_stats auto`` (the
measurement of the mean and std on 1000 evenly spaced training images) and listing a large flat folder or a list.

    python benchmarks/bench_data.py                                  # demo/data and 100,000 empty files
    python benchmarks/bench_data.py --stats_path /tmp/cifar10_jpg     # also a folder of your own (e.g. CIFAR JPEGs)

Prints one line per measurement; the empty files are made under --scratch (a temporary folder) and removed.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.data import data_stats  # noqa: E402
from util.data.image_sources import list_images, pretrain_dataset, read_list  # noqa: E402


def time_stats(data_path, in_chans=3):
    start = time.perf_counter()
    paths = [p for p, _ in pretrain_dataset(data_path).samples]
    listed = time.perf_counter() - start
    start = time.perf_counter()
    mean, std, count, _, error = data_stats.measure(paths, in_chans)
    measured = time.perf_counter() - start
    print(f"--data_stats auto on {data_path}: listing {len(paths)} images {listed:.2f} s, measuring {count} of them "
          f"{measured:.2f} s ({1000 * measured / count:.1f} ms per image); mean {data_stats.fmt(mean)} std "
          f"{data_stats.fmt(std)}, standard error of the means {error:.4f}")


def time_listing(scratch, n, per_folder):
    root = Path(tempfile.mkdtemp(dir=scratch, prefix='bench_data_'))
    try:
        start = time.perf_counter()
        paths = []
        for k in range(n):
            folder = root / 'photos' / f'{k // per_folder:04d}'
            if k % per_folder == 0:
                folder.mkdir(parents=True)
            path = folder / f'{k:06d}.jpg'
            path.touch()
            paths.append(str(path))
        made = time.perf_counter() - start
        (root / 'list.txt').write_text('\n'.join(paths) + '\n')
        start = time.perf_counter()
        found = list_images(str(root / 'photos'))
        walked = time.perf_counter() - start
        start = time.perf_counter()
        listed = read_list(str(root / 'list.txt'))
        read = time.perf_counter() - start
        assert len(found) == len(listed) == n
        print(f"{n} empty files in {n // per_folder} folders (made in {made:.1f} s): flat folder listed, sorted, in "
              f"{walked:.2f} s; .txt list read and every file checked to exist in {read:.2f} s")
    finally:
        shutil.rmtree(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--stats_path', nargs='*', default=['demo/data'],
                        help='folders (or .txt lists) to measure --data_stats auto on (default: demo/data)')
    parser.add_argument('--files', default=100000, type=int, help='empty files to list (default 100000)')
    parser.add_argument('--per_folder', default=1000, type=int, help='files per sub-folder (default 1000)')
    parser.add_argument('--scratch', default=tempfile.gettempdir(), help='where to make the empty files')
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])
    for path in args.stats_path:
        time_stats(path)
    if args.files:
        time_listing(args.scratch, args.files, args.per_folder)


if __name__ == '__main__':
    main()
