"""Training-step throughput of the reference's path and the fast path, for pre-training and fine-tuning, on
synthetic images already on the device (the model's speed, not the input pipeline's: see bench_input.py).

    python benchmarks/bench_step.py                 # on a GPU: MAE ViT-B/L/H and fine-tuning ViT-B/L/H
    python benchmarks/bench_step.py --models mae_vit_large_patch16 --batch_sizes 256 --paths fast fast_ckpt
    python benchmarks/bench_step.py --device cpu --models mae_vit_tiny_patch4 vit_tiny_patch4 --batch_sizes 16

Each step is the engines' own (engine_pretrain / engine_finetune.train_one_epoch over a list of batches): the
schedule, autocast, loss scaling, gradient norm, AdamW, the per-step loss read; fine-tuning adds Mixup/CutMix
(0.8/1.0, label smoothing 0.1), layer-wise lr decay (0.75) and drop-path (0.1). Paths:

    faithful   the reference's: fp16 autocast + GradScaler on CUDA, AdamW (foreach), loss.item() every step
    fast_eager --amp bf16 --fused_adamw --no_host_sync
    fast       the same plus --compile (= --fast)
    fast_ckpt  --fast --grad_checkpointing (memory for speed)

Achieved TFLOP/s counts the matmul/attention FLOPs of one forward+backward with torch.utils.flop_counter (no
recomputation counted), and "of peak" divides by the best of a few large matmuls this script times on the same
device in the path's precision (fp16 for faithful, bf16 for the fast paths on CUDA; fp32 on the CPU, where --fast
keeps fp32).
"""
import argparse
import contextlib
import datetime
import gc
import io
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine_finetune  # noqa: E402
import engine_pretrain  # noqa: E402
import models_mae  # noqa: E402
import models_vit  # noqa: E402
import util.lr_decay as lrd  # noqa: E402
import util.misc as misc  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402

PATHS = {
    'faithful': dict(amp='fp16', fused_adamw=False, compile=False, no_host_sync=False, grad_checkpointing=False,
                     fast=False),
    'fast_eager': dict(amp='bf16', fused_adamw=True, compile=False, no_host_sync=True, grad_checkpointing=False,
                       fast=True),
    'fast': dict(amp='bf16', fused_adamw=True, compile=True, no_host_sync=True, grad_checkpointing=False,
                 fast=True),
    'fast_ckpt': dict(amp='bf16', fused_adamw=True, compile=True, no_host_sync=True, grad_checkpointing=True,
                      fast=True),
}
DEFAULT_MODELS = ['mae_vit_base_patch16', 'mae_vit_large_patch16', 'mae_vit_huge_patch14',
                  'vit_base_patch16', 'vit_large_patch16', 'vit_huge_patch14']
