"""Your own images (docs/own-images.md): the sources of pre-training (ImageFolder, a flat folder, a list), the
formats (16-bit PNG/TIFF, multi-band TIFF, WebP, BMP, .npy), --in_chans, the statistics (--mean/--std, --data_stats
auto and its cache, carried through checkpoint -> fine-tuning -> visualize), the warm start (--init_from) across
input sizes and channel counts, and the one-line errors of bad input."""
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from conftest import ROOT, TINY, run_in_process, save_pretrained

import extract_features  # noqa: E402
import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
import models_mae  # noqa: E402
from util.data import data_stats  # noqa: E402
from util.datasets import pretrain_transform  # noqa: E402
from util.data.fast_data import CropFlip, collate_pixels  # noqa: E402
from util.data.image_decode import ChannelMismatch, ImageReader, load_rgb, read_image  # noqa: E402
from util.data.image_folder import ImageFolder  # noqa: E402
from util.data.image_sources import list_images, pretrain_dataset, pretrain_source, read_list  # noqa: E402
import util.training.process as process  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.checkpoints.from_checkpoint import adapt_patch_embed, init_from_checkpoint  # noqa: E402
from versions import exact_numbers_expected, stack_note  # noqa: E402

sys.path.insert(0, str(ROOT / 'demo'))
import visualize as vis  # noqa: E402

RNG = np.random.default_rng(0)


def png16(path, pixels):
    """A 16-bit RGB (H, W, 3) or RGBA PNG, written by hand: Pillow writes 16-bit PNGs only for one grey channel."""
    h, w, c = pixels.shape
    raw = b''.join(b'\0' + pixels[y].astype('>u2').tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    color_type = {3: 2, 4: 6}[c]
    Path(path).write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color_type, 0, 0, 0))
                           + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
    return path


# ---------------------------------------------------------------------------------------------------- formats
def test_8bit_rgb_files_stay_the_references_pil_images(tmp_path):
    rgb = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for name in ('a.jpg', 'a.png', 'a.bmp', 'a.webp', 'a.tif'):
        Image.fromarray(rgb).save(tmp_path / name)
        img = read_image(tmp_path / name)
        assert isinstance(img, Image.Image) and img.mode == 'RGB'
        assert np.array_equal(np.asarray(img), np.asarray(load_rgb(tmp_path / name))), name
    Image.fromarray(rgb[..., 0]).save(tmp_path / 'g.png')
    assert read_image(tmp_path / 'g.png').mode == 'RGB'  # grey -> 3 channels at the default --in_chans 3
    grey = read_image(tmp_path / 'g.png', in_chans=1)
    assert grey.mode == 'L' and np.array_equal(np.asarray(grey), rgb[..., 0])  # kept as one channel
    with pytest.raises(ChannelMismatch, match='colour: 3 channels that differ, --in_chans is 1; --to_grayscale conv'):
        read_image(tmp_path / 'a.png', in_chans=1)


def test_16bit_files_keep_their_precision(tmp_path):
    grey = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / 'g16.png')
    Image.fromarray(grey).save(tmp_path / 'g16.tif')
    for name in ('g16.png', 'g16.tif'):
        x = read_image(tmp_path / name, in_chans=1)
        assert x.dtype == torch.float32 and x.shape == (1, 9, 7)
        assert torch.equal(x[0], torch.from_numpy(grey.astype(np.float32) / np.float32(65535)))  # not cut to 8 bits
        assert torch.equal(read_image(tmp_path / name)[2], x[0])  # 3 channels: the grey repeated, as PIL's RGB
    rgb = RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    x = read_image(png16(tmp_path / 'rgb16.png', rgb))
    assert torch.equal(x, torch.from_numpy(rgb.astype(np.float32).transpose(2, 0, 1) / np.float32(65535)))
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 65535, np.uint16)], axis=2)
    assert torch.equal(read_image(png16(tmp_path / 'rgba16.png', rgba)), x)  # the opacity dropped


