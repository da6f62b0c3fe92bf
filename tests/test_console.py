"""What a user reads and submits: the submitit scripts check before queuing and run debug jobs in the foreground;
start-up notes on silent traps (--nb_classes, a changed effective batch size); TensorBoard beside the checkpoints;
a console without misleading lines, with a whole-run ETA."""
import pytest
import torch

import util.checkpoints.resume as resume
from conftest import TINY, pretrain_argv, run_script, save_pretrained
from util.datasets import check_classes
from util.data.image_folder import image_folder

submitit = pytest.importorskip("submitit")

import submitit_linprobe  # noqa: E402
import submitit_pretrain  # noqa: E402


# ---------------------------------------------------------------------------------------------------- submitit
def submit_argv(job_dir, *extra):
    return ['--nodes', '1', '--ngpus', '1', '--job_dir', str(job_dir), '--model', 'mae_vit_tiny_patch4',
            '--input_size', '32', '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--device', 'cpu',
            '--num_workers', '0', '--data_path', str(TINY), *extra]


@pytest.mark.parametrize('extra,expect', [
    (['--data_path', '/nope'], 'error: --data_path /nope: no such file or folder'),
    (['--model', 'mae_vit_gigantic'], 'error: --model mae_vit_gigantic is not a pre-training model; choose one of'),
    (['--blr', '-1'], 'error: --blr must be positive, got -1.0'),
    (['--batch_size', '64'], 'error: 16 training images give 16 per process over 1 process(es), fewer than '
                             '--batch_size 64'),
])
def test_submitit_checks_before_anything_is_queued(tmp_path, capsys, extra, expect):
    with pytest.raises(SystemExit) as e:
        submitit_pretrain.main(submit_argv(tmp_path / 'jobs', '--cluster', 'local', *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(expect), err
    assert not list((tmp_path / 'jobs').glob('**/*.pkl'))  # nothing was submitted


@pytest.mark.slow
def test_debug_cluster_runs_the_job_in_the_foreground(tmp_path):
    pretrained = save_pretrained(tmp_path / 'mae_tiny.pth')
    submitit_linprobe.main(['--cluster', 'debug', '--job_dir', str(tmp_path / 'x'), '--nodes', '1', '--ngpus', '1',
                            '--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--epochs', '1',
                            '--nb_classes', '2', '--data_path', str(TINY), '--device', 'cpu', '--num_workers', '0',
                            '--finetune', str(pretrained)])
    assert (tmp_path / 'x' / 'log.txt').read_text().count('"epoch": 0') == 1
    assert (tmp_path / 'x' / 'checkpoint-0.pth').exists()


# ---------------------------------------------------------------------------------------------------- notes
def test_nb_classes_above_the_class_folders_is_said(capsys):
    train, val = image_folder(str(TINY), 'train', None), image_folder(str(TINY), 'val', None)
    check_classes(type('A', (), {'nb_classes': 1000})(), train, val)
    assert ("Note: --nb_classes 1000 is 998 more than the 2 class folders in " in capsys.readouterr().out)
    check_classes(type('A', (), {'nb_classes': 2})(), train, val)
    assert capsys.readouterr().out == ''


def test_resuming_on_fewer_processes_says_what_changed(capsys):
    args = type('A', (), dict(batch_size=4, accum_iter=1, lr=4 * 1e-3 / 256, start_epoch=3))()
    checkpoint = {'epoch': 2, 'rng': [{}, {}], 'args': {'batch_size': 4, 'accum_iter': 1, 'world_size': 2,
                                                        'lr': 8 * 1e-3 / 256}}
    assert resume.continue_position(resume.Start(epoch=3), checkpoint, args, 8).purge_step == 3000
    out = capsys.readouterr().out
    assert ('Note: the effective batch size (batch_size x accum_iter x processes) is 4, it was 8: the lr is '
            '1.56e-05, it was 3.13e-05. To keep the recipe, keep the effective batch size (e.g. --accum_iter 2)') in out
    assert 'its random streams are for 2 processes, this run has 1; continuing with fresh random streams' in out


# ---------------------------------------------------------------------------------------------------- console
@pytest.mark.slow
def test_pretraining_console_and_tensorboard_beside_the_checkpoints(tmp_path):
    out = tmp_path / 'out'
    argv = [a for a in pretrain_argv(out, epochs=2) if a not in ('--log_dir',)]
    argv.remove(out)  # (the --log_dir value; --output_dir keeps its own)
    r = run_script(*argv, '--output_dir', out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(out.glob('events.out.tfevents.*'))  # --log_dir follows --output_dir
    assert 'Sampler_train' not in r.stdout and 'distributed init' not in r.stdout
    assert "Precision: fp32 (--amp fp16 applies on CUDA only; --amp bf16 runs bf16 autocast on the CPU)" in r.stdout
    assert 'Epoch 0 took 0:00:0' in r.stdout and '1 epoch(s) left, the run ends in about 0:00:0' in r.stdout
    assert 'Epoch 1 took' in r.stdout and '0 epoch(s) left' in r.stdout


@pytest.mark.slow
def test_finetune_console_and_eval(tmp_path):
    pretrained = save_pretrained(tmp_path / 'mae_tiny.pth')
    out = tmp_path / 'out'
    base = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '4',
            '--device', 'cpu', '--data_path', TINY]
    r = run_script('main_finetune.py', *base, '--epochs', '1', '--num_workers', '0', '--finetune', pretrained,
                   '--output_dir', out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '_IncompatibleKeys' not in r.stdout and 'decoder_blocks.0' not in r.stdout
    assert (f"Loaded the encoder of {pretrained}: 28 tensors; not used: decoder_blocks, decoder_embed, decoder_norm, "
            f"decoder_pos_embed, decoder_pred, mask_token, norm; initialised afresh: fc_norm.bias, fc_norm.weight, "
            f"head.bias, head.weight") in r.stdout
    r = run_script('main_finetune.py', *base, '--eval', '--resume', out / 'checkpoint-0.pth', '--num_workers', '10',
                   '--output_dir', tmp_path / 'unused')
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / 'unused').exists()
    assert 'actual lr' not in r.stdout and 'effective batch size' not in r.stdout
    assert r.stderr.count('This DataLoader will create') <= 1
    assert torch.load(out / 'checkpoint-0.pth', weights_only=True)['args']['log_dir'] == str(out)


@pytest.mark.slow
def test_pretraining_start_up_lines_appear_once(tmp_path):
    """A flat folder with --data_stats auto (its images listed twice: measured, then loaded): every start-up line
    once, the epochs' own lines aside."""
    flat = tmp_path / 'flat'
    flat.mkdir()
    for image in sorted((TINY / 'train').glob('*/*.jpg')):
        (flat / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    out = tmp_path / 'out'
    argv = pretrain_argv(out, '--data_stats', 'auto', epochs=1)
    argv[argv.index(TINY)] = flat
    r = run_script(*argv)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(f"--data_path {flat}: 16 images in {flat} (searched recursively; no labels)") == 1
    lines = [line.split('] ', 1)[1] for line in r.stdout.splitlines() if line.startswith('[')]  # (timestamped)
    start_up = [line for line in lines if not line.startswith(('Epoch', 'Averaged stats'))]
    assert 'Start training for 1 epochs' in start_up and 'Data statistics (--data_stats auto)' in r.stdout
    assert len(start_up) == len(set(start_up)), [line for line in start_up if start_up.count(line) > 1]
