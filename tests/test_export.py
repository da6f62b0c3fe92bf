"""export.py: --to timm (timm loads the weights strictly and computes the same features / logits; the printed call
carries the run's statistics), --to hf (the key layouts of transformers 4.x and 5.x; the folder holds 4.x's keys
whichever is installed, and the installed transformers loads it with no missing or unexpected key and the same loss
for the same noise; the encoder-only folder; the run's image processor, 1 channel included), and the mistakes.
benchmarks/check_hf_versions.py loads the folders in a second transformers version (run before a release)."""
import json
import sys

import pytest
import timm
import torch

import export
import models_mae
import models_vit
from conftest import run_in_process
from util.checkpoints.from_checkpoint import features
from versions import meta_device


def tiny_mae(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = models_mae.mae_vit_tiny_patch4(**kwargs).eval()
    with torch.no_grad():  # trained-looking weights: no zero biases, no unit norms
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def save(path, model, args=None, **extra):
    torch.save({'model': model.state_dict(), **({'args': args} if args else {}), **extra}, path)
    return path


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run_export(*argv):
    return export.main(export.get_args_parser().parse_args([str(a) for a in argv]))


# ---------------------------------------------------------------------------------------------------- timm
def test_timm_export_of_a_pretraining_checkpoint_loads_strictly(tmp_path, capsys):
    mae = tiny_mae()
    path = save(tmp_path / 'checkpoint-9.pth', mae, {'model': 'mae_vit_tiny_patch4', 'input_size': 32})
    run_export('--checkpoint', path, '--to', 'timm', '--out', tmp_path / 'tiny.pth')
    printed = capsys.readouterr().out
    name, kwargs = export.export_timm(path, tmp_path / 'tiny.pth')
    assert name == 'vit_tiny_patch16_224'
    assert {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay')} == dict(
        patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0, img_size=32)
    assert "timm.create_model('vit_tiny_patch16_224', pretrained=True" in printed
    model = timm.create_model(name, **kwargs).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), features(mae, x, 'tokens'), rtol=0, atol=1e-6)
    # strictly: one key more and timm refuses the file
    tensors = torch.load(tmp_path / 'tiny.pth', weights_only=True)
    torch.save({**tensors, 'extra.weight': torch.zeros(1)}, tmp_path / 'extra.pth')
    with pytest.raises(RuntimeError, match='extra.weight'):
        timm.create_model(name, **{**kwargs, 'pretrained_cfg_overlay': dict(file=str(tmp_path / 'extra.pth'),
                                                                           num_classes=0, custom_load=False)})


def test_timm_call_carries_the_runs_statistics_and_evaluation_resize(tmp_path, capsys):
    mean, std = [0.31, 0.42, 0.53], [0.21, 0.22, 0.23]
    path = save(tmp_path / 'checkpoint-9.pth', tiny_mae(),
                {'model': 'mae_vit_tiny_patch4', 'input_size': 32, 'mean': mean, 'std': std})
    run_export('--checkpoint', path, '--to', 'timm', '--out', tmp_path / 'tiny.pth')
    printed = capsys.readouterr().out
    assert "'mean': (0.31, 0.42, 0.53), 'std': (0.21, 0.22, 0.23), 'interpolation': 'bicubic', 'crop_pct': 0.875" \
        in printed
    call = printed.split('timm.create_model(', 1)[1].rsplit(')', 1)[0]
    model = eval(f'timm.create_model({call})')  # the printed call, as a user pastes it
    config = timm.data.resolve_data_config({}, model=model)
    assert config['mean'] == tuple(mean) and config['std'] == tuple(std)
    assert config['interpolation'] == 'bicubic' and config['crop_pct'] == 0.875  # our eval: 36 px, centre 32
    # a checkpoint that stores no statistics was trained on ImageNet's (not timm's 0.5 of its generic ViT)
    save(path, tiny_mae(), {'model': 'mae_vit_tiny_patch4', 'input_size': 32})
    _, kwargs = export.export_timm(path, tmp_path / 'tiny.pth')
    assert kwargs['pretrained_cfg_overlay']['mean'] == export.IMAGENET_MEAN


