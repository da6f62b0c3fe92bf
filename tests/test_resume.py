"""Crash safety: runs killed at chosen points (SIGKILL, also during a checkpoint write) or stopped by a signal,
then started again with the same command, end with the same log.txt and TensorBoard points as a run that was
never interrupted."""
import json

import pytest
import torch

from conftest import DATA, run_script

TINY = DATA / 'tiny_imagefolder'


def pretrain_args(out, *extra):
    # 16 images, batch 2: 8 iterations per epoch
    return ['main_pretrain.py', '--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '2',
            '--epochs', '3', '--warmup_epochs', '1', '--data_path', TINY, '--device', 'cpu', '--num_workers', '0',
            '--output_dir', out, '--log_dir', out, *extra]


def tb_points(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    r = run_script(*pretrain_args(out, '--save_every_iters', '2'))
    assert r.returncode == 0, r.stderr[-2000:]
    return (out / 'log.txt').read_text(), tb_points(out)


def crash_then_resume(out, fault, *extra, signal_name=None):
    env = {'MAE_FAULT': fault}
    if signal_name:
        env['MAE_FAULT_SIGNAL'] = signal_name
    crashed = run_script(*pretrain_args(out, *extra), env=env)
    resumed = run_script(*pretrain_args(out, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return crashed, resumed


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


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    crashed = run_script(*pretrain_args(tmp_path), env={'MAE_FAULT': 'save:3'})
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


def test_torchrun_two_processes_with_accumulation_resume(tmp_path):
    def ddp(out, env=None):
        return run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          *pretrain_args(out, '--accum_iter', '2', '--save_every_iters', '1'), env=env,
                          timeout=300)
    full = ddp(tmp_path / 'full')
    assert full.returncode == 0, full.stderr[-3000:]
    # rank 0's fourth checkpoint write (end of epoch 1) is cut short: the last one is mid-epoch 1, iteration 2
    crashed = ddp(tmp_path / 'crashed', env={'MAE_FAULT': 'save:4'})
    assert crashed.returncode != 0
    resumed = ddp(tmp_path / 'crashed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming epoch 1 at iteration 2 of 4' in resumed.stdout
    assert (tmp_path / 'crashed' / 'log.txt').read_text() == (tmp_path / 'full' / 'log.txt').read_text()
