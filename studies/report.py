"""The reports of a study: ``<study>.md`` (its table beside the paper's numbers, the recipes, the command, the compute
and the environment) and ``<study>.json`` (the numbers), in the results dir; ``<study>.png`` for the curves (charts).
"""
import json
import math
import os
import platform
import shlex
from importlib import metadata
from pathlib import Path

from studies.charts import plot_curve
from studies.paper import PAPER_MEASURE
from studies.plan import batch_flags, flag_argv, recipe_argv
from studies.recipes import EVALUATIONS
from studies.runner import fmt_time


def cell_value(run):
    """What a table shows for a run: its final top-1, or its state."""
    finished = run.finished()
    acc = run.accuracy() if finished else None
    if acc:
        return f"{acc[0]:.1f}"
    if finished:  # a training run whose log.txt has no readable top-1 (its rows damaged)
        return 'no top-1'
    if run.status in ('failed', 'interrupted', 'skipped'):
        return run.status
    if run.status == 'submitted':
        return f"job {run.job_id}"
    return 'not run'


def standard_error(top1, n):
    """The standard error (points) of a top-1 of ``top1`` per cent on ``n`` images: sqrt(p (1 - p) / n), a
    binomial's (each image right or wrong, independently); None when ``n`` is unknown."""
    if not n:
        return None
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def images_of(run, setup):
    """The evaluation images of ``run``'s top-1: its own count (a frozen-feature run's result.json), else the
    evaluation split's."""
    return run.eval_images() or setup.eval_images


def se_value(run, setup):
    acc = run.accuracy() if run.finished() else None
    se = standard_error(acc[0], images_of(run, setup)) if acc else None
    return f"±{se:.1f}" if se is not None else '—'


def paper_value(value):
    if value is None:
        return '—'
    if isinstance(value, tuple):
        return f"≈ {value[0]:.1f}"
    return f"{value:.1f}"


def markdown_table(study, plan, setup):
    """Each column's top-1 (ours), its standard error (s.e., from the evaluation set's size) and the paper's."""
    header = [study.row_header]
    for key, title in study.columns:
        header += [f"{title} (ours)", 's.e.', f"{PAPER_MEASURE.get(key, title)} (paper)"]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' + ':---:|' * (len(header) - 1)]
    for cell in study.cells:
        row = [cell.label]
        for key, _ in study.columns:
            m = cell.measures.get(key)
            row += ([cell_value(plan.result(m)), se_value(plan.result(m), setup)] if m else ['—', '—'])
            row.append(paper_value(cell.paper.get(key)))
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def evaluations_note(kinds):
    """What the table's frozen-feature columns are, and what they stand beside."""
    notes = []
    if 'probe' in kinds:
        notes.append("Feature probe: a linear classifier (logistic regression, full batch, from zero weights) on "
                     "the class token's features of the training images, embedded once without augmentation "
                     "(extract_features.py --probe): a proxy of linear probing in seconds, beside the paper's "
                     "linear-probing number, whose protocol (90 epochs of LARS on augmented images) is stronger; "
                     "compare trends, not values.")
    if 'knn' in kinds:
        notes.append("kNN: the weighted k-nearest-neighbour classifier of the kNN monitor (k = 20, temperature "
                     "0.07, class token; extract_features.py --knn); the paper reports no kNN numbers.")
    if notes and 'finetune' not in kinds:
        notes.append("Fine-tuning is a column on request (e.g. --evals probe knn finetune).")
    return ' '.join(notes)


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
            n = images_of(run, setup)
            entry['ours'][key] = {'final': acc[0], 'best': acc[1], 'se': standard_error(acc[0], n),
                                  'images': n} if acc else None
            entry.setdefault('runs', {})[key] = setup.rel(run.out)
        data['cells'].append(entry)
    return data


def report_name(study, plan):
    """The file name of a study's reports, without suffix: another seed's (or --amp's) beside the defaults', e.g.
    mask_ratio_seed1."""
    return study.name + ''.join(f"_{k}{v}" for k, v in plan.run_flags.items())


def write_report(study, plan, setup, argv, results_dir):
    """``<study>.md`` and ``<study>.json`` from the plan's runs as the runner left them (``argv``: the flags of this
    invocation); ``<study>.png`` for the curves."""
    runs = plan.study_runs(study)
    known = [r.seconds for r in runs if r.seconds is not None]
    kinds = {r.kind for r in runs}
    recipes = [('pre-training', 'pretrain')] + [(e.title, kind) for kind, e in EVALUATIONS.items()]
    approx = any(isinstance(v, tuple) for cell in study.cells for v in cell.paper.values())
    n = f"n = {setup.eval_images} images" if setup.eval_images else 'n: its images'
    lines = [f"## {study.title}", '',
             f"Scale `{setup.scale.name}`: {setup.scale.model_label}; data {setup.data_summary}. Ours: top-1 (%) on "
             f"the evaluation split (of the last epoch for a training run), and its standard error from the split's "
             f"size (s.e. = sqrt(p (1 - p) / n), {n}); the paper's: ImageNet-1K top-1 of "
             f"ViT-L/16{' (≈: read off a figure)' if approx else ''}."
             + (f" Every training run with {' '.join(flag_argv(plan.run_flags))}." if plan.run_flags else ''),
             '', markdown_table(study, plan, setup), '']
    notes = ' '.join(filter(None, (study.note, evaluations_note(kinds))))
    if notes:
        lines += [notes, '']
    lines += ['Recipes (the flags every run of a kind starts from; each cell adds its own):', '']
    lines += [f"- {name}: `{' '.join(recipe_argv(kind, setup))}`" for name, kind in recipes if kind in kinds]
    lines += [f"- {name}: `{' '.join(flag_argv(batch_flags(flags, setup.world)))}`" for name, flags in study.recipes]
    lines += ['', f"Command: `python reproduce.py {shlex.join(argv)}`", '',
              f"Compute: {fmt_time(sum(known))} for the {len(known)} of {len(runs)} runs of this study timed by "
              f"the runner (shared runs counted once); device `{setup.device}`.", '',
              f"Environment: {environment()}.", '']
    results_dir.mkdir(parents=True, exist_ok=True)
    name = report_name(study, plan)
    (results_dir / f"{name}.md").write_text('\n'.join(lines), encoding='utf-8')
    data = dict(results(study, plan, setup), run_flags=plan.run_flags)
    (results_dir / f"{name}.json").write_text(json.dumps(data, indent=1) + '\n', encoding='utf-8')
    if study.curve:
        plot_curve(study, data, setup.scale.name, results_dir / f"{name}.png")