@pytest.mark.parametrize('head', ['global_pool', 'cls_token', 'linear_probe'])
def test_timm_export_of_classifiers_gives_the_same_logits(tmp_path, head):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(num_classes=3, global_pool=head == 'global_pool')
    if head == 'linear_probe':
        bn = torch.nn.BatchNorm1d(64, affine=False, eps=1e-6)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        model.head = torch.nn.Sequential(bn, model.head)
    model.eval()
    path = save(tmp_path / 'ft.pth', model, {'model': 'vit_tiny_patch4', 'input_size': 32})
    name, kwargs = export.export_timm(path, tmp_path / 'ft.safetensors')
    assert kwargs['num_classes'] == 3 and kwargs['global_pool'] == ('avg' if head == 'global_pool' else 'token')
    theirs = timm.create_model(name, **kwargs).eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, timm_name', [('mae_vit_base_patch16', 'vit_base_patch16_224.mae'),
                                             ('mae_vit_large_patch16', 'vit_large_patch16_224.mae'),
                                             ('mae_vit_huge_patch14', 'vit_huge_patch14_224.mae')])
def test_timm_names_of_the_papers_models(name, timm_name):
    with meta_device():
        ours = export.timm_state_dict(models_mae.MODELS[name]().state_dict())
        called, kwargs = export.timm_call(ours, name, 224, 'x.pth')
        kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay')}
        theirs = timm.create_model(called, **kwargs).state_dict()
    assert (called, kwargs) == (timm_name, {'num_classes': 0})
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# ---------------------------------------------------------------------------------------------------- HF layouts
EXPECTED_BLOCK0 = {
    '4': ['vit.encoder.layer.0.attention.attention.query.weight', 'vit.encoder.layer.0.attention.attention.key.weight',
          'vit.encoder.layer.0.attention.attention.value.weight', 'vit.encoder.layer.0.attention.output.dense.weight',
          'vit.encoder.layer.0.intermediate.dense.weight', 'vit.encoder.layer.0.output.dense.weight',
          'vit.encoder.layer.0.layernorm_before.weight', 'vit.encoder.layer.0.layernorm_after.weight'],
    '5': ['vit.layers.0.attention.q_proj.weight', 'vit.layers.0.attention.k_proj.weight',
          'vit.layers.0.attention.v_proj.weight', 'vit.layers.0.attention.o_proj.weight',
          'vit.layers.0.mlp.fc1.weight', 'vit.layers.0.mlp.fc2.weight',
          'vit.layers.0.layernorm_before.weight', 'vit.layers.0.layernorm_after.weight'],
}


@pytest.mark.parametrize('layout', ['4', '5'])
def test_hf_key_layouts(layout):
    sd = tiny_mae().state_dict()
    hf = export.to_hf(sd, layout)
    assert len(hf) == len(sd) + 2 * (2 + 2) * 2  # each block's qkv weight and bias become three tensors
    for key in EXPECTED_BLOCK0[layout]:
        assert key in hf, key
    assert 'decoder.decoder_layers.1.' + EXPECTED_BLOCK0[layout][0].split('.0.', 1)[1] in hf
    q, k, v = (hf[key] for key in EXPECTED_BLOCK0[layout][:3])
    assert torch.equal(torch.cat([q, k, v]), sd['blocks.0.attn.qkv.weight']) and q.shape == (64, 64)
    assert torch.equal(hf['vit.embeddings.position_embeddings'], sd['pos_embed'])
    back = export.from_hf(hf, layout)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def refused_for_this_torch(transformers, capsys, *argv):
    """Where the installed transformers cannot use the installed torch (transformers 5 needs torch >= 2.6; the oldest
    stack CI runs has torch 2.1), --to hf says so in one line, before writing anything: True then."""
    if transformers.utils.is_torch_available():
        return False
    code, err = run_in_process(export, capsys, *argv)
    expected = (f"--to hf: the installed transformers {transformers.__version__} cannot use the installed torch "
                f"{torch.__version__} (its models need a newer one): upgrade torch")
    assert code == 2 and err.count('\n') == 1 and expected in err, err
    return True


