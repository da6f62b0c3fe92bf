"""extract_features.py: a tiny checkpoint's features of image folders and files are the encoder's output for the
same images; --knn gives the kNN monitor's numbers; mistakes are one line."""
import json

import numpy as np
import pytest
import torch

import extract_features
import main_pretrain
import models_mae
import models_vit
from conftest import TINY, parsed_args, run_in_process
from util.evaluation import feature_probe, knn_monitor
from util.datasets import eval_transform
from util.data.image_folder import image_folder


def save_ours(path, seed=0):
    """A tiny MAE checkpoint in main_pretrain.py's layout ({'model', 'epoch', 'args', ...}), and the model."""
    torch.manual_seed(seed)
    model = models_mae.mae_vit_tiny_patch4().eval()
    torch.save({'model': model.state_dict(), 'epoch': 3, 'script': 'main_pretrain.py',
                'args': {'model': 'mae_vit_tiny_patch4', 'input_size': 32, 'norm_pix_loss': True}}, path)
    return model


def extract(*argv):
    return extract_features.main(extract_features.get_args_parser().parse_args([str(a) for a in argv]))


def unmasked_encoder(model, x):
    """The MAE's own forward_encoder with nothing masked, in the patches' order."""
    with torch.no_grad():
        tokens, _, _ = model.forward_encoder(x, mask_ratio=0.0, noise=torch.arange(64.).repeat(len(x), 1))
    return tokens


@pytest.mark.parametrize('pool', ['cls', 'mean', 'tokens'])
def test_features_are_the_encoders_output(tmp_path, capsys, pool):
    model = save_ours(tmp_path / 'checkpoint-3.pth')
    out = tmp_path / 'val.npz'
    extract(TINY / 'val', '--checkpoint', tmp_path / 'checkpoint-3.pth', '--pool', pool, '--batch_size', 3,
            '--num_workers', 0, '--out', out)
    assert 'features: 100%' in capsys.readouterr().err  # the progress bar
    saved = np.load(out)
    dataset = image_folder(TINY, 'val', eval_transform(32))
    assert saved['paths'].tolist() == [p for p, _ in dataset.samples]
    assert saved['labels'].tolist() == dataset.targets and saved['classes'].tolist() == dataset.classes
    tokens = unmasked_encoder(model, torch.stack([dataset[i][0] for i in range(len(dataset))]))
    expected = {'cls': tokens[:, 0], 'mean': tokens[:, 1:].mean(1), 'tokens': tokens}[pool]
    assert saved['features'].dtype == np.float32 and saved['features'].shape == tuple(expected.shape)
    np.testing.assert_allclose(saved['features'], expected.numpy(), rtol=0, atol=1e-6)
    assert str(saved['pool']) == pool and str(saved['model']) == 'vit_tiny_patch4'


def test_files_and_several_folders(tmp_path, capsys):
    save_ours(tmp_path / 'c.pth')
    files = sorted((TINY / 'train').rglob('*.*'))[:2]
    out = tmp_path / 'f.npz'
    extract(*files, '--checkpoint', tmp_path / 'c.pth', '--out', out, '--num_workers', 0)
    saved = np.load(out)
    assert saved['paths'].tolist() == [str(f) for f in files] and 'labels' not in saved
    assert saved['features'].shape == (2, 64)
    # two ImageFolder trees: one list of classes for both
    extract(TINY / 'train', TINY / 'val', '--checkpoint', tmp_path / 'c.pth', '--out', out, '--num_workers', 0)
    saved = np.load(out)
    assert len(saved['paths']) == 16 + 8 and saved['labels'].tolist() == [0] * 8 + [1] * 8 + [0] * 4 + [1] * 4


def test_knn_gives_the_monitors_numbers(tmp_path, capsys):
    model = save_ours(tmp_path / 'c.pth', seed=5)
    args = parsed_args(main_pretrain, knn_every=1, knn_data_path=str(TINY), knn_train_subset=0, knn_val_subset=6,
                       epochs=1, batch_size=4, num_workers=0, input_size=32, device='cpu', amp='fp16')
    logged = knn_monitor.KnnMonitor(args, torch.device('cpu'))(model, 0)
    stats = extract(TINY, '--knn', '--knn_val_subset', 6, '--checkpoint', tmp_path / 'c.pth', '--num_workers', 0)
    assert stats == logged
    assert knn_monitor.describe(stats) in capsys.readouterr().out


