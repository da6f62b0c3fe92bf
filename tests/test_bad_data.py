"""Bad and unusual image files: odd modes load as RGB; a bad file stops the run with one line naming it, or, in skip
mode, is replaced by the next readable image and counted once per epoch."""
import json
import multiprocessing
import shutil
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as transforms
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import default_loader

from conftest import TINY, run_script
from util.data.image_decode import load_rgb
from util.data.image_folder import (image_folder, reset_skipped, restore_skipped, skipped_images, skipped_indices,
                               skipped_report)
from util.errors import UsageError

GOOD = sorted((TINY / 'train' / 'airplane').glob('*.jpg')) + sorted((TINY / 'train' / 'cat').glob('*.jpg'))
TO_TENSOR = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


# ---------------------------------------------------------------------------------------------------- test files
def truncated_jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = GOOD[0].read_bytes()
    path.write_bytes(data[:len(data) * 9 // 10])  # PIL: 'image file is truncated (N bytes not processed)'


def text_jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not an image\n")


def empty_jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'')


def odd_images(folder):
    """An image of each unusual mode; returns {name: (file, mode PIL opens it in)}."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(GOOD[1]).convert('RGB')
    out = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        out[name] = Image.open(folder / name).mode

    save('cmyk.jpg', base.convert('CMYK'))
    save('gray.png', base.convert('L'))
    save('gray16.png', Image.fromarray((np.asarray(base.convert('L')).astype(np.uint16) * 257)))
    palette = base.convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    save('palette.png', palette)
    save('palette_transparent.png', palette, transparency=bytes([0, 128] + [255] * 14))
    save('palette_transparent_index.png', palette, transparency=3)
    save('rgba.png', base.convert('RGBA'))
    save('gray_alpha.png', base.convert('LA'))
    return out


def good_tree(root, n_good=8):
    """root/train/<class>/ with ``n_good`` readable JPEGs copied from the tiny test folder."""
    for i, src in enumerate(GOOD[:n_good]):
        dst = root / 'train' / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return root


def mixed_tree(root):
    """12 files in two classes: 9 readable (7 JPEGs, a CMYK JPEG, a palette PNG), and 3 bad ones side by side
    (truncated JPEG, text named .jpg, empty .jpg)."""
    good_tree(root, n_good=7)
    cls = root / 'train' / 'cat'
    truncated_jpeg(cls / 'bad_1_truncated.jpg')
    text_jpeg(cls / 'bad_2_text.jpg')
    empty_jpeg(cls / 'bad_3_empty.jpg')
    Image.open(GOOD[0]).convert('CMYK').save(root / 'train' / 'airplane' / 'zz_cmyk.jpg')
    Image.open(GOOD[0]).convert('P', palette=Image.Palette.ADAPTIVE).save(
        root / 'train' / 'airplane' / 'zz_palette.png', transparency=0)
    return root


BAD_NAMES = ['bad_1_truncated.jpg', 'bad_2_text.jpg', 'bad_3_empty.jpg']


# ---------------------------------------------------------------------------------------------------- modes
def test_odd_modes_load_as_rgb(tmp_path, recwarn):
    modes = odd_images(tmp_path)
    assert modes['cmyk.jpg'] == 'CMYK' and modes['palette.png'] == 'P' and modes['rgba.png'] == 'RGBA'
    assert modes['gray16.png'].startswith('I')
    for name in modes:
        img = load_rgb(tmp_path / name)
        assert img.mode == 'RGB', name
        assert np.asarray(img).shape == (32, 32, 3), name
    assert not [w for w in recwarn if 'Palette' in str(w.message)]  # palette transparency goes through RGBA
    # 16-bit grayscale is scaled to 8 bits (PIL's own conversion would clip it to white)
    gray8 = np.asarray(load_rgb(tmp_path / 'gray.png'))
    gray16 = np.asarray(load_rgb(tmp_path / 'gray16.png'))
    assert np.array_equal(gray8, gray16)
    # grayscale, CMYK and alpha images: the same pixels as torchvision's default loader
    for name in ('gray.png', 'cmyk.jpg', 'rgba.png', 'gray_alpha.png', 'palette.png'):
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name)), np.asarray(default_loader(tmp_path / name)))


def test_ordinary_files_identical_to_torchvision():
    ours = image_folder(str(TINY), 'train', TO_TENSOR)
    theirs = datasets.ImageFolder(str(TINY / 'train'), transform=TO_TENSOR)
    assert ours.samples == theirs.samples and ours.classes == theirs.classes
    for i in range(len(theirs)):
        a, ta = ours[i]
        b, tb = theirs[i]
        assert ta == tb and torch.equal(a, b)
    for path, _ in theirs.samples:
        assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(default_loader(path)))
    assert repr(ours).splitlines()[0] == repr(theirs).splitlines()[0] == 'Dataset ImageFolder'


# ---------------------------------------------------------------------------------------------------- default mode
@pytest.mark.parametrize('maker,name,reason', [
    (truncated_jpeg, 'trunc.jpg', 'image file is truncated'),
    (text_jpeg, 'text.jpg', 'not an image file PIL can read'),
    (empty_jpeg, 'empty.jpg', 'empty file'),
])
def test_default_names_the_bad_file(tmp_path, maker, name, reason):
    good_tree(tmp_path, n_good=2)
    bad = tmp_path / 'train' / 'cat' / name
    maker(bad)
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR)
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(UsageError) as e:
        ds[index]
    msg = str(e.value)
    assert '\n' not in msg
    assert msg.startswith(f"bad image file {bad} ({reason}")
    assert msg.endswith("remove or replace it, or pass --skip_bad_images to skip such files")


def test_default_unreadable_file(tmp_path):
    """A file listed but not readable: a dangling link (permissions would not stop root, who runs CI)."""
    good_tree(tmp_path, n_good=2)
    bad = tmp_path / 'train' / 'airplane' / 'gone.jpg'
    bad.symlink_to(tmp_path / 'moved_away.jpg')
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR)
    with pytest.raises(UsageError, match=r"bad image file .*gone\.jpg \(No such file or directory\)"):
        ds[[p for p, _ in ds.samples].index(str(bad))]


@pytest.mark.parametrize('workers', [0, 2])
def test_default_error_through_dataloader(tmp_path, workers):
    good_tree(tmp_path, n_good=7)
    bad = tmp_path / 'train' / 'cat' / 'bad.jpg'
    truncated_jpeg(bad)
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
    with pytest.raises(UsageError) as e:
        for _ in loader:
            pass
    # in a worker the message gets the worker's traceback; its last line is still the one-line error
    last = str(e.value).strip().splitlines()[-1]
    if workers:
        assert last.startswith('util.errors.UsageError: ')
        last = last[len('util.errors.UsageError: '):]
    assert last.startswith(f"bad image file {bad} (image file is truncated")


# ---------------------------------------------------------------------------------------------------- skip mode
def test_skip_substitutes_next_readable_sample(tmp_path):
    mixed_tree(tmp_path)
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR, skip_bad=True)
    paths = [p for p, _ in ds.samples]
    first_bad = paths.index(str(tmp_path / 'train' / 'cat' / BAD_NAMES[0]))
    assert [paths[first_bad + k].rsplit('/', 1)[1] for k in range(3)] == BAD_NAMES
    after = (first_bad + 3) % len(ds)
    for k in range(3):
        x, t = ds[first_bad + k]
        y, u = ds[after]
        assert t == u and torch.equal(x, y)
    assert skipped_images(ds) == 3


@pytest.mark.parametrize('workers,context', [(0, None), (2, None), (2, 'spawn')])
def test_skip_mode_full_batches_and_counts(tmp_path, capfd, workers, context):
    mixed_tree(tmp_path)
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR, skip_bad=True)
    assert len(ds) == 12
    # spawn: persistent workers (one start-up), which must also see reset_skipped() from the main process
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=workers,
                                         multiprocessing_context=context, persistent_workers=context == 'spawn',
                                         generator=torch.Generator().manual_seed(0))
    for epoch in range(2):
        reset_skipped(ds)
        sizes = [x.shape for x, _ in loader]
        assert sizes == [torch.Size([4, 3, 16, 16])] * 3
        assert skipped_images(ds) == 3
    err = capfd.readouterr().err
    for name in BAD_NAMES:  # announced once per file, not once per epoch or per worker
        assert err.count(f"warning: skipping bad image file {tmp_path / 'train' / 'cat' / name} (") == 1, err
    reset_skipped(ds)
    assert skipped_images(ds) == 0


class SlowFlags:
    """A dataset's shared per-file flags, slow to read a file's first mark: widens the window in which workers that
    meet the same bad file at once would each see it as new, from microseconds to half a second."""

    def __init__(self, flags):
        self.flags = flags

    def __getitem__(self, index):
        value = self.flags[index].clone()  # the value now (indexing gives a view of the shared memory)
        if not value:
            time.sleep(0.5)
        return value

    def __setitem__(self, index, value):
        self.flags[index] = value


def _read_at_once(dataset, index, start, stderr_file):
    # a file of its own: writes at the same instant to one shared file can overwrite each other
    with open(stderr_file, 'w') as sys.stderr:
        start.wait()
        dataset[index]


def test_workers_meeting_a_bad_file_at_once_announce_it_once(tmp_path):
    mixed_tree(tmp_path)
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR, skip_bad=True)
    ds._bad_ever = SlowFlags(ds._bad_ever)
    bad = tmp_path / 'train' / 'cat' / BAD_NAMES[2]
    index = [p for p, _ in ds.samples].index(str(bad))
    Image.init()  # all of PIL's decoders imported before the fork, so that the three reach the file together
    fork = multiprocessing.get_context('fork')  # the DataLoader's default workers on Linux
    start = fork.Barrier(3)
    workers = [fork.Process(target=_read_at_once, args=(ds, index, start, tmp_path / f'stderr{k}')) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    err = ''.join((tmp_path / f'stderr{k}').read_text() for k in range(3))
    assert err.count(f"warning: skipping bad image file {bad} (") == 1, err
    assert skipped_images(ds) == 1


def test_skip_count_survives_a_resume(tmp_path, capfd):
    mixed_tree(tmp_path)
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR, skip_bad=True)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.rsplit('/', 1)[1] in BAD_NAMES]
    ds[bad[0]]  # the epoch so far met the three bad files (the substitute of the first is after the third)
    saved = skipped_indices(ds)
    assert saved == bad
    resumed = image_folder(str(tmp_path), 'train', TO_TENSOR, skip_bad=True)
    capfd.readouterr()
    restore_skipped(resumed, saved)
    for i in range(len(resumed)):
        resumed[i]
    assert skipped_images(resumed) == 3
    assert 'warning' not in capfd.readouterr().err  # already announced before the interruption


def test_skip_mode_without_bad_files_is_unchanged():
    plain = image_folder(str(TINY), 'train', TO_TENSOR)
    skip = image_folder(str(TINY), 'train', TO_TENSOR, skip_bad=True)
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], skip[i][0])
    assert skipped_images(skip) == 0 and skipped_images(plain) == 0


def test_skip_mode_all_bad(tmp_path):
    (tmp_path / 'train' / 'x').mkdir(parents=True)
    text_jpeg(tmp_path / 'train' / 'x' / 'a.jpg')
    empty_jpeg(tmp_path / 'train' / 'x' / 'b.jpg')
    ds = image_folder(str(tmp_path), 'train', TO_TENSOR, skip_bad=True)
    with pytest.raises(UsageError, match="none of its 2 image files can be read"):
        ds[0]


def test_skipped_report_line():
    assert skipped_report(1, 3) == ("Epoch 3: skipped 1 bad image file (--skip_bad_images; each was replaced by "
                                    "the next readable image)")
    assert 'skipped 2 bad image files' in skipped_report(2, 0)


# ---------------------------------------------------------------------------------------------------- end to end
def pretrain_argv(data, out, *extra, workers=0):
    return ['main_pretrain.py', '--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '4',
            '--epochs', '1', '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', str(workers),
            '--data_path', data, '--output_dir', out, '--log_dir', out, *extra]


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_main_pretrain_stops_on_bad_file(tmp_path, workers):
    data = good_tree(tmp_path / 'data', n_good=7)
    bad = data / 'train' / 'cat' / 'bad.jpg'
    truncated_jpeg(bad)
    result = run_script(*pretrain_argv(data, tmp_path / 'out', workers=workers), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: bad image file {bad} (image file is truncated"), result.stderr[-3000:]
    assert last.endswith("pass --skip_bad_images to skip such files")
    assert not (tmp_path / 'out' / 'log.txt').exists()


@pytest.mark.slow
def test_main_pretrain_skip_bad_images(tmp_path):
    """Needs ``--skip_bad_images`` wired into main_pretrain.py."""
    data = mixed_tree(tmp_path / 'data')
    out = tmp_path / 'out'
    result = run_script(*pretrain_argv(data, out, '--skip_bad_images', '--epochs', '2'), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1]
    assert [r['train_skipped_images'] for r in rows] == [3, 3]
    for name in BAD_NAMES:
        assert result.stderr.count(f"warning: skipping bad image file {data / 'train' / 'cat' / name}") == 1
    assert "Epoch 1: skipped 3 bad image files" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize('script_name', ['main_finetune.py', 'main_linprobe.py'])
def test_finetune_and_linprobe_bad_images(tmp_path, script_name):
    """The same flag and the same default error in the classification entry points."""
    data = mixed_tree(tmp_path / 'data')
    shutil.copytree(TINY / 'val', data / 'val')
    argv = [script_name, '--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--epochs', '1',
            '--nb_classes', '2', '--data_path', data, '--device', 'cpu', '--num_workers', '0',
            '--output_dir', tmp_path / 'out', '--log_dir', tmp_path / 'out']
    failed = run_script(*argv)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith('error: bad image file ')
    result = run_script(*argv, '--skip_bad_images')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / 'out' / 'log.txt').read_text().splitlines()]
    assert [r['train_skipped_images'] for r in rows] == [3]


def test_large_images_load_quietly_and_too_large_ones_are_named(tmp_path, monkeypatch, recwarn):
    """PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; scaled down here (a 10000x10000 photo warns,
    a 20000x20000 one is refused with the default limit)."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    folder = tmp_path / 'data' / 'train' / 'a'
    folder.mkdir(parents=True)
    Image.new('RGB', (40, 30)).save(folder / 'large.png')  # 1200 pixels: above the limit, below twice it
    assert load_rgb(folder / 'large.png').size == (40, 30)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    Image.new('RGB', (50, 50)).save(folder / 'huge.png')  # 2500 pixels: refused by PIL
    ds = image_folder(str(tmp_path / 'data'), 'train', TO_TENSOR)
    with pytest.raises(UsageError) as e:
        ds[[p for p, _ in ds.samples].index(str(folder / 'huge.png'))]
    assert str(e.value) == (f"image file {folder / 'huge.png'} is larger than PIL reads by default (Image size "
                            f"(2500 pixels), limit 1000 pixels, a guard against decompression bombs): shrink it, "
                            f"raise the limit with MAE_MAX_IMAGE_PIXELS=<pixels> if you trust the file, or pass "
                            f"--skip_bad_images to skip such files")
