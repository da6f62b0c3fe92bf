"""No output may destroy an input or a user's file, and an output that cannot be written is said in one line before
any model is loaded (util.training.output_dir.check_outputs, used by export.py, extract_features.py, demo/visualize.py
and reproduce.py). The tests run as root, which no permission bit stops: an unwritable folder is a folder under a file,
or one whose write is refused by a monkeypatched ``tempfile.mkstemp`` (what a read-only or immutable folder gives)."""
import os
import tempfile

import pytest
import torch

import export
import extract_features
import models_mae
import reproduce
from conftest import TINY, run_in_process
from demo import visualize
from util.checkpoints import from_checkpoint
from util.training.output_dir import check_outputs
from util.errors import UsageError

IMAGE = TINY / 'train' / 'airplane' / '0004.jpg'


def checkpoint(path):
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch4().state_dict(), 'epoch': 1}, path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to read a checkpoint fails the test: the output checks come first."""
    def refuse(*args, **kwargs):
        raise AssertionError('a checkpoint was read before the output was checked')
    for name in ('read', 'load_mae', 'load_encoder'):
        monkeypatch.setattr(from_checkpoint, name, refuse)


def refuse_writes_in(monkeypatch, folder):
    """Writing in ``folder`` fails as in a read-only (or immutable) folder."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
            raise PermissionError(13, 'Permission denied')
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)


def run_ok(module, capsys, *argv):
    """An entry point's main() that should finish (run_in_process is for the ones that exit): its stderr."""
    module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    return capsys.readouterr().err


def one_line(code, err):
    assert code == 2 and err.count('\n') == 1 and err.startswith('error: '), err
    return err


# ---------------------------------------------------------------------------------------------------- export.py
def test_export_onto_its_own_checkpoint_or_a_hard_link_of_it_is_refused(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    ckpt = checkpoint(run / 'checkpoint-1.pth')
    os.link(ckpt, run / 'checkpoint-last.pth')  # as main_pretrain.py keeps the last one
    os.symlink(ckpt, tmp_path / 'latest.pth')
    before = ckpt.read_bytes()
    for out, linked in ((ckpt, ''), (run / 'checkpoint-last.pth', ', by a link'), (tmp_path / 'latest.pth', ', by a link')):
        err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', 'timm', '--out', out))
        assert f"--out {out} is --checkpoint {ckpt} (the same file{linked}): writing it would destroy" in err, err
    # also given by its other name
    err = one_line(*run_in_process(export, capsys, '--checkpoint', run / 'checkpoint-last.pth', '--to', 'timm',
                                   '--out', ckpt))
    assert 'writing it would destroy that input' in err
    assert ckpt.read_bytes() == before and (run / 'checkpoint-last.pth').read_bytes() == before


def test_export_replaces_an_existing_file_whole_never_through_its_links(tmp_path, capsys):
    """An --out that exists is replaced by a new file: another name of the old one keeps the old bytes."""
    ckpt = checkpoint(tmp_path / 'c.pth')
    old = tmp_path / 'old.pth'
    old.write_bytes(b'an older export')
    os.link(old, tmp_path / 'old-link.pth')
    run_ok(export, capsys, '--checkpoint', ckpt, '--to', 'timm', '--out', old)
    assert (tmp_path / 'old-link.pth').read_bytes() == b'an older export'
    assert 'cls_token' in torch.load(old, weights_only=True)
    assert sorted(os.listdir(tmp_path)) == ['c.pth', 'old-link.pth', 'old.pth']  # no temporary file left


def test_export_to_hf_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    ckpt = checkpoint(tmp_path / 'c.pth')
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'README.md').write_text('# my model\n')
    (mine / 'config.json').write_text('{"mine": true}\n')
    err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', 'hf', '--out', mine))
    assert f"--out {mine} holds files export.py did not write (README.md, config.json): give a new or empty " \
           f"folder, or pass --overwrite" in err
    assert (mine / 'README.md').read_text() == '# my model\n' and (mine / 'config.json').read_text() == \
        '{"mine": true}\n'
    # --overwrite is the folder's: for --to timm it would do nothing
    err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', 'timm', '--out',
                                   tmp_path / 'x.pth', '--overwrite'))
    assert '--overwrite is for --to hf' in err
    if not transformers.utils.is_torch_available():  # (transformers 5 on torch < 2.6: --to hf writes nothing)
        return
    # a folder export.py wrote is written again without a word; --overwrite writes into the user's
    fresh = tmp_path / 'fresh'
    for _ in range(2):
        run_ok(export, capsys, '--checkpoint', ckpt, '--to', 'hf', '--out', fresh)
    run_ok(export, capsys, '--checkpoint', ckpt, '--to', 'hf', '--out', mine, '--overwrite')
    assert export.EXPORT_MARK in (mine / 'README.md').read_text()


