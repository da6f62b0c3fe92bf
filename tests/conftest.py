"""What the tests share: the repo's modules on the path, the test data, running the scripts as a user would (also
with a fault injected), reading what a run wrote (log.txt, TensorBoard, printed accuracy), and tiny command lines."""
import argparse
import builtins
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# With pytest-xdist's workers on every core (the README's -n auto), each test's own processes would also start one
# thread per core: the cores are oversubscribed and the suite runs about 1.4x slower (measured: two tiny resumed
# runs side by side, 44 s with 2 threads each, 30 s with 1). One thread per process then, inherited by the scripts
# the tests start. Every comparison in the suite is between runs under the same setting.
if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

# The files whose tests take longest (minutes of subprocesses each), longest first: collected first, so that
# xdist's --dist loadfile hands them out before the short ones and no worker is left with a long file at the end
# while the others idle (the suite's wall time is then about half its total time on 2 workers).
LONGEST_FIRST = ['test_resume.py', 'test_pretrain.py', 'test_gpu_check.py', 'test_finetune.py', 'test_distributed.py',
                 'test_resume_policy.py', 'test_reproduce.py', 'test_model_ema.py', 'test_linprobe.py',
                 'test_bad_data.py', 'test_knn_monitor.py', 'test_transforms.py', 'test_fast_path.py']


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file keeps its own order)
DATA = ROOT / 'tests' / 'data'
TINY = DATA / 'tiny_imagefolder'  # train/: 2 classes of 8 images; val/: 2 classes of 4
TINY_B = DATA / 'tiny_imagefolder_b'  # 3 classes
REFERENCE = json.loads((DATA / 'finetune_reference.json').read_text())
sys.path.insert(0, str(ROOT))

from versions import exact_numbers_expected, stack_note  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end runs of the scripts in subprocesses')


