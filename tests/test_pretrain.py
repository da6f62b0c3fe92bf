"""main_pretrain.py end to end: the reference's trajectory, checkpoints, resuming, and clear errors."""
import argparse
import json
import pathlib
import shutil

import pytest
import torch

from conftest import DATA, TINY, read_log, run_script, tb_scalars
from versions import exact_numbers_expected, stack_note
from conftest import pretrain_argv as tiny_args

TRAJECTORY = json.loads((DATA / 'pretrain_trajectory.json').read_text())
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """The reference's own command line (ViT-B at 224 on the tiny folder, two epochs)."""
    out = tmp_path_factory.mktemp('trajectory')
    argv = [a.replace('<tiny_imagefolder>', str(TINY)).replace('<output_dir>', str(out))
            for a in TRAJECTORY['args']]
    result = run_script(TRAJECTORY['script'], *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_reproduces_reference_log(reference_run):
    out, _ = reference_run
    rows = read_log(out)
    assert [r['epoch'] for r in rows] == [r['epoch'] for r in TRAJECTORY['log']]
    # (computed on versions.REFERENCE_STACK; elsewhere the losses only within 25%, see conftest._close)
    loss_rel = 1e-6 if exact_numbers_expected() else 0.25
    for ours, ref in zip(rows, TRAJECTORY['log']):
        assert set(ours) == set(ref)
        assert ours['train_loss'] == pytest.approx(ref['train_loss'], rel=loss_rel), stack_note()
        assert ours['train_lr'] == pytest.approx(ref['train_lr'], rel=1e-12)


def test_reproduces_reference_tensorboard_scalars(reference_run):
    out, _ = reference_run
    scalars = tb_scalars(out)
    for tag, points in TRAJECTORY['scalars'].items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        for (_, ours), (_, ref) in zip(scalars[tag], points):
            assert ours == pytest.approx(ref, rel=1e-6 if exact_numbers_expected() or tag == 'lr' else 0.25,
                                         abs=1e-12), (tag, stack_note())


def test_checkpoints_have_reference_keys_and_load_weights_only(reference_run):
    out, _ = reference_run
    # the reference keeps epoch 0 (epoch % 20 == 0) and the last epoch
    assert sorted(p.name for p in out.glob('checkpoint-*.pth')) == [
        'checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth']
    ckpt = torch.load(out / 'checkpoint-1.pth', map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'epoch', 'scaler', 'args'} <= set(ckpt)
    assert ckpt['epoch'] == 1 and ckpt['args']['model'] == 'mae_vit_base_patch16'
    assert 'decoder_pred.weight' in ckpt['model'] and 'pos_embed' in ckpt['model']
    last = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert torch.equal(last['model']['norm.weight'], ckpt['model']['norm.weight'])


def test_resume_continues_exactly(tmp_path, script):
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert script(*tiny_args(full, epochs=3)).returncode == 0
    assert script(*tiny_args(part, '--no_auto_resume', epochs=1)).returncode == 0
    r = script(*tiny_args(part, '--no_auto_resume', '--resume', part / 'checkpoint-0.pth', epochs=3))
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_log(part) == read_log(full)


def test_auto_resume_is_the_default(tmp_path, script):
    out = tmp_path / 'run'
    assert script(*tiny_args(out, epochs=1)).returncode == 0
    r = script(*tiny_args(out, epochs=2))
    assert r.returncode == 0
    assert 'Auto-resume: continuing from' in r.stdout
    assert [row['epoch'] for row in read_log(out)] == [0, 1]


def test_resumes_reference_checkpoint_with_pickled_namespace(tmp_path, script):
    """The reference stores args as an argparse.Namespace; --resume must still load it (weights_only)."""
    first = tmp_path / 'first'
    assert script(*tiny_args(first, epochs=1)).returncode == 0
    ckpt = torch.load(first / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    reference_style = {k: ckpt[k] for k in ('model', 'optimizer', 'epoch', 'scaler')}
    # as the reference's submitit runs save it: pathlib paths among the flags
    reference_style['args'] = argparse.Namespace(**{**ckpt['args'], 'output_dir': pathlib.PosixPath(first),
                                                    'job_dir': pathlib.PosixPath(first)})
    torch.save(reference_style, tmp_path / 'reference.pth')
    out = tmp_path / 'resumed'
    r = script(*tiny_args(out, '--resume', tmp_path / 'reference.pth', epochs=2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row['epoch'] for row in read_log(out)] == [1]


def test_input_size_sets_the_model(tmp_path, script):
    out = tmp_path / 'run'
    r = script('main_pretrain.py', '--model', 'mae_vit_tiny_patch4', '--input_size', '48', '--batch_size', '4',
               '--epochs', '1', '--data_path', TINY, '--device', 'cpu', '--num_workers', '0',
               '--output_dir', out, '--log_dir', out)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    assert ckpt['model']['pos_embed'].shape == (1, (48 // 4) ** 2 + 1, 64)


def _error(result):
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ''


def test_missing_data_path(tmp_path, script):
    r = script(*tiny_args(tmp_path / 'out'), '--data_path', tmp_path / 'nowhere')
    assert r.returncode == 2
    assert _error(r) == f"error: --data_path {tmp_path / 'nowhere'}: no such file or folder"


def test_missing_train_folder_and_empty_class(tmp_path, script):
    (tmp_path / 'data').mkdir()
    r = script(*tiny_args(tmp_path / 'out'), '--data_path', tmp_path / 'data')
    assert r.returncode == 2 and 'no image files' in _error(r)
    assert 'ImageFolder tree (train/<class>/<image>)' in _error(r)
    (tmp_path / 'data' / 'train' / 'cat').mkdir(parents=True)
    (tmp_path / 'data' / 'train' / 'dog').mkdir(parents=True)
    shutil.copy(TINY / 'train' / 'cat' / '0000.jpg', tmp_path / 'data' / 'train' / 'cat')
    r = script(*tiny_args(tmp_path / 'out'), '--data_path', tmp_path / 'data')
    assert r.returncode == 2 and _error(r).startswith('error: ') and 'dog' in _error(r)


def test_unknown_model_lists_valid_names(tmp_path, script):
    r = script(*tiny_args(tmp_path / 'out'), '--model', 'mae_vit_gigantic')
    assert r.returncode == 2
    assert 'mae_vit_gigantic' in _error(r) and 'mae_vit_large_patch16' in _error(r)
    assert not (tmp_path / 'out').exists()  # refused before anything was written


def test_resume_errors(tmp_path, script):
    r = script(*tiny_args(tmp_path / 'out'), '--resume', tmp_path / 'missing.pth')
    assert r.returncode == 2 and _error(r) == f"error: --resume {tmp_path / 'missing.pth'}: no such file"
    (tmp_path / 'junk.pth').write_text('not a checkpoint')
    r = script(*tiny_args(tmp_path / 'out2'), '--resume', tmp_path / 'junk.pth')
    assert r.returncode == 2 and 'cannot be read as a PyTorch checkpoint' in _error(r)
    # a checkpoint of another model: the message names the keys that differ
    from models_mae import MaskedAutoencoderViT
    other = MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pth')
    r = script(*tiny_args(tmp_path / 'out3'), '--resume', tmp_path / 'other.pth')
    assert r.returncode == 2
    assert 'does not fit --model mae_vit_tiny_patch4' in _error(r) and 'missing keys: blocks.1.' in _error(r)
    assert len(r.stderr.strip().splitlines()) == 1


def test_output_dir_not_writable(tmp_path, script):
    (tmp_path / 'file').write_text('')
    r = script(*tiny_args(tmp_path / 'file' / 'out'))
    assert r.returncode == 2 and _error(r) == (f"error: --output_dir {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} "
                                               f"is a file, not a folder")


def test_batch_larger_than_dataset(tmp_path, script):
    r = script(*tiny_args(tmp_path / 'out'), '--batch_size', '64')
    assert r.returncode == 2 and 'fewer than --batch_size 64' in _error(r)


def test_nonfinite_loss_stops_and_names_checkpoint(tmp_path, script):
    """A huge learning rate makes the loss non-finite: the run stops with one line naming the iteration and the
    last good checkpoint, which stays loadable."""
    out = tmp_path / 'run'
    r = script(*tiny_args(out, '--lr', '1e30', '--warmup_epochs', '0', epochs=3))
    assert r.returncode == 1, r.stderr[-2000:]
    line = _error(r)
    assert line.startswith('error: Loss is') and 'iteration' in line
    if (out / 'checkpoint-last.pth').exists():
        assert 'checkpoint-last.pth' in line or 'checkpoint-0.pth' in line
        torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
