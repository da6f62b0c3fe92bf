"""What checking a checkpoint's integrity costs (util/checkpoint.damage: the CRC-32 of each record of torch's zip
format, checked at load), for a ViT-L-sized checkpoint: about 1.2 GB of fp32 tensors (--gb to change), against
torch.save, torch.load and the hashes one could have added instead.

    python benchmarks/checkpoint_integrity.py             # 1.2 GB, in the system's temporary folder
    python benchmarks/checkpoint_integrity.py --gb 4 --dir /checkpoint/$USER   # a ViT-L with AdamW state, on NFS

The file is read from the page cache when it was just written (the numbers then are CPU time); on a network file
system the first read of a resume costs what reading the file costs, once for torch.load and once for the check.
"""
import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import util.checkpoints.checkpoint as ckpt_io  # noqa: E402


def timed(what, fn, gb):
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    print(f"{what:<44} {took:6.2f} s  ({gb / took:5.2f} GB/s)")


def hashes_and_save(gb, path):
    """The hashes over the tensors' bytes in memory, then the file written as Run.save writes it."""
    tensor = torch.randn(int(gb * 1e9 / 4))
    data = memoryview(tensor.numpy()).cast('B')
    print("hashes over the tensor's bytes in memory (what a checksum of our own would cost, at save and at load):")
    timed('  zlib.crc32', lambda: zlib.crc32(data), gb)
    timed('  zlib.adler32', lambda: zlib.adler32(data), gb)
    timed('  hashlib.sha256', lambda: hashlib.sha256(data).digest(), gb)
    timed('  hashlib.blake2b', lambda: hashlib.blake2b(data).digest(), gb)
    print("the checkpoint file:")
    timed('  atomic_save (torch.save + fsync; CRC-32s)', lambda: ckpt_io.atomic_save({'model': {'w': tensor}}, path),
          gb)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gb', type=float, default=1.2, help='size of the fp32 tensors (default 1.2: a ViT-L)')
    parser.add_argument('--dir', default=None, help='where to write the file (default: the temporary folder)')
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.gb} GB of fp32 tensors")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / 'checkpoint-last.pth'
        hashes_and_save(args.gb, path)
        timed('  torch.load (weights_only)', lambda: torch.load(path, weights_only=True), args.gb)
        timed('  util.checkpoints.checkpoint.damage (every CRC-32)', lambda: ckpt_io.damage(path), args.gb)
        timed('  util.checkpoints.checkpoint.load (both)', lambda: ckpt_io.load(path), args.gb)


if __name__ == '__main__':
    main()