def run_script(*argv, timeout=600, env=None, module=False):
    """Run ``python <script> argv...`` (or ``python -m <module> ...``) from the repo root, in a session of its own
    (a Ctrl-C it sends to its process group stays there); returns the CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    cmd = [sys.executable] + (['-m'] if module else []) + [str(a) for a in argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env,
                          start_new_session=True)


def run_with_fault(fault, argv, signal_name=None, **kwargs):
    """``run_script(*argv)`` (script first) with a fault injected by ``tests/faults.py``: ``step:E:I`` kills the
    run right after optimizer step I of epoch E, ``save:N`` during its N-th checkpoint write, ``stop:N`` asks it to
    stop (as SIGUSR1 does) at its N-th optimizer step. ``signal_name`` (e.g. 'TERM'; 'INT', 'INT2': Ctrl-C once,
    twice) replaces SIGKILL."""
    env = dict(kwargs.pop('env', None) or {}, **({'FAULT_SIGNAL': signal_name} if signal_name else {}))
    return run_script('tests/faults.py', fault, *argv, env=env, **kwargs)


@pytest.fixture
def script():
    return run_script


@pytest.fixture(autouse=True)
def plain_print():
    """An entry point's main() run in this process stamps every later print (misc.init_distributed_mode): undo it,
    so that each test sees the plain builtin."""
    yield
    builtins.print = getattr(builtins.print, '_mae_builtin', builtins.print)


# ---------------------------------------------------------------------------------------------------- command lines
def parsed_args(script, *argv, **after):
    """The flags of ``script`` (an entry point's module: main_pretrain, main_finetune, ...) as its own parser gives
    them for ``argv``, every default included (a flag added with a default reaches the test), then ``after`` set as
    attributes: what main() sets itself (e.g. the absolute ``lr``), or a value the test gives as is."""
    args = script.get_args_parser().parse_args([str(a) for a in argv])
    for name, value in after.items():
        setattr(args, name, value)
    return args


def pretrain_argv(out, *extra, epochs=2, batch_size=4):
    """The tiny pre-training run on TINY (16 images; 4 iterations per epoch at batch 4)."""
    return ['main_pretrain.py', '--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size',
            str(batch_size), '--epochs', str(epochs), '--warmup_epochs', '1', '--data_path', TINY, '--device', 'cpu',
            '--num_workers', '0', '--output_dir', out, '--log_dir', out, *extra]


def resume_argv(out, *extra):
    """The tiny pre-training of the resume tests: 16 images, batch 2, 8 iterations per epoch, 3 epochs."""
    return pretrain_argv(out, *extra, epochs=3, batch_size=2)


def crash_then_resume(out, fault, *extra, signal_name=None):
    """``resume_argv`` run with ``fault`` (tests/faults.py), then again with the same command: (crashed, resumed)."""
    crashed = run_with_fault(fault, resume_argv(out, *extra), signal_name=signal_name)
    resumed = run_script(*resume_argv(out, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return crashed, resumed


def reference_argv(which, pretrained, out=None):
    """The command line of a reference run in finetune_reference.json, with its placeholders filled in."""
    argv = [a.replace('<tiny_imagefolder>', str(TINY)).replace('<pretrained>', str(pretrained))
            for a in REFERENCE[which]['args']]
    if out is not None:
        argv += ['--output_dir', str(out), '--log_dir', str(out)]
    return [REFERENCE[which]['script']] + argv


def save_pretrained(path, encoder_only=False, seed=0):
    """A tiny MAE checkpoint as main_pretrain.py writes it ({'model': full MAE}), or encoder-only as the released
    pre-trained checkpoints; built right after ``torch.manual_seed(seed)``."""
    import models_mae
    torch.manual_seed(seed)
    sd = models_mae.mae_vit_tiny_patch4().state_dict()
    if encoder_only:
        sd = {k: v for k, v in sd.items() if not k.startswith('decoder') and k != 'mask_token'}
    torch.save({'model': sd}, path)
    return path


def to_reference_format(src, dst):
    """Rewrite one of our checkpoints as the reference writes them: a pickled argparse.Namespace under 'args', no
    random streams nor other extras."""
    ckpt = torch.load(src, map_location='cpu', weights_only=True)
    out = {k: ckpt[k] for k in ('model', 'optimizer', 'epoch', 'scaler')}
    out['args'] = argparse.Namespace(**ckpt['args'])
    torch.save(out, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- what runs wrote
def read_log(out):
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


def tb_scalars(folder):
    """TensorBoard's scalars as TensorBoard shows them (points hidden by a purge left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def acc_lines(stdout):
    return [line.split('] ', 1)[-1].strip() for line in stdout.splitlines() if '* Acc@1' in line]


# transformers 5 on a torch it cannot use (< 2.6, as on the oldest stack CI runs) writes these lines on stderr when
# torchvision is imported (its ONNX registration imports torch.onnx, which imports transformers): not ours
TRANSFORMERS_IMPORT_LINES = ('[transformers] Disabling PyTorch because PyTorch >= ',
                             "[transformers] PyTorch was not found. Models won't be available")


def our_stderr(text):
    """A script's stderr ``text`` less transformers' lines at import on a torch it cannot use."""
    return ''.join(line for line in text.splitlines(keepends=True) if not line.startswith(TRANSFORMERS_IMPORT_LINES))


def last_line(result):
    lines = our_stderr(result.stderr).strip().splitlines()
    return lines[-1] if lines else ''


def one_line_error(result):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = our_stderr(result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
    return lines[0]


# The reference runs' numbers (tests/data/*.json) were computed on versions.REFERENCE_STACK: there they are
# compared to within float32 rounding. On other versions timm/torchvision/Pillow transform the images differently
# (and fp32 sums run in other orders), so what must still hold is checked: the same rows, keys, steps and lr
# schedule (which no image touches), and finite numbers; losses within 25% (a handful of tiny images: one image
# cropped otherwise moves a batch's loss by several per cent), accuracies in [0, 100].
def _close(value, ref, key, approx):
    if exact_numbers_expected():
        return value == approx(ref, rel=1e-5, abs=1e-7)
    if 'lr' in key or key in ('epoch', 'n_parameters'):
        return value == approx(ref, rel=1e-6, abs=1e-12)
    if 'acc' in key:
        return 0 <= value <= 100
    return math.isfinite(value) and value == approx(ref, rel=0.25)


def assert_log_matches(rows, reference_rows, approx):
    assert [r['epoch'] for r in rows] == [r['epoch'] for r in reference_rows]
    for ours, ref in zip(rows, reference_rows):
        assert list(ours) == list(ref)
        for k, v in ref.items():
            assert _close(ours[k], v, k, approx), (k, ours[k], v, stack_note())


def assert_scalars_match(scalars, reference_scalars, approx):
    assert sorted(scalars) == sorted(reference_scalars)
    for tag, points in reference_scalars.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        for (_, ours), (_, ref) in zip(scalars[tag], points):
            assert _close(ours, ref, tag, approx), (tag, ours, ref, stack_note())


def assert_acc_lines(stdout, reference_lines):
    """The printed ``* Acc@1 .. Acc@5 .. loss ..`` lines: the reference's own on its stack, the same number of them
    in its format elsewhere."""
    ours = acc_lines(stdout)
    if exact_numbers_expected():
        assert ours == reference_lines
    else:
        assert len(ours) == len(reference_lines), stack_note()
        assert all(re.fullmatch(r'\* Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+', line) for line in ours), ours


def run_in_process(module, capsys, *argv):
    """An entry point's main() through run_main, as the script runs it; returns (exit code, stderr)."""
    import util.training.process as process
    with pytest.raises(SystemExit) as exc:
        process.run_main(module.main, module.get_args_parser(), [str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err
