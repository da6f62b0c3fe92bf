"""Every checkpoint a user can name goes through one loader (util.checkpoints.checkpoint.load): a local path and an http(s) URL
alike are read with ``torch.load(weights_only=True)`` and the integrity and kind checks, so that a crafted pickle
(a ``__reduce__`` that would run a command) runs on none of the seven entry points, and the refusal is one line that
never advises ``weights_only=False``. A URL is downloaded into torch's hub cache (here: a file already there, so no
network is needed) and read from there; a relative path that merely begins with ``https`` is a path."""
import os

import pytest
import torch

import export
import extract_features
import main_finetune
import main_linprobe
import main_pretrain
import models_mae
from conftest import TINY, run_in_process, run_script
from demo import visualize
from util.checkpoints import checkpoint as ckpt_io
from util.errors import UsageError

IMAGE = TINY / 'train' / 'airplane' / '0004.jpg'


class RunsACommand:
    """What a hostile checkpoint pickles: unpickling it calls os.system, which creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def crafted(path, marker):
    torch.save({'model': RunsACommand(marker), 'epoch': 0}, path)
    return path


def entry_points(tmp_path, ckpt):
    """(module, argv) of each entry point naming ``ckpt`` as the checkpoint it reads."""
    out = tmp_path / 'out'
    pretrain = ['--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--epochs', '1',
                '--data_path', TINY, '--device', 'cpu', '--num_workers', '0', '--output_dir', out, '--log_dir', out]
    classifier = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '4',
                  '--epochs', '1', '--device', 'cpu', '--num_workers', '0', '--data_path', TINY,
                  '--output_dir', out, '--log_dir', out]
    return {
        'main_pretrain --resume': (main_pretrain, pretrain + ['--resume', ckpt]),
        'main_pretrain --init_from': (main_pretrain, pretrain + ['--init_from', ckpt]),
        'main_finetune --finetune': (main_finetune, classifier + ['--finetune', ckpt]),
        'main_linprobe --finetune': (main_linprobe, classifier + ['--finetune', ckpt]),
        'extract_features.py': (extract_features, ['--checkpoint', ckpt, IMAGE, '--out', tmp_path / 'f.npz']),
        'export.py': (export, ['--checkpoint', ckpt, '--to', 'timm', '--out', tmp_path / 'e.pth']),
        'demo/visualize.py': (visualize, ['--checkpoint', ckpt, IMAGE, '--out', tmp_path / 'figures']),
    }


ENTRY_POINTS = ['main_pretrain --resume', 'main_pretrain --init_from', 'main_finetune --finetune',
                'main_linprobe --finetune', 'extract_features.py', 'export.py', 'demo/visualize.py']


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache in ``tmp_path`` (TORCH_HOME), and any download refused: nothing may reach the network."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def no_network(url, dst, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    folder = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize('source', ['local', 'url'])
@pytest.mark.parametrize('entry', ENTRY_POINTS)
def test_a_crafted_pickle_runs_on_no_entry_point(tmp_path, capsys, hub, entry, source):
    marker = tmp_path / 'ran'
    if source == 'local':
        ckpt = crafted(tmp_path / 'crafted.pth', marker)
    else:
        crafted(hub / 'crafted.pth', marker)  # as if downloaded before
        ckpt = 'https://example.invalid/models/crafted.pth'
    module, argv = entry_points(tmp_path, ckpt)[entry]
    code, err = run_in_process(module, capsys, *argv)
    assert not marker.exists(), f"{entry}: the file's code ran"
    assert code == 2 and err.count('\n') == 1, err
    assert f' {ckpt}' in err and 'cannot be read as a PyTorch checkpoint' in err and 'posix.system' in err, err
    assert 'refused, nothing in it was run' in err, err
    assert 'weights_only' not in err and 'trusted' not in err, err
    if source == 'url':
        assert f'cached as {hub / "crafted.pth"}' in err, err
    assert not (tmp_path / 'out' / 'log.txt').exists()


@pytest.mark.slow
def test_a_crafted_pickle_from_a_url_is_refused_from_the_command_line(tmp_path):
    """The same through the script as a user runs it (its own process, TORCH_HOME pointing at the cache)."""
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    marker = tmp_path / 'ran'
    crafted(cache / 'crafted.pth', marker)
    r = run_script('export.py', '--checkpoint', 'https://example.invalid/crafted.pth', '--to', 'timm', '--out',
                   tmp_path / 'e.pth', env={'TORCH_HOME': str(tmp_path / 'torch_home')})
    assert r.returncode == 2 and not marker.exists(), r.stderr[-2000:]
    assert r.stderr.count('\n') == 1 and 'weights_only' not in r.stderr


def test_a_url_is_loaded_from_the_hub_cache_like_a_local_file(tmp_path, hub):
    """A good file behind a URL loads (from the cache, no download); a damaged one is refused by the CRC check,
    which torch.hub's own loader never made; a file that is not an MAE checkpoint by the kind check."""
    torch.manual_seed(0)
    state = models_mae.mae_vit_tiny_patch4().state_dict()
    torch.save({'model': state}, hub / 'good.pth')
    loaded = ckpt_io.load('https://example.invalid/good.pth', what='--finetune')
    assert torch.equal(loaded['model']['pos_embed'], state['pos_embed'])

    data = bytearray((hub / 'good.pth').read_bytes())
    data[len(data) // 2] ^= 0xFF  # (most of the file is the tensors' bytes)
    (hub / 'bad.pth').write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r'https://example.invalid/bad.pth \(cached as .*\): damaged since it was'):
        ckpt_io.load('https://example.invalid/bad.pth', what='--finetune')

    torch.save(state, hub / 'bare.pth')  # a bare state dict
    with pytest.raises(UsageError, match="not an MAE checkpoint"):
        ckpt_io.load('https://example.invalid/bare.pth', what='--finetune')


