"""Crash safety: runs killed at chosen points (SIGKILL, also during a checkpoint write) or stopped by a signal,
then started again with the same command, end with the same log.txt and TensorBoard points as a run that was
never interrupted."""
import json

import pytest
import torch

from conftest import crash_then_resume, run_script, run_with_fault
from conftest import resume_argv as pretrain_args
from conftest import tb_scalars as tb_points

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    r = run_script(*pretrain_args(out, '--save_every_iters', '2'))
    assert r.returncode == 0, r.stderr[-2000:]
    return (out / 'log.txt').read_text(), tb_points(out)


@pytest.mark.parametrize('fault,extra', [
    ('step:1:3', []),                           # mid-epoch, only epoch checkpoints: epoch 1 is redone
    ('step:1:3', ['--save_every_iters', '2']),  # mid-epoch, resumes at iteration 2 of epoch 1
    ('step:0:1', []),                           # before any checkpoint: starts again from scratch
    ('step:2:8', []),                           # after the last step, before the final checkpoint
    ('save:2', []),                             # killed while writing the second checkpoint
    ('save:5', ['--save_every_iters', '2']),    # killed while writing a mid-epoch checkpoint
])
def test_sigkill_then_resume_gives_identical_log(tmp_path, uninterrupted, fault, extra):
    log, points = uninterrupted
    crashed, resumed = crash_then_resume(tmp_path, fault, *extra)
    assert crashed.returncode == -9
    assert (tmp_path / 'log.txt').read_text() == log
    assert tb_points(tmp_path) == points
    assert not list(tmp_path.glob('.checkpoint-*'))  # no temporary file left behind
    ckpt = torch.load(tmp_path / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 2 and 'resume_iter' not in ckpt


def test_bf16_on_the_cpu_resumes_to_the_same_log(tmp_path, uninterrupted):
    """--amp bf16 on the CPU (autocast [new]) is as deterministic as fp32 there: killed mid-epoch and resumed, the
    same log.txt and TensorBoard points as without the kill (and not fp32's)."""
    extra = ['--amp', 'bf16', '--save_every_iters', '2']
    full = tmp_path / 'full'
    r = run_script(*pretrain_args(full, *extra))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Precision: bf16 autocast on the CPU' in r.stdout
    crashed, resumed = crash_then_resume(tmp_path / 'resumed', 'step:1:3', *extra)
    assert crashed.returncode == -9 and 'Resuming epoch 1 at iteration 2' in resumed.stdout
    assert (tmp_path / 'resumed' / 'log.txt').read_text() == (full / 'log.txt').read_text()
    assert tb_points(tmp_path / 'resumed') == tb_points(full)
    assert (full / 'log.txt').read_text() != uninterrupted[0]  # the fp32 run's, with the same flags otherwise


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    crashed = run_with_fault('save:3', pretrain_args(tmp_path))
    assert crashed.returncode == -9
    # saves 1, 2: checkpoint-0 (+ last), checkpoint-last of epoch 1; the third (epoch 2) was cut short
    ckpt = torch.load(tmp_path / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 1
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()] == [0, 1, 2]


def test_sigterm_saves_and_resumes(tmp_path, uninterrupted):
    log, points = uninterrupted
    crashed, resumed = crash_then_resume(tmp_path, 'step:1:5', signal_name='TERM')
    assert crashed.returncode == 1
    last = crashed.stderr.strip().splitlines()[-1]
    assert last.startswith('stopped: signal 15 received, stopped at epoch 1 iteration 5: saved ')
    assert 'Resuming epoch 1 at iteration 5 of 8' in resumed.stdout
    assert (tmp_path / 'log.txt').read_text() == log
    assert tb_points(tmp_path) == points


@pytest.mark.parametrize('extra', [[], ['--save_every_iters', '2']])
def test_kill_during_the_very_first_checkpoint_write(tmp_path, uninterrupted, extra):
    """The epoch-0 row is written before checkpoint-0 is complete; the rerun starts afresh and writes it once."""
    log, points = uninterrupted
    crashed, resumed = crash_then_resume(tmp_path, 'save:1', *extra)
    assert crashed.returncode == -9 and 'Resume checkpoint' not in resumed.stdout  # it started afresh
    assert (tmp_path / 'log.txt').read_text() == log
    assert tb_points(tmp_path) == points


def test_resuming_an_older_checkpoint_keeps_the_later_rows_aside(tmp_path, uninterrupted):
    log, _ = uninterrupted
    assert run_script(*pretrain_args(tmp_path)).returncode == 0
    again = run_script(*pretrain_args(tmp_path, '--resume', tmp_path / 'checkpoint-0.pth', '--no_auto_resume'))
    assert again.returncode == 0, again.stderr[-2000:]
    side, = tmp_path.glob('log-moved-*.txt')
    assert f'to {side}' in again.stdout
    assert side.read_text() == ''.join(log.splitlines(keepends=True)[1:])
    assert (tmp_path / 'log.txt').read_text() == log
