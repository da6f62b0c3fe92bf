"""main_finetune.py end to end on the tiny folder: the reference's numbers, evaluation of reference-format
checkpoints, partial fine-tuning, and clear errors."""
import shutil
from functools import partial

import pytest
import torch

import main_finetune
from conftest import (REFERENCE, TINY, assert_acc_lines, assert_log_matches, assert_scalars_match, one_line_error,
                      read_log, reference_argv, run_in_process, run_script, run_with_fault, save_pretrained,
                      tb_scalars, to_reference_format)

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp('pretrained') / 'mae_tiny.pth')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, pretrained):
    """The reference's recipe in small: Mixup + CutMix, gradient clipping, accumulation, DataLoader workers."""
    out = tmp_path_factory.mktemp('finetune')
    result = run_script(*reference_argv('finetune', pretrained, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_reproduces_reference_log_and_printed_accuracy(reference_run):
    out, result = reference_run
    assert_log_matches(read_log(out), REFERENCE['finetune']['log'], pytest.approx)
    assert_acc_lines(result.stdout, REFERENCE['finetune']['acc_lines'])
    assert 'Max accuracy: 50.00%' in result.stdout


def test_reproduces_reference_tensorboard_scalars(reference_run):
    out, _ = reference_run
    assert_scalars_match(tb_scalars(out), REFERENCE['finetune']['scalars'], pytest.approx)


def test_checkpoints_every_epoch_load_weights_only(reference_run):
    out, _ = reference_run
    assert sorted(p.name for p in out.glob('checkpoint-*.pth')) == [
        'checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth']
    ckpt = torch.load(out / 'checkpoint-1.pth', map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'epoch', 'scaler', 'args', 'max_accuracy'} <= set(ckpt)
    assert 'fc_norm.weight' in ckpt['model'] and 'norm.weight' not in ckpt['model']
    assert ckpt['model']['head.weight'].shape == (2, 64)


def test_eval_of_reference_format_checkpoint_needs_only_val(reference_run, tmp_path):
    out, _ = reference_run
    data = tmp_path / 'data'
    shutil.copytree(TINY / 'val', data / 'val')  # evaluation does not need train/
    ckpt = to_reference_format(out / 'checkpoint-1.pth', tmp_path / 'reference-format.pth')
    r = run_script('main_finetune.py', '--eval', '--resume', ckpt, '--model', 'vit_tiny_patch4', '--input_size',
                   '32', '--nb_classes', '2', '--batch_size', '4', '--device', 'cpu', '--num_workers', '0',
                   '--data_path', data, '--output_dir', '', '--log_dir', '')
    assert r.returncode == 0, r.stderr[-3000:]
    assert_acc_lines(r.stdout, REFERENCE['finetune']['acc_lines'][-1:])
    assert 'Accuracy of the network on the 8 test images: 50.0%' in r.stdout


@pytest.mark.parametrize('k', [0, 1])
def test_partial_fine_tuning_trains_only_the_last_blocks(tmp_path, pretrained, k):
    out = tmp_path / 'out'
    r = run_script('main_finetune.py', '--train_blocks', k, '--model', 'vit_tiny_patch4', '--input_size', '32',
                   '--nb_classes', '2', '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0',
                   '--blr', '1e-2', '--device', 'cpu', '--num_workers', '0', '--data_path', TINY,
                   '--finetune', pretrained, '--output_dir', out, '--log_dir', out)
    assert r.returncode == 0, r.stderr[-3000:]
    after = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    before = torch.load(pretrained, map_location='cpu', weights_only=True)['model']
    trained = [n for n in after['model']
               if n.startswith(('fc_norm.', 'head.')) or (k == 1 and n.startswith('blocks.1.'))]
    for name, value in after['model'].items():
        if name in trained:
            assert name in before or name.startswith(('fc_norm.', 'head.'))
            if name in before:
                assert not torch.equal(value, before[name]), f'{name} was not trained'
        else:
            assert torch.equal(value, before[name]), f'{name} is frozen but changed'
    assert sum(len(g['params']) for g in after['optimizer']['param_groups']) == len(trained)
    assert len(after['optimizer']['state']) == len(trained)
    n_trained = sum(after['model'][n].numel() for n in trained)
    assert read_log(out)[0]['n_parameters'] == n_trained
    assert f'training the last {k} of 2 blocks' in r.stdout


# ---------------------------------------------------------------------------------------------------- errors
def tiny(tmp_path, *extra, data=TINY):
    return ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '4',
            '--device', 'cpu', '--num_workers', '0', '--data_path', data, '--output_dir', tmp_path / 'out',
            '--log_dir', tmp_path / 'out', *extra]


def test_bad_finetune_file_from_the_command_line(tmp_path):
    notes = tmp_path / 'notes.txt'
    notes.write_text('hello')
    line = one_line_error(run_script('main_finetune.py', *tiny(tmp_path, '--finetune', notes)))
    assert 'cannot be read as a PyTorch checkpoint' in line and str(notes) in line
    assert not (tmp_path / 'out' / 'log.txt').exists()


@pytest.mark.parametrize('case', ['not_vit', 'width', 'missing_val', 'nb_classes', 'model', 'train_blocks',
                                  'train_blocks_negative', 'resume_mismatch'])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, pretrained, case):
    extra, data = [], TINY
    if case == 'not_vit':
        torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, tmp_path / 'x.pth')
        extra, expect = ['--finetune', tmp_path / 'x.pth'], 'not an MAE/ViT checkpoint'
    elif case == 'width':
        import models_mae
        narrow = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
        torch.save({'model': narrow.state_dict()}, tmp_path / 'narrow.pth')
        extra = ['--finetune', tmp_path / 'narrow.pth']
        expect = 'does not fit --model vit_tiny_patch4 (another width or patch size?): other shapes'
    elif case == 'missing_val':
        shutil.copytree(TINY / 'train', tmp_path / 'data' / 'train')
        data, expect = tmp_path / 'data', "has no 'val/' folder"
    elif case == 'nb_classes':
        data, expect = TINY.parent / 'tiny_imagefolder_b', '--nb_classes 2 is smaller than the 3 classes in'
    elif case == 'model':
        extra, expect = ['--model', 'vit_small'], 'choose one of: vit_base_patch16, vit_large_patch16'
    elif case == 'train_blocks':
        extra, expect = ['--train_blocks', '3', '--finetune', pretrained], 'has only 2 blocks'
    elif case == 'train_blocks_negative':
        extra, expect = ['--train_blocks', '-2'], '--train_blocks must be -1 (all)'
    else:
        ckpt = tmp_path / 'lp.pth'
        torch.save({'model': {'head.0.running_mean': torch.zeros(64)}}, ckpt)
        extra, expect = ['--resume', ckpt, '--no_auto_resume'], 'does not fit --model vit_tiny_patch4'
    code, err = run_in_process(main_finetune, capsys, *tiny(tmp_path, *extra, data=data))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and expect in lines[0], err


