"""The reports of a study: ``<study>.md`` (its table beside the paper's numbers, the recipes, the command, the compute
and the environment) and ``<study>.json`` (the numbers), in the results dir; ``<study>.png`` for the curves (charts).
"""
import json
import os
import platform
import shlex
from importlib import metadata
from pathlib import Path

from studies.charts import plot_curve
from studies.plan import batch_flags, flag_argv
from studies.recipes import EVALUATIONS
from studies.runner import fmt_time


def cell_value(run):
    """What a table shows for a run: its final top-1, or its state."""
    acc = run.accuracy() if run.finished() else None
    if acc:
        return f"{acc[0]:.1f}"
    if run.status in ('failed', 'interrupted', 'skipped'):
        return run.status
    if run.status == 'submitted':
        return f"job {run.job_id}"
    return 'not run'


def paper_value(value):
    if value is None:
        return '—'
    if isinstance(value, tuple):
        return f"≈ {value[0]:.1f}"
    return f"{value:.1f}"


def markdown_table(study, plan):
    header = [study.row_header]
    for key, title in study.columns:
        header += [f"{title} (ours)", f"{title} (paper)"]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' + ':---:|' * (len(header) - 1)]
    for cell in study.cells:
        row = [cell.label]
        for key, _ in study.columns:
            m = cell.measures.get(key)
            row += [cell_value(plan.result(m)) if m else '—', paper_value(cell.paper.get(key))]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def environment():
    versions = []
    for pkg in ('torch', 'torchvision', 'timm', 'numpy', 'Pillow'):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return (f"Python {platform.python_version()}, {', '.join(versions)}; {platform.system()} {platform.release()}, "
            f"{cpu}, {os.cpu_count()} logical CPUs")


def results(study, plan, setup):
    """What ``<study>.json`` holds: each cell's paper numbers, and ours (final and best top-1) with their runs."""
    data = {'study': study.name, 'scale': setup.scale.name, 'columns': [k for k, _ in study.columns], 'cells': []}
    for cell in study.cells:
        entry = {'label': cell.label, 'paper': {k: (v[0] if isinstance(v, tuple) else v)
                                                for k, v in cell.paper.items()}, 'ours': {}}
        for key, m in cell.measures.items():
            run = plan.result(m)
            acc = run.accuracy() if run.finished() else None
            entry['ours'][key] = {'final': acc[0], 'best': acc[1]} if acc else None
            entry.setdefault('runs', {})[key] = setup.rel(run.out)
        data['cells'].append(entry)
    return data


def write_report(study, plan, setup, argv, results_dir):
    """``<study>.md`` and ``<study>.json`` from the plan's runs as the runner left them (``argv``: the flags of this
    invocation); ``<study>.png`` for the curves."""
    runs = plan.study_runs(study)
    known = [r.seconds for r in runs if r.seconds is not None]
    kinds = {r.kind for r in runs}
    recipes = [('pre-training', 'pretrain')] + [(e.title, kind) for kind, e in EVALUATIONS.items()]
    approx = any(isinstance(v, tuple) for cell in study.cells for v in cell.paper.values())
    lines = [f"## {study.title}", '',
             f"Scale `{setup.scale.name}`: {setup.scale.model_label}; data {setup.data_summary}. Ours: top-1 (%) of "
             f"the last epoch on the evaluation split; the paper's: ImageNet-1K top-1 of "
             f"ViT-L/16{' (≈: read off a figure)' if approx else ''}.",
             '', markdown_table(study, plan), '']
    if study.note:
        lines += [study.note, '']
    lines += ['Recipes (the flags every run of a kind starts from; each cell adds its own):', '']
    lines += [f"- {name}: `{' '.join(flag_argv(batch_flags(setup.scale.recipes[kind], setup.world)))}`"
              for name, kind in recipes if kind in kinds]
    lines += [f"- {name}: `{' '.join(flag_argv(batch_flags(flags, setup.world)))}`" for name, flags in study.recipes]
    lines += ['', f"Command: `python reproduce.py {shlex.join(argv)}`", '',
              f"Compute: {fmt_time(sum(known))} for the {len(known)} of {len(runs)} runs of this study timed by "
              f"the runner (shared runs counted once); device `{setup.device}`.", '',
              f"Environment: {environment()}.", '']
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{study.name}.md").write_text('\n'.join(lines), encoding='utf-8')
    data = results(study, plan, setup)
    (results_dir / f"{study.name}.json").write_text(json.dumps(data, indent=1) + '\n', encoding='utf-8')
    if study.curve:
        plot_curve(study, data, setup.scale.name, results_dir / f"{study.name}.png")
