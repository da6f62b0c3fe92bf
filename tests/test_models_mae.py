"""The MAE model against the reference's vectors, and its masking / patch invariants."""
from functools import partial

import pytest
import torch
import torch.nn as nn

import models_mae
from conftest import DATA
from versions import exact_numbers_expected
from util.pos_embed import get_2d_sincos_pos_embed

VECTORS = torch.load(DATA / 'model_vectors.pt', weights_only=True)
SMALL = VECTORS['small_mae']


def small_mae(**overrides):
    c = SMALL['config']
    kwargs = dict(img_size=c['img_size'], patch_size=c['patch_size'], in_chans=3, embed_dim=c['embed_dim'],
                  depth=c['depth'], num_heads=c['num_heads'], decoder_embed_dim=c['decoder_embed_dim'],
                  decoder_depth=c['decoder_depth'], decoder_num_heads=c['decoder_num_heads'],
                  mlp_ratio=c['mlp_ratio'], norm_layer=partial(nn.LayerNorm, eps=c['ln_eps']),
                  norm_pix_loss=c['norm_pix_loss'])
    kwargs.update(overrides)
    return models_mae.MaskedAutoencoderViT(**kwargs)


@pytest.fixture(scope='module')
def reference_run():
    torch.manual_seed(SMALL['config']['init_seed'])
    model = small_mae()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(SMALL['config']['mask_seed'])
    loss, pred, mask = model(SMALL['imgs'], mask_ratio=SMALL['config']['mask_ratio'])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, init, loss, pred, mask, grads


def test_initial_weights_are_bit_identical(reference_run):
    _, init, *_ = reference_run
    assert list(init) == list(SMALL['state_dict'])
    for k, v in SMALL['state_dict'].items():
        assert torch.equal(init[k], v), k


def test_masks_loss_predictions_and_gradients_match(reference_run):
    _, _, loss, pred, mask, grads = reference_run
    # the vectors' stack sums in the same order as the reference's run; another torch sums some fp32 reductions in
    # another order: a few roundings more
    slack = 1 if exact_numbers_expected() else 10
    assert torch.equal(mask, SMALL['mask'])
    torch.testing.assert_close(loss, SMALL['loss'], rtol=1e-6 * slack, atol=0)
    torch.testing.assert_close(pred, SMALL['pred'], rtol=1e-5 * slack, atol=1e-6 * slack)
    assert set(grads) == set(SMALL['grads'])
    for k, g in SMALL['grads'].items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5 * slack, atol=1e-7 * slack, msg=k)


def test_patchify_matches_and_round_trips(reference_run):
    model = reference_run[0]
    x = SMALL['imgs']
    assert torch.equal(model.patchify(x), SMALL['patchify'])
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_sincos_table_matches():
    table = torch.from_numpy(get_2d_sincos_pos_embed(64, 8, cls_token=True)).float()
    assert torch.equal(table, VECTORS['pos_embed']['sincos_64_8_cls'])