# the batches per GPU the background measurements used for pre-training; fine-tuning sees 4x the tokens
DEFAULT_BATCH = {'mae_vit_base_patch16': 256, 'mae_vit_large_patch16': 128, 'mae_vit_huge_patch14': 64,
                 'vit_base_patch16': 128, 'vit_large_patch16': 64, 'vit_huge_patch14': 32,
                 'mae_vit_tiny_patch4': 32, 'vit_tiny_patch4': 32}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=None, repeats=10):
    """TFLOP/s of the best of a few n x n matmuls (8192 on a GPU, 2048 on the CPU)."""
    n = n or (8192 if device.type == 'cuda' else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


class Bench:
    """One model on one path: builds what the entry point builds, runs epochs of the engine."""

    def __init__(self, name, batch_size, path, device, input_size):
        self.name, self.batch_size, self.device = name, batch_size, device
        self.pretrain = name in models_mae.MODELS
        self.args = SimpleNamespace(accum_iter=1, mask_ratio=0.75, lr=1e-4, min_lr=0., warmup_epochs=1, epochs=2,
                                    device=str(device), skip_nonfinite=0, batch_size=batch_size,
                                    **PATHS[path])
        torch.manual_seed(0)
        if self.pretrain:
            self.model = models_mae.MODELS[name](img_size=input_size, norm_pix_loss=True)
        else:
            self.model = models_vit.MODELS[name](img_size=input_size, num_classes=1000, drop_path_rate=0.1,
                                                 global_pool=True)
        self.model.set_grad_checkpointing(self.args.grad_checkpointing)
        self.model.to(device)
        if self.pretrain:
            groups = param_groups_weight_decay(self.model, 0.05)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.lr, betas=(0.9, 0.95), fused=self.fused())
        else:
            groups = lrd.param_groups_lrd(self.model, 0.05, no_weight_decay_list=self.model.no_weight_decay(),
                                          layer_decay=0.75)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.lr, fused=self.fused())
            self.mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
        self.scaler = misc.NativeScalerWithGradNormCount(self.args)
        self.step_model = torch.compile(self.model) if self.args.compile else self.model
        self.images = torch.randn(batch_size, 3, input_size, input_size, device=device)
        self.targets = torch.randint(0, 1000, (batch_size,), device=device)

    def fused(self):
        """The entry points' AdamW choice: fused with --fused_adamw where torch has it, else the default."""
        return misc.fused_adamw(self.args.device) if self.args.fused_adamw else None

    def epoch(self, steps):
        data = [(self.images, self.targets)] * steps
        with contextlib.redirect_stdout(io.StringIO()):  # the engines' progress lines
            if self.pretrain:
                engine_pretrain.train_one_epoch(self.step_model, data, self.optimizer, self.device, 0, self.scaler,
                                                args=self.args)
            else:
                engine_finetune.train_one_epoch(self.step_model, SoftTargetCrossEntropy(), data, self.optimizer,
                                                self.device, 0, self.scaler, mixup_fn=self.mixup,
                                                args=self.args)

    def flops(self):
        """FLOPs of one forward+backward (eager, no recomputation), counted by torch's FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode
        self.model.set_grad_checkpointing(False)
        counter = FlopCounterMode(display=False)
        with counter, misc.autocast(self.args):
            if self.pretrain:
                loss = self.model(self.images, mask_ratio=0.75)[0]
            else:
                loss = self.model(self.images).float().logsumexp(-1).mean()
            loss.backward()
        self.optimizer.zero_grad()
        self.model.set_grad_checkpointing(self.args.grad_checkpointing)
        return counter.get_total_flops()


def estimate_memory(name, batch_size, input_size, checkpointing):
    """GiB a bf16 training step would hold at ``batch_size``, estimated on any device (the CPU included): the bytes
    autograd saves for the backward under bf16 autocast (each storage once, through saved_tensors_hooks; with
    checkpointing, plus the inputs the checkpointed blocks keep), measured at 1 and 3 images and extrapolated
    linearly (the part that does not grow with the batch is autocast's bf16 weight copies), plus fp32 weights,
    gradients and AdamW's two moments (16 bytes a parameter). Leaves out the allocator's slack and the transient
    peak inside the backward, so a real peak is somewhat higher. Returns (GiB, MiB saved per image)."""
    torch.manual_seed(0)
    pretrain = name in models_mae.MODELS
    model = (models_mae.MODELS[name](img_size=input_size, norm_pix_loss=True) if pretrain else
             models_vit.MODELS[name](img_size=input_size, num_classes=1000, global_pool=True))
    model.set_grad_checkpointing(checkpointing)

    def saved_bytes(images):
        saved = {}

        def keep(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        def keep_input(module, inputs):
            keep(inputs[0])
        hooks = [blk.register_forward_pre_hook(keep_input) for blk in model.blocks] if checkpointing else []
        x = torch.randn(images, 3, input_size, input_size)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast('cpu', torch.bfloat16):
            out = model(x, mask_ratio=0.75)[0] if pretrain else model(x).float().mean()
        del out
        for h in hooks:
            h.remove()
        return sum(saved.values())

    one, three = saved_bytes(1), saved_bytes(3)
    per_image = (three - one) / 2
    static = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (static + one - per_image + per_image * batch_size) / 2 ** 30, per_image / 2 ** 20


def run_one(name, batch_size, path, device, args, peaks):
    bench = Bench(name, batch_size, path, device, args.input_size)
    flops = bench.flops()
    bench.epoch(args.warmup)  # compiles with --compile
    sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    bench.epoch(args.steps)
    sync(device)
    elapsed = (time.perf_counter() - start) / args.steps
    tflops = flops / elapsed / 1e12
    _, amp_dtype, autocast_on = misc.amp_settings(bench.args)
    dtype = amp_dtype if autocast_on else torch.float32
    if dtype not in peaks:
        peaks[dtype] = matmul_peak(device, dtype)
    memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device.type == 'cuda' else 'n/a'
    return dict(model=name, batch=batch_size, path=path, img_s=batch_size / elapsed, ms=elapsed * 1000,
                tflops=tflops, peak=tflops / peaks[dtype], memory=memory)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=None,
                        help='MAE and/or ViT names (default on a GPU: ' + ' '.join(DEFAULT_MODELS) + '; on the CPU: '
                             'mae_vit_tiny_patch4 vit_tiny_patch4)')
    parser.add_argument('--batch_sizes', nargs='+', type=int, default=None,
                        help='per-GPU batch: one for all models or one per model (default: per model, see '
                             'DEFAULT_BATCH)')
    parser.add_argument('--paths', nargs='+', default=['faithful', 'fast_eager', 'fast'], choices=list(PATHS))
    parser.add_argument('--steps', default=30, type=int, help='timed steps per row (after --warmup steps)')
    parser.add_argument('--warmup', default=10, type=int, help='untimed steps first (compilation happens here)')
    parser.add_argument('--input_size', default=224, type=int)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--estimate_memory', action='store_true',
                        help='instead of timing, estimate each model\'s bf16 training memory at its batch with and '
                             'without --grad_checkpointing (runs on the CPU; see estimate_memory)')
    args = parser.parse_args()

    device = torch.device(args.device)
    models = args.models or (DEFAULT_MODELS if device.type == 'cuda' else ['mae_vit_tiny_patch4', 'vit_tiny_patch4'])
    if device.type != 'cuda' and args.input_size == 224 and all('tiny' in m for m in models):
        args.input_size = 32
    sizes = args.batch_sizes or [DEFAULT_BATCH.get(m, 64) for m in models]
    if len(sizes) == 1:
        sizes = sizes * len(models)
    if len(sizes) != len(models):
        parser.error('--batch_sizes: one value, or one per model')
    if args.estimate_memory:
        print(f"estimated bf16 training memory (not measured on a GPU), input {args.input_size}, torch "
              f"{torch.__version__}")
        print("| model | batch | saved activations per image | estimate | with --grad_checkpointing |")
        print("|---|---:|---:|---:|---:|")
        for model, batch_size in zip(models, sizes):
            full, per_image = estimate_memory(model, batch_size, args.input_size, False)
            ckpt, per_image_ckpt = estimate_memory(model, batch_size, args.input_size, True)
            print(f"| {model} | {batch_size} | {per_image:.0f} MiB ({per_image_ckpt:.0f} MiB) | {full:.1f} GiB | "
                  f"{ckpt:.1f} GiB |", flush=True)
        return
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f"{datetime.date.today()}  {name}  torch {torch.__version__}  input {args.input_size}  "
          f"{args.steps} timed steps after {args.warmup}")
    print("| model | batch | path | img/s | ms/step | TFLOP/s | of matmul peak | peak memory |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    peaks = {}
    for model, batch_size in zip(models, sizes):
        for path in args.paths:
            try:
                r = run_one(model, batch_size, path, device, args, peaks)
                print(f"| {r['model']} | {r['batch']} | {r['path']} | {r['img_s']:.1f} | {r['ms']:.1f} | "
                      f"{r['tflops']:.3g} | {100 * r['peak']:.0f}% | {r['memory']} |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {model} | {batch_size} | {path} | OOM | | | | |", flush=True)
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    print("matmul peaks measured: " + ", ".join(f"{str(k).replace('torch.', '')} {v:.1f} TFLOP/s"
                                                for k, v in peaks.items()))


if __name__ == '__main__':
    main()