def test_only_http_and_https_prefixes_are_urls(tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'https_ckpts').mkdir()
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch4().state_dict()}, tmp_path / 'https_ckpts' / 'ck.pth')
    assert 'model' in ckpt_io.load('https_ckpts/ck.pth')  # a relative path that begins with 'https'
    with pytest.raises(UsageError, match=r'^--finetune https_ckpts/nope.pth: no such file$'):
        ckpt_io.load('https_ckpts/nope.pth', what='--finetune')
    assert [ckpt_io.is_url(p) for p in ('https://a/b.pth', 'http://a/b.pth', 'HTTPS://a/b.pth', 'https_ckpts/ck.pth',
                                        'ftp://a/b', 'httpsx://a/b.pth')] == [True, True, True, False, False, False]
    assert os.listdir(hub) == []  # nothing was downloaded, nothing left behind


def test_a_failed_download_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, hub):
    def failing(url, dst, *args, **kwargs):  # as torch's: its partial file, then the error
        with open(dst + '.0123.partial', 'wb') as f:
            f.write(b'half')
        raise OSError(110, 'Connection timed out')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', failing)
    with pytest.raises(UsageError) as e:
        ckpt_io.load('https://example.invalid/some/ck.pth', what='--init_from')
    assert str(e.value) == ("--init_from https://example.invalid/some/ck.pth: cannot be downloaded "
                            "(TimeoutError: [Errno 110] Connection timed out)")
    assert os.listdir(hub) == []
    with pytest.raises(UsageError, match=r'^--resume https://example.invalid/: not a URL of a file'):
        ckpt_io.load('https://example.invalid/')


def test_a_download_lands_in_the_cache_whole_and_is_used_from_there(tmp_path, monkeypatch, hub):
    torch.manual_seed(0)
    good = tmp_path / 'served.pth'
    torch.save({'model': models_mae.mae_vit_tiny_patch4().state_dict()}, good)
    calls = []

    def serve(url, dst, hash_prefix=None, *args, **kwargs):
        calls.append((url, hash_prefix))
        with open(dst, 'wb') as f:
            f.write(good.read_bytes())
    monkeypatch.setattr(torch.hub, 'download_url_to_file', serve)
    for _ in range(2):
        assert 'model' in ckpt_io.load('https://example.invalid/mae-1a2b3c4d.pth')
    assert calls == [('https://example.invalid/mae-1a2b3c4d.pth', '1a2b3c4d')]  # once; torch's hash convention
    assert os.listdir(hub) == ['mae-1a2b3c4d.pth']


@pytest.mark.parametrize('message', [
    # torch 2.6 and later
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source."
    "\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation",
    # torch 2.4-2.5
    "Weights only load failed. This file can still be loaded, to do so you have two options \n\t(1) Re-running "
    "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in arbitrary code "
    "execution. Do it only if you got the file from a trusted source.\n\t(2) Alternatively, to load with "
    "`weights_only=True` please check the recommended steps in the following error message.\n\tWeightsUnpickler "
    "error: Unsupported global: GLOBAL posix.system was not an allowed global by default. Please use "
    "`torch.serialization.add_safe_globals([system])` to allowlist this global if you trust this class/function.",
    # torch 2.1 (one line)
    "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but "
    "it can result in arbitrary code execution.Do it only if you get the file from a trusted source. "
    "WeightsUnpickler error: Unsupported class posix.system",
    # util.compat's restricted unpickler (torch < 2.5 with the reference's Namespace allowed)
    "Weights only load failed: unsupported global posix.system",
])
def test_the_refusal_keeps_the_reason_and_never_torchs_advice(message):
    reason = ckpt_io._unpickling_reason(RuntimeError(message))
    assert 'posix.system' in reason and 'weights_only' not in reason and 'trusted' not in reason, reason
