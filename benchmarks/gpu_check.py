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

This file is the command line and the order of the parts; each part, the jobs' runner and the report are in
benchmarks/gpu_check_parts/ (one module a job).
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from gpu_check_parts.correctness import part_correctness
from gpu_check_parts.environment import measure_environment, part_env
from gpu_check_parts.jobs import Budget, PartFailed, Runner
from gpu_check_parts.plan import GPU_PLAN, PARTS, ROOT, SMOKE_PLAN, TITLES
from gpu_check_parts.report import evaluate_targets, finite, render
from gpu_check_parts.speed import part_input, part_steps, start_background

CIFAR_CANDIDATES = [ROOT / '.data' / 'cifar10_jpg.tar.gz', ROOT.parent / 'shared' / 'datasets' / 'cifar10_jpg.tar.gz']


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
    ctx.script = Path(__file__).resolve()  # part 1 runs it again, with --_env, in a subprocess
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