def test_export_to_hf_holding_its_own_checkpoint_is_refused(tmp_path, capsys, no_model_load):
    run = tmp_path / 'run'
    run.mkdir()
    ckpt = checkpoint(run / 'checkpoint-1.pth')
    err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', 'hf', '--out', run))
    assert 'holds files export.py did not write (checkpoint-1.pth)' in err


@pytest.mark.parametrize('to', ['timm', 'hf'])
def test_export_into_an_unwritable_folder_is_one_line_before_loading(tmp_path, capsys, monkeypatch, no_model_load,
                                                                     to):
    ckpt = checkpoint(tmp_path / 'c.pth')
    locked = tmp_path / 'locked'
    locked.mkdir()
    refuse_writes_in(monkeypatch, locked)
    out = locked / ('e.pth' if to == 'timm' else 'hf')
    err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', to, '--out', out))
    assert f"--out {out}: cannot write in {locked} (Permission denied)" in err
    # a folder under a file fails for root too, with no monkeypatch
    monkeypatch.undo()
    err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', 'hf', '--out', ckpt / 'hf'))
    assert f"--out {ckpt / 'hf'}: {ckpt} is a file, not a folder" in err


# ---------------------------------------------------------------------------------------------------- extract_features.py
def test_extract_features_checks_its_outputs_before_loading(tmp_path, capsys, monkeypatch, no_model_load):
    ckpt = checkpoint(tmp_path / 'c.pth')
    locked = tmp_path / 'locked'
    locked.mkdir()
    refuse_writes_in(monkeypatch, locked)
    err = one_line(*run_in_process(extract_features, capsys, '--checkpoint', ckpt, IMAGE, '--out',
                                   locked / 'f.npz'))
    assert f"--out {locked / 'f.npz'}: cannot write in {locked} (Permission denied)" in err
    for mode in ('--knn', '--probe'):
        err = one_line(*run_in_process(extract_features, capsys, '--checkpoint', ckpt, mode, TINY, '--results',
                                       locked / 'r.json'))
        assert f"--results {locked / 'r.json'}: cannot write in {locked}" in err
    npz = checkpoint(tmp_path / 'c.npz')  # a checkpoint of any name
    err = one_line(*run_in_process(extract_features, capsys, '--checkpoint', npz, IMAGE, '--out', npz))
    assert f"--out {npz} is --checkpoint {npz} (the same file)" in err
    err = one_line(*run_in_process(extract_features, capsys, '--checkpoint', ckpt, IMAGE, '--out', tmp_path))
    assert 'give a .npz file name' in err
    (tmp_path / 'd.npz').mkdir()
    err = one_line(*run_in_process(extract_features, capsys, '--checkpoint', ckpt, IMAGE, '--out', tmp_path / 'd.npz'))
    assert f"--out {tmp_path / 'd.npz'} is a folder; give a file name" in err


def test_extract_features_replaces_its_npz_whole(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / 'c.pth')
    out = tmp_path / 'f.npz'
    out.write_bytes(b'old')
    os.link(out, tmp_path / 'f-link.npz')
    run_ok(extract_features, capsys, '--checkpoint', ckpt, IMAGE, '--out', out)
    assert (tmp_path / 'f-link.npz').read_bytes() == b'old' and out.read_bytes()[:2] == b'PK'
    assert sorted(os.listdir(tmp_path)) == ['c.pth', 'f-link.npz', 'f.npz']


