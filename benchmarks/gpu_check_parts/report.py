"""The report: the issue's targets, each met, missed or not measured (``evaluate_targets``), and report.md
(``render``)."""
import math

from .plan import TITLES
from .correctness import LR_TOLERANCE, TOLERANCE

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