def test_rectangular_sincos_grid():
    grid_h, grid_w, dim = 3, 5, 16
    table = get_2d_sincos_pos_embed(dim, (grid_h, grid_w)).reshape(grid_h, grid_w, dim)
    # the first half of the channels encodes the column, the second half the row (the reference's convention)
    assert (table[:, :, :dim // 2] == table[:1, :, :dim // 2]).all()
    assert (table[:, :, dim // 2:] == table[:, :1, dim // 2:]).all()
    square = get_2d_sincos_pos_embed(dim, 5).reshape(5, 5, dim)
    assert (table == square[:grid_h, :grid_w]).all()


@pytest.mark.parametrize('ratio', [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exact_count_and_restores_order(ratio):
    model = small_mae()
    x = torch.randn(3, 64, 8)
    x_masked, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(64 * (1 - ratio))
    assert x_masked.shape == (3, keep, 8)
    assert (mask.sum(1) == 64 - keep).all()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # un-shuffling puts every kept token back at a position the mask marks as kept
    for n in range(3):
        ids_shuffle = torch.argsort(ids_restore[n])
        assert torch.equal(x_masked[n], x[n, ids_shuffle[:keep]])
        assert (mask[n, ids_shuffle[:keep]] == 0).all()
        assert torch.equal(torch.sort(ids_restore[n]).values, torch.arange(64))


def test_noise_argument_gives_chosen_masks_and_draws_nothing():
    model = small_mae()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    torch.manual_seed(5)
    _, _, mask_a = model(imgs, noise=noise)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    _, _, mask_b = model(imgs, noise=noise)
    assert torch.equal(mask_a, mask_b)
    assert torch.equal(torch.rand(1), after_a)  # no draw from the global generator
    kept = torch.argsort(noise, dim=1)[:, :16]
    assert (torch.gather(mask_a, 1, kept) == 0).all()
    # the default draw is torch.rand(N, L) from the global generator
    torch.manual_seed(9)
    expected = torch.rand(2, 64)
    torch.manual_seed(9)
    _, _, mask_c = model(imgs)
    _, _, mask_d = model(imgs, noise=expected)
    assert torch.equal(mask_c, mask_d)


@pytest.mark.parametrize('in_chans,size', [(1, 32), (4, (16, 40)), (3, (24, 32))])
def test_channels_and_non_square_inputs(in_chans, size):
    torch.manual_seed(0)
    model = small_mae(in_chans=in_chans, img_size=size)
    h, w = (size, size) if isinstance(size, int) else size
    imgs = torch.randn(2, in_chans, h, w)
    patches = model.patchify(imgs)
    assert patches.shape == (2, (h // 4) * (w // 4), 16 * in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    loss, pred, mask = model(imgs)
    assert pred.shape == patches.shape and mask.shape == patches.shape[:2]
    assert torch.isfinite(loss)
    loss.backward()
    assert model.decoder_pred.weight.grad.shape == (16 * in_chans, 32)
    assert model.pos_embed.shape == (1, (h // 4) * (w // 4) + 1, 64)


def test_loss_only_counts_removed_patches():
    torch.manual_seed(0)
    model = small_mae(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    target = model.patchify(imgs)
    mask = torch.zeros(2, 64)
    mask[:, :10] = 1
    pred = target.clone()
    pred[:, 10:] += 100.0  # errors on kept patches must not count
    assert model.forward_loss(imgs, pred, mask).item() == 0.0
    pred[:, :10] += 1.0
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(1.0)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match='multiple of the patch size'):
        small_mae(img_size=30)
    with pytest.raises(ValueError, match='patchify expects'):
        small_mae().patchify(torch.randn(1, 3, 30, 32))


ENCODER_PARAMS = {'mae_vit_base_patch16': 85_798_656, 'mae_vit_large_patch16': 303_301_632,
                  'mae_vit_huge_patch14': 630_764_800}


@pytest.mark.parametrize('name', list(ENCODER_PARAMS))
def test_full_size_key_layout(name):
    with torch.device('meta'):
        model = models_mae.MODELS[name]()
    sd = model.state_dict()
    depth = {'mae_vit_base_patch16': 12, 'mae_vit_large_patch16': 24, 'mae_vit_huge_patch14': 32}[name]
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
             'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
             'mlp.fc2.bias']
    expected = (['cls_token', 'pos_embed', 'mask_token', 'decoder_pos_embed', 'patch_embed.proj.weight',
                 'patch_embed.proj.bias']
                + [f'blocks.{i}.{k}' for i in range(depth) for k in block]
                + ['norm.weight', 'norm.bias', 'decoder_embed.weight', 'decoder_embed.bias']
                + [f'decoder_blocks.{i}.{k}' for i in range(8) for k in block]
                + ['decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias'])
    assert list(sd) == expected
    # encoder size as timm counts a ViT without its head (e.g. 85.8M for ViT-B/16)
    encoder = sum(v.numel() for k, v in sd.items() if not k.startswith('decoder') and k != 'mask_token')
    assert encoder == ENCODER_PARAMS[name]
    p = 14 if name.endswith('14') else 16
    assert sd['decoder_pred.weight'].shape == (p * p * 3, 512)
    assert sd['pos_embed'].shape[1] == (224 // p) ** 2 + 1