# ---------------------------------------------------------------------------------------------------- visualize.py
def test_visualize_never_writes_over_its_images_and_checks_its_folder_first(tmp_path, capsys, monkeypatch,
                                                                            no_model_load):
    ckpt = checkpoint(tmp_path / 'c.pth')
    photos = tmp_path / 'photos'
    photos.mkdir()
    png = photos / 'cat.png'
    from PIL import Image
    Image.new('RGB', (32, 32), (200, 10, 10)).save(png)
    before = png.read_bytes()
    # the figures of photos/ into photos/: photos/cat.png would replace the image
    err = one_line(*run_in_process(visualize, capsys, '--checkpoint', ckpt, photos, '--out', photos))
    assert f"--out {png} is the image {png} (the same file): writing it would destroy that input" in err
    err = one_line(*run_in_process(visualize, capsys, '--checkpoint', ckpt, png, '--out', png))
    assert 'writing it would destroy that input' in err
    err = one_line(*run_in_process(visualize, capsys, '--checkpoint', ckpt, png, '--grid', '--out', ckpt))
    assert '--out' in err  # (a .pth is a folder name here: under a file)
    assert png.read_bytes() == before
    locked = tmp_path / 'locked'
    locked.mkdir()
    refuse_writes_in(monkeypatch, locked)
    for extra in ([], ['--grid']):
        err = one_line(*run_in_process(visualize, capsys, '--checkpoint', ckpt, png, '--out', locked / 'figs',
                                       *extra))
        assert f"cannot write in {locked} (Permission denied)" in err
    err = one_line(*run_in_process(visualize, capsys, '--checkpoint', ckpt, png, '--grid', '--out',
                                   ckpt / 'grid.png'))
    assert f"{ckpt} is a file, not a folder" in err


# ---------------------------------------------------------------------------------------------------- reproduce.py
def test_reproduce_work_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('mine')
    for flag in ('--work_dir', '--results_dir'):
        argv = ['--quick', '--study', 'decoder_width', '--work_dir', tmp_path / 'w', flag, a_file]
        import util.training.process as process
        with pytest.raises(SystemExit) as exc:
            process.run_main(reproduce.main, reproduce.get_args_parser(), [str(a) for a in argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err == f"error: {flag} {a_file} is a file; give a folder\n", err
    assert a_file.read_text() == 'mine'


# ---------------------------------------------------------------------------------------------------- the helper
def test_check_outputs_cases(tmp_path):
    a = tmp_path / 'a.bin'
    a.write_bytes(b'x')
    check_outputs([tmp_path / 'new' / 'deeper' / 'b.bin'], '--out', [('--in', a)])  # created later: fine
    check_outputs([tmp_path / 'b.bin'], '--out', [('--in', a), ('--none', None), ('--url', 'https://h/x.pth')])
    with pytest.raises(UsageError, match=r'is --in .* \(the same file\)'):
        check_outputs([a], '--out', [('--in', a)])
    with pytest.raises(UsageError, match=r'is a file, not a folder'):
        check_outputs([a / 'sub'], '--out', folder=True)
    with pytest.raises(UsageError, match=r'is a file; give a folder'):
        check_outputs([a], '--out', folder=True)


# ---------------------------------------------------------------------------------------------------- plot_knn.py
def test_plot_knn_never_writes_over_its_log(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    plot_knn = pytest.importorskip('demo.plot_knn')
    log = tmp_path / 'log.txt'
    log.write_text('{"epoch": 0, "train_loss": 1.0, "knn_top1": 10.0, "knn_mean_top1": 9.0}\n')
    before = log.read_bytes()
    err = one_line(*run_in_process(plot_knn, capsys, log, '--out', log))
    assert f"--out {log}: give a file name ending in one of" in err
    os.link(log, tmp_path / 'log.png')
    err = one_line(*run_in_process(plot_knn, capsys, log, '--out', tmp_path / 'log.png'))
    assert f"--out {tmp_path / 'log.png'} is the log {log} (the same file, by a link)" in err
    assert log.read_bytes() == before
    run_ok(plot_knn, capsys, log, '--out', tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').read_bytes()[:4] == b'\x89PNG'


def test_export_with_a_damaged_log_beside_and_an_empty_out(tmp_path, capsys, no_model_load):
    ckpt = checkpoint(tmp_path / 'c.pth')
    for to in ('timm', 'hf'):
        err = one_line(*run_in_process(export, capsys, '--checkpoint', ckpt, '--to', to, '--out', ''))
        assert '--out' in err and ('is empty' in err or 'give a file name' in err), err
    # the model card's rows of a log.txt with bytes that are not UTF-8 (was a UnicodeDecodeError after the export)
    (tmp_path / 'log.txt').write_bytes(b'{"epoch": 0, "train_loss": 1.5}\n\xff\xfe garbage\n')
    assert export._log_rows(ckpt) == ['{"epoch": 0, "train_loss": 1.5}']  # (its readable rows)