def test_hf_round_trip_gives_the_same_loss(tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    mae = tiny_mae(seed=4, norm_pix_loss=True)
    (tmp_path / 'run').mkdir()
    args = {'model': 'mae_vit_tiny_patch4', 'input_size': 32, 'norm_pix_loss': True, 'mask_ratio': 0.75,
            'blr': 0.0015, 'data_path': 'demo/data', 'mean': [0.31, 0.42, 0.53], 'std': [0.21, 0.22, 0.23]}
    path = save(tmp_path / 'run' / 'checkpoint-last.pth', mae, args, epoch=2)
    rows = [json.dumps({'train_loss': 1.0 - e / 10, 'epoch': e}) for e in range(7)]
    (tmp_path / 'run' / 'log.txt').write_text('\n'.join(rows) + '\n')
    out = tmp_path / 'hf'
    if refused_for_this_torch(transformers, capsys, '--checkpoint', path, '--to', 'hf', '--out', out):
        assert not out.exists()
        return
    run_export('--checkpoint', path, '--to', 'hf', '--out', out)

    theirs, report = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not report['missing_keys'] and not report['unexpected_keys'] and not report['mismatched_keys'], report
    theirs.eval()
    x = images(3)
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, pred, mask = mae(x, mask_ratio=0.75, noise=noise)
        result = theirs(pixel_values=x, noise=noise)
        latent, _, _ = mae.forward_encoder(x, 0.75, noise)
        encoder = transformers.ViTMAEModel.from_pretrained(out).eval()(pixel_values=x, noise=noise)
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(result.logits, pred, rtol=1e-4, atol=1e-4)
    assert torch.equal(result.mask, mask)
    torch.testing.assert_close(encoder.last_hidden_state, latent, rtol=1e-4, atol=1e-4)

    card = (out / 'README.md').read_text()
    assert '| `--blr` | `0.0015` |' in card and '`data_path`: demo/data' in card
    assert rows[-1] in card and rows[1] not in card  # the last 5 rows
    assert f'transformers {transformers.__version__}' in card
    processor = json.loads((out / 'preprocessor_config.json').read_text())
    assert (processor['image_mean'], processor['image_std']) == (args['mean'], args['std'])  # the run's
    assert processor['resample'] == 3 and processor['size'] == {'height': 32, 'width': 32}  # bicubic
    assert '- input normalisation (in preprocessor_config.json): mean [0.31, 0.42, 0.53]' in card
    assert 'resizes the short side to 36 (bicubic) and takes the central 32 x 32 square' in card


def test_hf_export_of_an_encoder_only_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    mae = tiny_mae(seed=5)
    encoder_only = {k: v for k, v in mae.state_dict().items() if not k.startswith('decoder') and k != 'mask_token'}
    torch.save({'model': encoder_only}, tmp_path / 'mae_pretrain_vit_tiny.pth')  # the released layout
    if refused_for_this_torch(transformers, capsys, '--checkpoint', tmp_path / 'mae_pretrain_vit_tiny.pth',
                              '--to', 'hf', '--out', tmp_path / 'hf'):
        return
    run_export('--checkpoint', tmp_path / 'mae_pretrain_vit_tiny.pth', '--to', 'hf', '--out', tmp_path / 'hf')
    x, noise = images(), torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, report = transformers.ViTMAEModel.from_pretrained(tmp_path / 'hf', output_loading_info=True)
        theirs = theirs.eval()(pixel_values=x, noise=noise)
        latent, _, _ = mae.forward_encoder(x, 0.75, noise)
    torch.testing.assert_close(theirs.last_hidden_state, latent, rtol=1e-4, atol=1e-4)
    assert not report['missing_keys'] and not report['unexpected_keys'], report
    assert 'holds no flags' in (tmp_path / 'hf' / 'README.md').read_text()
    processor = json.loads((tmp_path / 'hf' / 'preprocessor_config.json').read_text())
    assert processor['image_mean'] == list(export.IMAGENET_MEAN)  # a released file: trained on ImageNet's


def test_hf_export_that_the_installed_transformers_does_not_load_cleanly_is_refused(tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip('transformers')
    if not transformers.utils.is_torch_available():
        pytest.skip('this transformers cannot use this torch (refused in one line: the tests above)')
    path = save(tmp_path / 'c.pth', tiny_mae(), {'model': 'mae_vit_tiny_patch4', 'input_size': 32})
    written = export.hf_tensors
    monkeypatch.setattr(export, 'hf_tensors', lambda ours, name, layout=export.HF_LAYOUT: {  # one key lost
        k: v for k, v in written(ours, name, layout).items() if k != 'decoder.decoder_pred.bias' or layout != '4'})
    code, err = run_in_process(export, capsys, '--checkpoint', path, '--to', 'hf', '--out', tmp_path / 'hf')
    assert code == 2 and err.count('\n') == 1, err
    assert f"transformers {transformers.__version__} does not load the exported ViTMAEForPreTraining as written " \
           f"(missing keys: decoder.decoder_pred.bias): please report" in err
    assert not (tmp_path / 'hf' / 'model.safetensors').exists()


# transformers 4.x's names of the tiny MAE's keys (4.46.3's ViTMAEForPreTraining().state_dict(); ViTMAEModel's are
# the 'vit.' ones without that prefix): what export.py writes whichever transformers is installed
EMBEDDINGS_4X = ['embeddings.cls_token', 'embeddings.position_embeddings',
                 'embeddings.patch_embeddings.projection.weight', 'embeddings.patch_embeddings.projection.bias',
                 'layernorm.weight', 'layernorm.bias']
BLOCK_4X = ['attention.attention.query', 'attention.attention.key', 'attention.attention.value',
            'attention.output.dense', 'intermediate.dense', 'output.dense', 'layernorm_before', 'layernorm_after']
DECODER_4X = ['decoder.mask_token', 'decoder.decoder_pos_embed', 'decoder.decoder_embed.weight',
              'decoder.decoder_embed.bias', 'decoder.decoder_norm.weight', 'decoder.decoder_norm.bias',
              'decoder.decoder_pred.weight', 'decoder.decoder_pred.bias']


def keys_4x(depth, decoder_depth=None):
    """The keys of a 4.x ViTMAEModel of ``depth`` blocks, or (``decoder_depth``) of a ViTMAEForPreTraining."""
    blocks = [f'{prefix}{n}.{name}.{part}' for prefix, count in [('encoder.layer.', depth),
                                                                  ('decoder.decoder_layers.', decoder_depth or 0)]
              for n in range(count) for name in BLOCK_4X for part in ('weight', 'bias')]
    encoder = EMBEDDINGS_4X + [k for k in blocks if k.startswith('encoder.')]
    if decoder_depth is None:
        return set(encoder)
    return {'vit.' + k for k in encoder} | set(DECODER_4X) | {k for k in blocks if k.startswith('decoder.')}


def folder_keys(folder):
    from safetensors import safe_open
    with safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        return set(f.keys())


def test_hf_folders_hold_4x_keys_whichever_transformers_writes_them(tmp_path, capfd):
    """5.x's own save_pretrained writes the decoder as decoder.decoder_encoder.layer.N, which 4.x does not read (a
    random decoder): export.py writes 4.x's names, which 5.x renames on loading. --hf_encoder_only: a ViTMAEModel
    folder without decoder keys, which loads without transformers' table of unused keys."""
    transformers = pytest.importorskip('transformers')
    if not transformers.utils.is_torch_available():
        pytest.skip('this transformers cannot use this torch (refused in one line: the tests above)')
    mae = tiny_mae(seed=6)
    path = save(tmp_path / 'checkpoint-last.pth', mae, {'model': 'mae_vit_tiny_patch4', 'input_size': 32})
    run_export('--checkpoint', path, '--to', 'hf', '--out', tmp_path / 'full')
    run_export('--checkpoint', path, '--to', 'hf', '--out', tmp_path / 'encoder', '--hf_encoder_only')
    assert len(keys_4x(2, 2)) == 78 and len(keys_4x(2)) == 38
    assert folder_keys(tmp_path / 'full') == keys_4x(2, 2)
    assert folder_keys(tmp_path / 'encoder') == keys_4x(2)
    assert json.loads((tmp_path / 'encoder' / 'config.json').read_text())['architectures'] == ['ViTMAEModel']
    capfd.readouterr()
    x, noise = images(), torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, report = transformers.ViTMAEModel.from_pretrained(tmp_path / 'encoder', output_loading_info=True)
        latent = theirs.eval()(pixel_values=x, noise=noise).last_hidden_state
    assert not report['missing_keys'] and not report['unexpected_keys'], report
    assert 'decoder' not in capfd.readouterr().err
    torch.testing.assert_close(latent, mae.forward_encoder(x, 0.75, noise)[0], rtol=1e-4, atol=1e-4)


def test_hf_one_channel_export_runs_through_auto_image_processor(tmp_path):
    transformers = pytest.importorskip('transformers')
    if not transformers.utils.is_torch_available():
        pytest.skip('this transformers cannot use this torch (refused in one line: the tests above)')
    from PIL import Image
    mae = tiny_mae(seed=7, in_chans=1)
    path = save(tmp_path / 'checkpoint-last.pth', mae,
                {'model': 'mae_vit_tiny_patch4', 'input_size': 32, 'in_chans': 1, 'mean': [0.4], 'std': [0.2]})
    run_export('--checkpoint', path, '--to', 'hf', '--out', tmp_path / 'hf')
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / 'hf')
    gray = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    # an (H, W, 1) array in 4.x and 5.x (4.x's processor refuses a PIL 'L' image: "Unsupported number of image
    # dimensions: 2"; the model card says so), a PIL 'L' image in 5.x
    inputs = [gray.numpy()[:, :, None]]
    if int(transformers.__version__.split('.')[0]) >= 5:
        inputs.append(Image.fromarray(gray.numpy(), 'L'))
    for image in inputs:
        pixels = processor(image, return_tensors='pt')['pixel_values']
        assert pixels.shape == (1, 1, 32, 32)
        torch.testing.assert_close(pixels[0, 0], (gray / 255 - 0.4) / 0.2, rtol=0, atol=1e-5)  # (already 32 x 32)
    noise = torch.rand(1, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / 'hf').eval()
        assert theirs(pixel_values=pixels, noise=noise).loss.item() == pytest.approx(
            mae(pixels, mask_ratio=0.75, noise=noise)[0].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize('case, expected', [
    ('classifier', 'is a classifier (head.*), not an MAE: --to hf writes MAE pre-training models'),
    ('no_encoder', 'holds no MAE/ViT encoder'),
    ('no_transformers', '--to hf needs the optional package transformers, which is not installed: pip install'),
    ('timm_out_is_folder', 'give a file name in an existing folder'),
    ('timm_other_model', '--checkpoint {path} does not fit --model mae_vit_base_patch16: its weights are patch 4, '
                         'width 64, 2 blocks'),
    ('encoder_only_for_timm', '--hf_encoder_only is for --to hf'),
])
def test_mistakes_are_one_line(tmp_path, capsys, monkeypatch, case, expected):
    path, to, out = save(tmp_path / 'c.pth', tiny_mae()), 'hf', tmp_path / 'hf'
    if case == 'classifier':
        torch.manual_seed(0)
        save(path, models_vit.vit_tiny_patch4(num_classes=3))
    elif case == 'no_encoder':
        torch.save({'model': {'head.weight': torch.zeros(3, 3)}}, path)
    elif case == 'no_transformers':
        monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers then fails
    elif case == 'timm_out_is_folder':
        to, out = 'timm', tmp_path
    extra = []
    if case == 'timm_other_model':  # (timm's call was built for the other model: a traceback)
        to, out, extra = 'timm', tmp_path / 'e.pth', ['--model', 'mae_vit_base_patch16']
    if case == 'encoder_only_for_timm':
        to, out, extra = 'timm', tmp_path / 'x.pth', ['--hf_encoder_only']
    code, err = run_in_process(export, capsys, '--checkpoint', path, '--to', to, '--out', out, *extra)
    assert code == 2 and err.count('\n') == 1 and expected.format(path=path) in err, err
    assert not (tmp_path / 'hf').exists()
