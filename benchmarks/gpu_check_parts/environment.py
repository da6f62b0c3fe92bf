"""Part 1, the environment: the GPU, its driver, the versions and the best bf16/fp16 matmul rates, measured in a
subprocess (gpu_check.py --_env, which calls ``measure_environment``)."""
import json
import math
import os
import subprocess
import time
from pathlib import Path

from .jobs import PartFailed


def measure_environment(path, device, n):
    """(In its own subprocess.) Versions, the device, and the best of a few n x n matmuls per dtype in TFLOP/s."""
    import importlib
    import platform
    import torch
    info = dict(python=platform.python_version(), platform=platform.platform(), cpu_cores=os.cpu_count(),
                torch=torch.__version__, cuda=torch.version.cuda)
    for name in ('torchvision', 'timm', 'PIL', 'numpy', 'triton', 'tensorboard', 'nvidia.dali'):
        try:
            info[name.replace('nvidia.', '')] = getattr(importlib.import_module(name), '__version__', 'installed')
        except Exception:  # noqa: BLE001 (not installed, or broken: either way not usable)
            info[name.replace('nvidia.', '')] = None
    if device == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit('torch.cuda.is_available() is False: no GPU for this torch '
                             f'({torch.__version__}, built for CUDA {torch.version.cuda})')
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability='%d.%d' % (props.major,
                    props.minor), multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version())
        try:
            info['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            info['nccl'] = f'unknown ({e})'
        try:
            info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as e:
            info['driver'] = f'unknown ({e})'
        dtypes = {'bf16': torch.bfloat16, 'fp16': torch.float16}
    else:
        info.update(gpu=None, cpu_threads=torch.get_num_threads())
        dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16}
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    info['matmul_n'], info['matmul_tflops'] = n, {}
    for key, dtype in dtypes.items():
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty_like(a)
        for _ in range(3):
            torch.mm(a, b, out=c)
        sync()
        best = math.inf
        for _ in range(5):  # best of 5 batches of 10 products, each batch timed between two syncs
            start = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b, out=c)
            sync()
            best = min(best, (time.perf_counter() - start) / 10)
        info['matmul_tflops'][key] = float(f'{2 * n ** 3 / best / 1e12:.4g}')
        del a, b, c
    Path(path).write_text(json.dumps(info, indent=1))


def part_env(ctx):
    out = ctx.work / 'env.json'
    n = 8192 if ctx.plan['device'] == 'cuda' else 512
    job = ctx.runner.run('environment', [ctx.script, '--_env', out, '--_device', ctx.plan['device'],
                                         '--_matmul_n', n], ctx.budget.left('env'))
    ctx.part['jobs'] = [job.to_json()]
    if not job.ok:
        raise PartFailed(f'the environment subprocess failed ({job.summary()})', job.tail())
    ctx.env = json.loads(out.read_text())
    ctx.part['info'] = ctx.env
