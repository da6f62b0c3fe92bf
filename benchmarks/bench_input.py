"""Input-pipeline throughput of pre-training: the reference's PIL pipeline against --data_loader fast_cpu (and gpu
and dali where there is a GPU), in images per second for each number of DataLoader workers, on ImageNet-like JPEGs.

    python benchmarks/bench_input.py                          # 0, 1 and 2 workers, 256 images
    python benchmarks/bench_input.py --workers 0 4 8 16 --images 1024 --loaders pil fast_cpu gpu dali
    python benchmarks/bench_input.py --train mae_vit_tiny_patch4 --input_size 64 --device cpu

The images are made once in a cache folder (--cache, default <tmp>/mae_bench_input), never in the repository:
CIFAR-10 photos from the tarball at --cifar (read with tarfile) upsampled to 500x375 (bicubic) with Gaussian noise
(--noise) so that the JPEGs (quality 90, ~80 KB) take about as long to decode as ImageNet's instead of the smooth
~16 KB of a bare upsampled 32x32 picture (the "decode alone" line tells); or, without the tarball, the demo photos
(demo/data) resized the same way. The main process runs one torch thread; each worker one (the DataLoader's
default), so "per process" is per core when there are enough cores.

--train MODEL: also the end-to-end img/s of pre-training steps (the engine's faithful step) fed by each loader,
against the same steps on one synthetic batch already on the device.
"""
import argparse
import datetime
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from util.data import fast_data  # noqa: E402
from util.data.loaders import LOADERS, train_loader  # noqa: E402
from util.datasets import pretrain_transform  # noqa: E402

CIFAR = Path('/work/shared/datasets/cifar10_jpg.tar.gz')


def make_images(cache, count, noise, cifar, size=(500, 375), quality=90):
    """``cache/train/<class>/<k>.jpg``, ``count`` ImageNet-like JPEGs (made once; reused when already there)."""
    root = Path(cache) / f'{count}_{size[0]}x{size[1]}_q{quality}_n{noise}' / 'train'
    if root.is_dir() and sum(1 for _ in root.rglob('*.jpg')) == count:
        return root.parent
    rng = np.random.default_rng(0)
    sources = []
    if cifar and Path(cifar).is_file():
        with tarfile.open(cifar) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith('.jpg') and '/train/' in member.name:
                    sources.append((member.name.split('/')[-2], Image.open(io.BytesIO(tar.extractfile(member).read()))
                                    .convert('RGB')))
                    if len(sources) == count:
                        break
    else:
        photos = sorted((ROOT / 'demo' / 'data' / 'train').rglob('*.jpg'))
        sources = [('demo', Image.open(photos[k % len(photos)]).convert('RGB')) for k in range(count)]
    for k, (label, img) in enumerate(sources):
        big = np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float32)
        big = np.clip(big + rng.normal(0, noise, big.shape), 0, 255).astype(np.uint8)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(big).save(root / label / f'{k:05d}.jpg', quality=quality)
    return root.parent


def decode_rate(files):
    from torchvision.io import decode_jpeg, read_file
    data = [read_file(str(f)) for f in files]
    decode_jpeg(data[0])
    start = time.perf_counter()
    for d in data:
        decode_jpeg(d)
    return len(data) / (time.perf_counter() - start)


def loader_for(kind, data_path, input_size, batch_size, workers, device):
    args = argparse.Namespace(data_loader=kind, data_path=str(data_path), input_size=input_size, skip_bad_images=False,
                              batch_size=batch_size, accum_iter=1, num_workers=workers,
                              pin_mem=device.type == 'cuda', device=str(device), seed=0, rank=0)
    loader = train_loader(args, pretrain_transform(input_size), device)
    # an endless stream instead of one epoch: the resumable sampler's inner sampler is replaced
    loader.sampler.sampler = torch.utils.data.RandomSampler(loader.dataset, replacement=True, num_samples=10 ** 7)
    return loader


