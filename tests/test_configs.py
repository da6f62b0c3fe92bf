"""Every recipe file under configs/ parses through its entry point's own parser (``--config``) and sets exactly the
documented recipe: the values below are written from the reference's PRETRAIN.md / FINETUNE.md
(facebookresearch/mae), the paper's appendix (A.1 pre-training and fine-tuning, A.2 linear probing and the
from-scratch baseline, Tables 9-11) and docs/studies.md's small-scale recipes; none is read from the files."""

import pytest
import yaml

import extract_features
import main_finetune
import main_linprobe
import main_pretrain
from conftest import ROOT
from studies import recipes

CONFIGS = ROOT / 'configs'

# PRETRAIN.md: --batch_size 64 (x 8 nodes x 8 GPUs = 4096) --norm_pix_loss --mask_ratio 0.75 --epochs 800
# --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05; "To train ViT-Base or ViT-Huge, set --model
# mae_vit_base_patch16 or --model mae_vit_huge_patch14"; 1600 epochs: the released models (paper, Table 3)
PRETRAIN = dict(input_size=224, norm_pix_loss=True, mask_ratio=0.75, warmup_epochs=40, blr=1.5e-4,
                weight_decay=0.05, batch_size=64)
# FINETUNE.md's three scripts (effective batch 1024: 32 x 4 nodes x 8 GPUs; ViT-H 16 x 8 x 8), warm-up: the paper's
# 5 epochs (the reference's default)
FINETUNE = dict(input_size=224, warmup_epochs=5, weight_decay=0.05, reprob=0.25, mixup=0.8, cutmix=1.0,
                dist_eval=True)
FINETUNE_BY_MODEL = {
    'vit_base_patch16': dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1, batch_size=32),
    'vit_large_patch16': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2, batch_size=32),
    'vit_huge_patch14': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3, batch_size=16),
}
# FINETUNE.md's linear probing: --batch_size 512 (x 4 nodes x 8 GPUs = 16384) --cls_token --epochs 90 --blr 0.1
# --weight_decay 0.0 --dist_eval; ViT-L/H: "It is sufficient to train 50 epochs"; 10 warm-up epochs (Table 10)
LINPROBE = dict(input_size=224, cls_token=True, warmup_epochs=10, blr=0.1, weight_decay=0.0, dist_eval=True,
                batch_size=512)
LINPROBE_EPOCHS = {'vit_base_patch16': 90, 'vit_large_patch16': 50, 'vit_huge_patch14': 50}
# Appendix A.2, Table 11 (supervised ViT from scratch): AdamW 0.9/0.95, base lr 1e-4, weight decay 0.3, 20 warm-up
# epochs, label smoothing 0.1, Mixup 0.8, CutMix 1.0, EMA 0.9999, drop path 0.2 / 0.1, 200 / 300 epochs (L / B);
# no random erasing and no layer decay; the per-GPU batch of FINETUNE.md (effective batch 4096)
SCRATCH = dict(input_size=224, warmup_epochs=20, blr=1e-4, layer_decay=1.0, weight_decay=0.3, reprob=0.0,
               mixup=0.8, cutmix=1.0, dist_eval=True, batch_size=32, opt_betas=[0.9, 0.95], smoothing=0.1,
               model_ema=True, model_ema_decay=0.9999)
