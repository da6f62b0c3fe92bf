"""The layout stays as easy to fork as the reference's: the pre-training path a reader follows stays short
(benchmarks/hops.py), no module imports itself back through others, the reference's util/ modules keep their place
beside at most five of ours, and no production file grows past 500 lines."""
import ast
import os
import re
import subprocess
import sys

from conftest import ROOT

REFERENCE_UTIL = {'misc', 'lr_decay', 'lr_sched', 'pos_embed', 'lars', 'datasets', 'crop'}
MAX_HOPS = 16  # the issue that redesigned the run's life; the reference's path has 10


def production_files():
    """The project's .py files outside tests/: the entry points and the folders of its code (not a virtualenv or
    an output folder a user keeps beside them)."""
    yield from sorted(f for f in os.listdir(ROOT) if f.endswith('.py'))
    for top in ('util', 'studies', 'demo', 'benchmarks'):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith(('.', '__pycache__'))]
            yield from (os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith('.py'))


def test_the_pre_training_path_stays_short():
    """``python benchmarks/hops.py`` as a reader runs it (a fresh process: nothing left over from other tests)."""
    result = subprocess.run([sys.executable, os.path.join('benchmarks', 'hops.py')], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    hops = re.findall(r'^\s*\d+\s+(\S+)\s+(\S+)$', result.stdout, re.M)
    assert re.search(rf'^{len(hops)} hops in \d+ files', result.stdout, re.M), result.stdout
    assert len(hops) <= MAX_HOPS, result.stdout
    # the step's own calls are where a reader looks for them
    for hop in [('engine_pretrain.py', 'train_one_epoch'), ('util/misc.py', 'log_every'),
                ('util/lr_sched.py', 'adjust_learning_rate'), ('main_pretrain.py', 'main')]:
        assert hop in hops, result.stdout


def test_no_import_circle():
    modules = {}
    for path in production_files():
        if path.startswith('benchmarks'):
            continue
        modules[path[:-3].replace(os.sep, '.').removesuffix('.__init__')] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # (imports inside functions count: they close a circle as well)
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    seen, done = set(), set()

    def visit(name, path):
        if name in done:
            return
        assert name not in seen, 'import circle: ' + ' -> '.join(path[path.index(name):] + [name])
        seen.add(name)
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert len(graph) > 50  # (the walk found the project)


def test_util_shows_its_jobs():
    top = {f[:-3] for f in os.listdir(os.path.join(ROOT, 'util')) if f.endswith('.py') and f != '__init__.py'}
    assert REFERENCE_UTIL <= top and len(top) <= 12, sorted(top - REFERENCE_UTIL)


def test_no_production_file_over_500_lines():
    sizes = {}
    for path in production_files():
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            sizes[path] = sum(1 for _ in f)
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert 'main_pretrain.py' in sizes and 'engine_pretrain.py' in sizes
