"""main_linprobe.py end to end on the tiny folder: the reference's numbers, resuming (ours and the reference's
checkpoints), evaluation, global pooling with a trained fc_norm, and clear errors."""
import pytest
import torch

import main_linprobe
from conftest import (REFERENCE, TINY, assert_acc_lines, assert_log_matches, assert_scalars_match, one_line_error,
                      read_log, reference_argv, run_in_process, run_script, run_with_fault, save_pretrained,
                      tb_scalars, to_reference_format)

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp('pretrained') / 'mae_tiny.pth')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp('linprobe')
    result = run_script(*reference_argv('linprobe', pretrained, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_reproduces_reference_log_scalars_and_printed_accuracy(reference_run):
    out, result = reference_run
    assert_log_matches(read_log(out), REFERENCE['linprobe']['log'], pytest.approx)
    assert_scalars_match(tb_scalars(out), REFERENCE['linprobe']['scalars'], pytest.approx)
    assert_acc_lines(result.stdout, REFERENCE['linprobe']['acc_lines'])


def test_checkpoint_has_the_batchnorm_head(reference_run):
    out, _ = reference_run
    ckpt = torch.load(out / 'checkpoint-1.pth', map_location='cpu', weights_only=True)
    head = sorted(k for k in ckpt['model'] if k.startswith('head.'))
    assert head == ['head.0.num_batches_tracked', 'head.0.running_mean', 'head.0.running_var', 'head.1.bias',
                    'head.1.weight']
    assert [len(g['params']) for g in ckpt['optimizer']['param_groups']] == [2]


def test_resume_continues_exactly(tmp_path, pretrained):
    out = tmp_path / 'out'
    argv = reference_argv('linprobe', pretrained, out)
    first = run_script(*argv, '--epochs', '1')  # (the last --epochs wins)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(*argv)  # auto-resume from checkpoint-last.pth in --output_dir
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'Resume checkpoint' in second.stdout and 'is not loaded' in second.stdout
    assert_log_matches(read_log(out), REFERENCE['linprobe']['log'], pytest.approx)


def test_resume_of_reference_checkpoint_follows_the_reference(reference_run, tmp_path, pretrained):
    out, _ = reference_run
    ckpt = to_reference_format(out / 'checkpoint-0.pth', tmp_path / 'reference-format.pth')
    new = tmp_path / 'new'
    r = run_script(*reference_argv('linprobe', pretrained, new), '--resume', ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_log_matches(read_log(new), REFERENCE['linprobe_resumed']['log'], pytest.approx)
    assert_acc_lines(r.stdout, REFERENCE['linprobe_resumed']['acc_lines'])


def test_eval_resume(reference_run):
    out, _ = reference_run
    r = run_script('main_linprobe.py', '--eval', '--resume', out / 'checkpoint-1.pth', '--model', 'vit_tiny_patch4',
                   '--input_size', '32', '--nb_classes', '2', '--batch_size', '4', '--device', 'cpu',
                   '--num_workers', '0', '--data_path', TINY, '--output_dir', '', '--log_dir', '')
    assert r.returncode == 0, r.stderr[-3000:]
    assert_acc_lines(r.stdout, REFERENCE['linprobe']['acc_lines'][-1:])


def test_global_pool_trains_fc_norm(tmp_path, pretrained):
    out = tmp_path / 'out'
    argv = reference_argv('linprobe', pretrained, out)
    r = run_script(*argv, '--global_pool', '--epochs', '1')
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    # head.1.weight, head.1.bias, fc_norm.weight, fc_norm.bias: all in LARS, all got gradients
    assert [len(g['params']) for g in ckpt['optimizer']['param_groups']] == [4]
    assert len(ckpt['optimizer']['state']) == 4
    # fc_norm starts as the identity; the BatchNorm after it leaves it almost no gradient, but it does move
    assert ckpt['model']['fc_norm.bias'].abs().max() > 0
    assert read_log(out)[0]['n_parameters'] == 64 * 2 + 2 + 64 * 2
    before = torch.load(pretrained, map_location='cpu', weights_only=True)['model']
    assert torch.equal(ckpt['model']['blocks.1.mlp.fc1.weight'], before['blocks.1.mlp.fc1.weight'])


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, reference_run):
    out, _ = reference_run
    base = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '4',
            '--device', 'cpu', '--num_workers', '0', '--data_path', TINY, '--output_dir', tmp_path / 'o',
            '--log_dir', tmp_path / 'o', '--no_auto_resume']
    # a fine-tuning checkpoint has no BatchNorm head
    ft = tmp_path / 'ft.pth'
    torch.save({'model': {'head.weight': torch.zeros(2, 64)}}, ft)
    for extra, expect in ((['--model', 'mae_vit_tiny_patch4'], 'is not a classification model; choose one of'),
                          (['--resume', ft], 'does not fit --model vit_tiny_patch4'),
                          (['--nb_classes', '1'], '--nb_classes 1 is smaller than the 2 classes')):
        code, err = run_in_process(main_linprobe, capsys, *base, *extra)
        err = err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and expect in err[0], err
    line = one_line_error(run_script('main_linprobe.py', *base, '--finetune', tmp_path / 'missing.pth'))
    assert 'no such file' in line


def test_stop_mid_epoch_then_resume_matches_reference(tmp_path, pretrained):
    out = tmp_path / 'out'
    argv = reference_argv('linprobe', pretrained, out)
    stopped = run_with_fault('stop:6', argv)  # epoch 1, iteration 2 of 4
    assert stopped.returncode == 1 and stopped.stderr.strip().splitlines()[-1].startswith('stopped: ')
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['resume_iter'] == 2
    resumed = run_script(*argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming epoch 1 at iteration 2 of 4' in resumed.stdout
    assert_log_matches(read_log(out), REFERENCE['linprobe']['log'], pytest.approx)
    assert_scalars_match(tb_scalars(out), REFERENCE['linprobe']['scalars'], pytest.approx)
