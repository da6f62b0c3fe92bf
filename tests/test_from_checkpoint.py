"""util/checkpoints/from_checkpoint.py: any checkpoint (ours, the reference's released layouts) into a model, recognised from
its weights' shapes, and the encoder's features without masking."""
import argparse

import pytest
import torch

import models_mae
import models_vit
from util.checkpoints import from_checkpoint as fc
from util.errors import UsageError
from versions import meta_device


def tiny_mae(seed=0, **kwargs):
    torch.manual_seed(seed)
    return models_mae.mae_vit_tiny_patch4(**kwargs).eval()


def images(n=3, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encoder_only(state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith('decoder') and k != 'mask_token'}


@pytest.mark.parametrize('name, size', [('mae_vit_tiny_patch4', 32), ('mae_vit_tiny_patch4', 64),
                                        ('mae_vit_small_patch4', 32), ('mae_vit_base_patch16', 224),
                                        ('mae_vit_large_patch16', 224), ('mae_vit_huge_patch14', 224)])
def test_infer_model_from_shapes(name, size):
    with meta_device():
        sd = models_mae.MODELS[name](img_size=size).state_dict()
        classifier = models_vit.MODELS[fc.vit_name(name)](img_size=size, num_classes=7, global_pool=True)
        classifier = classifier.state_dict()
    assert fc.infer_model(sd) == name
    assert fc.grid_input_size(sd) == size
    # the released encoder-only layout, and a fine-tuned classifier (fc_norm, head, no final norm)
    assert fc.infer_model(encoder_only(sd)) == name
    assert fc.infer_model(classifier) == name
    assert (fc.layout(sd), fc.layout(encoder_only(sd)), fc.layout(classifier)) == ('mae', 'encoder', 'classifier')
    assert fc.num_classes(classifier) == 7 and fc.num_classes(sd) is None


def test_infer_model_of_another_decoder_and_of_nothing_known():
    with torch.device('meta'):
        sd = models_mae.mae_vit_base_patch16(decoder_depth=2, decoder_embed_dim=256).state_dict()
    assert fc.infer_model(sd) == 'mae_vit_base_patch16'
    with meta_device():
        sd = models_vit._vit(4, 64, 3, 4, img_size=32).state_dict()  # a depth no model has
    assert fc.infer_model(sd) is None


def test_mae_encoder_features_are_the_unmasked_forward_encoder():
    model = tiny_mae()
    x = images()
    # the MAE's own encoder with nothing masked and the identity order: every token in place
    noise = torch.arange(64.).repeat(3, 1)
    reference, _, _ = model.forward_encoder(x, mask_ratio=0.0, noise=noise)
    tokens = fc.features(model, x, 'tokens')
    assert tokens.shape == (3, 65, 64)
    torch.testing.assert_close(tokens, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(fc.features(model, x, 'cls'), reference[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(fc.features(model, x, 'mean'), reference[:, 1:].mean(1), rtol=0, atol=1e-6)


def test_features_leave_the_mode_and_the_random_stream_alone():
    model = tiny_mae().train()
    state = torch.get_rng_state()
    fc.features(model, images(), 'cls')
    assert model.training and torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match='pool must be one of'):
        fc.features(model, images(), 'max')


@pytest.mark.parametrize('which', ['ours', 'reference_namespace', 'released_full', 'released_encoder'])
def test_load_encoder_of_every_pretraining_layout(tmp_path, which):
    mae = tiny_mae(seed=3)
    sd = mae.state_dict()
    ckpt = {'model': sd, 'epoch': 4, 'args': {'model': 'mae_vit_tiny_patch4', 'input_size': 32}}
    if which == 'reference_namespace':
        ckpt['args'] = argparse.Namespace(**ckpt['args'])
    elif which == 'released_full':
        ckpt = {'model': sd}
    elif which == 'released_encoder':
        ckpt = {'model': encoder_only(sd)}
    torch.save(ckpt, tmp_path / 'c.pth')
    state = torch.get_rng_state()
    encoder, info = fc.load_encoder(tmp_path / 'c.pth')
    assert torch.equal(torch.get_rng_state(), state)  # building the model drew nothing from the global stream
    assert isinstance(encoder, models_vit.VisionTransformer) and not encoder.training
    assert (info['layout'], info['mae_model'], info['vit_model'], info['input_size'], info['global_pool']) == (
        'encoder' if which == 'released_encoder' else 'mae', 'mae_vit_tiny_patch4', 'vit_tiny_patch4', 32, False)
    x = images()
    for pool in fc.POOLS:
        assert torch.equal(fc.features(encoder, x, pool), fc.features(mae, x, pool)), pool


@pytest.mark.parametrize('global_pool', [True, False])
def test_load_encoder_of_a_classifier_gives_what_it_classifies(tmp_path, global_pool):
    torch.manual_seed(0)
    classifier = models_vit.vit_tiny_patch4(num_classes=5, global_pool=global_pool).eval()
    torch.save({'model': classifier.state_dict(), 'args': {'model': 'vit_tiny_patch4', 'input_size': 32}},
               tmp_path / 'ft.pth')
    encoder, info = fc.load_encoder(tmp_path / 'ft.pth')
    assert (info['layout'], info['num_classes'], info['global_pool']) == ('classifier', 5, global_pool)
    x = images()
    with torch.no_grad():
        expected = classifier.forward_features(x)
    torch.testing.assert_close(fc.features(encoder, x, 'mean' if global_pool else 'cls'), expected,
                               rtol=0, atol=1e-6)


def test_load_encoder_of_a_linear_probe_and_at_another_size(tmp_path):
    torch.manual_seed(0)
    probe = models_vit.vit_tiny_patch4(num_classes=3)
    probe.head = torch.nn.Sequential(torch.nn.BatchNorm1d(64, affine=False, eps=1e-6), probe.head)
    torch.save({'model': probe.state_dict()}, tmp_path / 'probe.pth')  # released-like: no args
    encoder, info = fc.load_encoder(tmp_path / 'probe.pth', input_size=48)
    assert (info['layout'], info['num_classes'], info['input_size']) == ('classifier', 3, 48)
    assert encoder.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert fc.features(encoder, images(2, 48), 'tokens').shape == (2, 145, 64)


def test_load_mae(tmp_path):
    mae = tiny_mae(seed=2, norm_pix_loss=True)
    torch.save({'model': mae.state_dict(), 'args': {'model': 'mae_vit_tiny_patch4', 'norm_pix_loss': True}},
               tmp_path / 'c.pth')
    loaded, info = fc.load_mae(tmp_path / 'c.pth')
    assert info['norm_pix_loss'] is True and loaded.norm_pix_loss and info['input_size'] == 32
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize('case, expected', [
    ('no_encoder', "is not an MAE/ViT checkpoint: it holds no MAE/ViT encoder (its 'model' has no "
                   "patch_embed.proj.weight / pos_embed / blocks.0.attn.qkv.weight)"),
    ('encoder_for_mae', 'holds an encoder only (like the released mae_pretrain_vit_*.pth), no decoder'),
    ('unknown_shapes', 'its weights fit none of mae_vit_base_patch16'),
    ('wrong_model', 'does not fit --model vit_small_patch4'),
    ('bad_input_size', '--input_size 30 is not a multiple of the patch size 4'),
])
def test_files_that_do_not_fit_are_one_line(tmp_path, case, expected):
    sd = tiny_mae().state_dict()
    path, kwargs, load = tmp_path / 'c.pth', {}, fc.load_encoder
    if case == 'no_encoder':
        sd = {'weight': torch.zeros(3)}
    elif case == 'encoder_for_mae':
        sd, load = encoder_only(sd), fc.load_mae
    elif case == 'unknown_shapes':
        sd = {k: v for k, v in sd.items() if not k.startswith('blocks.1.')}
    elif case == 'wrong_model':
        kwargs = {'model': 'vit_small_patch4'}
    elif case == 'bad_input_size':
        kwargs = {'input_size': 30}
    torch.save({'model': sd}, path)
    with pytest.raises(UsageError) as e:
        load(path, **kwargs)
    assert f'--checkpoint {path}' in str(e.value) and expected in str(e.value)


def test_init_from_a_global_pool_classifier_says_what_it_is(tmp_path):
    """A classifier fine-tuned with global pooling has fc_norm and no final norm: --init_from says so (it used to
    blame another depth); one with the class token still warm-starts the encoder."""
    from util.checkpoints.from_checkpoint import init_from_checkpoint
    path = tmp_path / 'classifier.pth'
    torch.save({'model': models_vit.vit_tiny_patch4(num_classes=3, global_pool=True).state_dict()}, path)
    with pytest.raises(UsageError) as e:
        init_from_checkpoint(models_mae.mae_vit_tiny_patch4(), path, check_only=True)
    assert str(e.value).startswith(f"--init_from {path} is a ViT classifier fine-tuned with global pooling (head, "
                                   f"fc_norm), not an MAE") and 'depth' not in str(e.value)
    torch.save({'model': models_vit.vit_tiny_patch4(num_classes=3, global_pool=False).state_dict()}, path)
    init_from_checkpoint(models_mae.mae_vit_tiny_patch4(), path, check_only=True)
