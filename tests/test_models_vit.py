"""The ViT classifier, its helpers (lr decay, LARS, TF crop, transforms, position embedding) and loading of MAE
checkpoints, against the reference's vectors."""
from functools import partial
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import models_mae
import main_finetune
import models_vit
from conftest import DATA, parsed_args
from util.crop import RandomResizedCrop
from util.datasets import build_transform
from util.lars import LARS
from util.lr_decay import param_groups_lrd
from util.errors import UsageError
from util.pos_embed import interpolate_pos_embed
from util.checkpoints.from_checkpoint import load_pretrained_encoder
from versions import meta_device

VECTORS = torch.load(DATA / 'model_vectors.pt', weights_only=True)
SMALL = VECTORS['small_mae']


def small_vit(global_pool, **overrides):
    """The classifier of the reference vectors (the encoder of small_mae, 10 classes, drop path 0.1)."""
    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=10, drop_path_rate=0.1,
                  global_pool=global_pool)
    kwargs.update(overrides)
    return models_vit.VisionTransformer(**kwargs)


def encoder_only(sd):
    return {k: v for k, v in sd.items() if not k.startswith('decoder') and k != 'mask_token'}


def with_reference_head(model):
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(10, 64, generator=torch.Generator().manual_seed(4)) * 0.02)
    return model


# ---------------------------------------------------------------------------------------------------- vectors
@pytest.mark.parametrize('gp', [1, 0])
def test_classifier_matches_reference_vectors(gp):
    ref = VECTORS[f'small_vit_gp{gp}']
    model = small_vit(bool(gp)).eval()
    msg = model.load_state_dict(encoder_only(SMALL['state_dict']), strict=False)
    assert sorted(msg.missing_keys) == sorted(ref['missing'])
    assert sorted(msg.unexpected_keys) == sorted(ref['unexpected'])
    with_reference_head(model)
    sd = model.state_dict()
    assert list(sd) == list(ref['state_dict'])
    for k, v in ref['state_dict'].items():
        assert torch.equal(sd[k], v), k
    with torch.no_grad():
        logits = model(SMALL['imgs'])
    torch.testing.assert_close(logits, ref['logits'], rtol=0, atol=1e-6)


def test_tiny_builder_is_the_vector_config():
    torch.manual_seed(3)
    a = models_vit.vit_tiny_patch4(num_classes=10, drop_path_rate=0.1, global_pool=True).state_dict()
    torch.manual_seed(3)
    b = small_vit(True).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_decay_groups_match_reference():
    model = small_vit(True)
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [{'lr_scale': g['lr_scale'], 'weight_decay': g['weight_decay'],
             'params': [names[id(p)] for p in g['params']]} for g in groups]
    assert ours == VECTORS['lrd']


def test_lr_decay_leaves_frozen_parameters_out():
    model = small_vit(True)
    models_vit.train_last_blocks(model, 1)
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for g in groups for p in g['params'])
    assert got == sorted(n for n, _ in model.named_parameters() if n.startswith(('blocks.1.', 'fc_norm.', 'head.')))
    assert {g['lr_scale'] for g in groups} == {0.65, 1.0}


def test_interpolated_pos_embed_matches_reference():
    v = VECTORS['interp']
    model = SimpleNamespace(patch_embed=SimpleNamespace(grid_size=(16, 16)), pos_embed=torch.zeros(v['dst'].shape))
    ckpt = {'pos_embed': v['src'].clone()}
    interpolate_pos_embed(model, ckpt)
    torch.testing.assert_close(ckpt['pos_embed'], v['dst'], rtol=0, atol=1e-6)


def test_interpolated_pos_embed_rectangular_keeps_class_token():
    src = VECTORS['interp']['src']
    model = SimpleNamespace(patch_embed=SimpleNamespace(grid_size=(12, 20)), pos_embed=torch.zeros(1, 241, 32))
    ckpt = {'pos_embed': src.clone()}
    interpolate_pos_embed(model, ckpt)
    assert ckpt['pos_embed'].shape == (1, 241, 32)
    assert torch.equal(ckpt['pos_embed'][:, 0], src[:, 0])


def test_lars_five_steps_match_reference():
    v = VECTORS['lars']
    params = [nn.Parameter(t.clone()) for t in v['init']]
    opt = LARS(params, lr=v['lr'], weight_decay=v['weight_decay'], momentum=v['momentum'],
               trust_coefficient=v['trust_coefficient'])
    for grads in v['grads']:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, final in zip(params, v['final']):
        torch.testing.assert_close(p.detach(), final, rtol=0, atol=1e-7)


def test_lars_leaves_vectors_unscaled_and_undecayed():
    bias = nn.Parameter(torch.ones(4))
    opt = LARS([bias], lr=0.5, weight_decay=0.1, momentum=0.9)
    bias.grad = torch.full((4,), 2.0)
    opt.step()
    assert torch.equal(bias.detach(), torch.full((4,), 1.0 - 0.5 * 2.0))
    assert set(opt.state[bias]) == {'mu'}