def single_process_argv(out, pretrained):
    return ['main_finetune.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2',
            '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '1', '--blr', '5e-2', '--mixup', '0.8',
            '--cutmix', '1.0', '--device', 'cpu', '--num_workers', '0', '--data_path', TINY,
            '--finetune', pretrained, '--output_dir', out, '--log_dir', out]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp('uninterrupted')
    r = run_script(*single_process_argv(out, pretrained))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_stop_mid_epoch_then_resume_is_exact(tmp_path, pretrained, uninterrupted):
    """Single process, --num_workers 0: RandAugment, random erasing and Mixup/CutMix draws all continue exactly."""
    argv = partial(single_process_argv, pretrained=pretrained)
    whole, part = uninterrupted, tmp_path / 'part'
    stopped = run_with_fault('stop:3', argv(part))  # epoch 0, iteration 3 of 4
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    resumed = run_script(*argv(part))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming epoch 0 at iteration 3 of 4' in resumed.stdout
    assert (part / 'log.txt').read_text() == (whole / 'log.txt').read_text()
    assert tb_scalars(part) == tb_scalars(whole)


@pytest.mark.parametrize('fault', ['step:1:2',   # killed in the middle of epoch 1: epoch 1 is done again
                                   'save:1',     # killed while writing the very first checkpoint: starts afresh
                                   'save:2'])    # killed while writing epoch 1's checkpoint (after its log row)
def test_sigkill_then_resume_gives_identical_log(tmp_path, pretrained, uninterrupted, fault):
    out = tmp_path / 'out'
    crashed = run_with_fault(fault, single_process_argv(out, pretrained))
    assert crashed.returncode == -9
    resumed = run_script(*single_process_argv(out, pretrained))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / 'log.txt').read_text() == (uninterrupted / 'log.txt').read_text()
    assert tb_scalars(out) == tb_scalars(uninterrupted)
    assert 'Max accuracy' in resumed.stdout


def test_bad_validation_image_keeps_the_epochs_training(tmp_path, pretrained, uninterrupted):
    """Evaluation fails on a bad val/ file after epoch 0's training: that training is kept, and once the file is
    fixed the same command continues with the evaluation and ends with the uninterrupted run's log."""
    data = tmp_path / 'data'
    shutil.copytree(TINY, data)
    bad = data / 'val' / 'cat' / 'zz_bad.jpg'
    bad.write_text('not an image')
    out = tmp_path / 'out'
    argv = [a if a != TINY else data for a in single_process_argv(out, pretrained)]
    failed = run_script(*argv)
    assert one_line_error(failed).startswith(f'error: bad image file {bad} ')
    assert 'Kept the training of epoch 0' in failed.stdout
    bad.unlink()
    resumed = run_script(*argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming epoch 0 at iteration 4 of 4' in resumed.stdout
    assert (out / 'log.txt').read_text() == (uninterrupted / 'log.txt').read_text()
