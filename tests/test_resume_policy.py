"""What a resume may and may not do: Ctrl-C saves and continues (twice stops at once), a non-finite step never
overwrites a good checkpoint, a busy --output_dir is refused, a mid-epoch position in other batches restarts the
epoch, a resume keeps later log rows aside and never continues another script's run. (Split from test_resume.py so
that the two halves run on different test workers.)"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, crash_then_resume, pretrain_argv, run_script, run_with_fault
from conftest import resume_argv as pretrain_args

pytestmark = pytest.mark.slow


def test_ctrl_c_saves_like_sigterm_and_twice_stops_at_once(tmp_path):
    """Ctrl-C (SIGINT to the process group, DataLoader workers included): saved at the next optimizer step, one
    line, the same command continues. (With workers a resume inside an epoch keeps the data order, and the workers'
    augmentation draws start afresh: docs/long-runs.md; the rows before it are the uninterrupted run's.) Twice:
    stopped at once, one line, exit 130."""
    workers = ['--num_workers', '2']  # (the workers get the Ctrl-C too)
    whole = run_script(*pretrain_args(tmp_path / 'whole', *workers))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / 'stopped'
    crashed, resumed = crash_then_resume(out, 'step:1:5', *workers, signal_name='INT')
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    last = crashed.stderr.strip().splitlines()[-1]
    assert last.startswith('stopped: signal 2 received, stopped at epoch 1 iteration 5: saved '), last
    assert 'Traceback' not in crashed.stderr
    assert 'Resuming epoch 1 at iteration 5 of 8' in resumed.stdout
    rows = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (tmp_path / 'whole' / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1, 2] and rows[0] == whole_rows[0]

    twice = run_with_fault('step:1:5', pretrain_args(tmp_path / 'twice', *workers), signal_name='INT2')
    assert twice.returncode == 130, twice.stderr[-2000:]
    assert twice.stderr.strip().splitlines()[-1] == ('stopped: interrupted (Ctrl-C twice), nothing saved since the '
                                                     'last checkpoint')
    assert 'Traceback' not in twice.stderr


# ---------------------------------------------------------------------------------------------------- misuse
def test_a_non_finite_step_never_overwrites_the_last_good_checkpoint(tmp_path):
    out = tmp_path / 'run'
    r = run_script(*pretrain_argv(out, '--blr', '1e5', '--save_every_iters', '1', epochs=3))
    assert r.returncode == 1, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    named = line.split('the last good checkpoint is ')[-1].split(' ')[0]
    assert named == str(out / 'checkpoint-last.pth'), line
    for path in out.glob('checkpoint-*.pth'):
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point()), path
        assert all(torch.isfinite(t).all() for s in ckpt['optimizer']['state'].values() for t in s.values()
                   if t.is_floating_point()), path


def test_a_second_run_into_a_busy_folder_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / 'run'
    argv = [str(a) for a in pretrain_args(out, '--epochs', '500')]
    first = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
    try:
        for line in first.stdout:  # until it trains
            if 'Start training' in line:
                break
        # (the same command, as a requeued duplicate job: with fewer epochs it could find the first run's newest
        # checkpoint complete for it, and say so, before it reaches the lock)
        second = run_script(*argv)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: --output_dir {out} is in use by another run (process {first.pid} on {socket.gethostname()}, "
            + second.stderr.split(f'{socket.gethostname()}, ')[1].split(')')[0]
            + "): let it finish or stop it, or pass another --output_dir"]
    finally:
        first.kill()
        first.wait()
    again = run_script(*pretrain_args(out))
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize('batch_size', ['1', '4'])
def test_resume_mid_epoch_with_another_batch_size_restarts_the_epoch(tmp_path, batch_size):
    stopped = run_with_fault('stop:3', pretrain_args(tmp_path, '--save_every_iters', '1'))
    assert stopped.returncode == 1 and torch.load(tmp_path / 'checkpoint-last.pth',
                                                  weights_only=True)['resume_iter'] == 3
    resumed = run_script(*pretrain_args(tmp_path), '--batch_size', batch_size)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (f'its position is in batches of --batch_size 2 --accum_iter 1, this run has {batch_size} and 1; '
            f'restarting epoch 0 from its beginning') in resumed.stdout
    assert 'Note: the effective batch size' in resumed.stdout
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()] == [0, 1, 2]


def test_auto_resume_never_continues_another_scripts_run(tmp_path):
    out = tmp_path / 'shared'
    assert run_script(*pretrain_args(out, '--epochs', '1')).returncode == 0
    ft = run_script('main_finetune.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2',
                    '--batch_size', '4', '--epochs', '1', '--device', 'cpu', '--num_workers', '0', '--data_path',
                    TINY, '--finetune', out / 'checkpoint-0.pth', '--output_dir', out, '--log_dir', out)
    assert ft.returncode == 2 and ft.stderr.strip().splitlines() == [
        f"error: --output_dir {out} holds a run of main_pretrain.py --model mae_vit_tiny_patch4 (checkpoint-last.pth, "
        f"the end of epoch 0), not of main_finetune.py --model vit_tiny_patch4: pass a new --output_dir, or "
        f"--no_auto_resume to start afresh in that folder"]
    done = run_script(*pretrain_args(out, '--epochs', '1'))
    assert done.returncode == 0 and 'holds this run, complete: it finished epoch 0 of --epochs 1' in done.stdout
    assert len((out / 'log.txt').read_text().splitlines()) == 1