# ---------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize('global_pool,timm_pool', [(True, 'avg'), (False, 'token')])
def test_fine_tuned_weights_load_strictly_into_timm(global_pool, timm_pool):
    torch.manual_seed(0)
    ours = small_vit(global_pool, drop_path_rate=0.).eval()
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=10, global_pool=timm_pool).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(SMALL['imgs']), ours(SMALL['imgs']), rtol=0, atol=1e-6)


@pytest.mark.parametrize('ours_name,timm_name', [('vit_base_patch16', 'vit_base_patch16_224'),
                                                ('vit_large_patch16', 'vit_large_patch16_224'),
                                                ('vit_huge_patch14', 'vit_huge_patch14_224')])
@pytest.mark.parametrize('global_pool,timm_pool', [(True, 'avg'), (False, 'token')])
def test_full_size_weights_load_strictly_into_timm_create_model(ours_name, timm_name, global_pool, timm_pool):
    with meta_device():  # construction only
        ours = models_vit.MODELS[ours_name](global_pool=global_pool, num_classes=37)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=37, global_pool=timm_pool)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert (theirs.fc_norm if global_pool else theirs.norm).eps == 1e-6


FULL_SIZE = {  # (MAE builder, parameters of the 1000-class classifier with global pooling, patch size, depth)
    'vit_base_patch16': ('mae_vit_base_patch16', 86_567_656, 16, 12),
    'vit_large_patch16': ('mae_vit_large_patch16', 304_326_632, 16, 24),
    'vit_huge_patch14': ('mae_vit_huge_patch14', 632_045_800, 14, 32),
}


@pytest.mark.parametrize('name', list(FULL_SIZE))
def test_full_size_builders_key_layout(name):
    mae_name, n_params, patch, depth = FULL_SIZE[name]
    with meta_device():
        gp = models_vit.MODELS[name](global_pool=True)
        cls = models_vit.MODELS[name](global_pool=False)
        mae = models_mae.MODELS[mae_name]()
    encoder = list(encoder_only(mae.state_dict()))
    assert list(cls.state_dict()) == encoder + ['head.weight', 'head.bias']
    assert list(gp.state_dict()) == [k for k in encoder if not k.startswith('norm.')] + [
        'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']
    assert sum(p.numel() for p in gp.parameters()) == n_params
    assert gp.patch_embed.patch_size == (patch, patch) and gp.head.out_features == 1000
    assert gp.blocks[0].attn.qkv.bias is not None and gp.fc_norm.eps == 1e-6
    assert len(gp.blocks) == depth


def test_drop_path_and_input_size_reach_the_model():
    model = models_vit.vit_tiny_patch4(img_size=48, drop_path_rate=0.2)
    assert model.patch_embed.grid_size == (12, 12) and model.pos_embed.shape == (1, 145, 64)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------- partial
@pytest.mark.parametrize('global_pool,k', [(True, 0), (True, 1), (False, 0), (False, 2)])
def test_train_last_blocks(global_pool, k):
    model = small_vit(global_pool)
    names = models_vit.train_last_blocks(model, k)
    norm = 'fc_norm.' if global_pool else 'norm.'
    expected = [n for n, _ in model.named_parameters()
                if n.startswith((norm, 'head.')) or any(n.startswith(f'blocks.{i}.') for i in range(2 - k, 2))]
    assert names == expected
    with pytest.raises(ValueError):
        models_vit.train_last_blocks(model, 3)


# ---------------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope='module')
def mae_state():
    torch.manual_seed(0)
    return models_mae.mae_vit_tiny_patch4().state_dict()


def _save(tmp_path, name, sd):
    path = tmp_path / name
    torch.save({'model': sd}, path)
    return path


@pytest.mark.parametrize('global_pool', [True, False])
def test_loads_pretrained_and_visualisation_checkpoints(tmp_path, mae_state, global_pool):
    for name, sd in (('pretrained.pth', encoder_only(mae_state)), ('visualize.pth', mae_state)):
        model = models_vit.vit_tiny_patch4(num_classes=5, global_pool=global_pool)
        msg = load_pretrained_encoder(model, _save(tmp_path, name, sd))
        expected = {'head.weight', 'head.bias'} | ({'fc_norm.weight', 'fc_norm.bias'} if global_pool else set())
        assert set(msg.missing_keys) == expected
        assert all(not k.startswith('blocks.') for k in msg.unexpected_keys)
        assert torch.equal(model.blocks[1].mlp.fc2.weight, mae_state['blocks.1.mlp.fc2.weight'])