def test_probe_fits_the_feature_probe_on_the_encoders_features(tmp_path, capsys):
    model = save_ours(tmp_path / 'c.pth', seed=5)
    results = tmp_path / 'probe.json'
    stats = extract(TINY, '--probe', '--checkpoint', tmp_path / 'c.pth', '--num_workers', 0, '--results', results)
    # the same numbers from the features of the unmasked encoder (class token; mean of patch tokens)
    train, val, classes = knn_monitor.knn_datasets(str(TINY), 32)
    feats = [knn_monitor.embed(model, d, torch.device('cpu'), 4) for d in (train, val)]
    for pool, prefix in (('cls', 'probe'), ('mean', 'probe_mean')):
        expected = feature_probe.probe_accuracy(feats[0][0][pool], feats[0][1], feats[1][0][pool], feats[1][1], 2)
        assert {k: stats[f'{prefix}_{k}'] for k in expected} == expected
    out = capsys.readouterr().out
    assert f"top-1 {stats['probe_top1']:.2f}% top-5 100.00% (class token;" in out and '16 train and 8 val' in out
    written = json.loads(results.read_text())
    assert {k: written[k] for k in stats} == stats
    assert (written['evaluation'], written['train_images'], written['val_images'], written['num_classes'],
            written['model']) == ('probe', 16, 8, 2, 'vit_tiny_patch4')


def test_random_init_evaluates_the_models_own_random_weights(tmp_path, capsys):
    results = tmp_path / 'knn.json'
    torch.manual_seed(123)
    stats = extract(TINY, '--knn', '--random_init', '--model', 'vit_tiny_patch4', '--num_workers', 0, '--results',
                    results)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # its seed 0 is set in a stream of its own: the caller's is untouched
    torch.manual_seed(0)
    encoder = models_vit.vit_tiny_patch4(num_classes=0, global_pool=False).eval()
    train, val, classes = knn_monitor.knn_datasets(str(TINY), 32)
    assert stats == knn_monitor.knn_evaluate(encoder, train, val, classes, torch.device('cpu'), 64)
    assert json.loads(results.read_text())['source'] == 'random weights of vit_tiny_patch4'
    assert 'kNN of random weights of vit_tiny_patch4 (vit_tiny_patch4, 32px)' in capsys.readouterr().out


@pytest.mark.parametrize('argv, expected', [
    (['--knn', '--random_init', '--model', 'vit_tiny_patch4', '--checkpoint', 'c.pth'],
     '--random_init and --checkpoint: give one'),
    (['--knn'], '--checkpoint is required (a checkpoint with a ViT encoder), unless --random_init'),
    (['--probe', '--random_init'], '--random_init needs --model, one of: vit_base_patch16'),
    (['--probe', '--random_init', '--model', 'vit_nope'], '(got vit_nope)'),
    (['--knn', '--probe', '--checkpoint', 'c.pth'], '--knn and --probe: give one'),
    (['--probe', '--checkpoint', 'c.pth', '--results', 'r.txt'], '--results r.txt: give a .json file name'),
    (['--probe', '--checkpoint', 'c.pth', '--results', 'nowhere/r.json'], '--results nowhere/r.json: no folder'),
])
def test_frozen_evaluation_mistakes_are_one_line(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    save_ours(tmp_path / 'c.pth')
    code, err = run_in_process(extract_features, capsys, TINY, *argv)
    assert code == 2 and err.count('\n') == 1 and expected in err, err


def test_results_go_with_knn_or_probe(tmp_path, capsys):
    save_ours(tmp_path / 'c.pth')
    code, err = run_in_process(extract_features, capsys, TINY / 'val', '--checkpoint', tmp_path / 'c.pth',
                               '--results', tmp_path / 'r.json')
    assert code == 2 and '--results is for the numbers of --knn or --probe' in err


@pytest.mark.parametrize('case, expected', [
    ('no_encoder', "holds no MAE/ViT encoder"),
    ('knn_without_val', "has no 'val/' folder"),
    ('not_npz', '--out x.txt: give a .npz file name'),
    ('missing_image', 'nope.jpg: no such file or folder'),
])
def test_mistakes_are_one_line(tmp_path, capsys, case, expected):
    save_ours(tmp_path / 'c.pth')
    argv = [TINY / 'val', '--checkpoint', tmp_path / 'c.pth', '--out', tmp_path / 'f.npz']
    if case == 'no_encoder':
        torch.save({'model': {'head.weight': torch.zeros(2, 2)}}, tmp_path / 'c.pth')
    elif case == 'knn_without_val':
        (tmp_path / 'knn').mkdir()
        (tmp_path / 'knn' / 'train').symlink_to(TINY / 'train')
        argv = [tmp_path / 'knn', '--knn', '--checkpoint', tmp_path / 'c.pth']
    elif case == 'not_npz':
        argv[-1] = 'x.txt'
    elif case == 'missing_image':
        argv[0] = tmp_path / 'nope.jpg'
    code, err = run_in_process(extract_features, capsys, *argv)
    assert code == 2 and err.count('\n') == 1 and expected in err, err
    assert not (tmp_path / 'f.npz').exists()
