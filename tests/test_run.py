"""Checkpoint files and the decisions of a run's owner, without running a script: atomic writes, safe loading,
which checkpoint is continued, the folder's lock, the flags a continued run may change, log rows kept aside, and
the checks made before anything is written."""
import argparse
import errno
import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
import util.checkpoints.checkpoint as ckpt_io
import util.training.process as process
import util.misc as misc
import util.training.output_dir as output_dir
import util.checkpoints.resume as resume
import util.training.run as run_mod
from util.checkpoints.saver import CheckpointSaver
from conftest import TINY, run_in_process
from util.errors import RunComplete, RunInterrupted, TrainingStopped, UsageError


# ---------------------------------------------------------------------------------------------------- files
def test_atomic_save_replaces_and_cleans_stale_temporaries(tmp_path):
    path = tmp_path / 'checkpoint-last.pth'
    (tmp_path / '.checkpoint-last.pth.tmp-123').write_bytes(b'left by a killed run')
    ckpt_io.atomic_save({'epoch': 1}, path)
    ckpt_io.atomic_save({'epoch': 2}, path)
    assert torch.load(path, weights_only=True) == {'epoch': 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-last.pth']


def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'
    ckpt_io.atomic_save({'epoch': 1}, path)

    def full(obj, f):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(ckpt_io.torch, 'save', full)
    with pytest.raises(TrainingStopped) as e:
        ckpt_io.atomic_save({'epoch': 2}, path)
    assert '(the disk is full)' in str(e.value) and f'free space in {tmp_path}' in str(e.value)
    assert 'the previous checkpoint there is intact' in str(e.value)
    assert torch.load(path, weights_only=True) == {'epoch': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint-last.pth']


def test_load_errors_are_safe_and_clear(tmp_path):
    with pytest.raises(UsageError, match=f'--finetune {tmp_path} is a folder; give a checkpoint file'):
        ckpt_io.load(tmp_path, '--finetune')
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UsageError) as e:
        ckpt_io.load(junk)
    assert 'cannot be read as a PyTorch checkpoint' in str(e.value)
    assert 'weights_only' not in str(e.value) and 'will likely succeed' not in str(e.value)


def test_reference_submitit_checkpoint_with_path_flags_loads(tmp_path):
    """The reference's submitit scripts store pathlib paths in args (job_dir, output_dir, dist_url's folder)."""
    args = argparse.Namespace(model='mae_vit_tiny_patch4', output_dir=pathlib.PosixPath('/checkpoint/u/exp/12'),
                              job_dir=pathlib.PosixPath('/checkpoint/u/exp/%j'), blr=1e-3)
    torch.save({'model': {'w': torch.ones(1)}, 'epoch': 3, 'args': args}, tmp_path / 'ref.pth')
    checkpoint = ckpt_io.load(tmp_path / 'ref.pth')
    assert checkpoint['epoch'] == 3
    assert ckpt_io.stored_args(checkpoint) == {'model': 'mae_vit_tiny_patch4', 'output_dir': '/checkpoint/u/exp/12',
                                               'job_dir': '/checkpoint/u/exp/%j', 'blr': 1e-3}


def test_newest_checkpoint_is_the_furthest_along(tmp_path):
    torch.save({'model': {}, 'epoch': 1}, tmp_path / 'checkpoint-1.pth')
    torch.save({'model': {}, 'epoch': 0}, tmp_path / 'checkpoint-0.pth')
    (tmp_path / 'checkpoint-9.pth').write_bytes(b'damaged')
    (tmp_path / '.checkpoint-last.pth.tmp-7').write_bytes(b'cut short')
    assert ckpt_io.newest(tmp_path) == str(tmp_path / 'checkpoint-1.pth')
    torch.save({'model': {}, 'epoch': 1}, tmp_path / 'checkpoint-last.pth')  # same epoch: the last one
    assert ckpt_io.newest(tmp_path) == str(tmp_path / 'checkpoint-last.pth')
    torch.save({'model': {}, 'epoch': 1, 'resume_iter': 3}, tmp_path / 'checkpoint-last.pth')  # in epoch 2
    torch.save({'model': {}, 'epoch': 2}, tmp_path / 'checkpoint-2.pth')
    assert ckpt_io.newest(tmp_path) == str(tmp_path / 'checkpoint-2.pth')
    assert ckpt_io.newest(tmp_path / 'nowhere') == ''


def test_nonfinite_tensors_are_named():
    named = [('a', torch.ones(2)), ('b', torch.tensor([1.0, float('nan')])), ('c', torch.tensor([float('inf')])),
             ('steps', torch.tensor([3]))]
    assert ckpt_io.nonfinite(named) == ['b', 'c']


def test_reference_linear_probe_optimizer_with_fewer_tensors_loads_with_a_note(capsys):
    head = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3))]
    fc_norm = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))]
    reference = torch.optim.SGD(head, lr=0.1, momentum=0.9)
    for p in head:
        p.grad = torch.ones_like(p)
    reference.step()
    ours = torch.optim.SGD(head + fc_norm, lr=0.1, momentum=0.9)
    resume.load_optimizer_state(ours, reference.state_dict(), '--resume ref.pth')
    assert torch.equal(ours.state[head[0]]['momentum_buffer'], reference.state[head[0]]['momentum_buffer'])
    assert fc_norm[0] not in ours.state
    assert "holds 2 of this run's 4 trained tensors" in capsys.readouterr().out
    other = torch.optim.SGD([torch.nn.Parameter(torch.randn(5))], lr=0.1)
    with pytest.raises(UsageError, match='its optimizer state does not fit this run'):
        resume.load_optimizer_state(other, reference.state_dict(), '--resume ref.pth')