def test_loads_fine_tuned_checkpoint_of_another_class_count(tmp_path, capsys):
    torch.manual_seed(1)
    fine_tuned = models_vit.vit_tiny_patch4(num_classes=1000, global_pool=True).state_dict()
    model = models_vit.vit_tiny_patch4(num_classes=5, global_pool=True)
    msg = load_pretrained_encoder(model, _save(tmp_path, 'ft.pth', fine_tuned))
    assert set(msg.missing_keys) == {'head.weight', 'head.bias'} and not msg.unexpected_keys
    assert torch.equal(model.fc_norm.weight, fine_tuned['fc_norm.weight'])
    assert 'Removing key head.weight from pretrained checkpoint' in capsys.readouterr().out


def test_pos_embed_is_interpolated_for_a_larger_input(tmp_path, mae_state):
    model = models_vit.vit_tiny_patch4(img_size=48, num_classes=5, global_pool=True)
    load_pretrained_encoder(model, _save(tmp_path, 'p.pth', encoder_only(mae_state)))
    expected = {'pos_embed': mae_state['pos_embed'].clone()}
    interpolate_pos_embed(model, expected)
    assert torch.equal(model.pos_embed.detach(), expected['pos_embed'])


def test_bad_finetune_files_are_named(tmp_path, mae_state):
    model = models_vit.vit_tiny_patch4(num_classes=5, global_pool=True)
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint')
    with pytest.raises(UsageError, match='cannot be read as a PyTorch checkpoint'):
        load_pretrained_encoder(model, text)
    with pytest.raises(UsageError, match="not an MAE/ViT checkpoint"):
        load_pretrained_encoder(model, _save(tmp_path, 'other.pth', {'fc.weight': torch.zeros(2, 2)}))

    torch.manual_seed(0)
    narrow = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    with pytest.raises(UsageError, match=r'other shapes.*blocks\.0\.attn\.proj\.bias \(32,\) vs \(64,\)'):
        load_pretrained_encoder(model, _save(tmp_path, 'narrow.pth', narrow.state_dict()), 'vit_tiny_patch4')

    deep = dict(mae_state, **{k.replace('blocks.1.', 'blocks.2.'): v for k, v in mae_state.items()
                              if k.startswith('blocks.1.')})
    with pytest.raises(UsageError, match=r'blocks the model does not have: blocks\.2\.'):
        load_pretrained_encoder(model, _save(tmp_path, 'deep.pth', deep))
    shallow = {k: v for k, v in mae_state.items() if not k.startswith('blocks.1.')}
    with pytest.raises(UsageError, match=r'missing keys: blocks\.1\.'):
        load_pretrained_encoder(model, _save(tmp_path, 'shallow.pth', shallow))

    cls_model = models_vit.vit_tiny_patch4(num_classes=5, global_pool=False)
    gp_fine_tuned = models_vit.vit_tiny_patch4(num_classes=5, global_pool=True).state_dict()
    with pytest.raises(UsageError, match=r'missing keys: norm\.bias, norm\.weight'):
        load_pretrained_encoder(cls_model, _save(tmp_path, 'gp.pth', gp_fine_tuned))


# ---------------------------------------------------------------------------------------------------- transforms
def _image(w, h):
    return Image.new('RGB', (w, h), (120, 30, 200))


def test_tf_crop_draws_once_and_clips_to_the_image():
    crop = RandomResizedCrop(32)
    for seed in range(50):
        for w, h in ((40, 30), (30, 90), (17, 17)):
            torch.manual_seed(seed)
            i, j, ch, cw = crop.get_params(_image(w, h), crop.scale, crop.ratio)
            after = torch.get_rng_state()
            assert 1 <= ch <= h and 1 <= cw <= w and 0 <= i <= h - ch and 0 <= j <= w - cw
            # exactly two uniform draws and two randint draws: no retry loop
            torch.manual_seed(seed)
            torch.empty(1).uniform_(0, 1), torch.empty(1).uniform_(0, 1)
            torch.randint(0, 2, size=(1,)), torch.randint(0, 2, size=(1,))
            assert torch.equal(torch.get_rng_state(), after)
    # a whole-image area at an extreme aspect ratio is clipped to the image's side, not retried
    torch.manual_seed(0)
    i, j, ch, cw = RandomResizedCrop.get_params(_image(40, 40), (1.0, 1.0), (4.0, 4.0))
    assert (cw, ch, j) == (40, 20, 0)
    assert crop(_image(50, 70)).size == (32, 32)


def test_transforms():
    args = parsed_args(main_finetune)  # its defaults: 224 px, rand-m9-mstd0.5-inc1, reprob 0.25, remode pixel
    train = repr(build_transform(True, args))
    assert 'RandAugment' in train and 'RandomErasing' in train and 'bicubic' in train.lower()
    ev = build_transform(False, args).transforms
    assert ev[0].size == 256 and ev[1].size == (224, 224)
    assert build_transform(False, parsed_args(main_finetune, input_size=32)).transforms[0].size == 36
    assert build_transform(False, parsed_args(main_finetune, input_size=384)).transforms[0].size == 384
    assert build_transform(True, args)(_image(300, 200)).shape == (3, 224, 224)