def test_multiband_tiff_and_npy(tmp_path):
    tifffile = pytest.importorskip('tifffile')
    bands = RNG.integers(0, 65536, (6, 8, 9), dtype=np.uint16)
    expected = torch.from_numpy(bands.astype(np.float32) / np.float32(65535))
    tifffile.imwrite(tmp_path / 'planar.tif', bands)  # (bands, H, W)
    tifffile.imwrite(tmp_path / 'contig.tiff', bands.transpose(1, 2, 0), planarconfig='contig')
    np.save(tmp_path / 'a.npy', bands.transpose(1, 2, 0))
    for name in ('planar.tif', 'contig.tiff', 'a.npy'):
        assert torch.equal(read_image(tmp_path / name, in_chans=6), expected), name
        with pytest.raises(ChannelMismatch, match='6 channels, --in_chans is 3'):
            read_image(tmp_path / name)
    np.save(tmp_path / 'f.npy', np.full((4, 5, 2), 0.25, np.float32))  # floats as they are
    assert torch.equal(read_image(tmp_path / 'f.npy', in_chans=2), torch.full((2, 4, 5), 0.25))
    np.save(tmp_path / 'u8.npy', np.full((4, 5), 51, np.uint8))  # H x W: one channel, 8 bits
    assert torch.allclose(read_image(tmp_path / 'u8.npy', in_chans=1), torch.full((1, 4, 5), 0.2))


def test_a_file_that_does_not_fit_in_chans_is_a_bad_file(tmp_path):
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(tmp_path / 'train' / 'c' / f'{k}.png')
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / 'train' / 'c' / '1b.png')
    strict = ImageFolder(tmp_path / 'train', loader=ImageReader(1))
    with pytest.raises(UsageError, match=r"1b.png \(colour: 3 channels that differ, --in_chans is 1; "
                                         r"--to_grayscale converts colour to grey\): .*--skip_bad_images"):
        strict[2]  # (0.png, 1.png, 1b.png, 2.png)
    skipping = ImageFolder(tmp_path / 'train', loader=ImageReader(1), skip_bad=True)
    assert np.asarray(skipping[2][0]).max() == 20  # replaced by the next readable image, 2.png
    assert int(skipping._bad_this_epoch.sum()) == 1


def test_grayscale_stored_as_rgb_is_one_channel_under_in_chans_1(tmp_path):
    """Most X-ray and microscopy sets store grey as RGB: equal channels are read as one; --in_chans 3 (the default)
    reads them as before."""
    grey = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / 'g.png')
    Image.fromarray(rgb).save(tmp_path / 'g.bmp')
    Image.fromarray(np.concatenate([rgb, np.full((12, 10, 1), 200, np.uint8)], axis=2)).save(tmp_path / 'ga.png')
    for name in ('g.png', 'g.bmp', 'ga.png'):
        img = read_image(tmp_path / name, in_chans=1)
        assert img.mode == 'L' and np.array_equal(np.asarray(img), grey), name
        assert np.array_equal(np.asarray(read_image(tmp_path / name)), np.asarray(load_rgb(tmp_path / name)))
    Image.fromarray(rgb).save(tmp_path / 'g.jpg', quality=95)  # a JPEG of grey: its decoded channels are equal
    assert read_image(tmp_path / 'g.jpg', in_chans=1).mode == 'L'
    grey16 = RNG.integers(0, 65536, (5, 6), dtype=np.uint16)
    x = read_image(png16(tmp_path / 'g16.png', np.repeat(grey16[..., None], 3, axis=2)), in_chans=1)
    assert torch.equal(x, torch.from_numpy(grey16.astype(np.float32) / np.float32(65535))[None])  # all 16 bits
    np.save(tmp_path / 'g.npy', np.repeat(grey16[..., None], 3, axis=2))
    assert torch.equal(read_image(tmp_path / 'g.npy', in_chans=1), x)
    # a folder of them is read whole, none skipped as bad
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(tmp_path / 'train' / 'c' / f'{k}.png')
    folder = ImageFolder(tmp_path / 'train', loader=ImageReader(1), skip_bad=True)
    assert [np.asarray(folder[k][0]).max() for k in range(3)] == [0, 10, 20]
    assert int(folder._bad_this_epoch.sum()) == 0


