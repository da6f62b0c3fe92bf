"""The GPU check in one command: run every GPU path of this repository, time it, and write what happened to a
Markdown report and a JSON file, inside a time budget (8 minutes by default on one H100/H200 with 16 cores), so that
a scarce GPU session needs one call. Nothing here has run on a GPU yet: the smoke mode is what is tested.

    python benchmarks/gpu_check.py gpu_report              # on a GPU machine: report.md, report.json, logs.txt
    python benchmarks/gpu_check.py smoke_report --smoke    # the same script on the CPU, tiny models (a minute or two)
    python benchmarks/gpu_check.py again --parts steps input --budget 300    # some parts only, e.g. to finish

The parts, in this order. Each is guarded (a failure is recorded with the end of its output, and the next part still
runs) and has its share of the budget (30/170/190/90 s of 480; time a part leaves goes to the later ones; a job that
would run past its part's share is stopped, and what it printed so far is kept):

1. environment: the GPU, its driver, the versions (Python, torch, torchvision, timm, CUDA, cuDNN, NCCL, Triton,
   DALI) and the best bf16 and fp16 8192x8192 matmul rates, measured in a subprocess;
2. correctness, on real JPEGs made on the spot: CIFAR-10 photos from --cifar (or, without it, the demo photos)
   resized to 500x375, quality 90, 10 classes. main_pretrain.py with MAE ViT-B, 2 epochs of 16 steps at batch 32,
   on the default path (fp16 autocast + GradScaler), with --fast, and with --data_loader gpu (and dali, when
   nvidia.dali imports): each run once uninterrupted and once killed with SIGKILL right after its first checkpoint
   inside epoch 1 (--save_every_iters 8), then started again with the same command; the resumed run's log.txt rows
   and TensorBoard points are compared with the uninterrupted run's (TOLERANCE says how closely, and why; the
   --fast runs also count torch.compile's recompilations, TORCH_LOGS=recompiles). Then main_finetune.py and
   main_linprobe.py (one epoch each) from the pre-trained checkpoint, main_finetune.py --eval of the fine-tuned
   one, and demo/visualize.py on the GPU. These runs go side by side (each reads its images in the main process,
   --num_workers 0, which is what makes a resumed epoch exact; the GPU has room for all of them), in /dev/shm when
   it has room (about 40 GB of checkpoints are written, each flushed with fsync);
3. bench_step.py's table: faithful, fast_eager and fast for MAE ViT-B/L/H and fine-tuning ViT-B/L/H at
   bench_step's batches (3 warm-up and 10 timed steps a row), and MAE ViT-H at batch 256 with
   --grad_checkpointing (peak memory). The rows the targets need run first. On a GPU of 120 GiB or more (H200),
   while part 2 runs, bench_step.py already runs each compiled row for one step in the background, so that part 3
   finds torch.compile's caches warm (those processes are stopped before part 3 times anything); elsewhere each
   compiled row compiles in part 3, and fewer rows fit;
4. bench_input.py: the input table at 16 workers (pil, fast_cpu, gpu, and dali) on its ImageNet-like JPEGs (made in
   the background during part 2), and MAE ViT-L pre-training end to end on them against a synthetic batch.

The report ends with the issue's targets, each met, missed or not measured. Everything runs through the scripts'
command lines, in subprocesses: this script imports neither the repository's modules nor torch (except in its
environment subprocess). --smoke runs the same parts on the CPU with mae_vit_tiny_patch4 / vit_tiny_patch4 on small
JPEGs, a handful of steps: the kill-and-resume check on the default path and on --fast --data_loader fast_cpu
(torch.compile off there, TORCH_COMPILE_DISABLE=1: inductor on a CPU takes minutes), bit-identical logs required
(fp32). tests/test_gpu_check.py runs it.

A GPU machine that reaches no network (this workplace's device tool, for one) lacks what the check can use; carry
it in git-ignored folders of the checkout (../shared does not travel):

    mkdir -p .data && cp ../shared/datasets/cifar10_jpg.tar.gz .data/          # 19 MB; /.data/ is git-ignored

and run there, with .data carried: ``python3 benchmarks/gpu_check.py $OUT/gpu_check``. DALI the same way, by the
device tool's convention for wheels (/.whl/ is git-ignored; DALI's wheels are py3-none-manylinux2014_x86_64, the
CUDA major in the name must be torch's):

    python3 -m pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 -d .whl nvidia-dali-cuda130
    unzip -p .whl/nvidia_dali*.whl '*/METADATA' | grep ^Requires-Dist     # those missing there: download them too
    # there, before the check:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
        export PYTHONPATH=/tmp/site

but DALI's wheel is some hundreds of MB (0.22's was 345 MB), over the 64 MiB that one call of the device tool
carries: there, dali is "not measured" until the wheel can reach the machine another way. Where pip reaches the
network, ``pip install nvidia-dali-cuda130`` before the check is enough.

--cifar defaults to the first of .data/cifar10_jpg.tar.gz, ../shared/datasets/cifar10_jpg.tar.gz that exists.
The folder given gets report.md, report.json, logs.txt (the end of each job's output) and reconstruction.png (one
demo/visualize.py figure); the runs themselves go to a temporary folder (--work), removed at the end unless
--keep_work. A part cut short by the budget can be run again alone (--parts), on the same machine with warm caches.
"""
import argparse
import concurrent.futures
import datetime
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CANDIDATES = [ROOT / '.data' / 'cifar10_jpg.tar.gz', ROOT.parent / 'shared' / 'datasets' / 'cifar10_jpg.tar.gz']
PARTS = ('env', 'correctness', 'steps', 'input')
TITLES = {'env': '1. Environment', 'correctness': '2. Correctness', 'steps': '3. Training steps (bench_step.py)',
          'input': '4. Input pipeline (bench_input.py)'}
SHARES = {'env': 30, 'correctness': 170, 'steps': 190, 'input': 90}  # seconds of the default budget of 480

# How closely a killed-and-resumed run must repeat the uninterrupted one: the largest relative difference allowed
# in any log.txt value (lr: 1e-9 whatever the precision: the schedule is computed on the host) and in any
# TensorBoard loss point, by the run's precision. On the CPU (fp32) the project promises the same log.txt. On a GPU
# two runs of the same command differ by rounding: backward passes add with atomics (torch.gather's backward in the
# masking, for one) in whatever order the threads come, a last-bit difference that 32 optimizer steps amplify.
# Expected: far under 1e-4 in fp16 after 32 steps; bf16 rounds each weight to 8 bits of mantissa under autocast, so
# a last-bit change of a weight sometimes moves its bf16 copy by one step: a few times 1e-4. A resume that went
# wrong (other masks, crops or data order, a lost optimizer, scaler or schedule state) moves a step's loss by about
# the step-to-step spread of the loss curve, 1e-2 or more at batch 32, which the report prints beside each check.
TOLERANCE = {'fp32': 0.0, 'fp16': 1e-3, 'bf16': 5e-3}
LR_TOLERANCE = 1e-9

