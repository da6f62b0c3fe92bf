"""Hugging Face datasets as --data_path (util/data/hf_datasets.py): a DatasetDict written by ``make_shards.py --to hf``
from the tiny ImageFolder holds its images in the same order, so runs on it write the folder's log.txt; columns
detected or given by flag; mistakes in one line."""
import argparse

import numpy as np
import pytest

pytest.importorskip('datasets')
import datasets  # noqa: E402

import extract_features  # noqa: E402
from conftest import TINY, one_line_error, pretrain_argv, run_script, save_pretrained  # noqa: E402
from util.data import hf_datasets  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.flag_checks import check_other_source  # noqa: E402
from util.data.image_folder import image_folder, listed  # noqa: E402
from util.data.image_sources import pretrain_dataset  # noqa: E402


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp('hf') / 'tiny'
    r = run_script('make_shards.py', TINY, out, '--to', 'hf')
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(autouse=True)
def default_columns():
    hf_datasets.use_columns(argparse.Namespace())
    yield
    hf_datasets.use_columns(argparse.Namespace())


def plain_dataset(tmp_path, **columns):
    """A single Dataset (no splits) of two images of TINY, with ``columns`` beside the image column ``img``."""
    paths = sorted((TINY / 'train' / 'cat').iterdir())[:2]
    data = {'img': [{'bytes': p.read_bytes(), 'path': p.name} for p in paths], **columns}
    features = datasets.Features({'img': datasets.Image(), **{k: datasets.Value('int64') for k in columns}})
    folder = tmp_path / 'plain'
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(folder))
    return str(folder)


def test_the_saved_splits_are_the_folders(tiny_hf):
    assert hf_datasets.is_hf(str(tiny_hf)) and not hf_datasets.is_hf(str(TINY))
    for split in ('train', 'val'):
        folder = image_folder(TINY, split, None, numbered_as='train')
        saved = image_folder(str(tiny_hf), split, None)
        assert saved.classes == ['airplane', 'cat'] and saved.targets == folder.targets
        for k in (0, len(folder) - 1):
            assert saved.samples[k][0].read() == open(folder.samples[k][0], 'rb').read()
            assert np.array_equal(np.asarray(saved[k][0]), np.asarray(folder[k][0]))
    assert str(saved.samples[0][0]).endswith('[validation][0]')


def test_columns_detected_or_given(tmp_path):
    path = plain_dataset(tmp_path, y=[3, 1])
    assert len(pretrain_dataset(path)) == 2  # the Image column found; no labels needed
    with pytest.raises(UsageError, match='no ClassLabel column for the classes \\(give --hf_label_column\\)'):
        listed(path, 'train')
    hf_datasets.use_columns(argparse.Namespace(hf_image_column='img', hf_label_column='y'))
    data = listed(path, 'train')
    assert data.targets == [3, 1] and data.classes == ['0', '1', '2', '3']
    hf_datasets.use_columns(argparse.Namespace(hf_image_column='y'))
    with pytest.raises(UsageError, match='--hf_image_column y: a column of Value, not of images'):
        listed(path, 'train', labelled=False)
    with pytest.raises(UsageError, match='one Dataset without splits: the val split needs a DatasetDict'):
        listed(path, 'val')


def test_column_flags_are_for_hf_datasets_only():
    args = argparse.Namespace(data_path=str(TINY), hf_image_column='image', hf_label_column=None)
    with pytest.raises(UsageError, match=f'--hf_image_column is for a Hugging Face dataset as --data_path; {TINY} '
                                         'is not one'):
        check_other_source(args, [])


def test_knn_of_extract_features_on_a_saved_dataset(tiny_hf, tmp_path, capsys):
    pretrained = save_pretrained(tmp_path / 'mae.pth')
    for data in (TINY, tiny_hf):
        extract_features.main(extract_features.get_args_parser().parse_args(
            [str(data), '--knn', '--checkpoint', str(pretrained), '--device', 'cpu']))
    out = [line.split(': ', 1)[1].rsplit('; took', 1)[0]  # (the images and numbers, not the time taken)
           for line in capsys.readouterr().out.splitlines() if line.startswith('kNN of')]
    assert len(out) == 2 and out[0] == out[1] and out[0].startswith('16 train and 8 val images: top-1 ')


@pytest.mark.slow
def test_pretraining_on_a_saved_dataset_writes_the_folders_log(tiny_hf, tmp_path):
    folder = run_script(*pretrain_argv(tmp_path / 'folder'))
    saved = run_script(*pretrain_argv(tmp_path / 'hf', '--data_path', tiny_hf))
    assert folder.returncode == 0 and saved.returncode == 0, saved.stderr[-2000:]
    assert (tmp_path / 'hf' / 'log.txt').read_text() == (tmp_path / 'folder' / 'log.txt').read_text()


@pytest.mark.slow
def test_fine_tuning_on_a_saved_dataset_evaluates_its_validation_split(tiny_hf, tmp_path):
    pretrained = save_pretrained(tmp_path / 'mae.pth')
    logs = []
    for name, data in (('folder', TINY), ('hf', tiny_hf)):
        r = run_script('main_finetune.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2',
                       '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '1', '--device', 'cpu',
                       '--num_workers', '0', '--data_path', data, '--finetune', pretrained,
                       '--output_dir', tmp_path / name, '--log_dir', tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
        assert 'Accuracy of the network on the 8 test images' in r.stdout
        logs.append((tmp_path / name / 'log.txt').read_text())
    assert logs[0] == logs[1]


@pytest.mark.slow
def test_a_hub_name_not_in_the_cache_is_one_line(tmp_path):
    offline = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf_home')}
    r = run_script(*pretrain_argv(tmp_path / 'out', '--data_path', 'hf:nobody/no-such-dataset'), env=offline)
    line = one_line_error(r)
    assert line.startswith("error: --data_path hf:nobody/no-such-dataset: cannot be loaded as a Hugging Face dataset "
                           "(not in the datasets cache, and no network to download it): ")
    assert not (tmp_path / 'out').exists()
