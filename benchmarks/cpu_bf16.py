"""Pre-training steps on the CPU in fp32 (the default, the reference's numbers) and with ``--amp bf16`` (bf16
autocast of the forward on the CPU [new]): the small-scale model of ``reproduce.py`` at its recipe's size.

    python benchmarks/cpu_bf16.py                       # mae_vit_small_patch4, 32 px, batch 128: about 2 minutes
    python benchmarks/cpu_bf16.py --model mae_vit_tiny_patch4 --batch_size 32 --steps 5

Each step is engine_pretrain.train_one_epoch's, as main_pretrain.py runs it (AdamW with its weight-decay groups,
the loss scaler's autocast, the per-step loss read), on synthetic images; the precisions alternate round by round
(fp32, bf16, fp32, bf16, ...) so that a change in the machine's load falls on both, and the best round of each is
printed with the FLOPs of one step (torch.utils.flop_counter: matrix products and attention) per second. It also
prints the CPU's vector capability, whether oneDNN multiplies bf16 in hardware (AVX-512 BF16, AMX), and the rate
of a 1024x1024 matrix product in each precision: without bf16 instructions bf16 is emulated and far slower than
fp32, and --amp bf16 does not pay there. Run it on a quiet machine: other jobs on the same cores slow both, by
different amounts.
"""
import argparse
import contextlib
import io
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine_pretrain  # noqa: E402
import models_mae  # noqa: E402
import util.misc as misc  # noqa: E402
import util.training.process as process  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402

PRECISIONS = {'fp32': 'fp16', 'bf16': 'bf16'}  # the name printed -> --amp (fp16 runs fp32 on the CPU)


def make_step(model_name, batch_size, input_size, amp):
    """``run(steps)``: ``steps`` training steps of a fresh model under ``--amp amp`` on the CPU."""
    torch.manual_seed(0)
    model = models_mae.MODELS[model_name](img_size=input_size)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    args = SimpleNamespace(accum_iter=1, mask_ratio=0.75, lr=1e-4, min_lr=0., warmup_epochs=1, epochs=2,
                           device='cpu', amp=amp, skip_nonfinite=0, output_dir='', no_host_sync=False,
                           batch_size=batch_size)
    scaler = misc.NativeScalerWithGradNormCount(args)
    images = torch.randn(batch_size, 3, input_size, input_size)

    def run(steps):
        batches = [(images, torch.zeros(batch_size))] * steps
        with contextlib.redirect_stdout(io.StringIO()):  # the engine's console lines
            engine_pretrain.train_one_epoch(model, batches, optimizer, torch.device('cpu'), 0, scaler, args=args)
    return model, scaler, run


def step_flops(model, scaler, batch_size, input_size):
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        with scaler.autocast:
            loss = model(torch.randn(batch_size, 3, input_size, input_size), mask_ratio=0.75)[0]
        loss.backward()
    model.zero_grad()
    return counter.get_total_flops()


def matmul_gflops(dtype, n=1024, repeats=3):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_small_patch4', choices=sorted(models_mae.MODELS))
    parser.add_argument('--input_size', default=32, type=int)
    parser.add_argument('--batch_size', default=128, type=int)
    parser.add_argument('--warmup', default=3, type=int, help='untimed steps before each timed round')
    parser.add_argument('--steps', default=10, type=int, help='timed steps per round')
    parser.add_argument('--rounds', default=2, type=int, help='timed rounds of each precision, alternating')
    args = parser.parse_args()

    benches = {name: make_step(args.model, args.batch_size, args.input_size, amp) for name, amp in PRECISIONS.items()}
    flops = {name: step_flops(model, scaler, args.batch_size, args.input_size)
             for name, (model, scaler, _) in benches.items()}
    print(f"{args.model} at {args.input_size} px, batch {args.batch_size}, 75% masking; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {flops['fp32'] / args.batch_size / 1e6:.0f} MFLOP per image")
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, bf16 matrix instructions: "
          f"{'yes' if process.cpu_has_fast_bf16() else 'no (emulated)'}; 1024x1024 matmul: fp32 "
          f"{matmul_gflops(torch.float32):.0f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.1f} GFLOP/s", flush=True)
    best = {}
    for r in range(args.rounds):
        for name, (_, _, run) in benches.items():
            run(args.warmup)
            start = time.perf_counter()
            run(args.steps)
            img_s = args.batch_size * args.steps / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), img_s)
            print(f"round {r + 1} {name}: {img_s:.1f} img/s", flush=True)
    print(f"\n| precision | img/s (best of {args.rounds} rounds of {args.steps} steps) | GFLOP/s |\n|---|---:|---:|")
    for name, img_s in best.items():
        gflop_s = flops[name] / args.batch_size * img_s / 1e9
        print(f"| {name} (--amp {PRECISIONS[name]}) | {img_s:.1f} | {gflop_s:.1f} |")
    print(f"\nbf16 / fp32: {best['bf16'] / best['fp32']:.2f}x")


if __name__ == '__main__':
    main()