def test_colour_under_in_chans_1_is_refused_or_converted_with_to_grayscale(tmp_path):
    colour = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / 'c.png')
    colour16 = RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    png16(tmp_path / 'c16.png', colour16)
    np.save(tmp_path / 'c.npy', colour16)
    for name in ('c.png', 'c16.png', 'c.npy'):
        with pytest.raises(ChannelMismatch, match='--to_grayscale converts colour to grey'):
            read_image(tmp_path / name, in_chans=1)
    converted = read_image(tmp_path / 'c.png', in_chans=1, to_grayscale=True)
    assert converted.mode == 'L'
    assert np.array_equal(np.asarray(converted), np.asarray(Image.fromarray(colour).convert('L')))  # PIL's 'L'
    luma = torch.from_numpy(colour16.astype(np.float32) / np.float32(65535)) @ torch.tensor([0.299, 0.587, 0.114])
    for name in ('c16.png', 'c.npy'):
        torch.testing.assert_close(read_image(tmp_path / name, in_chans=1, to_grayscale=True), luma[None])
    # the flag: beside --in_chans in the entry points, and in the reader of their flags
    for parser in (main_pretrain.get_args_parser(), vis.get_args_parser()):
        help_text = next(a.help for a in parser._actions if a.dest == 'to_grayscale')
        assert help_text.startswith('[new]')
    args = main_pretrain.get_args_parser().parse_args(['--in_chans', '1', '--to_grayscale'])
    assert ImageReader.of(args)(tmp_path / 'c.png').mode == 'L'
    assert np.asarray(ImageReader.of(args)(tmp_path / 'c.png')).tolist() == np.asarray(converted).tolist()
    mean, _, count, bad, _ = data_stats.measure([str(tmp_path / 'c.png')], 1, to_grayscale=True)
    assert (count, bad) == (1, 0) and mean == pytest.approx([np.asarray(converted).mean() / 255])
    with pytest.raises(UsageError, match=r"c.png \(colour: .*--to_grayscale converts colour to grey\)"):
        data_stats.measure([str(tmp_path / 'c.png')], 1)


# ---------------------------------------------------------------------------------------------------- sources
def test_flat_folder_recursive_sorted_symlinks_once(tmp_path):
    root = tmp_path / 'photos'
    for rel in ('b.jpg', 'a/z.png', 'a/y/x.npy', 'c.txt', 'a0.bmp'):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b'')
    os.symlink(root / 'a', root / 'a' / 'y' / 'loop')  # a link back up the tree
    os.symlink(root / 'a', root / 'link_to_a')  # a second way into a/
    names = [os.path.relpath(p, root) for p in list_images(str(root))]
    assert names == ['a/y/x.npy', 'a/z.png', 'a0.bmp', 'b.jpg']  # sorted by path, each folder once, no .txt
    assert pretrain_source(str(root)) == ('files', str(root))
    assert pretrain_source(str(TINY)) == ('folder', os.path.join(str(TINY), 'train'))  # the reference's
    # a train/ of images without class folders is a flat folder, not refused
    (tmp_path / 'd' / 'train').mkdir(parents=True)
    (tmp_path / 'd' / 'train' / 'i.png').write_bytes(b'')
    assert pretrain_source(str(tmp_path / 'd')) == ('files', str(tmp_path / 'd' / 'train'))


def test_lists_and_folders_give_the_same_images(tmp_path):
    folder = pretrain_dataset(str(TINY))
    assert isinstance(folder, ImageFolder) and len(folder) == 16
    paths = [p for p, _ in folder.samples]
    listed = tmp_path / 'list.txt'
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    listed.write_text('# my images\n' + '\n'.join(rel[:8]) + '\n\n' + '\n'.join(paths[8:]) + '\n')
    from_list = pretrain_dataset(str(listed))
    assert [os.path.realpath(p) for p, _ in from_list.samples] == [os.path.realpath(p) for p in paths]
    flat = pretrain_dataset(os.path.join(str(TINY), 'train', 'airplane'))
    assert len(flat) == 8 and flat.samples[0][1] == 0
    assert np.array_equal(np.asarray(flat[0][0]), np.asarray(folder[0][0]))


