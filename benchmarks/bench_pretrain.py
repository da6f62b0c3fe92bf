"""Throughput of MAE pre-training steps on synthetic images: prints img/s and peak memory.

    python benchmarks/bench_pretrain.py --model mae_vit_large_patch16 --batch_size 128 --device cuda
    python benchmarks/bench_pretrain.py --model mae_vit_tiny_patch4 --input_size 32 --device cpu

Each step is what engine_pretrain does (autocast forward, scaled backward, AdamW step); the data is random and on
the device already, so the number is the model's, not the input pipeline's.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mae  # noqa: E402
import util.misc as misc  # noqa: E402
from util import compat  # noqa: E402
from util.compat import param_groups_weight_decay  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_large_patch16', choices=list(models_mae.MODELS))
    parser.add_argument('--batch_size', default=128, type=int)
    parser.add_argument('--input_size', default=224, type=int)
    parser.add_argument('--mask_ratio', default=0.75, type=float)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', default='fp16', choices=['fp16', 'bf16', 'none'])
    parser.add_argument('--warmup', default=5, type=int)
    parser.add_argument('--steps', default=20, type=int)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models_mae.MODELS[args.model](img_size=args.input_size, norm_pix_loss=True).to(device)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    scaler = misc.NativeScalerWithGradNormCount(args)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)

    def step():
        with compat.autocast(*misc.amp_settings(args)):
            loss, _, _ = model(imgs, mask_ratio=args.mask_ratio)
        scaler(loss, optimizer, parameters=model.parameters())
        optimizer.zero_grad()

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    imgs_per_s = args.steps * args.batch_size / elapsed
    mem = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == 'cuda' else 'n/a (CPU)'
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    amp = args.amp if device.type == 'cuda' else 'none'
    print(f"{args.model} input {args.input_size} batch {args.batch_size} amp {amp} "
          f"on {name}: {imgs_per_s:.1f} img/s ({elapsed / args.steps * 1000:.1f} ms/step), peak memory {mem}, "
          f"torch {torch.__version__}")


if __name__ == '__main__':
    main()
