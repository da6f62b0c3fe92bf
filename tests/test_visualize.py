"""demo/visualize.py: reconstruction figures from a checkpoint (panels, masks, norm-pix de-normalisation, the PNG's
layout, the errors)."""
import argparse
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import models_mae
from conftest import ROOT, one_line_error
from util.errors import UsageError

spec = importlib.util.spec_from_file_location('visualize', ROOT / 'demo' / 'visualize.py')
vis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vis)

SCRIPT = 'demo/visualize.py'
P = 4            # patch size of mae_vit_tiny_patch4
SIZE = 32        # its default image size: an 8 x 8 patch grid
L = (SIZE // P) ** 2
SCALE = 128 // SIZE  # the default upscaling for 32-px inputs
TILE = SIZE * SCALE
# layout constants of the figure, spelled out: PAD 4, two caption lines of 14, a label band of 14
HEADER = 4 + 2 * 14 + 14


def tiny_model(seed=0, norm_pix_loss=False, img_size=SIZE):
    torch.manual_seed(seed)
    return models_mae.mae_vit_tiny_patch4(img_size=img_size, norm_pix_loss=norm_pix_loss).eval()


def random_image(seed=0, size=SIZE):
    """A normalised image (3, size, size) made from random 8-bit pixels, as load_image would give."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (3, size, size), generator=g).float() / 255
    mean = torch.tensor(vis.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(vis.IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def normalised_target(model, img):
    """What a perfect norm-pix decoder predicts: each patch minus its mean, over sqrt(unbiased var + 1e-6)."""
    target = model.patchify(img[None])[0]
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.e-6) ** .5


def blocks(a, p):
    """(H, W, C) -> (H/p, W/p, p, p, C): the patch at grid position (i, j) is [i, j]."""
    h, w, c = a.shape
    return a.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)


def save_checkpoint(path, model='mae_vit_tiny_patch4', input_size=SIZE, norm_pix_loss=True, seed=0, args=True):
    """A checkpoint as main_pretrain.py writes it ({'model', 'args', ...}); ``args=False``: the released layout."""
    torch.manual_seed(seed)
    sd = models_mae.MODELS[model](img_size=input_size, norm_pix_loss=norm_pix_loss).state_dict()
    ckpt = {'model': sd}
    if args:
        ckpt.update(epoch=0, args={'model': model, 'input_size': input_size, 'norm_pix_loss': norm_pix_loss,
                                   'mask_ratio': 0.75})
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """Three small photos of other sizes and modes: a landscape JPEG, a portrait PNG, a grayscale JPEG."""
    folder = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(folder / 'a_landscape.jpg', quality=95)
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(folder / 'b_portrait.png')
    (folder / 'sub').mkdir()
    Image.fromarray((yy * 5).astype(np.uint8)).save(folder / 'sub' / 'c_gray.jpg')
    (folder / 'notes.txt').write_text('not an image: ignored in a folder')
    return folder


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'checkpoint-0.pth')


def parse(*argv):
    return vis.get_args_parser().parse_args([str(a) for a in argv])


def read_png(path):
    return np.asarray(Image.open(path).convert('RGB'))


def panel(fig, row, col, tile=TILE):
    x, y = 4 + col * (tile + 4), HEADER + row * (tile + 4)
    return fig[y:y + tile, x:x + tile]


def grey_patches(masked_panel, original_panel, p):
    """The grid positions that are uniform grey (128) in the masked panel and not in the original."""
    mb, ob = blocks(masked_panel, p), blocks(original_panel, p)
    grey = (mb == 128).all(axis=(2, 3, 4))
    assert (mb[~grey] == ob[~grey]).all()  # every other patch is the original's
    return grey & ~(ob == 128).all(axis=(2, 3, 4))


# ---------------------------------------------------------------------------------------------------- panels
def test_reconstruct_panels_and_mask():
    model, img = tiny_model(), random_image()
    panels = vis.reconstruct(model, img, mask_ratio=0.75, seed=3)
    mask = panels['mask']
    assert mask.shape == (8, 8) and mask.sum() == L - int(L * 0.25) == 48

    original = blocks(panels['original'], P)
    expected = ((img * torch.tensor(vis.IMAGENET_STD).view(3, 1, 1) + torch.tensor(vis.IMAGENET_MEAN).view(3, 1, 1))
                .clamp(0, 1).permute(1, 2, 0).numpy())
    np.testing.assert_allclose(panels['original'], expected, atol=1e-6)
    pasted, recon, masked = (blocks(panels[k], P) for k in ('pasted', 'reconstruction', 'masked'))
    assert (pasted[~mask] == original[~mask]).all()  # visible patches: exactly the input's pixels
    assert (pasted[mask] == recon[mask]).all()
    assert (masked[mask] == np.float32(0.5)).all() and (masked[~mask] == original[~mask]).all()
    # the reconstruction is the model's, not a copy of the input
    assert np.abs(recon[mask] - original[mask]).mean() > 0.05
    for k in ('original', 'masked', 'reconstruction', 'pasted'):
        assert panels[k].shape == (SIZE, SIZE, 3) and panels[k].min() >= 0 and panels[k].max() <= 1


def test_seed_gives_the_mask_and_leaves_global_rng_alone():
    model, img = tiny_model(), random_image()
    state = torch.get_rng_state()
    a = vis.reconstruct(model, img, 0.75, seed=1)
    b = vis.reconstruct(model, img, 0.75, seed=1)
    c = vis.reconstruct(model, img, 0.75, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert (a['mask'] == b['mask']).all() and (a['pasted'] == b['pasted']).all()
    assert (a['mask'] != c['mask']).any() and c['mask'].sum() == 48
    # the mask is the reference's rule on the given noise: the patches with the smallest noise are kept
    noise = torch.rand(1, L, generator=torch.Generator().manual_seed(1))
    kept = set(torch.argsort(noise[0])[:16].tolist())
    assert {i for i in range(L) if not a['mask'].flat[i]} == kept


def test_norm_pix_true_patch_denormalisation_gives_back_the_image():
    """A decoder that predicts exactly the norm-pix target must be shown as exactly the original image."""
    model = tiny_model(norm_pix_loss=True)
    img = random_image(1) * 0.2 + 1.0  # low contrast, light: far from its own normalisation
    pred = normalised_target(model, img)
    mask = torch.zeros(L)
    mask[torch.randperm(L, generator=torch.Generator().manual_seed(0))[:48]] = 1
    panels = vis.make_panels(model, img, pred, mask, norm_pix=True, denorm='true_patch')
    np.testing.assert_allclose(panels['reconstruction'], panels['original'], atol=2e-6)
    # shown without de-normalisation (a pixel-target model), the same prediction is far from the image
    raw = vis.make_panels(model, img, pred, mask, norm_pix=False)
    assert np.abs(raw['reconstruction'] - raw['original']).mean() > 0.2


def test_norm_pix_through_the_model(monkeypatch):
    """The same through reconstruct(): the model's masking, with a forward whose prediction is the perfect one."""
    model, img = tiny_model(norm_pix_loss=True), random_image(2)
    real_forward = model.forward

    def perfect_forward(imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = real_forward(imgs, mask_ratio, noise)
        target = normalised_target(model, imgs[0])[None]
        assert model.forward_loss(imgs, target, mask).item() == pytest.approx(0, abs=1e-10)
        return loss, target, mask

    monkeypatch.setattr(model, 'forward', perfect_forward)
    panels = vis.reconstruct(model, img, 0.75, seed=0, norm_pix=True)
    np.testing.assert_allclose(panels['pasted'], panels['original'], atol=2e-6)
    np.testing.assert_allclose(panels['reconstruction'], panels['original'], atol=2e-6)


def test_neighbours_denormalisation():
    # the estimate: the mean of the nearest ring of visible patches
    mean = torch.arange(9.).view(9, 1)   # 3 x 3 grid, patch k has mean k and std 10 + k
    std = 10 + mean
    mask = torch.tensor([1., 0, 1, 0, 1, 0, 1, 0, 1])  # corners and centre removed
    m, s = vis.neighbour_stats(mean, std, mask, (3, 3))
    # corner (0, 0): visible neighbours 1 and 3; centre: 1, 3, 5, 7; visible patches keep their own
    assert m.flatten().tolist() == [2., 1., 3., 3., 4., 5., 5., 7., 6.]
    assert s.flatten().tolist() == [12., 11., 13., 13., 14., 15., 15., 17., 16.]
    # nothing visible nearby: the next ring is used
    mask = torch.ones(25)
    mask[24] = 0
    m, _ = vis.neighbour_stats(torch.arange(25.).view(25, 1), torch.ones(25, 1), mask, (5, 5))
    assert (m.flatten()[:24] == 24).all()

    # an image of one repeated patch: the neighbours' mean/std are the true ones, so a perfect prediction is exact
    model = tiny_model(norm_pix_loss=True)
    tile = random_image(3, size=P)
    img = tile.repeat(1, SIZE // P, SIZE // P)
    mask = torch.zeros(L)
    mask[::3] = 1
    panels = vis.make_panels(model, img, normalised_target(model, img), mask, norm_pix=True, denorm='neighbours')
    np.testing.assert_allclose(panels['reconstruction'], panels['original'], atol=2e-6)
    # on a real image (a random one) the estimate is not the truth
    img = random_image(4)
    panels = vis.make_panels(model, img, normalised_target(model, img), mask, norm_pix=True, denorm='neighbours')
    assert np.abs(panels['reconstruction'] - panels['original']).max() > 0.1


# ---------------------------------------------------------------------------------------------------- model
def test_checkpoint_layouts(tmp_path):
    # released layout: no args; model and input size from the shapes, pixel targets
    path = save_checkpoint(tmp_path / 'released.pth', input_size=64, norm_pix_loss=True, args=False)
    args = parse('x.jpg', '--checkpoint', path)
    model = vis.load_mae(args)
    assert (args.model, args.input_size, args.norm_pix_loss) == ('mae_vit_tiny_patch4', 64, False)
    torch.manual_seed(0)
    expected = models_mae.mae_vit_tiny_patch4(img_size=64).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    args = parse('x.jpg', '--checkpoint', path, '--norm_pix_loss', '--input_size', 48)
    model = vis.load_mae(args)
    assert args.norm_pix_loss and model.patch_embed.grid_size == (12, 12)
    # the released *_full files were trained on normalised pixels (their authors say; the file does not)
    full = save_checkpoint(tmp_path / 'mae_pretrain_vit_tiny_full.pth', args=False)
    args = parse('x.jpg', '--checkpoint', full)
    vis.load_mae(args)
    assert args.norm_pix_loss is True
    args = parse('x.jpg', '--checkpoint', full, '--no_norm_pix_loss')
    vis.load_mae(args)
    assert args.norm_pix_loss is False

    # the reference's own checkpoints pickle an argparse.Namespace
    ckpt = torch.load(save_checkpoint(tmp_path / 'ours.pth'), weights_only=True)
    ckpt['args'] = argparse.Namespace(**ckpt['args'])
    torch.save(ckpt, tmp_path / 'reference.pth')
    args = parse('x.jpg', '--checkpoint', tmp_path / 'reference.pth')
    vis.load_mae(args)
    assert (args.model, args.input_size, args.norm_pix_loss) == ('mae_vit_tiny_patch4', SIZE, True)
    args = parse('x.jpg', '--checkpoint', tmp_path / 'reference.pth', '--no_norm_pix_loss')
    vis.load_mae(args)
    assert args.norm_pix_loss is False


def decoderless(tmp_path, classifier):
    sd = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith('decoder') and k != 'mask_token'}
    if classifier:
        sd.update({'head.weight': torch.zeros(10, 64), 'head.bias': torch.zeros(10)})
    path = tmp_path / ('finetuned.pth' if classifier else 'mae_pretrain_vit_tiny.pth')
    torch.save({'model': sd}, path)
    return path


def test_encoder_only_checkpoint_is_one_clear_line(tmp_path, photos, script):
    path = decoderless(tmp_path, classifier=False)
    result = script(SCRIPT, photos, '--checkpoint', path, '--out', tmp_path / 'out')
    line = one_line_error(result)
    assert f'--checkpoint {path} holds an encoder only' in line
    assert 'decoder_* keys' in line and 'checkpoint-*.pth' in line and 'mae_visualize_vit_*.pth' in line
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('case, expected', [
    ('classifier', 'holds a fine-tuned classifier (head.weight), no decoder'),
    ('missing_checkpoint', 'nope.pth: no such file'),
    ('garbage_checkpoint', 'cannot be read as a PyTorch checkpoint'),
    ('missing_image', 'missing.jpg: no such file or folder'),
    ('empty_folder', 'no image files (.jpg'),
    ('bad_image', 'bad image file'),
    ('wrong_model', 'does not fit --model mae_vit_base_patch16'),
    ('bad_input_size', 'is not a multiple of the patch size 4'),
    ('ratios_without_grid', '--mask_ratios needs --grid'),
    ('many_images_one_file', 'is one file but there are 3 images'),
    ('nothing_kept', '--mask_ratio 0.99 keeps no patch of the 64 of mae_vit_tiny_patch4 at --input_size 32: the '
                     'figure would be all grey (at most 0.9844 keeps one)'),
    ('nothing_kept_grid', '--mask_ratios 0.99 keeps no patch of the 64'),
])
def test_mistakes(tmp_path, photos, ckpt, case, expected):
    argv = [photos, '--checkpoint', ckpt, '--out', tmp_path / 'out']
    if case == 'classifier':
        argv[2] = decoderless(tmp_path, classifier=True)
    elif case == 'missing_checkpoint':
        argv[2] = tmp_path / 'nope.pth'
    elif case == 'garbage_checkpoint':
        argv[2] = tmp_path / 'garbage.pth'
        argv[2].write_bytes(b'not a checkpoint')
    elif case == 'missing_image':
        argv[0] = tmp_path / 'missing.jpg'
    elif case == 'empty_folder':
        argv[0] = tmp_path / 'empty'
        (argv[0] / 'sub').mkdir(parents=True)
        (argv[0] / 'sub' / 'readme.txt').write_text('')
    elif case == 'bad_image':
        argv[0] = tmp_path / 'broken.jpg'
        argv[0].write_bytes(b'\xff\xd8\xff not really')
    elif case == 'wrong_model':
        argv += ['--model', 'mae_vit_base_patch16']
    elif case == 'bad_input_size':
        argv += ['--input_size', 30]
    elif case == 'ratios_without_grid':
        argv += ['--mask_ratios', 0.5]
    elif case == 'many_images_one_file':
        argv[-1] = tmp_path / 'one.png'
    elif case == 'nothing_kept':  # (an all-grey figure labelled 'masked 99%')
        argv += ['--mask_ratio', 0.99]
    elif case == 'nothing_kept_grid':
        argv += ['--grid', '--mask_ratios', 0.5, 0.99]
    with pytest.raises(UsageError) as e:
        vis.main(parse(*argv))
    assert expected in str(e.value)
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------- figures
def test_png_end_to_end(tmp_path, photos, ckpt, script):
    out = tmp_path / 'out'
    result = script(SCRIPT, photos, '--checkpoint', ckpt, '--out', out, '--seed', 5)
    assert result.returncode == 0, result.stderr
    assert "norm-pix model: each patch de-normalised with the true patch's mean/std" in result.stdout
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob('*.png'))
    assert files == ['a_landscape.png', 'b_portrait.png', 'sub/c_gray.png']

    for name, photo in [('a_landscape', 'a_landscape.jpg'), ('sub/c_gray', 'sub/c_gray.jpg')]:
        fig = read_png(out / f'{name}.png')
        assert fig.shape == (HEADER + TILE + 4, 4 * TILE + 5 * 4, 3) == (178, 532, 3)
        original, masked, recon, pasted = (panel(fig, 0, c) for c in range(4))
        # the original panel is the image as the model sees it (short side resized, centre crop), upscaled
        img = vis.load_image(photos / photo, SIZE)
        seen = np.rint(vis.to_display(img) * 255).astype(np.uint8)
        assert (original == seen.repeat(SCALE, 0).repeat(SCALE, 1)).all()
        # the mask is visible in the masked panel: 48 of 64 patches grey
        grey = grey_patches(masked, original, P * SCALE)
        assert grey.sum() == 48
        ob, pb, rb = blocks(original, P * SCALE), blocks(pasted, P * SCALE), blocks(recon, P * SCALE)
        assert (pb[~grey] == ob[~grey]).all()
        assert (pb[grey] == rb[grey]).all() and (pb[grey] != ob[grey]).any()
        if name == 'sub/c_gray':  # a grayscale file is read as RGB with three equal channels
            assert (original[..., 0] == original[..., 2]).all()

    # the k-th image gets the k-th draw of --seed's stream
    g = torch.Generator().manual_seed(5)
    noises = [vis.draw_noise(g, L) for _ in range(3)]
    fig = read_png(out / 'b_portrait.png')
    grey = grey_patches(panel(fig, 0, 1), panel(fig, 0, 0), P * SCALE)
    kept = set(torch.argsort(noises[1][0])[:16].tolist())
    assert {i for i in range(L) if not grey.flat[i]} == kept


def test_same_seed_same_png_other_seed_other_mask(tmp_path, photos, ckpt):
    image = photos / 'b_portrait.png'
    for name, seed in [('a', 7), ('b', 7), ('c', 8)]:
        vis.main(parse(image, '--checkpoint', ckpt, '--seed', seed, '--out', tmp_path / f'{name}.png'))
    a, b, c = ((tmp_path / f'{n}.png').read_bytes() for n in 'abc')
    assert a == b and a != c
    masks = [grey_patches(panel(read_png(tmp_path / f'{n}.png'), 0, 1), panel(read_png(tmp_path / f'{n}.png'), 0, 0),
                          P * SCALE) for n in 'ac']
    assert masks[0].sum() == masks[1].sum() == 48 and (masks[0] != masks[1]).any()


def test_grid(tmp_path, photos, ckpt, script):
    out = tmp_path / 'grid.png'
    result = script(SCRIPT, photos / 'a_landscape.jpg', photos / 'b_portrait.png', '--checkpoint', ckpt,
                    '--grid', '--mask_ratios', 0.5, 0.9, '--out', out)
    assert result.returncode == 0, result.stderr
    fig = read_png(out)
    cols, rows = 1 + 2 * 2, 2
    assert fig.shape == (HEADER + rows * (TILE + 4), cols * TILE + (cols + 1) * 4, 3) == (310, 664, 3)
    for r in range(rows):
        original = panel(fig, r, 0)
        grey50 = grey_patches(panel(fig, r, 1), original, P * SCALE)
        grey90 = grey_patches(panel(fig, r, 3), original, P * SCALE)
        assert grey50.sum() == 32 and grey90.sum() == L - int(L * 0.1) == 58
        assert (grey90 | grey50 == grey90).all()  # one noise per image: the masks are nested
        for c, grey in [(2, grey50), (4, grey90)]:
            assert (blocks(panel(fig, r, c), P * SCALE)[~grey] == blocks(original, P * SCALE)[~grey]).all()
    assert (grey_patches(panel(fig, 0, 1), panel(fig, 0, 0), P * SCALE)
            != grey_patches(panel(fig, 1, 1), panel(fig, 1, 0), P * SCALE)).any()

    # a palette PNG: smaller, same layout
    small = tmp_path / 'small.png'
    vis.main(parse(photos / 'a_landscape.jpg', photos / 'b_portrait.png', '--checkpoint', ckpt, '--grid',
                   '--mask_ratios', 0.5, 0.9, '--out', small, '--colors', 64))
    img = Image.open(small)
    assert img.mode == 'P' and img.size == (664, 310) and len(img.getcolors()) <= 64
    assert small.stat().st_size < out.stat().st_size