# docs/studies.md: the small scale (ViT-S/4 on 32x32 images, batch 128, base lr 1.5e-3, 1 warm-up epoch; 8 epochs of
# pre-training, 5 of fine-tuning and of linear probing at the absolute lr 6.4; fine-tuning without Mixup, CutMix,
# random erasing, drop path 0.1); --quick: the tiny model, one epoch, batch 4
SMALL = {
    'pretrain': dict(model='mae_vit_small_patch4', input_size=32, mask_ratio=0.75, epochs=8, warmup_epochs=1,
                     blr=1.5e-3, weight_decay=0.05, batch_size=128),
    'finetune': dict(model='vit_small_patch4', input_size=32, epochs=5, warmup_epochs=1, blr=1e-3, layer_decay=0.75,
                     weight_decay=0.05, drop_path=0.1, reprob=0.0, mixup=0.0, cutmix=0.0, batch_size=128),
    'linprobe': dict(model='vit_small_patch4', input_size=32, cls_token=True, epochs=5, warmup_epochs=1, lr=6.4,
                     weight_decay=0.0, batch_size=128),
    'knn': dict(model='vit_small_patch4', input_size=32, batch_size=256),
    'probe': dict(model='vit_small_patch4', input_size=32, batch_size=256),
}
QUICK = {
    'pretrain': dict(SMALL['pretrain'], model='mae_vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4),
    'finetune': dict(SMALL['finetune'], model='vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4),
    'linprobe': dict(SMALL['linprobe'], model='vit_tiny_patch4', epochs=1, warmup_epochs=0, batch_size=4),
    'knn': dict(SMALL['knn'], model='vit_tiny_patch4', batch_size=16),
    'probe': dict(SMALL['probe'], model='vit_tiny_patch4', batch_size=16),
}
ENTRY = {'pretrain': main_pretrain, 'finetune': main_finetune, 'linprobe': main_linprobe, 'knn': extract_features,
         'probe': extract_features, 'scratch': main_finetune}
NEEDED = {extract_features: ['images/', '--checkpoint', 'mae.pth']}

DOCUMENTED = {}
for size, model in (('base', 'vit_base_patch16'), ('large', 'vit_large_patch16'), ('huge', 'vit_huge_patch14')):
    for epochs in (800, 1600):
        DOCUMENTED[f'pretrain/mae_{model}_{epochs}ep.yaml'] = ('pretrain', dict(PRETRAIN, model='mae_' + model,
                                                                                  epochs=epochs))
    DOCUMENTED[f'finetune/{model}.yaml'] = ('finetune', dict(FINETUNE, model=model, **FINETUNE_BY_MODEL[model]))
    DOCUMENTED[f'linprobe/{model}.yaml'] = ('linprobe', dict(LINPROBE, model=model, epochs=LINPROBE_EPOCHS[model]))
# Table 1's baseline: PRETRAIN.md's ViT-L at 800 epochs with the unnormalised pixels (Table 1d's default row)
DOCUMENTED['studies/paper/pretrain.yaml'] = ('pretrain', {k: v for k, v in dict(
    PRETRAIN, model='mae_vit_large_patch16', epochs=800).items() if k != 'norm_pix_loss'})
DOCUMENTED['studies/paper/scratch_vit_large.yaml'] = ('scratch', dict(SCRATCH, model='vit_large_patch16', epochs=200,
                                                                      drop_path=0.2))
DOCUMENTED['studies/paper/scratch_vit_base.yaml'] = ('scratch', dict(SCRATCH, model='vit_base_patch16', epochs=300,
                                                                     drop_path=0.1))
for kind in SMALL:
    DOCUMENTED[f'studies/small/{kind}.yaml'] = (kind, SMALL[kind])
    DOCUMENTED[f'studies/quick/{kind}.yaml'] = (kind, QUICK[kind])


def test_every_file_under_configs_is_a_documented_recipe():
    assert sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob('*.yaml')) == sorted(DOCUMENTED)


@pytest.mark.parametrize('name', sorted(DOCUMENTED))
def test_a_recipe_file_sets_exactly_its_documented_flags(name):
    kind, expected = DOCUMENTED[name]
    path = CONFIGS / name
    written = yaml.safe_load(path.read_text())
    assert list(written) and set(written) == set(expected)  # no flag left out, none added
    module = ENTRY[kind]
    args = module.get_args_parser().parse_args(NEEDED.get(module, []) + ['--config', str(path)])
    for key, value in expected.items():
        got = (not args.global_pool) if key == 'cls_token' else getattr(args, key)
        assert got == value and type(got) is type(value), (name, key, got, value)


def test_the_studies_run_the_recipe_files():
    """reproduce.py's recipes are the files' flags (plus the effective batch a study splits over its GPUs)."""
    def flags(recipe):
        return {k: v for k, v in recipe.items() if k != 'effective_batch'}
    assert flags(recipes.PAPER_FINETUNE) == DOCUMENTED['finetune/vit_large_patch16.yaml'][1]
    assert flags(recipes.PAPER_FINETUNE_BASE) == DOCUMENTED['finetune/vit_base_patch16.yaml'][1]
    assert flags(recipes.PAPER_LINPROBE) == DOCUMENTED['linprobe/vit_large_patch16.yaml'][1]
    assert flags(recipes.PAPER_LINPROBE_BASE) == DOCUMENTED['linprobe/vit_base_patch16.yaml'][1]
    assert flags(recipes.PAPER_PRETRAIN) == DOCUMENTED['studies/paper/pretrain.yaml'][1]
    assert flags(recipes.PAPER_SCRATCH) == DOCUMENTED['studies/paper/scratch_vit_large.yaml'][1]
    for scale in ('small', 'quick'):
        for kind, recipe in recipes.SCALES[scale].recipes.items():
            assert flags(recipe) == DOCUMENTED[f'studies/{scale}/{kind}.yaml'][1], (scale, kind)
    assert [recipes.SCALES['paper'].recipes[k]['effective_batch'] for k in ('pretrain', 'finetune', 'linprobe')] == [
        4096, 1024, 16384]
