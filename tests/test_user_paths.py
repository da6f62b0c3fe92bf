"""Paths a user names, tried as a hostile user would (issue 29's hunt): missing, empty, damaged, of the wrong kind,
unwritable, or aliasing another path. Each is one line naming the path, or a note where the run goes on."""
import importlib.util
import os
import shutil

import pytest
import torch

import export
import extract_features
import main_pretrain
from conftest import ROOT, TINY, run_in_process, save_pretrained

spec = importlib.util.spec_from_file_location('visualize', ROOT / 'demo' / 'visualize.py')
visualize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(visualize)


def test_the_model_card_shows_only_the_readable_rows_of_a_damaged_log(tmp_path):
    (tmp_path / 'log.txt').write_bytes(b'{"epoch": 0}\n\xff\xfe\n[1]\n{"epoch": 1}\n')
    assert export._log_rows(tmp_path / 'checkpoint-1.pth') == ['{"epoch": 0}', '{"epoch": 1}']
    (tmp_path / 'log.txt').unlink()
    (tmp_path / 'log.txt').mkdir()
    assert export._log_rows(tmp_path / 'checkpoint-1.pth') == []


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs /proc (Linux): a folder no one can create in')
def test_a_log_dir_that_cannot_be_made_is_one_line_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    real = main_pretrain.models_mae.MODELS['mae_vit_tiny_patch4']  # (the checks build it on the meta device)
    monkeypatch.setitem(main_pretrain.models_mae.MODELS, 'mae_vit_tiny_patch4', lambda **kwargs: real(**kwargs) if
                        torch.empty(0).device.type == 'meta' else pytest.fail('the model must not be built'))
    code, err = run_in_process(main_pretrain, capsys, '--model', 'mae_vit_tiny_patch4', '--input_size', 32,
                               '--data_path', TINY, '--device', 'cpu', '--output_dir', tmp_path / 'out', '--log_dir',
                               '/proc/mae_tb')
    assert code == 2 and err == "error: --log_dir /proc/mae_tb is not writable (No such file or directory)\n"


@pytest.mark.parametrize('make, expected', [
    (lambda p: p.write_bytes(b''), '{flag} {path}: a file, not a folder with train/ and val/'),
    (lambda p: (p / 'train').mkdir(parents=True),
     "{flag} {path} has no 'val/' folder ({flag} needs {path}/train/<class>/<image> and {path}/val/...)"),
])
@pytest.mark.parametrize('flag', ['--probe', '--knn'])
def test_the_evaluation_folder_of_extract_features_is_named_for_its_own_mode(tmp_path, capsys, make, expected, flag):
    path = tmp_path / 'data'
    make(path)
    code, err = run_in_process(extract_features, capsys, flag, path, '--random_init', '--model', 'vit_tiny_patch4')
    assert code == 2 and err == 'error: ' + expected.format(flag=flag, path=path) + '\n'


@pytest.mark.parametrize('out', ['photos', 'photos/figures', 'photos/grid.png'])
def test_visualize_writes_no_figure_among_the_images_of_a_folder_it_reads(tmp_path, capsys, out):
    photos = tmp_path / 'photos'
    photos.mkdir()
    shutil.copy(TINY / 'val' / 'cat' / '0000.jpg', photos / 'a.jpg')
    checkpoint = save_pretrained(tmp_path / 'mae_tiny.pth')
    code, err = run_in_process(visualize, capsys, '--checkpoint', checkpoint, photos, '--grid', '--out', tmp_path / out)
    where = 'is' if out == 'photos' else 'lies inside'
    assert code == 2 and err.startswith(f"error: --out {tmp_path / out} {where} {photos}, which visualize.py reads "
                                        f"images from: what is written there would be read as data")
    assert [p.name for p in photos.iterdir()] == ['a.jpg']
