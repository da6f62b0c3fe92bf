"""Part 2, correctness: on JPEGs made on the spot, main_pretrain.py killed with SIGKILL inside an epoch and
resumed, against an uninterrupted run, on each path; then main_finetune.py, main_linprobe.py, --eval and
demo/visualize.py from the pre-trained checkpoint. The runs go side by side (``jobs.Graph``)."""
import concurrent.futures
import io
import json
import math
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path

from .jobs import Graph, Job
from .plan import ROOT

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