def images_per_second(loader, images, device):
    """img/s over ``images`` images, after a first batch (worker start-up) that is not timed. Without a GPU the
    uint8 batches of the fast loaders are timed as they leave the workers: their normalisation belongs to the
    device (one multiply-add on the GPU), which here would be the CPU."""
    if device.type != 'cuda' and isinstance(loader, fast_data.OnDevice):
        loader = loader.loader
    batches = iter(loader)
    first, _ = next(batches)
    seen, start = 0, time.perf_counter()
    while seen < images:
        x, _ = next(batches)
        seen += x.shape[0]
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def train_images_per_second(model_name, batches, device, steps, input_size):
    """img/s of the faithful pre-training step fed by ``batches`` (an iterator of (images, labels))."""
    import models_mae
    import util.misc as misc
    torch.manual_seed(0)
    model = models_mae.MODELS[model_name](img_size=input_size, norm_pix_loss=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    args = argparse.Namespace(device=str(device), amp='fp16')
    scaler = misc.NativeScalerWithGradNormCount(args)
    autocast = misc.autocast(args)
    seen, start = 0, None
    for step in range(steps + 1):
        if step == 1:  # the first step (and the loader's start-up) is not timed
            start = time.perf_counter()
        samples = next(batches)[0].to(device, non_blocking=True)
        with autocast:
            loss = model(samples, mask_ratio=0.75)[0]
        loss.item()
        scaler(loss, optimizer, parameters=model.parameters())
        optimizer.zero_grad()
        seen += samples.shape[0] if step else 0
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workers', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--loaders', nargs='+', default=None, choices=list(LOADERS),
                        help='default: pil fast_cpu, plus gpu (and dali if installed) on a GPU')
    parser.add_argument('--images', default=256, type=int, help='JPEGs to make, and images timed per row')
    parser.add_argument('--batch_size', default=32, type=int)
    parser.add_argument('--input_size', default=224, type=int)
    parser.add_argument('--noise', default=16.0, type=float,
                        help='Gaussian noise (grey levels) on the upsampled photos')
    parser.add_argument('--cifar', default=str(CIFAR), help='CIFAR-10 JPEG tarball (else the demo photos)')
    parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'mae_bench_input'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--train', default=None, metavar='MODEL', help='also time pre-training MODEL end to end')
    parser.add_argument('--train_steps', default=10, type=int)
    args = parser.parse_args()

    torch.set_num_threads(1)
    device = torch.device(args.device)
    loaders = args.loaders or (['pil', 'fast_cpu'] + (['gpu'] if device.type == 'cuda' else []))
    if args.loaders is None and device.type == 'cuda':
        try:
            import nvidia.dali  # noqa: F401
            loaders.append('dali')
        except ImportError:
            pass
    data = make_images(args.cache, args.images, args.noise, args.cifar)
    files = list((data / 'train').rglob('*.jpg'))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    with Image.open(files[0]) as im:
        size = im.size
    print(f"{datetime.date.today()}  {os.cpu_count()} cores  torch {torch.__version__}  {len(files)} JPEGs "
          f"{size[0]}x{size[1]} q90, {kb:.0f} KB on average, in {data}  crop {args.input_size}, batch "
          f"{args.batch_size}")
    print(f"JPEG decode alone, 1 core: {decode_rate(files):.0f} img/s (torchvision.io.decode_jpeg)")
    print("| workers | " + " | ".join(f"{k} img/s (per process)" for k in loaders) + " | fast_cpu / pil |")
    print("|---:|" + "---:|" * (len(loaders) + 1))
    for workers in args.workers:
        rates = {}
        for kind in loaders:
            if kind == 'dali' and workers == 0:
                rates[kind] = None  # DALI's own threads: --workers sets them (0 would mean 1)
                continue
            loader = loader_for(kind, data, args.input_size, args.batch_size, workers, device)
            rates[kind] = images_per_second(loader, args.images, device)
        per = max(workers, 1)
        cells = [f"{r:.0f} ({r / per:.0f})" if r else '-' for r in rates.values()]
        ratio = rates['fast_cpu'] / rates['pil'] if rates.get('fast_cpu') and rates.get('pil') else float('nan')
        print(f"| {workers} | " + " | ".join(cells) + f" | {ratio:.2f}x |", flush=True)
    if args.train:
        workers = max(args.workers)
        print(f"\nend to end: {args.train} pre-training at {args.input_size}, batch {args.batch_size}, {workers} "
              f"workers, on {device.type}")
        synthetic = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
        rate = train_images_per_second(args.train, iter(lambda: (synthetic, None), None), device, args.train_steps,
                                       args.input_size)
        print(f"| synthetic batch on the device | {rate:.1f} img/s |")
        for kind in loaders:
            loader = loader_for(kind, data, args.input_size, args.batch_size, workers, device)
            rate = train_images_per_second(args.train, iter(loader), device, args.train_steps, args.input_size)
            print(f"| {kind} | {rate:.1f} img/s |", flush=True)


if __name__ == '__main__':
    main()
