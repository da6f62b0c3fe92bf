"""The ablation flags of main_pretrain.py (decoder size, mask sampling) and the study runner reproduce.py."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_pretrain
import models_mae
import models_vit
import reproduce
from conftest import TINY, one_line_error, pretrain_argv, run_in_process, run_script
from studies import paper, plan, recipes, report, runner
from studies.data import prepare_data
from studies.plan import PlannedRun
from util.errors import UsageError
from util.checkpoints.from_checkpoint import load_pretrained_encoder


def pretrain_args(*argv):
    return main_pretrain.get_args_parser().parse_args(['--model', 'mae_vit_tiny_patch4', '--input_size', '32',
                                                       *map(str, argv)])


# ---------------------------------------------------------------------------------------------------- defaults
def test_default_flags_build_the_reference_model_and_draw_the_same_masks():
    torch.manual_seed(0)
    reference = models_mae.mae_vit_tiny_patch4(img_size=32).state_dict()
    torch.manual_seed(0)
    args = pretrain_args()  # the default flags, as main_pretrain.main builds the model from them
    model = models_mae.MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                          mask_type=args.mask_type, decoder_depth=args.decoder_depth,
                                          decoder_embed_dim=args.decoder_embed_dim)
    assert model.mask_type == 'random'
    state = model.state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    # random masking: one torch.rand(N, L), as the reference, and nothing else drawn
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    noise = torch.rand(2, 64)
    after = torch.rand(1)
    torch.manual_seed(3)
    _, _, mask = model(imgs)
    assert torch.equal(torch.rand(1), after)
    _, _, expected = model(imgs, noise=noise)
    assert torch.equal(mask, expected)


def test_paper_models_keep_their_decoder():
    with torch.device('meta'):
        model = models_mae.mae_vit_large_patch16()
    assert len(model.decoder_blocks) == 8 and model.decoder_embed.out_features == 512
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.blocks[0].attn.num_heads == 16


def test_decoder_flags_change_the_decoder_only(tmp_path):
    default = models_mae.mae_vit_tiny_patch4().state_dict()
    encoder = [k for k in default if not k.startswith('decoder') and k != 'mask_token']
    deeper = models_mae.mae_vit_tiny_patch4(decoder_depth=3).state_dict()
    assert {k.split('.')[1] for k in deeper if k.startswith('decoder_blocks.')} == {'0', '1', '2'}
    model = models_mae.mae_vit_tiny_patch4(decoder_embed_dim=64, decoder_depth=1)
    wide = model.state_dict()
    for other in (deeper, wide):  # the same encoder, key for key and shape for shape
        assert [k for k in other if k in encoder] == encoder
        assert all(other[k].shape == default[k].shape for k in encoder)
    assert wide['decoder_embed.weight'].shape == (64, 64) and wide['mask_token'].shape == (1, 1, 64)
    assert model.decoder_blocks[0].attn.num_heads == 8  # heads of 8, as the tiny model's 32-d decoder of 4 heads
    assert models_mae.decoder_size(wide) == {'decoder_embed_dim': 64, 'decoder_depth': 1}
    # fine-tuning takes the encoder whatever the decoder
    path = tmp_path / 'wide.pth'
    torch.save({'model': wide}, path)
    vit = models_vit.vit_tiny_patch4(num_classes=2, global_pool=True)
    msg = load_pretrained_encoder(vit, path)
    assert set(msg.missing_keys) == {'head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias'}
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, wide['blocks.1.mlp.fc2.weight'])


# ---------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize('grid, ratio', [((8, 8), 0.5), ((8, 8), 0.75), ((14, 14), 0.75), ((14, 14), 0.4),
                                         ((6, 10), 0.9)])
def test_block_masks_remove_exactly_the_asked_number(grid, ratio):
    length = grid[0] * grid[1]
    keep = int(length * (1 - ratio))
    torch.manual_seed(0)
    removed = models_mae.block_mask(64, *grid, length - keep)
    assert removed.shape == (64, length)
    assert (removed.sum(1) == length - keep).all()
    torch.manual_seed(0)
    assert torch.equal(models_mae.block_mask(64, *grid, length - keep), removed)  # seeded by torch


def test_block_masks_are_blocks():
    """Removed patches come in rectangles: far more of their neighbours are removed too than in random masks."""
    def removed_neighbours(removed):
        grid = removed.view(-1, 14, 14).float()
        right = (grid[:, :, 1:] * grid[:, :, :-1]).sum()
        down = (grid[:, 1:, :] * grid[:, :-1, :]).sum()
        return (right + down).item() / grid.sum().item()
    torch.manual_seed(0)
    block = models_mae.block_mask(32, 14, 14, 98)
    random_ = torch.zeros(32, 196, dtype=torch.bool)
    random_[torch.arange(32)[:, None], torch.rand(32, 196).argsort(1)[:, :98]] = True
    assert removed_neighbours(block) > 1.3 * removed_neighbours(random_)


def test_grid_masks_keep_one_patch_of_each_2x2_cell():
    torch.manual_seed(0)
    removed = models_mae.grid_mask(16, 8, 6)
    assert (removed.sum(1) == 48 - 12).all()
    corners = set()
    for mask in removed.view(16, 8, 6):
        rows, cols = torch.nonzero(~mask, as_tuple=True)
        assert len(set((rows % 2).tolist())) == 1 and len(set((cols % 2).tolist())) == 1
        assert sorted(set(rows.tolist())) == list(range(rows[0] % 2, 8, 2))  # every other row and column
        assert sorted(set(cols.tolist())) == list(range(cols[0] % 2, 6, 2))
        corners.add((rows[0].item() % 2, cols[0].item() % 2))
    assert len(corners) > 1  # the kept corner is drawn per image
    with pytest.raises(ValueError, match='by construction'):
        models_mae.grid_mask(1, 8, 8, mask_ratio=0.5)
    with pytest.raises(ValueError, match='even patch grid'):
        models_mae.grid_mask(1, 7, 8)


@pytest.mark.parametrize('mask_type, ratio', [('block', 0.5), ('block', 0.75), ('grid', 0.75)])
def test_model_keeps_the_structured_mask(mask_type, ratio):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(mask_type=mask_type)
    x = torch.randn(4, 64, 8)
    torch.manual_seed(1)
    noise = model.structured_noise(4, ratio, x.device)
    torch.manual_seed(1)
    x_masked, mask, ids_restore = model.random_masking(x, ratio, noise)
    keep = int(64 * (1 - ratio))
    assert x_masked.shape == (4, keep, 8) and (mask.sum(1) == 64 - keep).all()
    assert torch.equal(mask.bool(), noise >= 1)  # exactly the structured mask's patches are removed
    torch.manual_seed(1)
    loss, pred, mask_fwd = model(torch.randn(4, 3, 32, 32), mask_ratio=ratio)
    assert torch.isfinite(loss) and (mask_fwd.sum(1) == 64 - keep).all()


@pytest.mark.parametrize('extra, expected', [
    (['--mask_type', 'grid', '--mask_ratio', '0.5'], '--mask_type grid keeps one patch of every four'),
    (['--mask_type', 'grid', '--input_size', '36'], 'needs an even patch grid (2x2 cells); --input_size 36 gives 9x9'),
    (['--decoder_embed_dim', '30'], '--decoder_embed_dim 30 does not fit --model mae_vit_tiny_patch4'),
    (['--decoder_depth', '0'], '--decoder_depth must be at least 1'),
])
def test_flag_mistakes_are_one_line(tmp_path, capsys, extra, expected):
    argv = pretrain_argv(tmp_path / 'out', *extra)[1:]
    code, err = run_in_process(main_pretrain, capsys, *argv)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_checkpoint_keeps_the_flags_and_loads_for_fine_tuning_and_figures(tmp_path):
    out = tmp_path / 'pt'
    result = run_script(*pretrain_argv(out, '--mask_type', 'block', '--mask_ratio', '0.5', '--decoder_depth', '1',
                                       '--decoder_embed_dim', '16', epochs=1))
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=True)
    assert {k: ckpt['args'][k] for k in ('mask_type', 'decoder_depth', 'decoder_embed_dim')} == {
        'mask_type': 'block', 'decoder_depth': 1, 'decoder_embed_dim': 16}
    import demo.visualize as vis
    args = vis.get_args_parser().parse_args(['x.jpg', '--checkpoint', str(out / 'checkpoint-0.pth')])
    model = vis.load_mae(args)
    assert len(model.decoder_blocks) == 1 and model.decoder_embed.out_features == 16
    # the same run with another decoder does not continue this one
    result = run_script(*pretrain_argv(out, '--mask_type', 'block', '--mask_ratio', '0.5', epochs=2))
    assert '--decoder_depth 1 there, None here' in one_line_error(result)


# ---------------------------------------------------------------------------------------------------- the runner
def run_reproduce(capsys, *argv):
    """reproduce.py in this process; returns (exit code, stdout, stderr)."""
    import util.training.process as process
    with pytest.raises(SystemExit) as exc:
        process.run_main(reproduce.main, reproduce.get_args_parser(), [str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def dry_run_lines(capsys, *argv):
    code, out, err = run_reproduce(capsys, '--dry_run', *argv)
    assert code == 0, err
    return [shlex.split(line) for line in out.splitlines() if line.startswith('python ')]


def flags_of(cmd):
    """{'--flag': value or True} of a command line."""
    flags, i = {}, 2
    while i < len(cmd):
        if i + 1 < len(cmd) and not cmd[i + 1].startswith('--'):
            flags[cmd[i]] = cmd[i + 1]
            i += 2
        else:
            flags[cmd[i]] = True
            i += 1
    return flags


def effective_batch(flags):
    return int(flags['--batch_size']) * int(flags.get('--accum_iter', 1)) * int(flags['--nodes']) * int(
        flags['--ngpus'])


@pytest.mark.parametrize('nodes', [8, 1])
def test_paper_scale_dry_run_has_the_papers_recipes(tmp_path, capsys, nodes):
    cmds = dry_run_lines(capsys, '--scale', 'paper', '--study', 'mask_sampling', 'target', 'scratch', 'partial_ft',
                         '--data_path', '/imagenet', '--work_dir', tmp_path, '--nodes', nodes, '--ngpus', 8)
    by_dir = {c[c.index('--job_dir') + 1]: (c[1], flags_of(c)) for c in cmds}
    assert all(script.startswith('submitit_') for script, _ in by_dir.values())
    script, pt = by_dir[str(tmp_path / 'runs/baseline/pretrain')]
    assert script == 'submitit_pretrain.py'
    # Table 1's baseline: ViT-L, 800 epochs, base lr 1.5e-4, batch 4096, 75% random masks, unnormalised pixels
    assert {k: pt[k] for k in ('--model', '--mask_ratio', '--epochs', '--warmup_epochs', '--blr', '--weight_decay')} \
        == {'--model': 'mae_vit_large_patch16', '--mask_ratio': '0.75', '--epochs': '800', '--warmup_epochs': '40',
            '--blr': '0.00015', '--weight_decay': '0.05'}
    assert effective_batch(pt) == 4096 and int(pt['--batch_size']) <= 64
    assert '--norm_pix_loss' not in pt and '--mask_type' not in pt and '--decoder_depth' not in pt
    # Table 1d's other target, Table 3's MAE (1600 epochs, normalised pixels), Table 1f's samplings
    assert by_dir[str(tmp_path / 'runs/norm_pix_loss/pretrain')][1]['--norm_pix_loss'] is True
    table3 = by_dir[str(tmp_path / 'runs/epochs_1600+norm_pix_loss/pretrain')][1]
    assert table3['--epochs'] == '1600' and table3['--norm_pix_loss'] is True
    assert by_dir[str(tmp_path / 'runs/mask_type_grid/pretrain')][1]['--mask_type'] == 'grid'
    block = by_dir[str(tmp_path / 'runs/mask_ratio_0.5+mask_type_block/pretrain')][1]
    assert (block['--mask_type'], block['--mask_ratio']) == ('block', '0.5')
    # FINETUNE.md's ViT-L fine-tuning, after its pre-training job
    script, ft = by_dir[str(tmp_path / 'runs/baseline/finetune')]
    assert script == 'submitit_finetune.py'
    assert {k: ft[k] for k in ('--model', '--epochs', '--blr', '--layer_decay', '--weight_decay', '--drop_path',
                               '--reprob', '--mixup', '--cutmix', '--dist_eval', '--nb_classes')} == {
        '--model': 'vit_large_patch16', '--epochs': '50', '--blr': '0.001', '--layer_decay': '0.75',
        '--weight_decay': '0.05', '--drop_path': '0.2', '--reprob': '0.25', '--mixup': '0.8', '--cutmix': '1',
        '--dist_eval': True, '--nb_classes': '1000'}
    assert effective_batch(ft) == 1024
    assert ft['--finetune'] == str(tmp_path / 'runs/baseline/pretrain/checkpoint-799.pth')
    assert ft['--dependency'] == 'afterok:<job of runs/baseline/pretrain>'
    # linear probing: class token, LARS base lr 0.1, no weight decay, batch 16384
    script, lin = by_dir[str(tmp_path / 'runs/baseline/linprobe')]
    assert script == 'submitit_linprobe.py'
    assert {k: lin[k] for k in ('--model', '--cls_token', '--epochs', '--blr', '--weight_decay')} == {
        '--model': 'vit_large_patch16', '--cls_token': True, '--epochs': '50', '--blr': '0.1', '--weight_decay': '0'}
    assert effective_batch(lin) == 16384
    # Figure 9: the last K blocks; Table 3: from scratch with the paper's supervised recipe (no --finetune; its
    # flags: test_paper_scale_scratch_is_the_papers_supervised_recipe_with_ema), ViT-B's own recipe
    assert sorted(int(f['--train_blocks']) for _, f in by_dir.values() if '--train_blocks' in f) == [1, 2, 4, 6, 12, 18]
    scratch = by_dir[str(tmp_path / 'runs/scratch-vit_large_patch16/finetune')][1]
    assert '--finetune' not in scratch and scratch['--blr'] == '0.0001' and effective_batch(scratch) == 4096
    base = by_dir[str(tmp_path / 'runs/epochs_1600+model_mae_vit_base_patch16+norm_pix_loss/finetune')][1]
    assert (base['--model'], base['--epochs'], base['--blr'], base['--layer_decay'], base['--drop_path']) == (
        'vit_base_patch16', '100', '0.0005', '0.65', '0.1')
    # each run once: the baseline's pre-training serves every study
    assert len(by_dir) == len(cmds)


def test_paper_scale_scratch_is_the_papers_supervised_recipe_with_ema(tmp_path, capsys):
    """Table 3's from-scratch column at paper scale: Appendix A.2's recipe (Table 11) with --model_ema; the table
    shows the EMA's top-1 (the paper's 82.3 / 82.6 are) and lists the recipe; fine-tuning from MAE keeps its own."""
    cmds = dry_run_lines(capsys, '--scale', 'paper', '--study', 'scratch', '--data_path', '/imagenet', '--work_dir',
                         tmp_path, '--nodes', 8, '--ngpus', 8)
    by_dir = {c[c.index('--job_dir') + 1]: c for c in cmds}
    table11 = {'--blr': '0.0001', '--weight_decay': '0.3', '--warmup_epochs': '20', '--layer_decay': '1',
               '--reprob': '0', '--smoothing': '0.1', '--mixup': '0.8', '--cutmix': '1', '--model_ema': True,
               '--model_ema_decay': '0.9999'}
    for model, epochs, drop_path in (('vit_large_patch16', '200', '0.2'), ('vit_base_patch16', '300', '0.1')):
        cmd = by_dir[str(tmp_path / f'runs/scratch-{model}/finetune')]
        f = flags_of(cmd)
        assert cmd[1] == 'submitit_finetune.py' and '--finetune' not in f and '--aa' not in f  # RandAug (9, 0.5)
        assert {k: f[k] for k in table11} == table11
        assert (f['--model'], f['--epochs'], f['--drop_path']) == (model, epochs, drop_path)
        assert cmd[cmd.index('--opt_betas') + 1:cmd.index('--opt_betas') + 3] == ['0.9', '0.95']
        assert effective_batch(f) == 4096
    mae = flags_of(by_dir[str(tmp_path / 'runs/epochs_1600+norm_pix_loss/finetune')])
    assert (mae['--blr'], mae['--layer_decay'], effective_batch(mae)) == ('0.001', '0.75', 1024)
    assert '--model_ema' not in mae and '--opt_betas' not in mae
    # the table: the EMA's top-1 of the from-scratch runs, the raw one's of the others; the recipe of each column
    scale = recipes.SCALES['paper']
    study = paper.build_study('scratch', scale)
    planned = plan.Plan(scale, tmp_path)
    planned.add_study(study)
    for run in planned.runs.values():
        fake_finished(run, 70.0)
        if run.flags.get('model_ema'):
            lines = (run.out / 'log.txt').read_text().splitlines()
            rows = [dict(json.loads(line), test_acc1_ema=80.0) for line in lines]
            (run.out / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    setup = plan.Setup(scale, Path('/imagenet'), 1000, tmp_path, 'cuda', 10, 64, [])
    report.write_report(study, planned, setup, ['--scale', 'paper', '--study', 'scratch'], tmp_path)
    table = (tmp_path / 'scratch.md').read_text()
    # (no s.e.: this Setup does not say how many evaluation images there are)
    assert '| ViT-L/16 | 80.0 | — | 82.6 | 70.0 | — | 85.9 |' in table
    assert '| ViT-B/16 | 80.0 | — | 82.3 | 70.0 | — | 83.6 |' in table
    assert "its top-1 is the EMA's" in table
    recipe = re.search(r'- training ViT-L/16 from scratch: `([^`]*)`', table).group(1)
    assert all(f in recipe for f in ('--model_ema --model_ema_decay 0.9999', '--opt_betas 0.9 0.95', '--blr 0.0001'))
    small = paper.build_study('scratch', recipes.SCALES['small'])
    assert small.recipes == () and "this scale's fine-tuning recipe" in small.note and 'not used here' in small.note
    assert 'random weights (seed 0)' not in small.note
    frozen = paper.build_study('scratch', recipes.SCALES['small'], evals=['probe', 'knn'])
    assert "fine-tuning recipe" not in frozen.note  # (no fine-tuning column)
    assert "Feature probe and kNN: the same encoder, frozen, with random weights (seed 0)" in frozen.note


def test_small_scale_dry_run_runs_the_entry_points_here(tmp_path, capsys):
    cmds = dry_run_lines(capsys, '--study', 'decoder_width', '--data_path', TINY, '--work_dir', tmp_path,
                         '--evals', 'finetune', 'linprobe')
    scripts = [c[1] for c in cmds]
    assert set(scripts) == {'main_pretrain.py', 'main_finetune.py', 'main_linprobe.py'}
    widths = sorted(int(flags_of(c)['--decoder_embed_dim']) for c in cmds if '--decoder_embed_dim' in c)
    assert widths == [32, 64, 192, 256]  # the paper's 128..1024 scaled to the 128-d decoder (128: the baseline)
    for c in cmds:
        f = flags_of(c)
        assert f['--device'] == 'cpu' and f['--output_dir'] == f['--log_dir']
        assert f['--model'] in ('mae_vit_small_patch4', 'vit_small_patch4')
        if c[1] != 'main_pretrain.py':
            assert f['--nb_classes'] == '2' and f['--finetune'].endswith('pretrain/checkpoint-7.pth')


def test_pretrain_epochs_lengthen_pre_training_only_in_folders_of_their_own(tmp_path, capsys):
    cmds = dry_run_lines(capsys, '--study', 'scratch', '--data_path', TINY, '--work_dir', tmp_path,
                         '--pretrain_epochs', 50)
    runs = {flags_of(c)['--output_dir']: (c[1], flags_of(c)) for c in cmds}
    mae = str(tmp_path / 'runs' / 'pretrain_epochs_50')
    scratch = str(tmp_path / 'runs' / 'scratch-vit_small_patch4' / 'finetune')
    assert sorted(runs) == sorted([mae + '/pretrain', mae + '/finetune', scratch])
    script, pre = runs[mae + '/pretrain']
    assert script == 'main_pretrain.py'
    assert (pre['--epochs'], pre['--warmup_epochs']) == ('50', '6')  # the warm-up keeps its 1/8 of the schedule
    for out in (mae + '/finetune', scratch):  # the evaluations keep the recipe
        assert runs[out][1]['--epochs'] == '5'
    assert runs[mae + '/finetune'][1]['--finetune'] == mae + '/pretrain/checkpoint-49.pth'
    assert '--finetune' not in runs[scratch][1]
    # the scale's own schedule keeps its folders: neither continues the other
    default = dry_run_lines(capsys, '--study', 'scratch', '--data_path', TINY, '--work_dir', tmp_path)
    pre = [flags_of(c) for c in default if c[1] == 'main_pretrain.py']
    baseline = str(tmp_path / 'runs' / 'baseline' / 'pretrain')
    assert [(f['--epochs'], f['--output_dir']) for f in pre] == [('8', baseline)]


def test_another_seed_runs_in_folders_of_its_own_and_seed_0_is_unchanged(tmp_path, capsys):
    argv = ('--study', 'scratch', '--evals', 'finetune', 'probe', '--data_path', TINY, '--work_dir', tmp_path)
    seed0 = {flags_of(c)['--output_dir'] if '--output_dir' in flags_of(c) else flags_of(c)['--results']: flags_of(c)
             for c in dry_run_lines(capsys, *argv)}
    seed1 = {flags_of(c)['--output_dir'] if '--output_dir' in flags_of(c) else flags_of(c)['--results']: flags_of(c)
             for c in dry_run_lines(capsys, *argv, '--seed', 1)}
    runs = tmp_path / 'runs'
    assert sorted(seed0) == sorted(str(p) for p in (runs / 'baseline/pretrain', runs / 'baseline/finetune',
                                                    runs / 'baseline/probe/result.json',
                                                    runs / 'scratch-vit_small_patch4/finetune',
                                                    runs / 'scratch-vit_small_patch4/probe/result.json'))
    assert all('--seed' not in f for f in seed0.values())  # seed 0: the commands of before, the entry points' seed
    # every training run of seed 1 in folders of its own, with --seed 1; the frozen-feature evaluations have no seed
    # (deterministic given their checkpoint), and random weights are seed 0's (one folder shared by both)
    assert sorted(seed1) == sorted(str(p) for p in (runs / 'seed_1/pretrain', runs / 'seed_1/finetune',
                                                    runs / 'seed_1/probe/result.json',
                                                    runs / 'seed_1+scratch-vit_small_patch4/finetune',
                                                    runs / 'scratch-vit_small_patch4/probe/result.json'))
    for out, flags in seed1.items():
        assert flags.get('--seed') == ('1' if out.endswith(('pretrain', 'finetune')) else None), out
    assert seed1[str(runs / 'seed_1/finetune')]['--finetune'] == str(runs / 'seed_1/pretrain/checkpoint-7.pth')


def test_amp_goes_to_every_training_run_in_folders_of_its_own(tmp_path, capsys):
    cmds = dry_run_lines(capsys, '--study', 'target', '--evals', 'probe', 'finetune', '--data_path', TINY,
                         '--work_dir', tmp_path, '--amp', 'bf16', '--seed', 3)
    runs = tmp_path / 'runs'
    by_kind = {(c[1], c[2] if c[2].startswith('--probe') else ''): flags_of(c) for c in cmds
               if 'norm_pix_loss' not in ' '.join(c)}
    pre, ft = by_kind[('main_pretrain.py', '')], by_kind[('main_finetune.py', '')]
    assert pre['--output_dir'] == str(runs / 'seed_3+amp_bf16' / 'pretrain')
    assert (pre['--amp'], pre['--seed'], ft['--amp'], ft['--seed']) == ('bf16', '3', 'bf16', '3')
    probe = by_kind[('extract_features.py', '--probe')]
    assert '--amp' not in probe and '--seed' not in probe  # (extract_features.py runs fp32, deterministically)
    assert probe['--results'] == str(runs / 'seed_3+amp_bf16' / 'probe' / 'result.json')


def test_another_seeds_reports_go_beside_seed_0s(tmp_path, capsys, monkeypatch):
    scale = recipes.SCALES['quick']
    for seed, acc in ((0, 40.0), (1, 44.0)):
        planned = plan.Plan(scale, tmp_path, {'seed': seed} if seed else None)
        planned.add_study(paper.build_study('mask_ratio', scale, [0.75], ['knn']))
        for run in planned.runs.values():
            fake_finished(run, acc, val_images=8)
    monkeypatch.setattr(runner.Runner, '_run_local', lambda *a, **k: pytest.fail('nothing should run'))
    for seed in (0, 1):
        code, out, err = run_reproduce(capsys, '--quick', '--study', 'mask_ratio', '--values', 0.75, '--evals', 'knn',
                                       '--work_dir', tmp_path, '--seed', seed)
        assert code == 0, err
    assert '| 0.75 (default) | 40.0 |' in (tmp_path / 'mask_ratio.md').read_text()
    seed1 = (tmp_path / 'mask_ratio_seed1.md').read_text()
    assert '| 0.75 (default) | 44.0 |' in seed1 and 'Every training run with --seed 1.' in seed1
    assert '--seed 1' in seed1  # the command
    assert json.loads((tmp_path / 'mask_ratio_seed1.json').read_text())['run_flags'] == {'seed': 1}
    assert json.loads((tmp_path / 'mask_ratio.json').read_text())['run_flags'] == {}


def test_two_invocations_on_one_work_dir_keep_each_others_timings(tmp_path, monkeypatch):
    scale = recipes.SCALES['quick']
    setup = plan.Setup(scale, TINY, 2, tmp_path, 'cpu', 0, 1, [])
    planned = plan.Plan(scale, tmp_path)
    planned.add_study(paper.build_study('mask_ratio', scale, [0.5, 0.75], ['knn']))
    first, second = runner.Runner(planned, setup), runner.Runner(planned, setup)  # both started before either ran

    class Finished:
        def __init__(self, *args, **kwargs):
            pass

        def wait(self):
            return 0
    monkeypatch.setattr(runner.subprocess, 'Popen', Finished)
    runs = list(planned.runs.values())
    first._run_local(runs[0])
    second._run_local(runs[1])
    first._run_local(runs[2])
    timed = json.loads((tmp_path / 'timings.json').read_text())
    assert sorted(timed) == sorted(setup.rel(r.out) for r in runs[:3])

def fake_finished(run, acc, val_images=None):
    """Write what a finished run leaves: its log (each epoch, accuracy for evaluations) and final checkpoint; for
    an evaluation of frozen features, its result.json (with ``val_images``: the images it says it counted)."""
    run.out.mkdir(parents=True, exist_ok=True)
    if not run.trains:
        metric = recipes.EVALUATIONS[run.kind].metric
        run.result_file.write_text(json.dumps({metric: acc, 'val_images': val_images}))
        return
    rows = [dict({'epoch': e}, **({'test_acc1': acc - run.epochs + 1 + e} if run.kind != 'pretrain' else {}))
            for e in range(run.epochs)]
    (run.out / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run.final_checkpoint.write_bytes(b'')


def test_finished_runs_are_not_run_again(tmp_path, capsys, monkeypatch):
    scale = recipes.SCALES['quick']
    planned = plan.Plan(scale, tmp_path)
    study = paper.build_study('partial_ft', scale)
    planned.add_study(study)
    assert [r.kind for r in planned.runs.values()] == ['pretrain', 'linprobe', 'finetune', 'finetune']
    for i, run in enumerate(planned.runs.values()):
        fake_finished(run, 50.0 + i)

    def no_run(*args, **kwargs):
        raise AssertionError('nothing should run')
    monkeypatch.setattr(runner.Runner, '_run_local', no_run)
    # the compute of earlier invocations, as the runner keeps it (two of the four runs timed)
    (tmp_path / 'timings.json').write_text(json.dumps({'runs/baseline/pretrain': 60.5, 'runs/baseline/linprobe': 40}))
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'partial_ft', '--work_dir', tmp_path)
    assert code == 0, err
    assert '4 runs in 3 cells: 4 done before, 0 to run' in out
    table = (tmp_path / 'partial_ft.md').read_text()
    assert '| 0 (linear probe) | 51.0 |' in table and '| 1 | 52.0 |' in table and '| 2 (all) | 53.0 |' in table
    assert 'Compute: 0:01:40 for the 2 of 4 runs of this study timed by the runner' in table
    if charts_drawn():
        assert (tmp_path / 'partial_ft.png').stat().st_size > 1000
    results = json.loads((tmp_path / 'partial_ft.json').read_text())
    # the standard error from the evaluation split's size (tests/data/tiny_imagefolder/val: 8 images)
    assert results['cells'][1]['ours']['top1'] == {'final': 52.0, 'best': 52.0, 'images': 8,
                                                   'se': pytest.approx(100 * (0.52 * 0.48 / 8) ** 0.5)}
    assert '| 1 | 52.0 | ±17.7 | — |' in table


@pytest.mark.parametrize('damaged, kept, why', [
    (b'{"runs/baseline/pretrain": 60.5, "runs/bas', {}, 'not UTF-8 JSON: '),
    (b'\xff\xfe\x00', {}, 'not UTF-8 JSON: '),
    (b'[60.5, 40]', {}, 'a JSON list, not an object'),
    (b'{"runs/baseline/pretrain": 60.5, "runs/baseline/linprobe": "forty"}', {'runs/baseline/pretrain': 60.5},
     '1 value(s) of another kind, e.g. runs/baseline/linprobe: "forty"'),
])
def test_a_damaged_timings_file_is_set_aside_and_rebuilt_in_one_line(tmp_path, capsys, monkeypatch, damaged, kept,
                                                                      why):
    scale = recipes.SCALES['quick']
    planned = plan.Plan(scale, tmp_path)
    planned.add_study(paper.build_study('partial_ft', scale))
    for i, run in enumerate(planned.runs.values()):
        fake_finished(run, 50.0 + i)
    monkeypatch.setattr(runner.Runner, '_run_local', lambda *a, **k: pytest.fail('nothing should run'))
    (tmp_path / 'timings.json').write_bytes(damaged)
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'partial_ft', '--work_dir', tmp_path)
    assert code == 0, err
    side, = tmp_path.glob('timings.json.damaged-*')
    assert side.read_bytes() == damaged
    assert f"Note: {tmp_path / 'timings.json'} is damaged ({why}" in out
    assert f"): set aside as {side}; rebuilt with its {len(kept)} readable entries" in out
    assert json.loads((tmp_path / 'timings.json').read_text()) == kept
    table = (tmp_path / 'partial_ft.md').read_text()
    assert '| 0 (linear probe) | 51.0 |' in table
    assert f"for the {len(kept)} of 4 runs of this study timed by the runner" in table


@pytest.mark.parametrize('damaged', [b'{"runs/baseline/pretrain": 12', b'{"runs/baseline/pretrain": 12}'])
def test_a_damaged_jobs_file_is_set_aside_and_rebuilt(tmp_path, capsys, damaged):
    (tmp_path / 'jobs.json').write_bytes(damaged[:-1] + b', "runs/baseline/finetune": "345"}'
                                         if damaged.endswith(b'}') else damaged)
    jobs = runner.read_json(tmp_path / 'jobs.json', runner.job_id_value)
    assert jobs == ({'runs/baseline/finetune': '345'} if damaged.endswith(b'}') else {})
    side, = tmp_path.glob('jobs.json.damaged-*')
    assert json.loads((tmp_path / 'jobs.json').read_text()) == jobs
    assert f"set aside as {side}; rebuilt with its {len(jobs)} readable entries" in capsys.readouterr().out


def test_a_damaged_data_record_is_one_line(tmp_path, capsys):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'SOURCE.json').write_bytes(b'{"data_path": "/x", \xff')
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'scratch', '--work_dir', tmp_path, '--train_subset',
                                   4)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'data' / 'SOURCE.json'} is damaged (not UTF-8 JSON: ")
    assert f"move {tmp_path / 'data'} aside (it is made again), else pass another --work_dir" in err


def test_a_work_dir_among_the_images_and_a_split_without_classes_are_one_line(tmp_path, capsys):
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        (data / split / 'a').mkdir(parents=True)
    for argv, expected in (
            (['--work_dir', data / 'train' / 'runs'],
             f"--work_dir {data / 'train' / 'runs'} lies inside {data / 'train'}, which --data_path reads images"),
            (['--work_dir', tmp_path / 'w', '--results_dir', data / 'val'],
             f"--results_dir {data / 'val'} is {data / 'val'}, which --data_path reads images")):
        code, out, err = run_reproduce(capsys, '--quick', '--study', 'scratch', '--data_path', data, *argv)
        assert code == 2 and err.startswith('error: ' + expected) and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in data.rglob('*')) == ['a', 'a', 'train', 'val'] and not (tmp_path / 'w').exists()
    no_classes = tmp_path / 'noclass'
    (no_classes / 'train').mkdir(parents=True)
    (no_classes / 'val' / 'a').mkdir(parents=True)
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'scratch', '--data_path', no_classes, '--work_dir',
                                   tmp_path / 'w2')
    assert code == 2 and err == (f"error: --data_path {no_classes}: train/ has no class folders (expected "
                                 f"{no_classes / 'train'}/<class>/<image>)\n")


class WritesResult:
    """extract_features.py as the runner starts it: writes its --results (a top-1 of 61.5 on 8 images)."""
    commands = []

    def __init__(self, cmd, **kwargs):
        WritesResult.commands.append(cmd)
        result = Path(cmd[cmd.index('--results') + 1])
        result.write_text(json.dumps({'knn_top1': 61.5, 'val_images': 8}))

    def wait(self):
        return 0


@pytest.mark.parametrize('damaged', [b'[61.5, 8]', b'{}', b'{"knn_top1": "61.5"}', b'{"knn_top1": true}',
                                     b'{"knn_top1": 61.5, "val_images": "8"}', b'\xff\xfe{}', b'{"knn_top1": 6'])
def test_an_unreadable_result_is_set_aside_and_its_evaluation_runs_again(tmp_path, capsys, monkeypatch, damaged):
    scale = recipes.SCALES['quick']
    planned = plan.Plan(scale, tmp_path)
    planned.add_study(paper.build_study('mask_ratio', scale, [0.75], ['knn']))
    for run in planned.runs.values():
        fake_finished(run, 40.0, val_images=8)
    knn = tmp_path / 'runs' / 'baseline' / 'knn' / 'result.json'
    knn.write_bytes(damaged)
    WritesResult.commands = []
    monkeypatch.setattr(runner.subprocess, 'Popen', WritesResult)
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'mask_ratio', '--values', 0.75, '--evals', 'knn',
                                   '--work_dir', tmp_path)
    assert code == 0, err
    assert '2 runs in 1 cells: 1 done before, 1 to run' in out
    assert [cmd[1] for cmd in WritesResult.commands] == ['extract_features.py']
    side, = knn.parent.glob('result.json.damaged-*')
    assert side.read_bytes() == damaged
    assert f"Note: {knn} is damaged (not JSON of an object with a number knn_top1): set aside as {side}; the " \
           f"evaluation runs again" in out
    assert '| 0.75 (default) | 61.5 | ±17.2 |' in (tmp_path / 'mask_ratio.md').read_text()


def test_a_training_runs_log_of_unreadable_rows_is_no_traceback(tmp_path):
    run = PlannedRun('finetune', {'epochs': 2}, tmp_path)
    (tmp_path / 'checkpoint-1.pth').write_bytes(b'')
    (tmp_path / 'log.txt').write_bytes(b'\xff\n[1]\n{"epoch": 0, "test_acc1": 10}\n{"epoch": 1, "test_acc1": 20}\n')
    assert run.finished() and run.accuracy() == (20, 20)
    (tmp_path / 'log.txt').write_bytes(b'{"epoch": 0, "test_acc1": 10}\n{"epoch": 1, "test_acc1": "20"}\n')
    assert run.finished() and run.accuracy() is None
    assert report.cell_value(run) == 'no top-1'


def charts_drawn():
    try:
        import matplotlib  # noqa: F401 (optional: requirements-test.txt has it, so CI draws the charts)
        return True
    except ImportError:
        return False


def test_without_matplotlib_the_chart_is_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    planned = plan.Plan(recipes.SCALES['quick'], tmp_path)
    planned.add_study(paper.build_study('mask_ratio', recipes.SCALES['quick'], values=[0.5, 0.75]))
    for run in planned.runs.values():
        fake_finished(run, 40.0, val_images=1000)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # import fails as if not installed
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'mask_ratio', '--values', 0.5, 0.75, '--work_dir',
                                   tmp_path)
    assert code == 0, err
    assert '# note: mask_ratio.png not drawn: matplotlib is not installed (pip install matplotlib)' in out
    assert not (tmp_path / 'mask_ratio.png').exists()
    # the small scale's default: the feature probe (beside the paper's linear probing) and kNN (no paper number),
    # each with the standard error of the images its result.json counted: sqrt(0.4 * 0.6 / 1000) = 1.5 points
    table = (tmp_path / 'mask_ratio.md').read_text()
    assert '| 0.75 (default) | 40.0 | ±1.5 | 73.5 | 40.0 | ±1.5 | — |' in table
    assert ('| mask ratio | feature probe (ours) | s.e. | linear probing (paper) | kNN (ours) | s.e. | kNN (paper) |'
            in table)
    assert 'Feature probe: a linear classifier' in table and 'Fine-tuning is a column on request' in table


def test_a_run_is_finished_only_with_its_last_epoch_and_checkpoint(tmp_path):
    run = PlannedRun('finetune', {'epochs': 3}, tmp_path)
    assert not run.finished()
    (tmp_path / 'log.txt').write_text('{"epoch": 0, "test_acc1": 10}\n{"epoch": 1, "test_acc1": 20}\n{"epo')
    assert not run.finished() and run.accuracy() == (20, 20)
    (tmp_path / 'log.txt').write_text('{"epoch": 0, "test_acc1": 10}\n{"epoch": 2, "test_acc1": 5}\n')
    assert not run.finished()  # killed between its last row and its checkpoint: the entry point continues it
    (tmp_path / 'checkpoint-2.pth').write_bytes(b'')
    assert run.finished() and run.accuracy() == (5, 10)


def test_data_folder_links_the_test_split_and_a_balanced_subset(tmp_path):
    src = tmp_path / 'cifar'
    for split, n in (('train', 7), ('test', 3)):
        for cls in ('cat', 'dog'):
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                (src / split / cls / f'{i}.jpg').write_bytes(b'x')
    args = reproduce.get_args_parser().parse_args(['--data_path', str(src), '--val_split', 'test',
                                                   '--train_subset', '9'])
    data = prepare_data(args, tmp_path / 'work', dry_run=False)
    assert sorted(len(list((data / 'train' / c).iterdir())) for c in ('cat', 'dog')) == [4, 5]
    assert (data / 'val').resolve() == (src / 'test').resolve()
    assert prepare_data(args, tmp_path / 'work', dry_run=False) == data  # made once
    args.train_subset = 4
    with pytest.raises(UsageError, match='was made from other data'):
        prepare_data(args, tmp_path / 'work', dry_run=False)


@pytest.mark.parametrize('argv, expected', [
    ([], '--study is required'),
    (['--study', 'nope', '--quick'], '--study nope: no such study'),
    (['--study', 'mask_ratio', 'scratch', '--values', '0.5', '--quick'], '--values goes with one study'),
    (['--study', 'mask_ratio', '--values', '75', '--quick'], 'mask ratios are between 0 and 1'),
    (['--study', 'scratch', '--quick', '--scale', 'paper'], '--quick is a small smoke test'),
    (['--study', 'scratch'], '--data_path is required'),
    (['--study', 'scratch', '--quick', '--pretrain_epochs', '0'], '--pretrain_epochs must be at least 1'),
    (['--study', 'scratch', '--scale', 'paper', '--data_path', '/imagenet', '--nodes', '3', '--dry_run'],
     'cannot be split over 24 GPUs'),
])
def test_runner_mistakes_are_one_line(tmp_path, capsys, argv, expected):
    code, out, err = run_reproduce(capsys, *argv, '--work_dir', tmp_path / 'w')
    assert code == 2 and err.startswith('error: ') and expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_quick_study_end_to_end_then_nothing_to_do(tmp_path):
    argv = ['reproduce.py', '--quick', '--study', 'partial_ft', '--work_dir', tmp_path]
    first = run_script(*argv)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert '4 runs in 3 cells: 0 done before, 4 to run' in first.stdout
    assert re.search(r'\[cell 3/3 partial_ft: 2 \(all\)\] finetune runs/baseline/finetune: done in [0-9:]+, '
                     r'top-1 [0-9.]+; elapsed [0-9:]+, about 0:00:00 left', first.stdout)
    table = (tmp_path / 'partial_ft.md').read_text()
    assert 'not run' not in table and 'failed' not in table
    assert re.search(r'\| 1 \| [0-9.]+ \| ±[0-9.]+ \| — \|', table)  # top-1, its standard error, no paper number
    assert 'Command: `python reproduce.py --study partial_ft --quick --work_dir' in table
    second = run_script(*argv)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '4 runs in 3 cells: 4 done before, 0 to run' in second.stdout and 'running' not in second.stdout
    assert (tmp_path / 'partial_ft.md').read_text() == table


@pytest.mark.slow
def test_quick_frozen_feature_evaluations_end_to_end(tmp_path):
    """kNN and the feature probe of the baseline MAE and of random weights, run, read back and reported; the same
    numbers as extract_features.py prints; a second invocation runs nothing."""
    argv = ['reproduce.py', '--quick', '--study', 'scratch', '--evals', 'knn', 'probe', '--work_dir', tmp_path]
    first = run_script(*argv)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert '5 runs in 1 cells: 0 done before, 5 to run' in first.stdout
    assert 'knn runs/scratch-vit_tiny_patch4/knn: running (features of train/ and val/;' in first.stdout
    results = json.loads((tmp_path / 'scratch.json').read_text())['cells'][0]['ours']
    for key, kind in (('scratch_knn', 'knn'), ('mae_knn', 'knn'), ('scratch_probe', 'probe'),
                      ('mae_probe', 'probe')):
        folder = 'scratch-vit_tiny_patch4' if key.startswith('scratch') else 'baseline'
        written = json.loads((tmp_path / 'runs' / folder / kind / 'result.json').read_text())
        assert written['val_images'] == 8 and written['train_images'] == 16
        top1 = written[f'{kind}_top1']
        assert results[key] == {'final': top1, 'best': top1, 'images': 8,
                                'se': pytest.approx(100 * (top1 / 100 * (1 - top1 / 100) / 8) ** 0.5)}
        assert f"top-1 {top1:.2f}%" in (tmp_path / 'runs' / folder / kind / 'console.txt').read_text()
    table = (tmp_path / 'scratch.md').read_text()
    assert 'not run' not in table and 'failed' not in table
    assert '- kNN: `--knn --model vit_tiny_patch4 --input_size 32 --batch_size 16`' in table
    second = run_script(*argv)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '5 runs in 1 cells: 5 done before, 0 to run' in second.stdout and 'running' not in second.stdout


def test_paper_scale_submits_each_run_after_its_pre_training(tmp_path, capsys, monkeypatch):
    """With SLURM (faked here): one job per run, an evaluation job depending on its pre-training job, the job ids
    kept in jobs.json; a second invocation does not submit the jobs still queued or running again."""
    submitted, queued = [], set()

    def fake_run(cmd, **kwargs):
        if cmd[0] == 'squeue':
            alive = cmd[cmd.index('-j') + 1] in queued
            return subprocess.CompletedProcess(cmd, 0, stdout='PENDING\n' if alive else '', stderr='')
        job = str(1000 + len(submitted))
        submitted.append((job, cmd))
        queued.add(job)
        return subprocess.CompletedProcess(cmd, 0, stdout=f'{job}\n', stderr='')
    monkeypatch.setattr(reproduce.shutil, 'which', lambda name: f'/usr/bin/{name}')
    monkeypatch.setattr(runner.subprocess, 'run', fake_run)
    argv = ['--scale', 'paper', '--study', 'target', '--data_path', TINY, '--work_dir', tmp_path, '--nodes', 1]
    code, out, err = run_reproduce(capsys, *argv)
    assert code == 0, err
    jobs = {cmd[cmd.index('--job_dir') + 1]: (job, cmd) for job, cmd in submitted}
    assert len(jobs) == 6  # two pre-trainings, each with a fine-tuning and a linear probe
    for name in ('baseline', 'norm_pix_loss'):
        pt_job, pt_cmd = jobs[str(tmp_path / 'runs' / name / 'pretrain')]
        assert pt_cmd[1] == 'submitit_pretrain.py' and '--dependency' not in pt_cmd
        # one node of 8 GPUs: the effective batches are kept by accumulation
        assert (flags_of(pt_cmd)['--batch_size'], flags_of(pt_cmd)['--accum_iter']) == ('64', '8')
        for kind in ('finetune', 'linprobe'):
            _, cmd = jobs[str(tmp_path / 'runs' / name / kind)]
            assert cmd[1] == f'submitit_{kind}.py'
            assert cmd[cmd.index('--dependency') + 1] == f'afterok:{pt_job}'
            assert effective_batch(flags_of(cmd)) == (1024 if kind == 'finetune' else 16384)
    assert json.loads((tmp_path / 'jobs.json').read_text())['runs/baseline/pretrain'] == '1000'
    table = (tmp_path / 'target.md').read_text()
    assert '| pixel (w/o norm) (default) | job 1001 | — | 84.9 | job 1002 | — | 73.5 |' in table
    assert 'n = 50000 images' in table  # ImageNet-1K's validation set, not walked on the cluster
    # again: all six are still queued, nothing is submitted twice
    code, out, err = run_reproduce(capsys, *argv)
    assert code == 0, err
    assert len(submitted) == 6 and out.count('still queued or running; not submitted again') == 6


class StoppedChild:
    """A run's process, faked: the user's Ctrl-C reaches the runner (the child has a session of its own), which asks
    the child to stop with SIGTERM; the child then exits 1, having written checkpoint-last.pth only if ``saves``."""
    saves = False

    def __init__(self, cmd, stdout=None, **kwargs):
        self.out = Path(cmd[cmd.index('--output_dir') + 1])
        self.signals = []

    def poll(self):
        return None

    def send_signal(self, signum):
        self.signals.append(signum)

    def wait(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this (the main) thread before kill returns
        assert self.signals == [signal.SIGTERM]
        if self.saves:
            (self.out / 'checkpoint-last.pth').write_bytes(b'')
        return 1


@pytest.mark.parametrize('saves, earlier, expected', [
    (True, False, 'saved where it was; the same command continues'),
    (False, False, 'had nothing saved yet'),
    (False, True, 'saved nothing new (it continues from its last checkpoint)'),
])
def test_an_interrupted_cell_says_interrupted_and_whether_it_saved(tmp_path, capsys, monkeypatch, saves, earlier,
                                                                    expected):
    monkeypatch.setattr(StoppedChild, 'saves', saves)
    monkeypatch.setattr(runner.subprocess, 'Popen', StoppedChild)
    first = tmp_path / 'runs' / 'scratch-vit_tiny_patch4' / 'finetune'
    if earlier:  # a checkpoint of an earlier attempt
        first.mkdir(parents=True)
        (first / 'checkpoint-last.pth').write_bytes(b'earlier')
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'scratch', '--work_dir', tmp_path)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith('stopped: signal 2 received: runs/scratch-vit_tiny_patch4/finetune ') and expected in err
    assert saves or 'saved where it was' not in err
    table = (tmp_path / 'scratch.md').read_text()
    assert 'failed' not in table
    assert '| ViT-tiny/4 (64-d, 2 blocks; decoder 32-d, 2 blocks) | interrupted | — | — | not run | — | — |' \
        in table


def test_quick_plans_every_study_with_each_evaluation_kind(tmp_path, capsys):
    """The --quick smoke test covers every study and each kind of evaluation: by default, and with each kind alone."""
    def kinds_of(cmds):  # main_pretrain.py, or the evaluation each command is (extract_features.py's by its mode)
        entry = {(e.entry_point, e.mode): k for k, e in recipes.EVALUATIONS.items()}
        return {'pretrain' if c[1] == 'main_pretrain.py' else
                entry[c[1], c[2] if c[1] == 'extract_features.py' else ''] for c in cmds}
    cmds = dry_run_lines(capsys, '--quick', '--study', 'all', '--work_dir', tmp_path)
    assert kinds_of(cmds) == {'pretrain'} | set(recipes.EVALUATIONS)
    for name in paper.STUDIES:
        study = paper.build_study(name, recipes.SCALES['quick'])
        assert study.cells and all(cell.measures for cell in study.cells if cell.label not in ('PCA', 'dVAE token'))
    for kind in recipes.EVALUATIONS:
        cmds = dry_run_lines(capsys, '--quick', '--study', 'all', '--evals', kind, '--work_dir', tmp_path)
        assert kinds_of(cmds) == {'pretrain', kind}


def test_frozen_feature_evaluations_are_extract_features_commands(tmp_path, capsys):
    """--evals knn probe: extract_features.py of each pre-training's final checkpoint (or of random weights, for
    the scratch study) on the data's train/ and val/, writing result.json in the run's folder."""
    cmds = dry_run_lines(capsys, '--study', 'scratch', 'target', '--data_path', TINY, '--work_dir', tmp_path,
                         '--evals', 'knn', 'probe')
    runs = {c[c.index('--results') + 1]: c for c in cmds if c[1] == 'extract_features.py'}
    rel = sorted(str(Path(out).relative_to(tmp_path / 'runs')) for out in runs)
    assert rel == ['baseline/knn/result.json', 'baseline/probe/result.json', 'norm_pix_loss/knn/result.json',
                   'norm_pix_loss/probe/result.json', 'scratch-vit_small_patch4/knn/result.json',
                   'scratch-vit_small_patch4/probe/result.json']
    knn = runs[str(tmp_path / 'runs/baseline/knn/result.json')]
    assert knn[2] == '--knn' and plan.REPO / knn[3] == TINY  # (shown relative to the repository)
    f = flags_of(knn[2:])  # (from knn[4], the flags after --knn DIR)
    assert f['--checkpoint'] == str(tmp_path / 'runs/baseline/pretrain/checkpoint-7.pth')
    assert (f['--model'], f['--input_size'], f['--device']) == ('vit_small_patch4', '32', 'cpu')
    probe = flags_of(runs[str(tmp_path / 'runs/scratch-vit_small_patch4/probe/result.json')][2:])
    assert probe['--random_init'] is True and '--checkpoint' not in probe
    assert sum(c[1] == 'main_pretrain.py' for c in cmds) == 2  # no training evaluation, no scratch training
    # every column is measured: the first evaluation given is the headline (the first column)
    study = paper.build_study('target', recipes.SCALES['small'], evals=('knn', 'probe'))
    assert [k for k, _ in study.columns] == ['knn', 'probe']
    assert study.cells[1].paper == {'finetune': 85.4, 'linprobe': 73.9, 'probe': 73.9}  # the probe's: linear probing


def test_the_small_scale_defaults_to_the_cheap_evaluations_where_the_finding_is_linear_probing():
    small = paper.evals_per_study(None, list(paper.STUDIES), 'small')
    assert all(small[name] == ('probe', 'knn') for name in paper.ABLATIONS)
    assert small['partial_ft'] == ('finetune', 'linprobe') and small['scratch'] == ('finetune',)
    assert paper.evals_per_study(None, list(paper.STUDIES), 'quick') == small
    # the paper's scale keeps the paper's columns; --evals still chooses, the first given first
    assert paper.evals_per_study(None, ['mask_ratio'], 'paper') == {'mask_ratio': ('finetune', 'linprobe')}
    assert paper.evals_per_study(['knn', 'finetune'], ['target'], 'small') == {'target': ('knn', 'finetune')}
    # Figure 9's K = 0 point with the cheap probe
    study = paper.build_study('partial_ft', recipes.SCALES['quick'], evals=('finetune', 'probe'))
    assert [(c.label, c.measures['top1'].kind) for c in study.cells] == [
        ('0 (feature probe)', 'probe'), ('1', 'finetune'), ('2 (all)', 'finetune')]


@pytest.mark.parametrize('top1, n, expected', [(50.0, 100, 5.0), (90.0, 10000, 0.3), (100.0, 8, 0.0),
                                              (40.0, None, None)])
def test_standard_error_of_a_top1_is_the_binomials(top1, n, expected):
    from studies.report import standard_error
    assert standard_error(top1, n) == (pytest.approx(expected) if expected is not None else None)


def test_evals_choose_the_evaluations_of_each_study(tmp_path, capsys):
    cmds = dry_run_lines(capsys, '--quick', '--study', 'scratch', 'mask_sampling', 'partial_ft', '--work_dir',
                         tmp_path, '--evals', 'linprobe', 'scratch=finetune,linprobe')
    runs = {flags_of(c)['--output_dir']: (c[1], flags_of(c)) for c in cmds}
    rel = sorted(str(Path(out).relative_to(tmp_path / 'runs')) for out in runs)
    # scratch: fine-tuning and linear probing, each from random weights and from the MAE; the others: linear probes
    # only (partial_ft: its K=0 point)
    assert rel == ['baseline/finetune', 'baseline/linprobe', 'baseline/pretrain', 'mask_ratio_0.5+mask_type_block/'
                   'linprobe', 'mask_ratio_0.5+mask_type_block/pretrain', 'mask_type_block/linprobe',
                   'mask_type_block/pretrain', 'mask_type_grid/linprobe', 'mask_type_grid/pretrain',
                   'scratch-vit_tiny_patch4/finetune', 'scratch-vit_tiny_patch4/linprobe']
    script, probe = runs[str(tmp_path / 'runs/scratch-vit_tiny_patch4/linprobe')]
    assert script == 'main_linprobe.py' and '--finetune' not in probe and probe['--cls_token'] is True
    source = runs[str(tmp_path / 'runs/baseline/linprobe')][1]['--finetune']
    assert source == str(tmp_path / 'runs/baseline/pretrain/checkpoint-0.pth')
    # the columns follow: the scratch study's table has both pairs, Table 3's first
    study = paper.build_study('scratch', recipes.SCALES['quick'], evals=('finetune', 'linprobe'))
    assert study.columns == [('scratch', 'from scratch'), ('mae', 'fine-tuned from MAE'),
                             ('scratch_linprobe', 'linear probing of random weights'),
                             ('mae_linprobe', 'linear probing of MAE')]
    study = paper.build_study('partial_ft', recipes.SCALES['quick'], evals=('finetune',))
    assert [cell.label for cell in study.cells] == ['1', '2 (all)']
    # the default is the paper's columns
    assert paper.evals_per_study(None, ['mask_ratio', 'scratch']) == {'mask_ratio': ('finetune', 'linprobe'),
                                                                      'scratch': ('finetune',)}


@pytest.mark.parametrize('evals, expected', [
    (['knm'], "--evals knm: no evaluation 'knm'; choose from finetune, linprobe, knn, probe"),
    (['target=linprobe'], '--evals target=linprobe: target is not one of the studies run (scratch)'),
    (['scratch=linprobe,fine'], "--evals scratch=linprobe,fine: no evaluation 'fine'"),
    (['knn', '--scale', 'paper', '--data_path', '/imagenet'],
     "--evals knn: knn runs here on extracted features, not as a SLURM job; at --scale paper choose from finetune, "
     "linprobe"),
])
def test_evals_mistakes_are_one_line(tmp_path, capsys, evals, expected):
    work = tmp_path / 'w'
    quick = [] if '--scale' in evals else ['--quick']
    code, out, err = run_reproduce(capsys, *quick, '--study', 'scratch', '--evals', *evals, '--work_dir', work)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not work.exists()


def test_partial_ft_without_its_evaluations_is_one_line(tmp_path, capsys):
    work = tmp_path / 'w'
    code, out, err = run_reproduce(capsys, '--quick', '--study', 'partial_ft', '--evals', 'finetune', '--values', 0,
                                   '--work_dir', work)
    assert code == 2 and "partial_ft measures fine-tuning (K > 0 blocks) and linear probing (K = 0: linprobe, " \
                          "probe, knn); it has no cell for finetune" in err
    assert not work.exists()