# what each part runs, on a GPU and in --smoke; 'role' names a row the targets read
GPU_PLAN = dict(
    device='cuda', budget=480, slots=10, threads=2, image_size=(500, 375), train_per_class=52, val_per_class=10,
    mae='mae_vit_base_patch16', vit='vit_base_patch16', input_size=224, batch=32, epochs=2, save_every=8,
    finetune_batch=32, linprobe_batch=64, workers=6,
    paths=[('default', [], 'fp16'), ('fast', ['--fast'], 'bf16'), ('gpu', ['--data_loader', 'gpu'], 'fp16')],
    dali=True, compile_env={'TORCH_LOGS': 'recompiles'},
    step_args=['--warmup', '3', '--steps', '10'], step_items=[  # (roles, models, batches, paths), in this order
        (['mae_L'], ['mae_vit_large_patch16'], [128], ['faithful', 'fast_eager', 'fast']),
        (['ft_L'], ['vit_large_patch16'], [64], ['faithful', 'fast_eager', 'fast']),
        (['mae_B'], ['mae_vit_base_patch16'], [256], ['faithful', 'fast_eager', 'fast']),
        (['mae_H'], ['mae_vit_huge_patch14'], [64], ['faithful', 'fast_eager', 'fast']),
        (['mae_H256'], ['mae_vit_huge_patch14'], [256], ['fast_ckpt']),
        (['ft_B'], ['vit_base_patch16'], [128], ['faithful', 'fast_eager', 'fast']),
        (['ft_H'], ['vit_huge_patch14'], [32], ['faithful', 'fast_eager', 'fast'])],
    input_images=4096, input_runs=[  # the table at batch 32; end to end at ViT-L's batch (it prints a table too)
        ('table', ['--workers', '16', '--batch_size', '32']),
        ('end_to_end', ['--workers', '16', '--batch_size', '128', '--train', 'mae_vit_large_patch16',
                        '--train_steps', '60'])],
    input_loaders=['pil', 'fast_cpu', 'gpu'])
SMOKE_PLAN = dict(
    device='cpu', budget=1500, slots=2, threads=1, image_size=(64, 48), train_per_class=5, val_per_class=2,
    mae='mae_vit_tiny_patch4', vit='vit_tiny_patch4', input_size=32, batch=4, epochs=2, save_every=4,
    finetune_batch=4, linprobe_batch=8, workers=0,
    paths=[('default', [], 'fp32'), ('fast', ['--fast', '--data_loader', 'fast_cpu'], 'fp32')],
    dali=False, compile_env={'TORCH_COMPILE_DISABLE': '1'},
    step_args=['--warmup', '1', '--steps', '2', '--input_size', '32', '--device', 'cpu'], step_items=[
        (['mae_L', 'ft_L'], ['mae_vit_tiny_patch4', 'vit_tiny_patch4'], [8, 8], ['faithful', 'fast_eager', 'fast']),
        (['mae_H256'], ['mae_vit_tiny_patch4'], [16], ['fast_ckpt'])],
    input_images=32, input_runs=[
        ('end_to_end', ['--workers', '2', '--batch_size', '8', '--input_size', '32', '--device', 'cpu', '--train',
                        'mae_vit_tiny_patch4', '--train_steps', '3'])],
    input_loaders=['pil', 'fast_cpu'])

TARGETS = [  # (key, what, role, measure, threshold)
    ('mae_L_speedup', 'MAE ViT-L: fast >= 2.5x the faithful step\'s img/s', 'mae_L', 'speedup', 2.5),
    ('mae_L_peak', 'MAE ViT-L: fast >= 45% of the measured bf16 matmul peak', 'mae_L', 'peak', 0.45),
    ('mae_B_speedup', 'MAE ViT-B: fast >= 2x faithful', 'mae_B', 'speedup', 2.0),
    ('mae_H_speedup', 'MAE ViT-H: fast >= 2x faithful', 'mae_H', 'speedup', 2.0),
    ('ft_L_speedup', 'fine-tuning ViT-L: fast >= 1.8x faithful', 'ft_L', 'speedup', 1.8),
    ('mae_H256_memory', 'MAE ViT-H at batch 256 with --grad_checkpointing fits in 80 GB (peak allocated <= 76 GiB: '
     'an 80 GB card has 79.6 GiB, less the CUDA context and the allocator\'s reserve)', 'mae_H256', 'memory', 76.0),
    ('e2e', 'MAE ViT-L end to end on the JPEGs >= 90% of synthetic input (best loader)', 'e2e', 'e2e', 0.9),
]


# ---------------------------------------------------------------------------------------------------- jobs
class Job:
    """What one subprocess did: its command, exit code (None: stopped at its time limit), seconds, output."""

    def __init__(self, name, argv):
        self.name, self.argv = name, [str(a) for a in argv]
        self.rc, self.seconds, self.timed_out, self.killed, self.output, self.note = None, 0.0, False, False, '', ''

    @property
    def ok(self):
        return self.rc == 0

    def tail(self, lines=25):
        return '\n'.join(self.output.rstrip().splitlines()[-lines:])

    def summary(self):
        state = ('stopped at its time limit' if self.timed_out else 'killed (SIGKILL) as planned' if self.killed
                 else f'exit code {self.rc}')
        return f'{state}, {self.seconds:.1f} s' + (f'; {self.note}' if self.note else '')

    def to_json(self):
        return dict(name=self.name, command=' '.join(self.argv), rc=self.rc, seconds=round(self.seconds, 2),
                    timed_out=self.timed_out, killed=self.killed, note=self.note,
                    **({} if self.ok or self.killed else {'tail': self.tail()}))


