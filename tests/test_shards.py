"""Tar shards as --data_path (util/data/shards.py, make_shards.py): written from the tiny ImageFolder by the converter,
the shards give the scripts the same samples at the same indices, so every run on them must write the same log.txt
as on the folder (pre-training, fast_cpu, fine-tuning with val/, linear probing, the kNN monitor, two processes on
uneven shards, a kill mid-epoch and the same command again); bad shards stop with one line."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

import extract_features
import main_finetune
import main_pretrain
from conftest import (TINY, pretrain_argv, read_log, resume_argv, run_in_process, run_script,
                      run_with_fault, save_pretrained)
from util.data import shards
from util.errors import UsageError
from util.data.image_folder import image_folder, listed
from util.data.image_sources import check_pretrain_path, pretrain_dataset


def make_shards(src, out, *extra):
    r = run_script('make_shards.py', src, out, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope='module')
def tiny_shards(tmp_path_factory):
    """TINY as shards of at most 5 samples: train 5+5+5+1 (uneven), val 5+3, classes.json."""
    return make_shards(TINY, tmp_path_factory.mktemp('shards') / 'tiny', '--samples_per_shard', '5')


def tar_of(path, members):
    """A tar at ``path`` of ``members`` {name: bytes}, in order."""
    with tarfile.open(path, 'w') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg_bytes(k=0):
    return sorted((TINY / 'train' / 'cat').iterdir())[k].read_bytes()


# ---------------------------------------------------------------------------------------------------- the converter
def test_converter_writes_the_folders_samples_in_order(tiny_shards):
    assert sorted(p.name for p in (tiny_shards / 'train').glob('*.tar')) == [f'train-00000{k}.tar' for k in range(4)]
    assert len(list((tiny_shards / 'val').glob('*.tar'))) == 2
    assert json.loads((tiny_shards / 'classes.json').read_text()) == ['airplane', 'cat']
    for split in ('train', 'val'):
        folder = image_folder(TINY, split, None, numbered_as='train')
        sharded = image_folder(tiny_shards, split, None)
        assert sharded.classes == folder.classes and sharded.targets == folder.targets
        assert len(sharded) == len(folder) == (16 if split == 'train' else 8)
        for (member, _), (path, _) in zip(sharded.samples, folder.samples):
            assert member.read() == open(path, 'rb').read()
            assert str(member).endswith('.jpg') and '.tar:' in str(member)
    # the index of each shard is cached beside it
    assert (tiny_shards / 'train' / 'train-000003.tar.index.json').is_file()


def test_pretraining_reads_the_same_pixels(tiny_shards):
    folder, sharded = pretrain_dataset(str(TINY)), pretrain_dataset(str(tiny_shards))
    assert len(sharded) == 16
    for k in (0, 7, 15):
        a, b = np.asarray(folder[k][0]), np.asarray(sharded[k][0])
        assert a.shape == b.shape and (a == b).all()


def test_patterns_single_tars_and_pipe_urls(tiny_shards, tmp_path, monkeypatch):
    pattern = str(tiny_shards / 'train' / 'train-{000000..000003}.tar')
    assert shards.is_shards(pattern) and shards.is_shards(str(tiny_shards))
    assert not shards.is_shards(str(TINY))
    assert len(pretrain_dataset(pattern)) == 16
    assert len(pretrain_dataset(str(tiny_shards / 'train' / 'train-000001.tar'))) == 5
    # the val split of a pattern: 'train' replaced by 'val' in the file and folder names, with its own range
    assert len(listed(str(tiny_shards / 'train' / 'train-{000000..000001}.tar'), 'val')) == 8
    with pytest.raises(UsageError, match="must contain 'train'"):
        shards.split_urls(str(tmp_path / 'x-{000000..000001}.tar'), 'val')
    monkeypatch.setenv('MAE_SHARD_CACHE', str(tmp_path / 'cache'))
    url = f"pipe:cat {tiny_shards / 'train' / 'train-000000.tar'}"
    piped = pretrain_dataset(url)
    assert len(piped) == 5 and piped.samples[0][0].read() == pretrain_dataset(str(tiny_shards)).samples[0][0].read()
    assert len(list((tmp_path / 'cache').iterdir())) >= 1  # copied once into the cache


def test_a_read_only_folder_keeps_the_index_in_memory(tmp_path, monkeypatch):
    folder = tmp_path / 'ro'
    folder.mkdir()
    tar_of(folder / 'a.tar', {'x.jpg': jpeg_bytes(), 'x.cls': b'1', 'y.jpg': jpeg_bytes(1), 'y.cls': b'0'})

    def read_only(*_):  # (the tests may run as root, whom a folder's mode does not stop)
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(os, 'replace', read_only)
    data = listed(str(folder), 'train')
    assert data.targets == [1, 0] and data.classes == ['0', '1']
    assert sorted(p.name for p in folder.iterdir()) == ['a.tar']  # no index, no temporary file
    assert listed(str(folder), 'train').targets == [1, 0]  # (from memory)


def test_samples_of_two_ranks_cover_every_sample_once_with_equal_steps(tiny_shards):
    """The map-style dataset takes the reference's DistributedSampler: uneven shards (5, 5, 5, 1) or not, each rank
    gets the same count, and together they see every index of the epoch."""
    data = pretrain_dataset(str(tiny_shards))
    parts = [list(torch.utils.data.DistributedSampler(data, num_replicas=2, rank=r, shuffle=True)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 8
    assert sorted(parts[0] + parts[1]) == list(range(16))


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('case, expected', [
    ('pattern', 'of its 4 shards do not exist'),
    ('truncated', 'is not a readable tar file'),
    ('no image', 'have no image member'),
    ('not a number', "not a class number"),
])
def test_bad_shards_are_one_line(tmp_path, case, expected):
    folder = tmp_path / 'shards'
    folder.mkdir()
    path = str(folder)
    if case == 'pattern':
        path = str(folder / 'train-{000000..000003}.tar')
    elif case == 'truncated':
        whole = tar_of(tmp_path / 'whole.tar', {'a.jpg': jpeg_bytes(), 'b.jpg': jpeg_bytes(1)}).read_bytes()
        (folder / 'a.tar').write_bytes(whole[:1024 + 300])  # cut inside the second member
    elif case == 'no image':
        tar_of(folder / 'a.tar', {'a.jpg': jpeg_bytes(), 'b.json': b'{}'})
    else:
        tar_of(folder / 'a.tar', {'a.jpg': jpeg_bytes(), 'a.cls': b'cat'})
    with pytest.raises(UsageError, match=expected) as e:
        check_pretrain_path(path)
    assert '\n' not in str(e.value)


def test_a_member_that_is_not_an_image_is_named_or_skipped_and_counted(tmp_path):
    folder = tmp_path / 'shards'
    folder.mkdir()
    tar_of(folder / 'a.tar', {'a.jpg': jpeg_bytes(), 'b.jpg': b'not a jpeg', 'c.jpg': jpeg_bytes(1)})
    with pytest.raises(UsageError, match=r'bad image file .*a\.tar:b\.jpg \(not an image file PIL can read\)'):
        pretrain_dataset(str(folder))[1]
    data = pretrain_dataset(str(folder), skip_bad=True)
    img, _ = data[1]  # replaced by the next readable sample
    assert np.asarray(img).shape == np.asarray(data[2][0]).shape
    from util.data.image_folder import skipped_images
    assert skipped_images(data) == 1


def test_fine_tuning_needs_a_class_per_sample(tmp_path, capsys):
    folder = tmp_path / 'shards'
    for split in ('train', 'val'):
        (folder / split).mkdir(parents=True)
        tar_of(folder / split / 'a.tar', {'a.jpg': jpeg_bytes(), 'a.cls': b'0', 'b.jpg': jpeg_bytes(1)})
    code, err = run_in_process(main_finetune, capsys, '--data_path', folder, '--model', 'vit_tiny_patch4',
                               '--input_size', '32', '--nb_classes', '2', '--device', 'cpu',
                               '--output_dir', tmp_path / 'out')
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(
        "a.tar: sample b has no b.cls member (its class number): fine-tuning, linear probing and kNN need one per "
        "sample (make_shards.py from an ImageFolder tree writes them)")
    assert not (tmp_path / 'out').exists()  # before anything is written


def test_dali_is_refused_on_shards(tiny_shards, tmp_path, capsys):
    code, err = run_in_process(main_pretrain, capsys, *pretrain_argv(tmp_path / 'out')[1:], '--data_path',
                               tiny_shards, '--data_loader', 'dali', '--device', 'cuda')
    assert code == 2 and ('dali' in err.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- the scripts
@pytest.mark.slow
@pytest.mark.parametrize('extra', [[], ['--data_loader', 'fast_cpu']])
def test_pretraining_on_shards_writes_the_folders_log(tiny_shards, tmp_path, extra):
    folder = run_script(*pretrain_argv(tmp_path / 'folder', *extra))
    sharded = run_script(*pretrain_argv(tmp_path / 'shards', *extra, '--data_path', tiny_shards))
    assert folder.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    assert (tmp_path / 'shards' / 'log.txt').read_text() == (tmp_path / 'folder' / 'log.txt').read_text()


@pytest.mark.slow
def test_kill_mid_epoch_then_the_same_command_gives_the_same_log(tiny_shards, tmp_path):
    argv = resume_argv(tmp_path / 'full', '--save_every_iters', '2', '--data_path', tiny_shards)
    full = run_script(*argv)
    assert full.returncode == 0, full.stderr[-2000:]
    argv = resume_argv(tmp_path / 'killed', '--save_every_iters', '2', '--data_path', tiny_shards)
    killed = run_with_fault('step:1:3', argv)
    assert killed.returncode == -9
    resumed = run_script(*argv)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'Resuming epoch 1 at iteration 2' in resumed.stdout
    assert (tmp_path / 'killed' / 'log.txt').read_text() == (tmp_path / 'full' / 'log.txt').read_text()


def classifier_argv(script, data, out, pretrained):
    return [script, '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '4',
            '--epochs', '2', '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', '0', '--data_path', data,
            '--finetune', pretrained, '--output_dir', out, '--log_dir', out]


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_finetune.py', 'main_linprobe.py'])
def test_classification_on_shards_evaluates_val_as_the_folder(tiny_shards, tmp_path, script):
    pretrained = save_pretrained(tmp_path / 'mae.pth')
    logs = []
    for name, data in (('folder', TINY), ('shards', tiny_shards)):
        r = run_script(*classifier_argv(script, data, tmp_path / name, pretrained))
        assert r.returncode == 0, r.stderr[-2000:]
        assert 'Accuracy of the network on the 8 test images' in r.stdout
        logs.append((tmp_path / name / 'log.txt').read_text())
    assert logs[0] == logs[1]
    assert 'test_acc1' in logs[1]


@pytest.mark.slow
def test_knn_monitor_on_shards(tiny_shards, tmp_path):
    knn = ['--knn_every', '1', '--epochs', '1']
    folder = run_script(*pretrain_argv(tmp_path / 'folder', *knn, '--knn_data_path', TINY))
    sharded = run_script(*pretrain_argv(tmp_path / 'shards', *knn, '--knn_data_path', tiny_shards))
    assert folder.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    rows, expected = read_log(tmp_path / 'shards'), read_log(tmp_path / 'folder')
    assert 'knn_top1' in rows[0] and rows == expected


def test_extract_features_on_shards(tiny_shards, tmp_path, capsys):
    pretrained = save_pretrained(tmp_path / 'mae.pth')
    for name, data in (('folder', TINY / 'train'), ('shards', tiny_shards)):
        extract_features.main(extract_features.get_args_parser().parse_args(
            [str(data), '--checkpoint', str(pretrained), '--out', str(tmp_path / f'{name}.npz'), '--device', 'cpu']))
    folder, sharded = np.load(tmp_path / 'folder.npz'), np.load(tmp_path / 'shards.npz')
    assert np.array_equal(folder['features'], sharded['features'])
    assert list(sharded['labels']) == list(folder['labels']) and list(sharded['classes']) == ['airplane', 'cat']
    assert str(sharded['paths'][0]).endswith('train-000000.tar:00000000.jpg')
    capsys.readouterr()
    for data in (TINY, tiny_shards):
        extract_features.main(extract_features.get_args_parser().parse_args(
            [str(data), '--knn', '--checkpoint', str(pretrained), '--device', 'cpu']))
    out = [line.split(': ', 1)[1].rsplit('; took', 1)[0]  # (the images and numbers, not the time taken)
           for line in capsys.readouterr().out.splitlines() if line.startswith('kNN of')]
    assert len(out) == 2 and out[0] == out[1] and out[0].startswith('16 train and 8 val images: top-1 ')


@pytest.mark.slow
def test_two_processes_on_uneven_shards_write_the_folders_log(tiny_shards, tmp_path):
    """torchrun, 2 processes on gloo: shards of 5, 5, 5 and 1 samples give each rank the same 4 steps (no DDP hang)
    and the same samples as the folder (each once per epoch): the same log.txt."""
    logs = []
    for name, data in (('folder', TINY), ('shards', tiny_shards)):
        out = tmp_path / name
        r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                       *pretrain_argv(out, '--batch_size', '2', '--data_path', data), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        logs.append((out / 'log.txt').read_text())
    assert logs[0] == logs[1]


def test_data_stats_auto_measures_shards_as_the_files(tiny_shards):
    from util.data.data_stats import measure
    files = [path for path, _ in pretrain_dataset(str(TINY)).samples]
    members = [member for member, _ in pretrain_dataset(str(tiny_shards)).samples]
    assert measure(members, 3) == measure(files, 3)


def test_the_checkpoints_data_identity_covers_shards(tiny_shards, tmp_path):
    """A checkpoint records which samples the data order was drawn over (issue 29's fingerprint): the same shards
    moved elsewhere keep it, other shards change it (a resume then says so)."""
    import shutil
    from util.checkpoints.saver import data_identity
    here = data_identity(pretrain_dataset(str(tiny_shards)))
    assert here['data_size'] == 16
    moved = shutil.copytree(tiny_shards, tmp_path / 'moved')
    assert data_identity(pretrain_dataset(str(moved))) == here
    fewer = make_shards(TINY, tmp_path / 'other', '--samples_per_shard', '4')  # 4 shards of 4: drop one
    (fewer / 'train' / 'train-000003.tar').unlink()
    other = data_identity(pretrain_dataset(str(fewer)))
    assert other['data_size'] == 12 and other['data_fingerprint'] != here['data_fingerprint']
