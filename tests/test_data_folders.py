"""The class folders of the splits: val/'s classes take train/'s numbers by name (a class train/ lacks is refused),
so that an accuracy is scored against the right outputs; a class folder that links back to a folder it is inside of
is refused instead of multiplying the data set."""
import pytest
import torch
from PIL import Image
from torchvision import datasets

import main_finetune
import main_pretrain
from conftest import TINY, parsed_args, run_in_process
from engine_finetune import evaluate
from util.datasets import check_classes, eval_transform
from util.data.image_folder import image_folder
from util.errors import UsageError

COLOURS = {'a': (255, 0, 0), 'b': (0, 255, 0), 'c': (0, 0, 255), 'airplane': (255, 0, 0), 'cat': (0, 255, 0),
           'dog': (0, 0, 255)}


def tree(root, splits):
    """root/<split>/<class>/<k>.png, each image filled with its class's colour; ``splits``: {split: [class, ...]}."""
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for k in range(2):
                Image.new('RGB', (8, 8), COLOURS[name]).save(root / split / name / f'{k}.png')
    return root


class ColourModel(torch.nn.Module):
    """Three outputs: the mean of each colour channel, so a red image is class 0, green 1, blue 2."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------------- classes
@pytest.mark.parametrize('train,val,unknown', [
    (['airplane', 'cat'], ['cat', 'dog'], 'dog'),
    (['cat'], ['airplane', 'cat'], 'airplane'),  # one class in train/, two in val/
])
def test_val_class_that_train_lacks_is_refused(tmp_path, train, val, unknown):
    data = tree(tmp_path, {'train': train, 'val': val})
    with pytest.raises(UsageError) as e:
        image_folder(str(data), 'val', None, numbered_as='train')
    assert str(e.value) == (f"{data / 'val'} has class folder that {data / 'train'} lacks: {unknown}; the model has "
                            f"no output for it: rename or remove it (class folders are matched by name)")


def test_val_with_fewer_classes_is_scored_with_trains_numbers(tmp_path, capsys):
    data = tree(tmp_path, {'train': ['a', 'b', 'c'], 'val': ['b', 'c']})
    train = image_folder(str(data), 'train', None)
    val = image_folder(str(data), 'val', eval_transform(8), numbered_as='train')
    assert val.classes == ['b', 'c'] and val.class_to_idx == {'b': 1, 'c': 2} == {
        k: train.class_to_idx[k] for k in ('b', 'c')}
    assert val.targets == [1, 1, 2, 2]
    check_classes(parsed_args(main_finetune, nb_classes=3), train, val)
    assert capsys.readouterr().out == (f"Note: {data / 'val'} holds 2 of the 3 classes of {data / 'train'} (not: a); "
                                       f"its images are labelled with the numbers of their classes there\n")
    loader = torch.utils.data.DataLoader(val, batch_size=4)
    assert evaluate(loader, ColourModel(), torch.device('cpu'))['acc1'] == 100.0  # (numbered alone: 0.0)


def test_eval_labels_beyond_nb_classes_are_refused(tmp_path):
    data = tree(tmp_path, {'train': ['a', 'b', 'c'], 'val': ['c']})
    val = image_folder(str(data), 'val', None, numbered_as='train')
    with pytest.raises(UsageError, match=r"^--nb_classes 2 is smaller than the 3 classes of .*train, whose numbers "):
        check_classes(parsed_args(main_finetune, nb_classes=2), None, val)


def test_matching_classes_are_numbered_as_before(tmp_path):
    ours = image_folder(str(TINY), 'val', None, numbered_as='train')
    assert ours.samples == datasets.ImageFolder(str(TINY / 'val')).samples
    assert ours.class_to_idx == {'airplane': 0, 'cat': 1}
    only_val = tree(tmp_path, {'val': ['b', 'c']})  # no train/ (e.g. --eval): val/ numbers its own classes
    assert image_folder(str(only_val), 'val', None, numbered_as='train').class_to_idx == {'b': 0, 'c': 1}


def test_finetune_refuses_mismatched_classes_in_one_line(tmp_path, capsys):
    data = tree(tmp_path / 'data', {'train': ['airplane', 'cat'], 'val': ['cat', 'dog']})
    for name in ('airplane', 'cat'):  # 16 training images: a full batch
        for k in range(2, 8):
            Image.new('RGB', (8, 8), COLOURS[name]).save(data / 'train' / name / f'{k}.png')
    code, err = run_in_process(main_finetune, capsys, '--model', 'vit_tiny_patch4', '--input_size', '32',
                               '--batch_size', '4', '--nb_classes', '2', '--device', 'cpu', '--num_workers', '0',
                               '--data_path', data, '--output_dir', tmp_path / 'out')
    assert code == 2 and err == (f"error: {data / 'val'} has class folder that {data / 'train'} lacks: dog; the "
                                 f"model has no output for it: rename or remove it (class folders are matched by "
                                 f"name)\n")
    assert not (tmp_path / 'out' / 'log.txt').exists()


# ---------------------------------------------------------------------------------------------------- link loops
@pytest.mark.parametrize('link,target', [('train/loop', '..'), ('train/cat/up', '../..'), ('train/cat/me', '.')])
def test_class_folder_linking_back_is_refused(tmp_path, link, target):
    data = tree(tmp_path, {'train': ['airplane', 'cat']})
    (data / link).symlink_to(target)
    with pytest.raises(UsageError) as e:
        image_folder(str(data), 'train', None)
    assert str(e.value) == (f"{data / link} is a symbolic link to {(data / link).resolve()}, a folder it is inside "
                            f"of: its images would be listed again and again; remove the link")


def test_links_to_folders_elsewhere_are_followed(tmp_path):
    data = tree(tmp_path / 'data', {'train': ['airplane']})
    photos = tree(tmp_path / 'photos', {'all': ['cat']})
    (data / 'train' / 'cat').symlink_to(photos / 'all' / 'cat')
    (photos / 'all' / 'cat' / 'again.png').symlink_to(photos / 'all' / 'cat' / '0.png')  # a file link: no loop
    ds = image_folder(str(data), 'train', None)
    assert ds.classes == ['airplane', 'cat'] and len(ds) == 5


# ---------------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize('script, flag, where, reads', [
    (main_pretrain, '--output_dir', 'train/run', 'train'),  # a new class folder 'run' in the next run's tree
    (main_pretrain, '--log_dir', 'link/tb', 'train'),  # through a symbolic link to train/
    (main_finetune, '--output_dir', 'val/run', 'val'),
])
def test_a_run_folder_among_the_images_it_reads_is_refused_before_it_is_made(tmp_path, capsys, script, flag, where,
                                                                             reads):
    data = tree(tmp_path / 'data', {'train': ['a', 'b'], 'val': ['a', 'b']})
    (data / 'link').symlink_to(data / 'train')
    model = ['--model', 'mae_vit_tiny_patch4'] if script is main_pretrain else ['--model', 'vit_tiny_patch4',
                                                                                 '--nb_classes', 2]
    outputs = {'--output_dir': tmp_path / 'out', '--log_dir': tmp_path / 'out', flag: data / where}
    code, err = run_in_process(script, capsys, *model, '--input_size', 32, '--data_path', data, '--device', 'cpu',
                               *[a for pair in outputs.items() for a in pair])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.strip() == (f"error: {flag} {data / where} lies inside {data / reads}, which --data_path reads "
                           f"images from: what is written there would be read as data (a folder as a class, a PNG "
                           f"as an image); give a {flag} outside it")
    assert sorted(p.name for p in (data / reads).iterdir()) == ['a', 'b'] and not (tmp_path / 'out').exists()


def test_a_folder_of_images_as_the_output_dir_and_the_knn_data_are_refused(tmp_path, capsys):
    flat = tmp_path / 'photos'
    flat.mkdir()
    for k in range(4):
        Image.new('RGB', (8, 8), (k, 0, 0)).save(flat / f'{k}.png')
    knn = tree(tmp_path / 'knn', {'train': ['a', 'b'], 'val': ['a', 'b']})
    argv = ['--model', 'mae_vit_tiny_patch4', '--input_size', 32, '--device', 'cpu', '--epochs', 1]
    code, err = run_in_process(main_pretrain, capsys, *argv, '--data_path', flat, '--output_dir', flat)
    assert code == 2 and err.startswith(f"error: --output_dir {flat} is {flat}, which --data_path reads images from")
    code, err = run_in_process(main_pretrain, capsys, *argv, '--data_path', flat, '--output_dir', tmp_path / 'out',
                               '--knn_every', 1, '--knn_data_path', knn, '--log_dir', knn / 'val' / 'tb')
    assert code == 2 and err.startswith(f"error: --log_dir {knn / 'val' / 'tb'} lies inside {knn / 'val'}, which "
                                        f"--knn_data_path reads images from")
    assert sorted(p.name for p in flat.iterdir()) == ['0.png', '1.png', '2.png', '3.png']

