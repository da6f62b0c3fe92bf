"""One reader of image sources for every script (``util.data.image_sources.image_paths``): extract_features.py and
demo/visualize.py read a class tree, a flat folder and a .txt list of the same images alike, and a missing path, a
folder with no image, a list naming a missing file or no file at all give the same one line in both, before any
model is loaded."""
import shutil

import numpy as np
import pytest
import torch

import extract_features
import models_mae
from conftest import TINY, run_in_process
from demo import visualize
from util.checkpoints import from_checkpoint


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to read a checkpoint fails the test: the images are checked first."""
    def refuse(*args, **kwargs):
        raise AssertionError('a checkpoint was read before the images were checked')
    for name in ('read', 'load_mae', 'load_encoder'):
        monkeypatch.setattr(from_checkpoint, name, refuse)


@pytest.fixture
def sources(tmp_path):
    """The 8 images of TINY/val as a class tree, as a flat folder (<class>-<name>, the same order) and as a .txt
    list beside the tree (relative paths, the tree's order)."""
    tree, flat = tmp_path / 'tree', tmp_path / 'flat'
    shutil.copytree(TINY / 'val', tree)
    flat.mkdir()
    files = sorted(p.relative_to(tree) for p in tree.glob('*/*.jpg'))
    for f in files:
        shutil.copy(tree / f, flat / f"{f.parent.name}-{f.name}")
    (tree / 'list.txt').write_text('# the images of the tree\n' + ''.join(f"{f}\n" for f in files) + '\n')
    return {'tree': tree, 'flat': flat, 'list': tree / 'list.txt'}


def mae_checkpoint(path):
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch4().state_dict(), 'epoch': 1}, path)
    return path


def test_extract_features_reads_a_tree_a_flat_folder_and_a_list_alike(tmp_path, capsys, sources):
    out = {}
    for kind, source in sources.items():
        extract_features.main(extract_features.get_args_parser().parse_args(
            [str(source), '--random_init', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0',
             '--out', str(tmp_path / f'{kind}.npz')]))
        out[kind] = np.load(tmp_path / f'{kind}.npz')
    assert out['tree']['features'].shape == (8, 64)
    for kind in ('flat', 'list'):
        assert np.array_equal(out[kind]['features'], out['tree']['features']), kind
    assert [str(p) for p in out['list']['paths']] == [str(p) for p in out['tree']['paths']]  # (the same files)
    assert list(out['tree']['labels']) == [0] * 4 + [1] * 4 and list(out['tree']['classes']) == ['airplane', 'cat']
    assert 'labels' not in out['flat'] and 'labels' not in out['list']  # (a list and a flat folder have no classes)
    assert 'wrote' in capsys.readouterr().out


def test_visualize_reads_a_tree_a_flat_folder_and_a_list_alike(tmp_path, monkeypatch, sources):
    checkpoint, read = mae_checkpoint(tmp_path / 'mae.pth'), []
    real = visualize.load_image

    def load_image(path, *args, **kwargs):
        read.append(open(path, 'rb').read())
        return real(path, *args, **kwargs)
    monkeypatch.setattr(visualize, 'load_image', load_image)
    figures, seen = {}, {}
    for kind, source in sources.items():
        read.clear()
        out = tmp_path / f'{kind}.png'
        visualize.main(visualize.get_args_parser().parse_args(
            [str(source), '--checkpoint', str(checkpoint), '--grid', '--input_size', '32', '--out', str(out)]))
        figures[kind], seen[kind] = out.read_bytes(), list(read)
    assert len(seen['tree']) == 8 and seen['flat'] == seen['tree'] and seen['list'] == seen['tree']
    assert figures['list'] == figures['tree']  # (the same images under the same names: the same figure)


def test_a_list_as_one_of_several_sources(tmp_path, sources):
    from util.data.image_sources import image_paths
    found = image_paths([sources['list'], sources['flat'] / 'cat-0000.jpg'])
    assert found.names[:2] == ['airplane/0000.jpg', 'airplane/0001.jpg'] and found.names[-1] == 'cat-0000.jpg'
    assert len(found.paths) == 9 and found.labels is None


@pytest.mark.parametrize('case', ['missing_path', 'empty_folder', 'list_naming_a_missing_file', 'empty_list'])
def test_bad_sources_are_the_same_line_in_each_script_before_any_model_load(tmp_path, capsys, no_model_load, case):
    checkpoint = mae_checkpoint(tmp_path / 'mae.pth')
    source = tmp_path / 'images'
    if case == 'missing_path':
        expected = f"{source}: no such file or folder"
    elif case == 'empty_folder':
        (source / 'sub').mkdir(parents=True)
        (source / 'sub' / 'notes.txt').write_text('not an image\n')
        expected = f"{source}: no image files (.jpg, .jpeg, .png"
    elif case == 'list_naming_a_missing_file':
        source = tmp_path / 'list.txt'
        source.write_text('gone.jpg\n')
        expected = f"{source}: 1 of its 1 files do not exist, e.g. {tmp_path / 'gone.jpg'}"
    else:
        source = tmp_path / 'list.txt'
        source.write_text('# nothing yet\n\n')
        expected = f"{source}: the list names no image file (one path per line)"
    errors = []
    for module, extra in ((extract_features, ['--out', tmp_path / 'f.npz']),
                          (visualize, ['--out', tmp_path / 'figures'])):
        code, err = run_in_process(module, capsys, source, '--checkpoint', checkpoint, *extra)
        assert code == 2 and err.count('\n') == 1 and err.startswith(f"error: {expected}"), (module.__name__, err)
        errors.append(err)
    assert errors[0] == errors[1]
    assert not (tmp_path / 'f.npz').exists() and not (tmp_path / 'figures').exists()