def test_list_errors(tmp_path):
    (tmp_path / 'empty.txt').write_text('\n# nothing\n')
    with pytest.raises(UsageError, match='names no image file'):
        read_list(str(tmp_path / 'empty.txt'))
    (tmp_path / 'l.txt').write_text(''.join(f'missing{k}.png\n' for k in range(5)) + str(TINY / 'val/cat/0000.jpg'))
    with pytest.raises(UsageError, match=r'5 of its 6 files do not exist, e\.g\. .*missing0.png, .*missing1.png, '
                                         r'.*missing2.png, \.\.\.$'):
        read_list(str(tmp_path / 'l.txt'))


# ---------------------------------------------------------------------------------------------------- transforms
def test_tensor_path_draws_what_the_pil_path_draws(tmp_path):
    grey = RNG.integers(0, 65536, (40, 30), dtype=np.uint16)
    x = torch.from_numpy(grey.astype(np.float32) / 65535)[None]
    pil = Image.fromarray((grey // 257).astype(np.uint8))
    transform = pretrain_transform(16, [0.5], [0.25])
    torch.manual_seed(3)
    a = transform(x)
    after_tensor = torch.get_rng_state()
    torch.manual_seed(3)
    b = transform(pil)
    assert torch.equal(after_tensor, torch.get_rng_state())  # the same crop and flip draws
    assert a.shape == b.shape == (1, 16, 16)
    # the same window, resampled from 16 and from 8 bits (antialiased on both paths: torchvision 0.16's tensor
    # kernels did not by default). Pillow's bicubic of 8 bits moves by up to 8 levels at a few pixels between
    # versions (10.1 against 13): 0.125 at std 0.25 on the oldest stack, 0.03 on the reference's
    assert (a - b).abs().max() < (0.1 if exact_numbers_expected() else 0.15), stack_note()
    assert (a - b).abs().mean() < 0.015
    # the fast loader's workers: 16-bit pixels as float on the 0-255 scale, mixed with uint8 ones in a batch
    Image.fromarray(grey).save(tmp_path / 'g16.png')
    pil.save(tmp_path / 'g8.png')
    crop = CropFlip(16, in_chans=1)
    torch.manual_seed(3)
    fast16 = crop(str(tmp_path / 'g16.png'))
    fast8 = crop(str(tmp_path / 'g8.png'))
    assert fast16.dtype == torch.float32 and fast8.dtype == torch.uint8 and fast16.shape == (1, 16, 16)
    assert collate_pixels([(fast16, 0), (fast8, 0)])[0].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- statistics
def test_defaults_are_imagenets_bit_for_bit():
    assert data_stats.DEFAULT_MEAN == tuple(IMAGENET_DEFAULT_MEAN)
    assert data_stats.DEFAULT_STD == tuple(IMAGENET_DEFAULT_STD)
    old = data_stats.stats_from_checkpoint({'model': 'mae_vit_large_patch16'})  # ours before --mean, the reference's
    assert old == {'mean': list(IMAGENET_DEFAULT_MEAN), 'std': list(IMAGENET_DEFAULT_STD), 'in_chans': 3,
                   'stored': False}
    ours = data_stats.stats_from_checkpoint({'mean': [0.5], 'std': [0.2], 'in_chans': 1})
    assert ours == {'mean': [0.5], 'std': [0.2], 'in_chans': 1, 'stored': True}


def test_measure_and_cache(tmp_path, capsys):
    for k, value in enumerate((51, 153)):  # 0.2 and 0.6: mean 0.4, std 0.2
        Image.fromarray(np.full((6, 6), value, np.uint8)).save(tmp_path / f'{k}.png')
    paths = [str(tmp_path / f'{k}.png') for k in range(2)]
    mean, std, count, bad, error = data_stats.measure(paths, 1)
    assert (count, bad) == (2, 0) and mean == pytest.approx([0.4]) and std == pytest.approx([0.2])
    assert error == pytest.approx(0.2 / 2 ** 0.5)
    assert data_stats.sample_indices(10, 4) == [0, 2, 5, 7] and data_stats.sample_indices(3, 4) == [0, 1, 2]
    args = main_pretrain.get_args_parser().parse_args(['--in_chans', '1', '--data_stats', 'auto', '--output_dir',
                                                       str(tmp_path / 'out'), '--data_path', str(tmp_path)])
    data_stats.resolve(args, lambda: paths)
    assert args.mean == pytest.approx([0.4]) and 'measured on 2 of 2 images' in capsys.readouterr().out
    cached = json.loads((tmp_path / 'out' / data_stats.CACHE_NAME).read_text())
    assert cached['mean'] == args.mean and cached['in_chans'] == 1
    args.mean = args.std = None
    data_stats.resolve(args, lambda: pytest.fail('measured again'))  # a resumed run reads the cache
    assert args.mean == cached['mean'] and 'from ' in capsys.readouterr().out


@pytest.mark.parametrize('content, problem', [
    ({'in_chans': 1, 'mean': [0.4], 'std': [0.0]}, 'holds std [0.0], which cannot normalise'),
    ({'in_chans': 1, 'mean': ['x'], 'std': [0.2]}, "does not hold 1 numbers as mean and std (mean ['x'], std [0.2])"),
    ({'in_chans': 1, 'mean': [0.4]}, 'does not hold 1 numbers as mean and std (mean [0.4], std None)'),
])
def test_a_damaged_cache_is_named_and_measured_again(tmp_path, capsys, content, problem):
    """A data_stats.json that cannot normalise (std 0, not numbers) is named in one line and measured again; it was
    blamed on --finetune in a pre-training run, without naming the file."""
    for k, value in enumerate((51, 153)):  # mean 0.4, std 0.2
        Image.fromarray(np.full((6, 6), value, np.uint8)).save(tmp_path / f'{k}.png')
    cache = tmp_path / 'out' / data_stats.CACHE_NAME
    cache.parent.mkdir()
    cache.write_text(json.dumps(content))
    args = main_pretrain.get_args_parser().parse_args(['--in_chans', '1', '--data_stats', 'auto', '--output_dir',
                                                       str(tmp_path / 'out'), '--data_path', str(tmp_path)])
    data_stats.resolve(args, lambda: [str(tmp_path / f'{k}.png') for k in range(2)])
    out = capsys.readouterr().out
    assert f"Note: {cache} {problem}: measuring again" in out and 'measured on 2 of 2 images' in out
    assert args.mean == pytest.approx([0.4]) and args.std == pytest.approx([0.2])
    assert json.loads(cache.read_text())['std'] == pytest.approx([0.2])


# ---------------------------------------------------------------------------------------------------- warm start
def test_warm_start_across_sizes_and_channels(tmp_path, capsys):
    path = save_pretrained(tmp_path / 'rgb.pth')  # a tiny full MAE at 32 px, 3 channels
    rgb = torch.load(path, weights_only=True)['model']
    torch.manual_seed(1)
    model = models_mae.mae_vit_tiny_patch4(img_size=48, in_chans=1)
    torch.manual_seed(1)
    fresh = models_mae.mae_vit_tiny_patch4(img_size=48, in_chans=1)
    init_from_checkpoint(model, str(path))
    out = capsys.readouterr().out
    assert 'encoder and decoder' in out and 'adapted from 3 to 1 channels' in out
    sd = model.state_dict()
    assert torch.equal(sd['blocks.1.attn.qkv.weight'], rgb['blocks.1.attn.qkv.weight'])
    assert torch.allclose(sd['patch_embed.proj.weight'], rgb['patch_embed.proj.weight'].sum(1, keepdim=True),
                          atol=1e-7)  # one channel: the RGB filters summed
    assert sd['pos_embed'].shape[1] == sd['decoder_pos_embed'].shape[1] == 145  # 12x12 patches + class token
    assert not torch.equal(sd['decoder_pos_embed'], fresh.state_dict()['decoder_pos_embed'])  # interpolated
    assert torch.allclose(sd['decoder_pred.bias'], rgb['decoder_pred.bias'].view(16, 3).mean(1))
    # N channels: a grey image of N equal channels gives the activations the RGB model gives it
    rgb_model = models_mae.mae_vit_tiny_patch4()
    rgb_model.load_state_dict(rgb)
    grey = torch.rand(2, 1, 32, 32)
    for n in (1, 4, 6):
        adapted = torch.nn.Conv2d(n, 64, 4, 4)
        adapted.weight.data = adapt_patch_embed(rgb['patch_embed.proj.weight'], n)
        adapted.bias.data = rgb['patch_embed.proj.bias']
        assert torch.allclose(adapted(grey.repeat(1, n, 1, 1)), rgb_model.patch_embed.proj(grey.repeat(1, 3, 1, 1)),
                              atol=1e-5)
    # encoder only: the decoder keeps the model's own initialisation
    enc = save_pretrained(tmp_path / 'enc.pth', encoder_only=True)
    torch.manual_seed(2)
    model = models_mae.mae_vit_tiny_patch4(in_chans=3)
    torch.manual_seed(2)
    fresh = models_mae.mae_vit_tiny_patch4(in_chans=3)
    init_from_checkpoint(model, str(enc))
    assert 'encoder only' in capsys.readouterr().out
    assert torch.equal(model.decoder_pred.weight, fresh.decoder_pred.weight)
    assert torch.equal(model.patch_embed.proj.weight, rgb['patch_embed.proj.weight'])


def test_warm_start_refusals(tmp_path):
    six = tmp_path / 'six.pth'
    torch.save({'model': models_mae.mae_vit_tiny_patch4(in_chans=6).state_dict()}, six)
    with torch.device('meta'):
        with pytest.raises(UsageError, match='is a 6-channel model and --in_chans is 4: only RGB or grey'):
            init_from_checkpoint(models_mae.mae_vit_tiny_patch4(in_chans=4), str(six), check_only=True)
        init_from_checkpoint(models_mae.mae_vit_tiny_patch4(in_chans=6, img_size=16), str(six), check_only=True)
        with pytest.raises(UsageError, match='other shapes'):
            init_from_checkpoint(models_mae.mae_vit_small_patch4(in_chans=6), str(six), check_only=True)


# ---------------------------------------------------------------------------------------------------- end to end
def grey_tree(root, n=4, size=20):
    """train/ and val/ of two class folders of 16-bit grey PNGs."""
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(RNG.integers(0, 65536, (size, size), dtype=np.uint16)).save(
                    root / split / c / f'{k}.png')
    return root


def run_ok(module, capsys, *argv):
    """An entry point's main() through run_main, which returns when the run succeeds; returns its stdout."""
    process.run_main(module.main, module.get_args_parser(), [str(a) for a in argv])
    return capsys.readouterr().out


def test_stats_round_trip_pretrain_finetune_visualize(tmp_path, capsys):
    data = grey_tree(tmp_path / 'data')
    rgb = save_pretrained(tmp_path / 'rgb.pth')
    out = tmp_path / 'pre'
    base = ['--model', 'mae_vit_tiny_patch4', '--input_size', '16', '--batch_size', '4', '--warmup_epochs', '0',
            '--data_path', data / 'train' / 'a', '--device', 'cpu', '--num_workers', '0', '--output_dir', out,
            '--in_chans', '1', '--data_stats', 'auto', '--init_from', rgb, '--norm_pix_loss']
    first = run_ok(main_pretrain, capsys, *base, '--epochs', '1')
    assert 'measured on 4 of 4 images' in first and 'Initialised from' in first
    # said once, by the load (the checks before any compute are silent)
    assert first.count('Position interpolate from 8x8 to 4x4') == 1
    assert first.count('decoder_pos_embed: position interpolate from 8x8 to 4x4') == 1
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    stats = json.loads((out / data_stats.CACHE_NAME).read_text())
    assert ckpt['args']['mean'] == stats['mean'] and ckpt['args']['in_chans'] == 1
    assert ckpt['model']['patch_embed.proj.weight'].shape[1] == 1
    # continuing: the run's own checkpoint and cached statistics, the init not applied again
    # (with the kNN monitor on, which reads grey images as the run does: one channel, its statistics)
    second = run_ok(main_pretrain, capsys, *base, '--epochs', '2', '--knn_every', '1', '--knn_data_path', data)
    assert 'Auto-resume' in second and 'Initialised from' not in second
    assert 'measured on 4 of 4' not in second and 'data_stats auto) from' in second
    last = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert last['epoch'] == 1 and 0 <= last['knn_top1'] <= 100
    knn = run_ok(extract_features, capsys, data, '--checkpoint', out / 'checkpoint-last.pth', '--knn', '--device',
                 'cpu', '--num_workers', '0')
    assert 'Images: 1 channel(s), normalised with mean' in knn and f"top-1 {last['knn_top1']:.2f}%" in knn

    ft = tmp_path / 'ft'
    said = run_ok(main_finetune, capsys, '--model', 'vit_tiny_patch4', '--input_size', '16', '--nb_classes', '2',
                  '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--data_path', data, '--device',
                  'cpu', '--num_workers', '0', '--output_dir', ft, '--finetune', out / 'checkpoint-last.pth')
    assert '--in_chans 1: from --finetune' in said and 'Normalisation: mean' in said
    ft_args = torch.load(ft / 'checkpoint-last.pth', weights_only=True)['args']
    assert (ft_args['mean'], ft_args['std'], ft_args['in_chans']) == (stats['mean'], stats['std'], 1)

    said = run_ok(vis, capsys, data / 'val' / 'a', '--checkpoint', out / 'checkpoint-last.pth', '--grid', '--out',
                  tmp_path / 'fig.png')
    assert 'from --checkpoint' in said and (tmp_path / 'fig.png').is_file()


def test_colour_photos_train_one_channel_with_to_grayscale(tmp_path, capsys):
    """--to_grayscale end to end: the statistics measured and the model trained on the converted images, the flag
    stored in the checkpoint, which extract_features.py follows (refused without it: test_bad_input_is_one_line)."""
    out = tmp_path / 'pre'
    run_ok(main_pretrain, capsys, '--model', 'mae_vit_tiny_patch4', '--input_size', '16', '--batch_size', '4',
           '--epochs', '1', '--warmup_epochs', '0', '--data_path', TINY / 'train', '--device', 'cpu', '--num_workers',
           '0', '--output_dir', out, '--in_chans', '1', '--data_stats', 'auto', '--to_grayscale')
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['args']['to_grayscale'] is True and ckpt['model']['patch_embed.proj.weight'].shape[1] == 1
    paths = sorted(str(p) for p in (TINY / 'train').rglob('*') if p.is_file())
    grey = [np.asarray(Image.open(p).convert('RGB').convert('L'), np.float64) / 255 for p in paths]
    assert ckpt['args']['mean'] == pytest.approx([np.mean([g.mean() for g in grey])], abs=1e-6)
    said = run_ok(extract_features, capsys, TINY / 'val', '--checkpoint', out / 'checkpoint-last.pth', '--device',
                  'cpu', '--num_workers', '0', '--out', tmp_path / 'f.npz')
    assert 'Images: 1 channel(s)' in said and np.load(tmp_path / 'f.npz')['features'].shape[0] == 8


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('extra, expect', [
    (['--mean', '0.5', '0.5', '--std', '0.2', '0.2'], '--mean has 2 values, --in_chans is 3'),
    (['--mean', '0.5', '0.5', '0.5'], '--std is missing'),
    (['--mean', '0.5', '0.5', '0.5', '--std', '0.2', '0', '0.2'], '--std must be positive, got 0.0'),
    (['--mean', '0.5', '0.5', '0.5', '--std', '0.2', 'nan', '0.2'], '--std must be finite and positive, got nan'),
    (['--mean', '0.5', '0.5', '0.5', '--std', '0.2', '-1', '0.2'], '--std must be positive, got -1.0'),
    (['--mean', '0.5', 'inf', '0.5', '--std', '0.2', '0.2', '0.2'], '--mean must be finite and a number, got inf'),
    (['--mean', '0.5', '--std', '0.2', '--in_chans', '1', '--data_stats', 'auto'], 'leave out --mean/--std'),
    (['--mean', '124', '116', '104', '--std', '58', '57', '57'],  # 0-255 pixel units: refused, with the division
     '--mean 124 116 104 --std 58 57 57: images are read into [0, 1], so give --mean and --std in 0-1 units: divide '
     'by 255 (--mean 0.4863 0.4549 0.4078 --std 0.2275 0.2235 0.2235); float .npy arrays in other units: '
     '--data_stats auto measures them'),
    (['--mean', '124', '116', '104', '--std', '0.2', '0.2', '0.2'], 'give --mean in 0-1 units: divide by 255 '
                                                                    '(--mean 0.4863 0.4549 0.4078);'),
    (['--in_chans', '2'], "--in_chans 2: ImageNet's mean and std are for 3 channels"),
    (['--in_chans', '0'], '--in_chans must be at least 1'),
    (['--data_path', 'EMPTY'], 'no image files'),
    (['--data_path', 'LIST'], '1 of its 1 files do not exist, e.g. '),
    (['--data_path', 'FILE'], 'is a file: pre-training reads a folder'),
    (['--in_chans', '4', '--data_stats', 'auto', '--init_from', 'SIX'], 'is a 6-channel model and --in_chans is 4'),
    (['--in_chans', '1', '--data_stats', 'auto'], '(colour: 3 channels that differ, --in_chans is 1; --to_grayscale'),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, expect):
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'list.txt').write_text('nowhere.png\n')
    (tmp_path / 'x.json').write_text('{}')
    if 'SIX' in extra:
        torch.save({'model': models_mae.mae_vit_tiny_patch4(in_chans=6).state_dict()}, tmp_path / 'six.pth')
    names = {'EMPTY': tmp_path / 'empty', 'LIST': tmp_path / 'list.txt', 'FILE': tmp_path / 'x.json',
             'SIX': tmp_path / 'six.pth'}
    extra = [names.get(a, a) for a in extra]
    code, err = run_in_process(main_pretrain, capsys, '--model', 'mae_vit_tiny_patch4', '--input_size', '32',
                               '--batch_size', '4', '--epochs', '1', '--data_path', TINY, '--device', 'cpu',
                               '--num_workers', '0', '--output_dir', tmp_path / 'o', *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and expect in lines[0], lines


@pytest.mark.parametrize('module, argv', [
    (main_finetune, ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2']),
    (main_linprobe, ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2']),
    (vis, [TINY / 'val' / 'a', '--checkpoint', 'never_read.pth']),
])
def test_pixel_units_refused_in_every_script(tmp_path, capsys, module, argv):
    """--mean/--std in 0-255 units (issue 29: accepted by fine-tuning and visualize, the input nearly constant): one
    line with the division, before anything is read, loaded or written."""
    out = tmp_path / 'o'
    extra = [] if module is vis else ['--data_path', TINY, '--device', 'cpu', '--output_dir', out]
    code, err = run_in_process(module, capsys, *argv, *extra, '--mean', '124', '116', '104', '--std', '58', '57',
                               '57')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'in 0-1 units: divide by 255 (--mean 0.4863 0.4549 0.4078 --std ' \
        '0.2275 0.2235 0.2235)' in lines[0], lines
    assert not out.exists()


def test_a_continued_run_normalises_as_its_checkpoint_without_the_cache(tmp_path, capsys):
    """The checkpoint a run continues is chosen before the statistics are known: a continued run takes --in_chans,
    --mean and --std from it (said in one line), even when --output_dir's data_stats.json is gone; given values
    that differ from it are refused."""
    out = tmp_path / 'run'
    base = ['--model', 'mae_vit_tiny_patch4', '--input_size', '16', '--batch_size', '4', '--warmup_epochs', '0',
            '--data_path', TINY, '--device', 'cpu', '--num_workers', '0', '--output_dir', out, '--data_stats', 'auto']
    assert 'measured on 16 of 16 images' in run_ok(main_pretrain, capsys, *base, '--epochs', '1')
    measured = torch.load(out / 'checkpoint-last.pth', weights_only=True)['args']
    (out / data_stats.CACHE_NAME).unlink()
    second = run_ok(main_pretrain, capsys, *base, '--epochs', '2')
    assert 'Measuring' not in second and 'measured on' not in second
    assert f"Data statistics (--data_stats auto) from {out / 'checkpoint-last.pth'}, the checkpoint this run " \
           f"continues: mean {data_stats.fmt(measured['mean'])}" in second
    continued = torch.load(out / 'checkpoint-last.pth', weights_only=True)['args']
    assert continued['epochs'] == 2
    assert (continued['mean'], continued['std'], continued['in_chans']) == (
        measured['mean'], measured['std'], measured['in_chans'])
    code, err = run_in_process(main_pretrain, capsys, *base[:-2], '--epochs', '3', '--mean', '0.5', '0.5', '0.5',
                               '--std', '0.2', '0.2', '0.2')
    assert code == 2 and 'with other training flags (' in err and '--mean [' in err and ', [0.5, 0.5, 0.5] here' in err