class Runner:
    """Starts the scripts as subprocesses (each in its own process group, so that a kill or a time limit ends what
    it started too: DataLoader workers, inductor's compile workers; in this script's session, so that whatever ends
    this script's session ends them too), keeps their output under ``work/logs`` and the end of it in
    ``logs.txt``."""

    def __init__(self, work, log_file, env):
        self.logs, self.log_file, self.env = Path(work) / 'logs', Path(log_file), env
        self.logs.mkdir(parents=True, exist_ok=True)
        self.lock, self.live = threading.Lock(), {}  # pid -> tag

    def run(self, name, argv, timeout, env=None, kill_after=None, tag=''):
        """Run ``python argv...`` from the repository root for at most ``timeout`` seconds. ``kill_after=(path,
        n)``: SIGKILL it as soon as ``path`` has been replaced for the n-th time (a new file: inode and mtime)."""
        job = Job(name, [sys.executable] + list(argv))
        if timeout < 1:
            job.note = 'not started: no time left in its part\'s budget'
            return job
        log = self.logs / f'{name}.txt'
        start = time.monotonic()
        with open(log, 'wb') as out:
            group = dict(process_group=0) if sys.version_info >= (3, 11) else dict(start_new_session=True)
            proc = subprocess.Popen(job.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(self.env, **(env or {})), **group)
            with self.lock:
                self.live[proc.pid] = tag
            seen = set()
            try:
                while proc.poll() is None:
                    if time.monotonic() - start > timeout:
                        self.kill(proc.pid)
                        job.timed_out = True
                        break
                    if kill_after:
                        try:
                            st = os.stat(kill_after[0])
                            seen.add((st.st_ino, st.st_mtime_ns))
                        except FileNotFoundError:
                            pass
                        if len(seen) >= kill_after[1]:
                            self.kill(proc.pid)
                            job.killed = True
                            job.note = f'killed {time.monotonic() - start:.1f} s in, after checkpoint write {len(seen)}'
                            break
                    time.sleep(0.005 if kill_after else 0.1)
                proc.wait()
            finally:
                with self.lock:
                    self.live.pop(proc.pid, None)
        job.rc = None if job.timed_out else proc.returncode
        job.seconds = time.monotonic() - start
        job.output = log.read_text(errors='replace')
        if kill_after and not job.killed and not job.timed_out:
            job.note = f'ended before the kill ({len(seen)} checkpoint writes seen, {kill_after[1]} awaited)'
        with self.lock, open(self.log_file, 'a') as f:
            f.write(f"\n===== {name}: {job.summary()}\n$ {' '.join(job.argv)}\n{job.tail(60)}\n")
        return job

    def kill(self, pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_tagged(self, tag):
        with self.lock:
            pids = [pid for pid, t in self.live.items() if tag is None or t == tag]
        for pid in pids:
            self.kill(pid)


class Budget:
    """Each part ends by its deadline: the start plus the shares of the parts up to it, scaled to --budget."""

    def __init__(self, total, parts):
        self.start = time.monotonic()
        scale = total / sum(SHARES[p] for p in parts)
        ends, self.deadlines = 0.0, {}
        for p in parts:
            ends += SHARES[p] * scale
            self.deadlines[p] = self.start + ends

    def left(self, part):
        return self.deadlines[part] - time.monotonic()


# ---------------------------------------------------------------------------------------------------- images
def make_jpegs(root, plan, cifar):
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``: per class, plan['train_per_class'] and
    plan['val_per_class'] photos of CIFAR-10's training split (the tarball at ``cifar``), or the demo photos in 10
    made-up classes, resized (bicubic) to plan['image_size'] and saved at quality 90. Returns what it made."""
    from PIL import Image
    need = plan['train_per_class'] + plan['val_per_class']
    sources = {}
    if cifar:
        with tarfile.open(cifar) as tar:
            for member in tar:
                parts = member.name.split('/')
                if member.isfile() and member.name.endswith('.jpg') and len(parts) >= 3 and parts[-3] == 'train':
                    photos = sources.setdefault(parts[-2], [])
                    if len(photos) < need:
                        photos.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB'))
                    if len(sources) == 10 and all(len(v) == need for v in sources.values()):
                        break
        what = f'CIFAR-10 photos from {cifar}'
    else:
        files = sorted((ROOT / 'demo' / 'data').rglob('*.jpg'))
        photos = [Image.open(f).convert('RGB') for f in files]
        sources = {f'demo{c}': [photos[(c * need + k) % len(photos)] for k in range(need)] for c in range(10)}
        what = f'the {len(files)} demo photos (demo/data), reused'

    def save(job):
        img, path = job
        path.parent.mkdir(parents=True, exist_ok=True)
        img.resize(plan['image_size'], Image.BICUBIC).save(path, quality=90)
        return path.stat().st_size

    jobs = [(img, Path(root) / ('train' if k < plan['train_per_class'] else 'val') / label / f'{k:04d}.jpg')
            for label, photos in sorted(sources.items()) for k, img in enumerate(photos)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(save, jobs))
    w, h = plan['image_size']
    return dict(source=what, classes=len(sources), train=sum(1 for _, p in jobs if p.parts[-3] == 'train'),
                val=sum(1 for _, p in jobs if p.parts[-3] == 'val'), size=f'{w}x{h}', quality=90,
                mean_kb=round(sum(sizes) / len(sizes) / 1024, 1))


# ---------------------------------------------------------------------------------------------------- part 1
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
    job = ctx.runner.run('environment', [Path(__file__).resolve(), '--_env', out, '--_device', ctx.plan['device'],
                                         '--_matmul_n', n], ctx.budget.left('env'))
    ctx.part['jobs'] = [job.to_json()]
    if not job.ok:
        raise PartFailed(f'the environment subprocess failed ({job.summary()})', job.tail())
    ctx.env = json.loads(out.read_text())
    ctx.part['info'] = ctx.env


# ---------------------------------------------------------------------------------------------------- part 2
def read_rows(folder):
    path = Path(folder) / 'log.txt'
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def tb_points(folder):
    """TensorBoard's scalars as TensorBoard shows them (points a resumed run purged left out); None without
    tensorboard."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def compare_runs(full, resumed, tol):
    """How the resumed run's log.txt and TensorBoard points differ from the uninterrupted run's. ``tol``: the
    largest relative difference a loss may show (None: report only, as for DALI, whose crops a resume redraws)."""
    problems, worst_row, worst_step = [], 0.0, 0.0
    a, b = read_rows(full), read_rows(resumed)
    if not a or [r.get('epoch') for r in a] != [r.get('epoch') for r in b]:
        problems.append(f"log.txt epochs {[r.get('epoch') for r in b]}, uninterrupted {[r.get('epoch') for r in a]}")
    for ra, rb in zip(a, b):
        if sorted(ra) != sorted(rb):
            problems.append(f"log.txt keys {sorted(rb)} against {sorted(ra)}")
            continue
        for k, v in ra.items():
            if k == 'epoch' or not isinstance(v, (int, float)):
                continue
            d = rel(rb[k], v)
            if 'lr' in k:
                if d > LR_TOLERANCE:
                    problems.append(f"epoch {ra['epoch']} {k}: {rb[k]} against {v}")
            else:
                worst_row = max(worst_row, d)
    spread = None
    pa, pb = tb_points(full), tb_points(resumed)
    if pa is not None:
        if sorted(pa) != sorted(pb or {}):
            problems.append(f"TensorBoard tags {sorted(pb or {})} against {sorted(pa)}")
        for tag, points in pa.items():
            other = (pb or {}).get(tag, [])
            if [s for s, _ in points] != [s for s, _ in other]:
                problems.append(f"TensorBoard {tag}: {len(other)} points at other steps than the {len(points)}")
                continue
            for (_, x), (_, y) in zip(points, other):
                d = rel(y, x)
                if tag == 'lr':
                    if d > LR_TOLERANCE:
                        problems.append(f"TensorBoard lr {y} against {x}")
                else:
                    worst_step = max(worst_step, d)
        loss = [v for _, v in pa.get('train_loss', [])]
        if len(loss) > 2:
            steps = sorted(rel(y, x) for x, y in zip(loss, loss[1:]))
            spread = steps[len(steps) // 2]
    within = tol is None or (worst_row <= tol and worst_step <= tol)
    return dict(passed=not problems and within, problems=problems, tolerance=tol, max_rel_diff_log=worst_row,
                max_rel_diff_steps=worst_step if pa is not None else None, loss_step_spread=spread,
                identical_log=(Path(full) / 'log.txt').exists() and (Path(full) / 'log.txt').read_text()
                == (Path(resumed) / 'log.txt').read_text(), tensorboard=pa is not None)


def pretrain_argv(plan, data, out, extra):
    return ['main_pretrain.py', '--model', plan['mae'], '--input_size', plan['input_size'], '--batch_size',
            plan['batch'], '--epochs', plan['epochs'], '--warmup_epochs', '1', '--blr', '1.5e-3', '--norm_pix_loss',
            '--data_path', data, '--device', plan['device'], '--num_workers', '0', '--save_every_iters',
            plan['save_every'], '--output_dir', out, '--log_dir', out, *extra]


class Graph:
    """Jobs that wait for others, run side by side in ``slots`` at a time."""

    def __init__(self, slots):
        self.slots, self.threads, self.done, self.results = threading.Semaphore(slots), [], {}, {}

    def add(self, name, fn, deps=()):
        self.done[name] = threading.Event()

        def body():
            for d in deps:
                self.done[d].wait()
            try:
                with self.slots:
                    self.results[name] = fn(*(self.results.get(d) for d in deps))
            except Exception:  # noqa: BLE001 (recorded: the other jobs go on)
                self.results[name] = {'error': traceback.format_exc(limit=4)}
            finally:
                self.done[name].set()
        t = threading.Thread(target=body, daemon=True)
        self.threads.append(t)
        t.start()

    def wait(self):
        for t in self.threads:
            t.join()


def part_correctness(ctx):
    plan, runner, work = ctx.plan, ctx.runner, ctx.work
    data = work / 'jpegs'
    start = time.monotonic()
    ctx.part['data'] = dict(make_jpegs(data, plan, ctx.cifar), seconds=round(time.monotonic() - start, 1))
    steps = ctx.part['data']['train'] // plan['batch']
    writes_per_epoch = -(-steps // plan['save_every'])  # the last of them at the end of the epoch
    kill_at = writes_per_epoch + 1  # the first checkpoint inside epoch 1
    ctx.part['setup'] = dict(model=plan['mae'], batch=plan['batch'], epochs=plan['epochs'], steps_per_epoch=steps,
                             save_every_iters=plan['save_every'], kill_after_checkpoint_write=kill_at)
    paths = list(plan['paths'])
    if plan['dali'] and ctx.env.get('dali'):
        paths.append(('dali', ['--data_loader', 'dali'], None))

    def left():
        return ctx.budget.left('correctness')
    threads = {'OMP_NUM_THREADS': str(plan['threads'])}
    graph = Graph(plan['slots'])
    checks = ctx.part['checks'] = []
    for name, extra, precision in paths:
        env = dict(threads, **(plan['compile_env'] if '--fast' in extra else {}))
        full, part = work / f'{name}_uninterrupted', work / f'{name}_killed'
        argv = pretrain_argv(plan, data, full, extra)
        graph.add(f'{name}:full', lambda argv=argv, env=env, name=name: runner.run(
            f'pretrain_{name}_uninterrupted', argv, left(), env))
        argv = pretrain_argv(plan, data, part, extra)
        graph.add(f'{name}:killed', lambda argv=argv, env=env, name=name, part=part: runner.run(
            f'pretrain_{name}_killed', argv, left(), env, kill_after=(part / 'checkpoint-last.pth', kill_at)))
        graph.add(f'{name}:resumed', lambda killed, argv=argv, env=env, name=name: runner.run(
            f'pretrain_{name}_resumed', argv, left(), env), deps=[f'{name}:killed'])
        graph.add(f'{name}:check', lambda a, k, r, name=name, flags=' '.join(extra), precision=precision, full=full,
                  part=part: kill_check(name, flags, precision, a, k, r, full, part),
                  deps=[f'{name}:full', f'{name}:killed', f'{name}:resumed'])
    first = paths[0][0]
    ckpt = work / f'{first}_uninterrupted' / 'checkpoint-last.pth'
    common = ['--model', plan['vit'], '--input_size', plan['input_size'], '--nb_classes', '10', '--device',
              plan['device'], '--num_workers', plan['workers'], '--data_path', data]
    ft = work / 'finetune'
    graph.add('finetune', lambda pre: needs(pre, 'finetune') or runner.run('finetune', [
        'main_finetune.py', *common, '--batch_size', plan['finetune_batch'], '--epochs', '1', '--warmup_epochs', '1',
        '--mixup', '0.8', '--cutmix', '1.0', '--finetune', ckpt, '--output_dir', ft, '--log_dir', ft], left(),
        threads), deps=[f'{first}:full'])
    lp = work / 'linprobe'
    graph.add('linprobe', lambda pre: needs(pre, 'linprobe') or runner.run('linprobe', [
        'main_linprobe.py', *common, '--batch_size', plan['linprobe_batch'], '--epochs', '1', '--warmup_epochs', '1',
        '--finetune', ckpt, '--output_dir', lp, '--log_dir', lp], left(), threads), deps=[f'{first}:full'])
    graph.add('eval', lambda f: needs(f, 'eval') or runner.run('finetune_eval', [
        'main_finetune.py', *common, '--batch_size', plan['finetune_batch'], '--eval', '--resume',
        ft / 'checkpoint-last.pth', '--output_dir', '', '--log_dir', ''], left(), threads), deps=['finetune'])
    images = sorted((data / 'val').rglob('*.jpg'))[:2]
    figures = work / 'figures'
    graph.add('visualize', lambda pre: needs(pre, 'visualize') or runner.run('visualize', [
        'demo/visualize.py', *images, '--checkpoint', ckpt, '--out', figures, '--device', plan['device']], left(),
        threads), deps=[f'{first}:full'])
    graph.wait()
    for name, *_ in paths:
        checks.append(graph.results[f'{name}:check'])
    checks.append(run_check('main_finetune.py, one epoch from the pre-trained checkpoint', graph.results['finetune'],
                            lambda job: rows_check(ft, 'test_acc1')))
    checks.append(run_check('main_linprobe.py, one epoch from the pre-trained checkpoint', graph.results['linprobe'],
                            lambda job: rows_check(lp, 'test_acc1')))
    checks.append(run_check('main_finetune.py --eval of the fine-tuned checkpoint', graph.results['eval'],
                            accuracy_line))
    checks.append(run_check('demo/visualize.py on the pre-trained checkpoint', graph.results['visualize'],
                            lambda job: figure_check(figures, ctx.out)))
    for c in checks:
        if c.get('status') != 'ok':
            ctx.part['status'] = 'failed'


def needs(result, what):
    """None when an earlier job ``what`` depends on succeeded, else a Job saying why ``what`` did not run."""
    if isinstance(result, Job) and result.ok:
        return None
    job = Job(what, [])
    job.note = 'not run: the pre-training (or fine-tuning) run it starts from failed'
    return job


def rows_check(folder, key):
    rows = read_rows(folder)
    if not rows or not all(key in r and all(math.isfinite(v) for v in r.values() if isinstance(v, float))
                           for r in rows):
        raise ValueError(f'log.txt in {folder} has no finite {key}: {rows}')
    return ', '.join(f"{k} {v:.4g}" for k, v in rows[-1].items() if isinstance(v, float))


def accuracy_line(job):
    lines = [line.split('] ', 1)[-1].strip() for line in job.output.splitlines() if '* Acc@1' in line]
    if not lines:
        raise ValueError('no "* Acc@1" line printed')
    return lines[-1]


def figure_check(folder, out):
    pngs = sorted(Path(folder).rglob('*.png'))
    if not pngs:
        raise ValueError(f'no PNG written to {folder}')
    shutil.copy(pngs[0], Path(out) / 'reconstruction.png')
    return f'{len(pngs)} figure(s); the first is reconstruction.png'


def run_check(what, job, detail):
    """A check that is one job: ok when it exits 0 and ``detail(job)`` (which says what it found) raises nothing."""
    if isinstance(job, dict):  # the job itself raised
        return dict(check=what, status='failed', detail='this script failed', tail=job['error'])
    out = dict(check=what, job=job.to_json(), seconds=round(job.seconds, 1))
    if not job.ok:
        return dict(out, status='failed', detail=job.summary(), tail=job.tail())
    try:
        return dict(out, status='ok', detail=detail(job))
    except Exception as e:  # noqa: BLE001
        return dict(out, status='failed', detail=str(e)[:500], tail=job.tail())


def kill_check(name, flags, precision, full, killed, resumed, full_dir, part_dir):
    """The verdict on one path's kill and resume: all three runs as planned and the logs within tolerance."""
    what = (f"main_pretrain.py {flags or '(default path)'}: SIGKILL inside epoch 1, resumed, against an "
            f"uninterrupted run")
    out = dict(check=what, path=name, precision=precision, status='failed',
               jobs=[j.to_json() if isinstance(j, Job) else j for j in (full, killed, resumed)])
    bad = [(label, j) for label, j, good in (('uninterrupted', full, lambda j: j.ok), ('killed', killed,
           lambda j: j.killed and j.rc == -signal.SIGKILL), ('resumed', resumed, lambda j: j.ok))
           if not isinstance(j, Job) or not good(j)]
    if bad:
        label, j = bad[0]
        if not isinstance(j, Job):
            return dict(out, detail=f'the {label} run: this script failed', tail=j.get('error'))
        return dict(out, detail=f'the {label} run: {j.summary()}', tail=j.tail())
    point = re.search(r'Resuming epoch (\d+) at iteration (\d+) of (\d+)', resumed.output)
    out['resumed_at'] = point.group(0) if point else None
    if not point:
        return dict(out, detail='the resumed run did not resume inside an epoch (no "Resuming epoch E at iteration '
                    'I of N" line): the kill came too late or the checkpoint was not found', tail=resumed.tail())
    tol = TOLERANCE.get(precision)
    cmp = compare_runs(full_dir, part_dir, tol)
    out['comparison'] = cmp
    if precision == 'bf16' or name == 'fast':
        out['recompiles'] = sum(j.output.count('Recompiling function') for j in (full, killed, resumed))
    spread = f", step-to-step spread of the loss {cmp['loss_step_spread']:.2g}" if cmp['loss_step_spread'] else ''
    steps = ('' if cmp['max_rel_diff_steps'] is None else
             f", TensorBoard loss points {cmp['max_rel_diff_steps']:.2g}")
    tol_text = ('report only: DALI draws its crops anew in a resumed epoch' if tol is None else
                'bit-identical required' if tol == 0 else f'tolerance {tol:g} ({precision})')
    detail = (f"{out['resumed_at']}; largest relative difference: log.txt {cmp['max_rel_diff_log']:.2g}{steps} "
              f"({tol_text}{spread}); log.txt {'identical' if cmp['identical_log'] else 'not identical'}")
    if cmp['problems']:
        detail += '; ' + '; '.join(cmp['problems'][:5])
    return dict(out, status='ok' if cmp['passed'] else 'failed', detail=detail)


# ---------------------------------------------------------------------------------------------------- background
def start_background(ctx):
    """While part 2 runs (GPU only): bench_input.py makes its JPEGs, and each compiled row of part 3 runs once for a
    step, filling torch.compile's caches, 2 at a time, on a GPU of 120 GiB or more (an H200; on 80 GB, part 2's
    runs, about 50 GiB together, leave too little room for them)."""
    plan, threads = ctx.plan, []
    if 'input' in ctx.parts:
        argv = ['benchmarks/bench_input.py', '--workers', '0', '--loaders', 'fast_cpu', '--device', 'cpu',
                '--images', plan['input_images'], '--cache', ctx.work / 'input_cache',
                '--cifar', ctx.cifar or '/nonexistent']
        ctx.background['input_images'] = threading.Thread(target=lambda: ctx.background_jobs.append(
            ctx.runner.run('input_images', argv, ctx.budget.left('input'), tag='input')), daemon=True)
        threads.append(ctx.background['input_images'])
    memory = ctx.env.get('gpu_memory_gib') or 0
    slots = 2 if memory >= 120 else 0
    if 'steps' in ctx.parts and slots:
        rows = [(roles, models, batches, [p for p in paths if p in ('fast', 'fast_ckpt')])
                for roles, models, batches, paths in plan['step_items']]
        queue = [row for row in rows if row[3]]
        lock = threading.Lock()

        def warm():
            while True:
                with lock:
                    if not queue or ctx.stop_warming.is_set():
                        return
                    roles, models, batches, paths = queue.pop(0)
                ctx.background_jobs.append(ctx.runner.run(
                    f"compile_warmup_{'_'.join(roles)}", ['benchmarks/bench_step.py', '--models', *models,
                                                          '--batch_sizes', *batches, '--paths', *paths, '--warmup',
                                                          '1', '--steps', '1'],
                    ctx.budget.left('correctness') + 30, {'TORCHINDUCTOR_COMPILE_THREADS': '4'}, tag='warm'))
        ctx.warmers = [threading.Thread(target=warm, daemon=True) for _ in range(slots)]
        threads += ctx.warmers
    for t in threads:
        t.start()


# ---------------------------------------------------------------------------------------------------- part 3
STEP_ROW = re.compile(r'^\| (\S+) \| (\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.e+-]+) \| (\d+)% \| ([^|]*) \|$')
OOM_ROW = re.compile(r'^\| (\S+) \| (\d+) \| (\w+) \| OOM \|')


def parse_bench_step(text):
    rows, peaks = [], {}
    for line in text.splitlines():
        m = STEP_ROW.match(line.strip())
        if m:
            mem = re.match(r'([\d.]+) GiB', m.group(8).strip())
            rows.append(dict(model=m.group(1), batch=int(m.group(2)), path=m.group(3), img_s=float(m.group(4)),
                             ms=float(m.group(5)), tflops=float(m.group(6)), of_peak=int(m.group(7)) / 100,
                             memory_gib=float(mem.group(1)) if mem else None))
        elif OOM_ROW.match(line.strip()):
            m = OOM_ROW.match(line.strip())
            rows.append(dict(model=m.group(1), batch=int(m.group(2)), path=m.group(3), oom=True))
        elif line.startswith('matmul peaks measured:'):
            peaks = {k: float(v) for k, v in re.findall(r'(\w+) ([\d.]+) TFLOP/s', line)}
    return rows, peaks


def part_steps(ctx):
    ctx.stop_warming.set()
    for t in ctx.warmers:  # nothing else may use the GPU while it is timed
        while t.is_alive():
            ctx.runner.kill_tagged('warm')
            t.join(0.5)
    warmed = [j.to_json() for j in ctx.background_jobs if j.name.startswith('compile_warmup')]
    ctx.part['compile_warmups'] = [dict(name=j['name'], done=j['rc'] == 0, seconds=j['seconds']) for j in warmed]
    ctx.part['rows'], ctx.part['items'] = [], []
    for roles, models, batches, paths in ctx.plan['step_items']:
        argv = ['benchmarks/bench_step.py', '--models', *models, '--batch_sizes', *batches, '--paths', *paths,
                *ctx.plan['step_args']]
        job = ctx.runner.run(f"bench_step_{'_'.join(roles)}", argv, ctx.budget.left('steps'),
                             ctx.plan['compile_env'])
        rows, peaks = parse_bench_step(job.output)
        role_of = {(m, b): r for r, m, b in zip(roles, models, batches)}
        for r in rows:
            r['role'] = role_of.get((r['model'], r['batch']))
        ctx.part['rows'] += rows
        done = {(r['model'], r['batch'], r['path']) for r in rows}
        missing = [f'{m} {p}' for m, b in zip(models, batches) for p in paths if (m, b, p) not in done]
        item = dict(roles=roles, models=models, batches=batches, paths=paths, job=job.to_json(), matmul_peaks=peaks,
                    missing=missing, status='ok' if job.ok and not missing else 'failed')
        if missing:
            item['detail'] = f"not measured: {', '.join(missing)} ({job.note or job.summary()})"
            if job.output and not job.timed_out:
                item['tail'] = job.tail()
        ctx.part['items'].append(item)
    if any(i['status'] != 'ok' for i in ctx.part['items']):
        ctx.part['status'] = 'failed'


# ---------------------------------------------------------------------------------------------------- part 4
def parse_bench_input(text):
    out, loaders = dict(table=[], end_to_end=[]), []
    e2e = False
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r'JPEG decode alone, 1 core: ([\d.]+) img/s', line)
        if m:
            out['decode_alone_img_s'] = float(m.group(1))
        if line.startswith('| workers |'):
            loaders = [c.split(' img/s')[0].strip() for c in line.strip('|').split('|')[1:-1]]
        elif re.match(r'^\| \d+ \|', line) and loaders:
            cells = [c.strip() for c in line.strip('|').split('|')]
            row = dict(workers=int(cells[0]))
            for kind, cell in zip(loaders, cells[1:]):
                m = re.match(r'([\d.]+) \(([\d.]+)\)', cell)
                row[kind] = float(m.group(1)) if m else None
            out['table'].append(row)
        elif line.startswith('end to end:'):
            e2e, out['end_to_end_setup'] = True, line
        elif e2e:
            m = re.match(r'^\| (.+?) \| ([\d.]+) img/s \|$', line)
            if m:
                out['end_to_end'].append(dict(input=m.group(1), img_s=float(m.group(2))))
    return out


def part_input(ctx):
    t = ctx.background.get('input_images')
    if t is not None:  # its JPEGs, made while part 2 ran
        t.join(max(0.0, ctx.budget.left('input') - 20))
    loaders = list(ctx.plan['input_loaders'])
    if ctx.plan['dali'] and ctx.env.get('dali'):
        loaders.append('dali')
    common = ['--loaders', *loaders, '--images', ctx.plan['input_images'], '--cache', ctx.work / 'input_cache',
              '--cifar', ctx.cifar or '/nonexistent']
    ctx.part['runs'] = []
    for name, args in ctx.plan['input_runs']:
        job = ctx.runner.run(f'bench_input_{name}', ['benchmarks/bench_input.py', *args, *common],
                             ctx.budget.left('input'))
        parsed = parse_bench_input(job.output)
        run = dict(name=name, job=job.to_json(), **parsed, status='ok')
        expected = parsed['table'] and all(all(r.get(k) for k in loaders) for r in parsed['table'])
        if name == 'end_to_end':
            expected = expected and len(parsed['end_to_end']) == len(loaders) + 1
        if not job.ok or not expected:
            run.update(status='failed', detail=job.summary(), tail=job.tail())
            ctx.part['status'] = 'failed'
        ctx.part['runs'].append(run)


# ---------------------------------------------------------------------------------------------------- targets
def evaluate_targets(report, smoke):
    parts = {p['name']: p for p in report['parts']}
    rows = parts.get('steps', {}).get('rows', [])
    bf16_peak = parts.get('env', {}).get('info', {}).get('matmul_tflops', {}).get('bf16')
    results = []
    for key, what, role, measure, threshold in TARGETS:
        value, how = None, ''
        by_path = {r['path']: r for r in rows if r.get('role') == role and not r.get('oom')}
        if measure == 'speedup' and 'fast' in by_path and 'faithful' in by_path:
            value = by_path['fast']['img_s'] / by_path['faithful']['img_s']
            how = f"{by_path['fast']['img_s']:.0f} / {by_path['faithful']['img_s']:.0f} img/s"
        elif measure == 'peak' and 'fast' in by_path:
            if bf16_peak:
                value = by_path['fast']['tflops'] / bf16_peak
                how = f"{by_path['fast']['tflops']:.0f} of {bf16_peak:.0f} TFLOP/s (part 1's peak)"
            else:
                value, how = by_path['fast']['of_peak'], "bench_step.py's own peak"
        elif measure == 'memory' and by_path.get('fast_ckpt', {}).get('memory_gib') is not None:
            value = by_path['fast_ckpt']['memory_gib']
            how = f"peak allocated {value:.1f} GiB, batch {by_path['fast_ckpt']['batch']}"
        elif measure == 'memory' and any(r.get('role') == role and r.get('oom') for r in rows):
            value, how = math.inf, 'out of memory'
        elif measure == 'e2e':
            e2e = next((r for r in parts.get('input', {}).get('runs', []) if r['name'] == 'end_to_end'), {})
            rates = {r['input']: r['img_s'] for r in e2e.get('end_to_end', [])}
            synthetic = rates.pop('synthetic batch on the device', None)
            if synthetic and rates:
                best = max(rates, key=rates.get)
                value, how = rates[best] / synthetic, f'{best}: {rates[best]:.0f} / {synthetic:.0f} img/s'
        met = None if value is None else (value <= threshold if measure == 'memory' else value >= threshold)
        verdict = ('not measured' if value is None else 'n/a (CPU smoke run)' if smoke else
                   'met' if met else 'missed')
        results.append(dict(key=key, target=what, threshold=threshold,
                            value=None if value is None or math.isinf(value) else round(value, 4),
                            how=how, met=None if smoke else met, verdict=verdict))
    report['targets'] = results


# ---------------------------------------------------------------------------------------------------- report
def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def fmt(v, digits=3):
    return '-' if v is None else f'{v:.{digits}g}' if isinstance(v, float) else str(v)


def render(report):
    lines = [f"# GPU check, {report['started'][:10]}: {report.get('device_name') or '?'}", '',
             f"`{report['command']}`  ", f"mode {report['mode']}, budget {report['budget_s']} s, took "
             f"{report['elapsed_s']:.0f} s{'' if report['finished'] else ' (did not finish: interrupted)'}.", '']
    if report['mode'] == 'smoke':
        lines += ['A smoke run on the CPU with the tiny models: it shows the script works; no figure below is a GPU '
                  'measurement.', '']
    lines += ['| part | status | seconds |', '|---|---|---:|']
    lines += [f"| {TITLES[p['name']]} | {p['status']} | {p.get('seconds', 0):.0f} |" for p in report['parts']]
    lines += ['', '## Targets (one H100 or H200)', '', '| target | measured | verdict |', '|---|---|---|']
    for t in report.get('targets', []):
        lines.append(f"| {t['target']} | {fmt(t['value'])} {('(' + t['how'] + ')') if t['how'] else ''} | "
                     f"{t['verdict']} |")
    for p in report['parts']:
        lines += ['', f"## {TITLES[p['name']]}", '']
        lines += RENDER[p['name']](p)
        if p.get('error'):
            lines += ['', f"**Failed:** {p['error']}", '', '```', p.get('tail') or '', '```']
    return '\n'.join(lines) + '\n'


def render_env(p):
    info = p.get('info', {})
    keys = ['gpu', 'gpu_count', 'capability', 'multiprocessors', 'gpu_memory_gib', 'driver', 'cuda', 'cudnn', 'nccl',
            'torch', 'torchvision', 'timm', 'triton', 'dali', 'PIL', 'numpy', 'tensorboard', 'python', 'cpu_cores',
            'cpu_threads', 'platform']
    lines = ['| | |', '|---|---|'] + [f'| {k} | {info[k]} |' for k in keys if k in info]
    for k, v in info.get('matmul_tflops', {}).items():
        lines.append(f"| {k} matmul {info['matmul_n']}^3, best | {v} TFLOP/s |")
    return lines


def render_checks(p):
    lines = []
    if p.get('data'):
        d = p['data']
        lines += [f"Data: {d['train']} training and {d['val']} validation JPEGs in {d['classes']} classes, "
                  f"{d['size']}, quality {d['quality']}, {d['mean_kb']} KB on average, made from {d['source']} in "
                  f"{d['seconds']} s.", '']
    if p.get('setup'):
        s = p['setup']
        lines += [f"Pre-training runs: {s['model']}, batch {s['batch']}, {s['epochs']} epochs of "
                  f"{s['steps_per_epoch']} steps, --save_every_iters {s['save_every_iters']}, --num_workers 0; the "
                  f"killed run gets SIGKILL right after checkpoint write {s['kill_after_checkpoint_write']} (the first "
                  f"inside epoch 1). Tolerance (largest relative difference of a logged loss): fp32 on the CPU "
                  f"bit-identical; fp16 {TOLERANCE['fp16']:g}; bf16 {TOLERANCE['bf16']:g}; lr {LR_TOLERANCE:g}. "
                  f"Why: GPU backward passes add with atomics in no fixed order, a last-bit difference that "
                  f"the steps amplify; a resume that went wrong moves a step's loss by about the curve's "
                  f"step-to-step spread, printed with each check.", '']
    lines += ['| check | status | detail |', '|---|---|---|']
    for c in p.get('checks', []):
        extra = f"; {c['recompiles']} recompilation(s) logged" if c.get('recompiles') else ''
        lines.append(f"| {c['check']} | {c['status']} | {c.get('detail', '')}{extra} |")
    for c in p.get('checks', []):
        if c.get('tail'):
            lines += ['', f"{c['check']}: {c.get('detail', '')}", '```', c['tail'], '```']
    return lines


def render_steps(p):
    lines = []
    if p.get('compile_warmups'):
        done = [w['name'].replace('compile_warmup_', '') for w in p['compile_warmups'] if w['done']]
        lines += [f"Compiled ahead during part 2 (warm caches): {', '.join(done) or 'none'}.", '']
    lines += ['| model | batch | path | img/s | ms/step | TFLOP/s | of matmul peak | peak memory |',
              '|---|---:|---|---:|---:|---:|---:|---:|']
    for r in p.get('rows', []):
        if r.get('oom'):
            lines.append(f"| {r['model']} | {r['batch']} | {r['path']} | OOM | | | | |")
        else:
            mem = '-' if r['memory_gib'] is None else f"{r['memory_gib']:.1f} GiB"
            lines.append(f"| {r['model']} | {r['batch']} | {r['path']} | {r['img_s']:.1f} | {r['ms']:.1f} | "
                         f"{r['tflops']:.3g} | {100 * r['of_peak']:.0f}% | {mem} |")
    for i in p.get('items', []):
        if i.get('detail'):
            lines += ['', f"{' '.join(i['models'])}: {i['detail']}"]
            if i.get('tail'):
                lines += ['```', i['tail'], '```']
    peaks = [i['matmul_peaks'] for i in p.get('items', []) if i['matmul_peaks']]
    if peaks:
        lines += ['', 'bench_step.py\'s own matmul peaks: ' + ', '.join(f'{k} {v} TFLOP/s'
                                                                        for k, v in peaks[0].items())]
    return lines


def render_input(p):
    lines = []
    for run in p.get('runs', []):
        if run.get('table'):
            kinds = [k for k in run['table'][0] if k != 'workers']
            lines += [f"{run['name']}: " + ', '.join(run['job']['command'].split('bench_input.py ')[1:]), '',
                      '| workers | ' + ' | '.join(f'{k} img/s' for k in kinds) + ' |', '|---:|' + '---:|' * len(kinds)]
            lines += [f"| {r['workers']} | " + ' | '.join(fmt(r[k], 4) for k in kinds) + ' |' for r in run['table']]
            if run.get('decode_alone_img_s'):
                lines += ['', f"JPEG decode alone, 1 core: {run['decode_alone_img_s']:.0f} img/s"]
            lines.append('')
        if run.get('end_to_end'):
            lines += [run.get('end_to_end_setup', ''), '', '| input | img/s |', '|---|---:|']
            lines += [f"| {r['input']} | {r['img_s']:.1f} |" for r in run['end_to_end']]
            lines += ['', 'The DataLoader prefetches 2 batches a worker before the first timed step, so the loaders\' '
                      'rows include up to that many images delivered ahead: read them as upper bounds.', '']
        if run.get('status') != 'ok':
            lines += [f"{run['name']}: failed ({run.get('detail', '')})", '```', run.get('tail') or '', '```']
    return lines


RENDER = {'env': render_env, 'correctness': render_checks, 'steps': render_steps, 'input': render_input}


def scratch_folder(smoke):
    """Where the runs go by default: on a GPU machine /dev/shm when it has 48 GiB free (the runs write about 40 GB
    of ViT-B checkpoints, each flushed to disk with fsync, and keep about 25 GB), else the temporary folder."""
    if not smoke and os.path.isdir('/dev/shm'):
        try:
            if shutil.disk_usage('/dev/shm').free >= 48 * 2 ** 30:
                return '/dev/shm'
        except OSError:
            pass
    return None


class PartFailed(Exception):
    def __init__(self, message, tail=''):
        super().__init__(message)
        self.tail = tail


class Context:
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out', nargs='?', help='folder for report.md, report.json, logs.txt (made if missing)')
    parser.add_argument('--smoke', action='store_true', help='on the CPU, tiny models and images, a few steps')
    parser.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS, help='default: all, in order')
    parser.add_argument('--budget', type=float, default=None,
                        help='seconds for all the parts (default 480 on a GPU; with --smoke 1500, a bound for a '
                             'loaded machine: it takes a few minutes on 2 idle cores)')
    parser.add_argument('--cifar', default=None,
                        help='CIFAR-10 JPEG tarball to make the images from (default: the first of '
                             + ', '.join(str(p) for p in CIFAR_CANDIDATES) + ' that exists; "none": demo photos)')
    parser.add_argument('--work', default=None, help='where the runs go (default: a temporary folder)')
    parser.add_argument('--keep_work', action='store_true', help='keep --work (its checkpoints take gigabytes)')
    parser.add_argument('--_env', help=argparse.SUPPRESS)
    parser.add_argument('--_device', help=argparse.SUPPRESS)
    parser.add_argument('--_matmul_n', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._env:
        return measure_environment(args._env, args._device, args._matmul_n)
    if not args.out:
        parser.error('the folder to write the report to is required')

    ctx = Context()
    ctx.plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    ctx.parts = [p for p in PARTS if p in args.parts]
    if args.cifar and args.cifar != 'none' and not Path(args.cifar).is_file():
        parser.error(f'--cifar {args.cifar}: no such file')
    ctx.cifar = (None if args.cifar == 'none' else args.cifar or next(
        (str(p) for p in CIFAR_CANDIDATES if p.is_file()), None))
    ctx.out = Path(args.out)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.work = Path(args.work or tempfile.mkdtemp(prefix='gpu_check_', dir=scratch_folder(args.smoke)))
    ctx.work.mkdir(parents=True, exist_ok=True)
    (ctx.out / 'logs.txt').write_text('')
    budget = args.budget or ctx.plan['budget']
    ctx.budget = Budget(budget, ctx.parts)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    ctx.runner = Runner(ctx.work, ctx.out / 'logs.txt', env)
    ctx.env, ctx.background, ctx.background_jobs, ctx.stop_warming = {}, {}, [], threading.Event()
    ctx.part, ctx.warmers = {}, []
    report = dict(mode='smoke' if args.smoke else 'gpu', started=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec='seconds'), command=' '.join(['python'] + sys.argv), budget_s=budget,
                  cifar=ctx.cifar, work=str(ctx.work), parts=[], finished=False, elapsed_s=0.0)

    def write():
        report['elapsed_s'] = round(time.monotonic() - ctx.budget.start, 1)
        evaluate_targets(report, args.smoke)
        (ctx.out / 'report.json').write_text(json.dumps(finite(report), indent=1, allow_nan=False, default=str))
        (ctx.out / 'report.md').write_text(render(report))

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # the machine's time limit: stop the jobs, write what was done
    functions = {'env': part_env, 'correctness': part_correctness, 'steps': part_steps, 'input': part_input}
    try:
        for name in ctx.parts:
            ctx.part = dict(name=name, status='ok')
            report['parts'].append(ctx.part)
            start = time.monotonic()
            print(f'[gpu_check] part {TITLES[name]} ({ctx.budget.left(name):.0f} s left for it)', flush=True)
            try:
                if name == 'correctness' and not args.smoke:
                    start_background(ctx)
                functions[name](ctx)
            except PartFailed as e:
                ctx.part.update(status='failed', error=str(e), tail=e.tail)
            except Exception as e:  # noqa: BLE001 (this script's own failure: recorded, the next part runs)
                ctx.part.update(status='failed', error=f'{type(e).__name__}: {e}', tail=traceback.format_exc())
            ctx.part['seconds'] = round(time.monotonic() - start, 1)
            if name == 'env':
                report['device_name'] = ctx.env.get('gpu') or (f"CPU ({ctx.env['cpu_cores']} cores)" if ctx.env
                                                                 else None)
            write()
            print(f"[gpu_check]   {ctx.part['status']} in {ctx.part['seconds']:.0f} s", flush=True)
        report['finished'] = True
    except KeyboardInterrupt:
        ctx.part.setdefault('error', 'interrupted')
        ctx.part['status'] = 'interrupted'
    finally:
        ctx.runner.kill_tagged(None)
        write()
        if not args.keep_work and not args.work:
            shutil.rmtree(ctx.work, ignore_errors=True)
    print(f"[gpu_check] wrote {ctx.out / 'report.md'} and report.json ({report['elapsed_s']:.0f} s)")
    return 0 if all(p['status'] == 'ok' for p in report['parts']) else 1


if __name__ == '__main__':
    sys.exit(main())