# ---------------------------------------------------------------------------------------------------- the folder
def test_lock_refuses_a_second_run_and_names_the_holder(tmp_path):
    first = output_dir.lock_output_dir(tmp_path)
    with pytest.raises(UsageError) as e:
        output_dir.lock_output_dir(tmp_path)
    assert f'--output_dir {tmp_path} is in use by another run (process {os.getpid()} on ' in str(e.value)
    first.close()
    output_dir.lock_output_dir(tmp_path).close()


def test_lock_file_of_damaged_bytes_still_names_its_holder_in_one_line(tmp_path):
    (tmp_path / output_dir.LOCK).write_bytes(b'\xff\xfe process 12 on \x80host\n')
    with open(tmp_path / output_dir.LOCK, 'a') as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=f'--output_dir {tmp_path} is in use by another run '
                                             f'\\(\ufffd\ufffd process 12 on \ufffdhost\\)'):
            output_dir.lock_output_dir(tmp_path)
    output_dir.lock_output_dir(tmp_path).close()  # let go: the folder is this run's, its lock file rewritten
    assert (tmp_path / output_dir.LOCK).read_text(encoding='utf-8').startswith(f'process {os.getpid()} on ')


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', f'''
import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parents[1])!r})
import util.training.output_dir as r, time
held = r.lock_output_dir({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)'''],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(UsageError, match=f'process {holder.pid} on '):
        output_dir.lock_output_dir(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    output_dir.lock_output_dir(tmp_path).close()


def test_log_rows_after_the_checkpoint_are_moved_not_deleted(tmp_path, capsys):
    rows = [json.dumps({'epoch': e}) + '\n' for e in range(4)]
    (tmp_path / 'log.txt').write_text(''.join(rows) + '{"epoch": 4, "tra')  # a row cut short by a kill
    output_dir.move_log_rows_after(tmp_path, 1)
    assert (tmp_path / 'log.txt').read_text() == ''.join(rows[:2])
    side, = tmp_path.glob('log-moved-*.txt')
    assert side.read_text() == ''.join(rows[2:]) + '{"epoch": 4, "tra\n'
    assert str(side) in capsys.readouterr().out
    output_dir.move_log_rows_after(tmp_path, 1)  # nothing to move: no new side file
    assert len(list(tmp_path.glob('log-moved-*.txt'))) == 1


@pytest.mark.parametrize('bad_row, why', [
    (b'\xff\xfe{"epoch": 1}\n', 'line 3: not UTF-8'),
    (b'[1, 2]\n', 'line 3: a JSON list, not an object'),
    (b'{"epoch": "one"}\n', "line 3: epoch 'one' is not a number"),
    (b'garbage\n', 'line 3: not JSON'),  # not the last row: not a row cut short by a kill
])
def test_a_damaged_log_is_set_aside_whole_and_rebuilt_from_its_readable_rows(tmp_path, capsys, bad_row, why):
    rows = [json.dumps({'epoch': e}).encode() + b'\n' for e in range(4)]
    damaged = rows[0] + rows[1] + bad_row + rows[2] + rows[3]
    (tmp_path / 'log.txt').write_bytes(damaged)
    output_dir.move_log_rows_after(tmp_path, 2)
    assert (tmp_path / 'log.txt').read_bytes() == rows[0] + rows[1] + rows[2]
    side, = tmp_path.glob('log.txt.damaged-*')
    assert side.read_bytes() == damaged  # nothing lost
    assert not list(tmp_path.glob('log-moved-*.txt'))
    out = capsys.readouterr().out
    assert out.count('\n') == 1
    assert f"log.txt is damaged (1 unreadable row(s), {why}): set aside as {side}; log.txt rebuilt from its 3 " \
           f"readable row(s) up to epoch 2" in out
    output_dir.append_log(tmp_path, {'epoch': 3})  # the run goes on: its rows follow the readable ones
    output_dir.move_log_rows_after(tmp_path, 3)
    assert (tmp_path / 'log.txt').read_bytes() == rows[0] + rows[1] + rows[2] + rows[3]


def test_a_log_dir_owner_file_of_damaged_bytes_is_another_runs(tmp_path, capsys):
    log_dir = tmp_path / 'tb'
    log_dir.mkdir()
    (log_dir / 'events.out.tfevents.1.host.1.0').write_bytes(b'')
    (log_dir / run_mod.LOG_DIR_OWNER).write_bytes(b'/runs/\xff\xfeold\n')
    args = parse(main_pretrain, '--log_dir', log_dir, '--output_dir', tmp_path / 'out')
    assert run_mod.purge(args, 3) is None  # none of the other run's points hidden
    assert f"Note: --log_dir {log_dir} holds the TensorBoard events of another run (/runs/\ufffd\ufffdold)" \
        in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- continuing
def parse(module, *argv):
    return module.get_args_parser().parse_args([str(a) for a in argv])


def stored(module, *argv, **changes):
    args = parse(module, *argv)
    args.lr = args.blr * args.batch_size * args.accum_iter / 256 if args.lr is None else args.lr
    return {**ckpt_io.args_to_dict(args), **changes}


def test_changed_flags_allow_what_a_resume_may_change():
    base = ['--model', 'mae_vit_tiny_patch4', '--batch_size', '8']
    there = stored(main_pretrain, *base)
    assert resume.changed_flags(there, parse(main_pretrain, *base)) == []
    assert resume.changed_flags(there, parse(main_pretrain, *base, '--epochs', '800', '--num_workers', '3',
                                              '--save_every_iters', '5', '--data_path', '/elsewhere')) == []
    assert resume.changed_flags(there, parse(main_pretrain, *base, '--blr', '2e-3', '--mask_ratio', '0.5')) == [
        '--blr 0.001 there, 0.002 here', '--mask_ratio 0.75 there, 0.5 here']  # (in the parser's order)
    given = stored(main_pretrain, *base, '--lr', '0.1')
    assert resume.changed_flags(given, parse(main_pretrain, *base, '--lr', '0.1')) == []
    assert resume.changed_flags(given, parse(main_pretrain, *base)) == ['--lr 0.1 there, none here']
    assert resume.changed_flags(there, parse(main_pretrain, *base, '--lr', '0.1')) == [
        '--lr 3.125e-05 there, 0.1 here']


def choose(args, script, folder):
    """The checkpoint a run of ``script`` with ``args`` continues in ``folder`` (with its path)."""
    assert str(args.output_dir) == str(folder)
    return resume.choose_checkpoint(args, script)


def test_continues_only_its_own_run(tmp_path):
    argv = ['--model', 'mae_vit_tiny_patch4', '--output_dir', tmp_path, '--epochs', '3']
    torch.save({'model': {}, 'epoch': 0, 'script': 'main_pretrain.py', 'args': stored(main_pretrain, *argv)},
               tmp_path / 'checkpoint-last.pth')
    args = parse(main_pretrain, *argv)
    path, checkpoint = choose(args, 'main_pretrain.py', tmp_path)
    assert checkpoint['epoch'] == 0 and path == str(tmp_path / 'checkpoint-last.pth')

    ft = parse(main_finetune, '--model', 'vit_tiny_patch4', '--output_dir', tmp_path)
    with pytest.raises(UsageError) as e:
        choose(ft, 'main_finetune.py', tmp_path)
    assert str(e.value) == (f"--output_dir {tmp_path} holds a run of main_pretrain.py --model mae_vit_tiny_patch4 "
                            f"(checkpoint-last.pth, the end of epoch 0), not of main_finetune.py --model "
                            f"vit_tiny_patch4: pass a new --output_dir, or --no_auto_resume to start afresh in that "
                            f"folder")
    with pytest.raises(UsageError, match=r'other training flags \(--mask_ratio 0.75 there, 0.6 here\)'):
        choose(parse(main_pretrain, *argv, '--mask_ratio', '0.6'), 'main_pretrain.py', tmp_path)
    with pytest.raises(RunComplete, match='holds this run, complete: it finished epoch 0 of --epochs 1'):
        choose(parse(main_pretrain, *argv, '--epochs', '1'), 'main_pretrain.py', tmp_path)
    assert choose(parse(main_pretrain, *argv, '--no_auto_resume'), 'main_pretrain.py', tmp_path) == ('', None)


def test_explicit_resume_that_is_not_the_newest_says_so(tmp_path, capsys):
    argv = ['--model', 'mae_vit_tiny_patch4', '--output_dir', tmp_path, '--epochs', '9']
    for epoch in (2, 5):
        torch.save({'model': {}, 'epoch': epoch, 'script': 'main_pretrain.py', 'args': stored(main_pretrain, *argv)},
                   tmp_path / f'checkpoint-{epoch}.pth')
    args = parse(main_pretrain, *argv, '--resume', tmp_path / 'checkpoint-2.pth')
    assert choose(args, 'main_pretrain.py', tmp_path)[1]['epoch'] == 5
    out = capsys.readouterr().out
    assert f"Auto-resume: continuing from {tmp_path / 'checkpoint-5.pth'} (further along than --resume " in out
    assert 'which is not used; pass --no_auto_resume to start from --resume' in out
    args = parse(main_pretrain, *argv, '--resume', tmp_path / 'checkpoint-2.pth', '--no_auto_resume')
    assert choose(args, 'main_pretrain.py', tmp_path)[1]['epoch'] == 2


def test_a_stop_on_another_rank_names_its_signal(monkeypatch):
    saver = CheckpointSaver(parse(main_pretrain, '--output_dir', ''), 'main_pretrain.py', None, None, None)
    monkeypatch.setattr(misc, 'all_reduce_max', lambda x: 15.0)  # this rank got none, another got SIGTERM
    with pytest.raises(RunInterrupted, match='^signal 15 received, stopped at epoch 1 iteration 3: nothing was'):
        saver.after_step(1, 3, 8, misc.MetricLogger())


def test_nonfinite_weights_are_never_saved(tmp_path):
    torch.save({'model': {}, 'epoch': 0}, tmp_path / 'checkpoint-0.pth')
    model = torch.nn.Linear(2, 2)
    args = parse(main_pretrain, '--output_dir', tmp_path, '--save_freq', '1')
    saver = CheckpointSaver(args, 'main_pretrain.py', model, torch.optim.AdamW(model.parameters()), None)
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(TrainingStopped) as e:
        saver.save(1)
    assert str(e.value) == (f"non-finite values in weight at the end of epoch 1 (the loss was still finite): not "
                            f"saved; the last good checkpoint is {tmp_path / 'checkpoint-0.pth'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-0.pth']


# ---------------------------------------------------------------------------------------------------- up-front checks
PT = ['--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--warmup_epochs', '1',
      '--device', 'cpu', '--num_workers', '0', '--data_path', TINY]
FT = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--nb_classes', '2', '--device', 'cpu',
      '--num_workers', '0', '--data_path', TINY]


@pytest.mark.parametrize('module,argv,expect', [
    (main_pretrain, ['--blr=-1e-3'], '--blr must be positive, got -0.001'),
    (main_pretrain, ['--lr', '-0.001'], '--lr must be positive, got -0.001'),
    (main_pretrain, ['--input_size', '30'], '--input_size 30 is not a multiple of the patch size 4 of '
                                            'mae_vit_tiny_patch4 (e.g. 28)'),
    (main_pretrain, ['--input_size', '0'], '--input_size must be at least 1, got 0'),
    (main_pretrain, ['--num_workers', '-1'], '--num_workers must be in [0, 256], got -1'),
    (main_pretrain, ['--mask_ratio', '0'], '--mask_ratio 0.0 masks no patch of the 64 at --input_size 32'),
    (main_pretrain, ['--mask_ratio', '0.999'], '--mask_ratio 0.999 keeps no patch of the 64 at --input_size 32'),
    (main_pretrain, ['--save_every_iters', '-1'], '--save_every_iters must be at least 0, got -1'),
    (main_pretrain, ['--warmup_epochs', '-3'], '--warmup_epochs must be at least 0, got -3'),
    (main_pretrain, ['--accum_iter', '3'], '--accum_iter 3 is more than the 2 iterations of an epoch'),
    (main_finetune, ['--input_size', '30'], '--input_size 30 is not a multiple of the patch size 4'),
    (main_finetune, ['--eval'], '--eval evaluates the checkpoint given with --resume; none was given'),
    (main_finetune, ['--eval', '--finetune', 'x.pth'], '--finetune only initialises training'),
    (main_linprobe, ['--eval'], '--eval evaluates the checkpoint given with --resume; none was given'),
    (main_finetune, ['--finetune', TINY], f'--finetune {TINY} is a folder; give a checkpoint file'),
])
def test_mistakes_are_one_line_before_anything_is_written(tmp_path, capsys, module, argv, expect):
    out = tmp_path / 'out'
    base = PT if module is main_pretrain else FT
    code, err = run_in_process(module, capsys, *base, '--output_dir', out, '--log_dir', out, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and expect in lines[0], err
    if module is main_pretrain and argv[0] != '--accum_iter':  # (that check needs the dataset's size)
        assert not out.exists()


def test_log_dir_naming_a_file_and_missing_data_come_before_the_output_folder(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    out = tmp_path / 'out'
    code, err = run_in_process(main_pretrain, capsys, *PT, '--output_dir', out, '--log_dir', tmp_path / 'file')
    assert code == 2 and err == f"error: --log_dir {tmp_path / 'file'} is a file, not a folder\n"
    code, err = run_in_process(main_pretrain, capsys, *PT, '--output_dir', out, '--data_path', tmp_path / 'none')
    assert code == 2 and err == f"error: --data_path {tmp_path / 'none'}: no such file or folder\n"
    assert not out.exists()


def test_help_works_on_every_entry_point(capsys):
    for module in (main_pretrain, main_finetune, main_linprobe):
        with pytest.raises(SystemExit) as e:
            process.run_main(module.main, module.get_args_parser(), ['--help'])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert '--save_every_iters' in out and '[new]' in out and '-h, --help' in out


def test_a_log_dir_shared_with_another_run_hides_none_of_its_points(tmp_path, capsys):
    """Two runs (other --output_dir) in one --log_dir: the second one's writer gets no purge step, which would hide
    the first one's points, and it says so; the run that owns the folder purges as before."""
    shared = tmp_path / 'tb'
    shared.mkdir()
    (shared / 'events.out.tfevents.1.other').write_bytes(b'')
    (shared / run_mod.LOG_DIR_OWNER).write_text('/elsewhere/run1\n')
    args = parse(main_pretrain, '--log_dir', shared, '--output_dir', tmp_path / 'run2')
    assert run_mod.purge(args, None) is None and run_mod.purge(args, 3000) is None
    assert 'holds the TensorBoard events of another run (/elsewhere/run1)' in capsys.readouterr().out
    (shared / run_mod.LOG_DIR_OWNER).write_text(os.path.realpath(tmp_path / 'run2') + '\n')
    assert run_mod.purge(args, 3000) == 3000 and run_mod.purge(args, None) == 0
