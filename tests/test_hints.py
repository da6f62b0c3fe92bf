"""Mistakes that used to end in a traceback or a wrong hint (issue 29, item 8): each is one line naming the flag
and the cause, exit code 2, before anything is computed or written."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

import export
import main_pretrain
import models_vit
import util.training.process as process
from conftest import ROOT, TINY, run_in_process, save_pretrained
from util.errors import UsageError

spec = importlib.util.spec_from_file_location('visualize', ROOT / 'demo' / 'visualize.py')
visualize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(visualize)


def one_line(code, err):
    assert code == 2 and err.startswith('error: ') and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize('model, shape', [('mae_vit_small_patch4', 'patch 4, width 192, 6 blocks'),
                                          ('mae_vit_base_patch16', 'patch 16, width 768, 12 blocks')])
def test_export_to_timm_with_a_model_of_another_size_is_one_line(tmp_path, capsys, model, shape):
    checkpoint = save_pretrained(tmp_path / 'mae_tiny.pth')
    out = tmp_path / 'encoder.pth'
    err = one_line(*run_in_process(export, capsys, '--checkpoint', checkpoint, '--to', 'timm', '--out', out,
                                   '--model', model))
    assert err == (f"error: --checkpoint {checkpoint} does not fit --model {model}: its weights are patch 4, width "
                   f"64, 2 blocks; {model} is {shape}")
    assert not out.exists()


@pytest.mark.parametrize('url, expected', [
    ('garbage', 'not a rendezvous URL torch knows'),
    ('foo://host:1234', 'not a rendezvous URL torch knows'),
    ('tcp://127.0.0.1', 'a tcp:// URL needs a host and a port (1-65535)'),
    ('tcp://127.0.0.1:99999', 'a tcp:// URL needs a host and a port (1-65535)'),
    ('tcp://:1234', 'a tcp:// URL needs a host and a port (1-65535)'),
    ('file://', 'a file:// URL needs the path of a file in a folder that exists'),
    ('file:///no/such/folder/init', 'a file:// URL needs the path of a file in a folder that exists'),
])
def test_a_dist_url_torch_cannot_use_is_one_line_before_joining(monkeypatch, url, expected):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(process.dist, 'init_process_group', lambda *a, **k: pytest.fail('must not be joined'))
    args = SimpleNamespace(device='cpu', dist_url=url, dist_on_itp=False)
    with pytest.raises(UsageError) as e:
        process.init_distributed_mode(args)
    assert str(e.value) == (f"--dist_url {url}: {expected}: give env:// (torchrun's), tcp://HOST:PORT or "
                            f"file:///PATH/TO/A/NEW/FILE")


@pytest.mark.parametrize('url', ['env://', 'tcp://127.0.0.1:29500', 'tcp://node-1.cluster:23456', 'file:///tmp/init'])
def test_the_dist_urls_torch_uses_pass(url):
    process.check_dist_url(url)


def test_init_from_a_global_pool_classifier_names_it_not_another_depth(tmp_path, capsys):
    classifier = models_vit.vit_tiny_patch4(num_classes=2, global_pool=True, img_size=32)
    path = tmp_path / 'finetuned.pth'
    torch.save({'model': classifier.state_dict()}, path)
    err = one_line(*run_in_process(main_pretrain, capsys, '--model', 'mae_vit_tiny_patch4', '--input_size', 32,
                                   '--data_path', TINY, '--device', 'cpu', '--output_dir', tmp_path / 'out',
                                   '--init_from', path))
    assert err == (f"error: --init_from {path} is a ViT classifier fine-tuned with global pooling (head, fc_norm), "
                   f"not an MAE: its encoder has no final norm to start pre-training from; to train on from it, use "
                   f"main_finetune.py --finetune {path} (or --resume to continue its fine-tuning)")
    assert not (tmp_path / 'out' / 'log.txt').exists()


@pytest.mark.parametrize('argv, flag', [(['--mask_ratio', 0.99], '--mask_ratio'),
                                        (['--grid', '--mask_ratios', 0.5, 0.99], '--mask_ratios')])
def test_visualize_refuses_a_mask_ratio_that_keeps_no_patch(tmp_path, capsys, argv, flag):
    checkpoint = save_pretrained(tmp_path / 'mae_tiny.pth')
    image = TINY / 'val' / 'cat' / '0000.jpg'
    err = one_line(*run_in_process(visualize, capsys, '--checkpoint', checkpoint, image, '--out', tmp_path / 'figs',
                                   *argv))
    # 8 x 8 patches: int(64 * 0.01) = 0 kept; 63/64 = 0.984375 keeps one
    assert err == (f"error: {flag} 0.99 keeps no patch of the 64 of mae_vit_tiny_patch4 at --input_size 32: the "
                   f"figure would be all grey (at most 0.9844 keeps one)")
    assert not (tmp_path / 'figs').exists()
