"""Does the fast path train like the reference's? Pre-trains the tiny MAE on real photos (demo/data, 64x64 crops)
on the CPU for a few hundred steps along several paths and compares their per-step loss curves (TensorBoard's
train_loss) with the reference path's.

    python benchmarks/compare_numerics.py                  # about 5 minutes on 2 cores
    python benchmarks/compare_numerics.py --epochs 150 --compile

Paths: 'faithful' (fp32, the reference's), 'faithful seed 1' (the same with --seed 1: how far two equally good runs
drift apart, the scale to judge the others by), 'fast fp32' (--fused_adamw --no_host_sync), 'fast bf16' (the same
under bf16 autocast), and with --compile 'fast bf16 compiled' (= --fast; its masks come from inductor's generator,
so its curve is another seed's). On the CPU --amp bf16 runs the forward under bf16 autocast (util.misc.amp_settings;
the default --amp fp16 runs fp32 there, as the reference).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main_pretrain  # noqa: E402
import util.training.process as process

PATHS = {
    'faithful': [],
    'faithful seed 1': ['--seed', '1'],
    'fast fp32': ['--fused_adamw', '--no_host_sync'],
    'fast bf16': ['--fused_adamw', '--no_host_sync', '--amp', 'bf16'],
    'fast bf16 compiled': ['--fast'],
}


def step_losses(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return np.array([e.value for e in acc.Scalars('train_loss')])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', default=100, type=int, help='5 steps per epoch (21 photos, batch 4)')
    parser.add_argument('--compile', action='store_true', help='also the compiled fast path (minutes to compile)')
    parser.add_argument('--out', default=None, help='keep the runs here (default: a temporary folder)')
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix='mae_numerics_'))
    curves = {}
    for name, extra in PATHS.items():
        if name.endswith('compiled') and not args.compile:
            continue
        folder = out / name.replace(' ', '_')
        argv = ['--model', 'mae_vit_tiny_patch4', '--input_size', '64', '--batch_size', '4', '--epochs',
                str(args.epochs), '--warmup_epochs', str(max(1, args.epochs // 10)), '--blr', '1.5e-3',
                '--norm_pix_loss', '--data_path', str(ROOT / 'demo' / 'data'), '--device', 'cpu', '--num_workers',
                '0', '--save_freq', str(args.epochs), '--output_dir', str(folder), '--no_auto_resume', *extra]
        with open(os.devnull, 'w') as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                process.run_main(main_pretrain.main, main_pretrain.get_args_parser(), argv)
            finally:
                sys.stdout = stdout
        curves[name] = step_losses(folder)
        print(f"{name}: {len(curves[name])} steps, done", flush=True)

    ref = curves['faithful']
    window = max(1, len(ref) // 10)
    print(f"\n{len(ref)} optimizer steps, tiny MAE on demo/data at 64, batch 4, torch {torch.__version__}")
    print(f"| path | first loss | mean of last {window} | mean abs diff to faithful | max abs diff | "
          "mean abs diff, last tenth |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, curve in curves.items():
        diff = np.abs(curve - ref)
        print(f"| {name} | {curve[0]:.4f} | {curve[-window:].mean():.4f} | {diff.mean():.4f} | {diff.max():.4f} | "
              f"{diff[-window:].mean():.4f} |")
    print(f"\nruns in {out}")


if __name__ == '__main__':
    main()
