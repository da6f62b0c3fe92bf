"""Every numeric flag of every entry point declares its range where it is defined (``type=Range(...)``, util/flags.py),
and each side of it, nan and inf are refused while parsing with one line naming the flag; a flag declared without a
range still runs, with a note. The constraints between flags (what timm's Mixup needs, the seed on many processes)
too. In-process: the parsers, the checks on parsed flags, and a few whole command lines through run_main."""
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

import export
import extract_features
import main_finetune
import main_linprobe
import main_pretrain
import models_vit
import util.flag_checks as flag_checks
import util.slurm.submitit_job as submitit_job
from conftest import ROOT, TINY, run_in_process
from util.flag_checks import check_between
from util.flags import Range
from util.errors import UsageError


def _load(script):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VISUALIZE = _load('demo/visualize.py')
REPRODUCE = _load('reproduce.py')
# every entry point's parser, and the command line it needs besides numeric flags
PARSERS = {
    'main_pretrain.py': (main_pretrain.get_args_parser, []),
    'main_finetune.py': (main_finetune.get_args_parser, []),
    'main_linprobe.py': (main_linprobe.get_args_parser, []),
    'submitit_pretrain.py': (lambda: submitit_job.get_args_parser('main_pretrain', 'submitit'), []),
    'submitit_finetune.py': (lambda: submitit_job.get_args_parser('main_finetune', 'submitit'), []),
    'submitit_linprobe.py': (lambda: submitit_job.get_args_parser('main_linprobe', 'submitit'), []),
    'demo/visualize.py': (VISUALIZE.get_args_parser, ['image.png', '--checkpoint', 'mae.pth']),
    'extract_features.py': (extract_features.get_args_parser, ['images/', '--checkpoint', 'mae.pth']),
    'reproduce.py': (REPRODUCE.get_args_parser, ['--study', 'mask_ratio', '--quick']),
    'export.py': (export.get_args_parser, ['--checkpoint', 'mae.pth', '--to', 'timm', '--out', 'vit.pth']),
}


def ranged_flags(parser):
    return [a for a in parser._actions if isinstance(a.type, Range)]


def test_every_numeric_flag_has_a_range():
    for script, (make, needed) in PARSERS.items():
        parser = make()
        for a in parser._actions:
            # a flag whose value is a number parses it as one (without a type argparse would give a string)
            if isinstance(a.default, (int, float)) and not isinstance(a.default, bool) and a.nargs != 0:
                assert isinstance(a.type, Range) or a.type in (int, float), (script, a.dest)
        for a in ranged_flags(parser):
            assert f'--{a.dest}' in a.option_strings  # the message says --<dest>: the flag as it is typed
            assert a.default is None or a.type.admits(a.default), (script, a.dest, a.default)
        # a flag declared without its range (a researcher's plain type=float) runs unchecked: said, not failed
        plain = [a.option_strings[0] for a in parser._actions if a.type in (int, float)]
        if plain:
            warnings.warn(f"{script}: no valid range declared for {', '.join(plain)} (type=Range(int or float, low, "
                          f"high) in its add_argument would check it)")
    ranged = sum(len(ranged_flags(make())) for make, _ in PARSERS.values())
    assert ranged >= 198  # (the project's own, all of them: 198 over these parsers when they were declared)


def test_a_flag_without_a_range_runs_with_a_note(tmp_path, capsys):
    """A researcher's ``parser.add_argument('--l1_weight', type=float, default=0.)``: parsed, passed through the
    checks and on to main(), with one note naming it."""
    parser = main_pretrain.get_args_parser()
    parser.add_argument('--weight_of_this_test', type=float, default=0.)
    args = parser.parse_args([str(a) for a in PT + ['--output_dir', tmp_path / 'out', '--weight_of_this_test', '-2']])
    assert args.weight_of_this_test == -2. and parser.parse_args([]).weight_of_this_test == 0.
    assert capsys.readouterr().out.count("Note: --weight_of_this_test: no valid range declared (type=Range(float, "
                                         "low, high) in its add_argument would check it)\n") == 2
    main_pretrain.check_args(args)


def _step(value, kind, direction):
    """The next value of ``kind`` beyond ``value`` in ``direction`` (+1/-1)."""
    return value + direction if kind is int else math.nextafter(value, direction * math.inf)


def outside(allowed, kind):
    """Values just outside each finite bound (not one of its special values), and the non-finite ones."""
    values = []
    for bound, is_open, direction in ((allowed.low, allowed.low_open, -1), (allowed.high, allowed.high_open, 1)):
        if math.isfinite(bound):
            value = kind(bound) if is_open else _step(kind(bound), kind, direction)
            while value in allowed.special:
                value = _step(value, kind, direction)
            values.append(value)
    return values + [math.nan, math.inf, -math.inf]


def inside(allowed, kind):
    """Each finite bound, or the value next to it for an open one, and the special values."""
    values = list(allowed.special)
    for bound, is_open, direction in ((allowed.low, allowed.low_open, 1), (allowed.high, allowed.high_open, -1)):
        if math.isfinite(bound):
            values.append(_step(kind(bound), kind, direction) if is_open else kind(bound))
    return values


CASES = [(script, a.dest) for script, (make, _) in PARSERS.items() for a in ranged_flags(make())]


def refusal(parser, argv, capsys):
    """The one line with which ``parser`` refuses ``argv`` (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    return err


@pytest.mark.parametrize('script,dest', CASES, ids=[f'{s}:{d}' for s, d in CASES])
def test_each_side_of_each_range_nan_and_inf(script, dest, capsys):
    make, needed = PARSERS[script]
    parser = make()
    action, = [a for a in ranged_flags(parser) if a.dest == dest]
    allowed, kind = action.type, action.type.kind
    parser.parse_args(needed)  # the defaults are in range (and not parsed: argparse types only string defaults)
    assert action.default is None or allowed.admits(action.default)

    def given(value):
        return needed + [f'--{dest}={value!r}']

    for value in inside(allowed, kind):
        parsed = getattr(parser.parse_args(given(value)), dest)
        assert parsed == ([value] if action.nargs else value)
    for value in outside(allowed, kind):
        if kind is int and not math.isfinite(value):  # argparse itself refuses 'nan' and 'inf' for an int flag
            assert f"invalid int value: '{value!r}'" in refusal(parser, given(value), capsys)
            assert not allowed.admits(value)  # (and the range, given one, too)
            continue
        message = refusal(parser, given(value), capsys)
        assert message == f'error: --{dest} must be {"" if math.isfinite(value) else "finite and "}' \
                          f'{allowed.rule()}, got {value}\n', message
        assert message.startswith(f'error: --{dest} must be ') and message.endswith(f', got {value}\n')


def test_messages_say_the_range(capsys):
    parser = main_finetune.get_args_parser()
    for flag, value, expect in [
            ('clip_grad', -1.0, '--clip_grad must be positive, got -1.0'),
            ('layer_decay', -1.0, '--layer_decay must be in (0, 1], got -1.0'),
            ('layer_decay', 1.5, '--layer_decay must be in (0, 1], got 1.5'),
            ('smoothing', 1.0, '--smoothing must be in [0, 1), got 1.0'),
            ('mixup_prob', math.nan, '--mixup_prob must be finite and in [0, 1], got nan'),
            ('lr', math.inf, '--lr must be finite and positive, got inf'),
            ('seed', 2 ** 32, '--seed must be in [0, 4294967295], got 4294967296'),
            ('train_blocks', -2, '--train_blocks must be -1 (all) or at least 0, got -2'),
            ('recount', 0, '--recount must be at least 1, got 0')]:
        assert refusal(parser, [f'--{flag}={value}'], capsys) == f'error: {expect}\n'
    # argparse's own mistakes keep its usage line
    assert refusal(parser, ['--recount', 'x'], capsys).endswith("error: argument --recount: invalid int value: 'x'\n")


# ---------------------------------------------------------------------------------------------------- between flags
def finetune_args(*argv):
    return main_finetune.get_args_parser().parse_args([str(a) for a in argv])


@pytest.mark.parametrize('argv,expect', [
    (['--mixup', '0.8', '--batch_size', '5'], '--mixup/--cutmix mix each image with another of its batch (timm\'s '
                                              'Mixup), which needs an even --batch_size; got 5'),
    (['--cutmix', '1', '--batch_size', '3'], 'needs an even --batch_size; got 3'),
    (['--cutmix_minmax', '0.2', '0.8', '--batch_size', '3'], 'needs an even --batch_size; got 3'),
    (['--mixup_mode', 'pairs'], '--mixup_mode pairs is not one of batch, pair, elem'),
    (['--cutmix_minmax', '0.5'], '--cutmix_minmax takes two values'),
    (['--cutmix_minmax', '0.8', '0.2'], 'the first below the second; got 0.8 0.2'),
    (['--cutmix_minmax', '0.5', '0.51', '--input_size', '32'], '--cutmix_minmax 0.5 0.51 gives cut boxes 16 to 16 '
                                                              'pixels wide at --input_size 32: no size to draw'),
    (['--seed', str(2 ** 32 - 1), '--world_size', '2'], 'with 2 processes --seed must be at most 4294967294'),
])
def test_constraints_between_flags(argv, expect):
    args = finetune_args(*argv)
    with pytest.raises(UsageError) as e:
        check_between(args)
    assert expect in str(e.value) and '\n' not in str(e.value)


def test_what_mixup_accepts_passes():
    for argv in ([], ['--mixup', '0.8', '--cutmix', '1.0', '--batch_size', '4', '--mixup_mode', 'elem'],
                 ['--cutmix_minmax', '0.2', '0.8', '--input_size', '32'],
                 ['--batch_size', '5'], ['--seed', str(2 ** 32 - 1)]):
        check_between(finetune_args(*argv))


def test_even_batch_and_minmax_are_what_timm_needs():
    """The two constraints are timm's own: an odd batch and a cut-size range of one pixel fail inside Mixup."""
    import torch
    from timm.data import Mixup
    with pytest.raises(AssertionError, match='Batch size should be even'):
        Mixup(mixup_alpha=0.8, num_classes=2)(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):  # numpy: low >= high
        Mixup(mixup_alpha=0., cutmix_minmax=[0.5, 0.51], num_classes=2)(
            torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- whole scripts
FT = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--nb_classes', '2', '--device', 'cpu',
      '--num_workers', '0', '--data_path', TINY]
PT = ['--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--warmup_epochs', '1',
      '--device', 'cpu', '--num_workers', '0', '--data_path', TINY]


@pytest.mark.parametrize('module,argv,expect', [
    (main_finetune, ['--clip_grad', '-1'], 'error: --clip_grad must be positive, got -1.0'),  # gradient ascent
    (main_finetune, ['--layer_decay', '-1'], 'error: --layer_decay must be in (0, 1], got -1.0'),  # negative lrs
    (main_linprobe, ['--blr', 'nan'], 'error: --blr must be finite and positive, got nan'),
    (main_pretrain, ['--mask_ratio', 'nan'], 'error: --mask_ratio must be finite and in [0, 1), got nan'),
    (main_pretrain, ['--weight_decay', 'inf'], 'error: --weight_decay must be finite and at least 0, got inf'),
    (main_pretrain, ['--seed', '-1'], 'error: --seed must be in [0, 4294967295], got -1'),
])
def test_scripts_refuse_in_one_line_before_writing(tmp_path, capsys, module, argv, expect):
    out = tmp_path / 'out'
    code, err = run_in_process(module, capsys, *(PT if module is main_pretrain else FT), '--output_dir', out, *argv)
    assert code == 2 and err == expect + '\n'
    assert not out.exists()


def test_visualize_uses_the_table(tmp_path, capsys):
    for argv, expect in [(['--mask_ratios', '0.5', '1.0', '--grid'], '--mask_ratios must be in [0, 1), got 1.0'),
                         (['--colors', '1'], '--colors must be 0 (full colour) or in [2, 256], got 1'),
                         (['--scale', '-1'], '--scale must be 0 (automatic) or at least 1, got -1'),
                         (['--mask_ratio', 'inf'], '--mask_ratio must be finite and in [0, 1), got inf')]:
        code, err = run_in_process(VISUALIZE, capsys, 'x.png', '--checkpoint', tmp_path / 'none.pth', *argv)
        assert code == 2 and err == f'error: {expect}\n'


# ---------------------------------------------------------------------------------------------------- other values
@pytest.mark.parametrize('module,argv,expect', [
    (main_pretrain, ['--device', 'gpu'], "--device 'gpu' is not a device torch knows; e.g. cuda, cuda:1, cpu"),
    (main_pretrain, ['--device', ''], "--device '' is not a device torch knows; e.g. cuda, cuda:1, cpu"),
    (main_linprobe, ['--device', 'cuda:x'], "--device 'cuda:x' is not a device torch knows; e.g. cuda, cuda:1, cpu"),
    (main_finetune, ['--aa', 'none'], "--aa none is not an augmentation policy timm knows (Unknown AA policy none): "
                                      "e.g. rand-m9-mstd0.5-inc1, v0, original, or '' for none"),
    (main_finetune, ['--remode', 'pixels'], '--remode pixels is not one of const, rand, pixel'),
    (main_finetune, ['--mixup_mode', 'pairs'], '--mixup_mode pairs is not one of batch, pair, elem'),
])
def test_other_mistakes_are_one_line_before_writing(tmp_path, capsys, module, argv, expect):
    out = tmp_path / 'out'
    code, err = run_in_process(module, capsys, *(PT if module is main_pretrain else FT), '--output_dir', out, *argv)
    assert code == 2 and err == f'error: {expect}\n'
    assert not out.exists()


def test_log_dir_inside_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    code, err = run_in_process(main_pretrain, capsys, *PT, '--output_dir', tmp_path / 'out', '--log_dir',
                               tmp_path / 'file' / 'tb')
    assert code == 2 and err == (f"error: --log_dir {tmp_path / 'file' / 'tb'}: {tmp_path / 'file'} is a file, not a "
                                 f"folder\n")
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('module, flag, name', [(main_finetune, '--finetune', 'checkpoint-0.pth'),
                                                (main_pretrain, '--init_from', 'checkpoint-last.pth')])
def test_starting_weights_in_the_output_dir_are_refused(tmp_path, capsys, module, flag, name):
    """A run would write its own checkpoint-N.pth / checkpoint-last.pth over the file it starts from."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / name).write_bytes(b'weights')
    code, err = run_in_process(module, capsys, *(PT if module is main_pretrain else FT), '--output_dir', out,
                               '--no_auto_resume', flag, out / name)
    assert code == 2 and err == (f"error: {flag} {out / name} lies in --output_dir {out}, whose checkpoint files this "
                                 f"run writes over: copy it elsewhere, or give another --output_dir\n")
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_bytes() == b'weights'


def test_a_file_as_the_data_folder_of_fine_tuning_says_so(tmp_path, capsys):
    (tmp_path / 'images.txt').write_text('a.jpg\n')
    out = tmp_path / 'out'
    code, err = run_in_process(main_finetune, capsys, *FT, '--output_dir', out, '--data_path', tmp_path / 'images.txt')
    assert code == 2 and err == (f"error: --data_path {tmp_path / 'images.txt'} is a file: give the folder that holds "
                                 f"train/ and val/ (or tar shards, a saved Hugging Face dataset)\n")
    assert not out.exists()


def test_device_index_and_backend(monkeypatch):
    from util.flag_checks import check_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    check_device(finetune_args('--device', 'cuda:1'))
    with pytest.raises(UsageError, match=r'^--device cuda:2: this machine has 2 GPU\(s\), cuda:0 to cuda:1$'):
        check_device(finetune_args('--device', 'cuda:2'))
    monkeypatch.setattr(torch, 'empty', lambda *a, **k: (_ for _ in ()).throw(RuntimeError('no mps backend')))
    with pytest.raises(UsageError, match=r'^--device mps: this torch or machine cannot run on mps; e.g. cuda, cpu$'):
        check_device(finetune_args('--device', 'mps'))


def test_visualize_device_typo(tmp_path, capsys):
    code, err = run_in_process(VISUALIZE, capsys, 'x.png', '--checkpoint', tmp_path / 'none.pth', '--device', 'gpu')
    assert code == 2 and err == "error: --device 'gpu' is not a device torch knows; e.g. cuda, cuda:1, cpu\n"


def test_a_model_too_big_for_memory_is_one_line_before_writing(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    common = ('--data_path', TINY, '--output_dir', out, '--device', 'cpu')
    # the MAE's position embeddings at 160,000 px (10^8 patches): numpy cannot even compute them
    code, err = run_in_process(main_pretrain, capsys, '--model', 'mae_vit_large_patch16', '--input_size', 160000,
                               *common)
    assert code == 2 and err.strip() == ("error: --input_size 160000: --model mae_vit_large_patch16 at that size needs "
                                         "more memory than this machine has for its position embeddings alone")
    # weights, gradients and AdamW's moments of ViT-L/16 at 224 px (304 M trainable weights: 4.5 GiB) on a machine
    # of 4 GiB; the same model fits in 8 GiB
    try:
        with torch.device('meta'):
            models_vit.MODELS['vit_large_patch16']()
    except (NotImplementedError, RuntimeError, AssertionError):
        pytest.skip("this torch/timm cannot build a ViT on the meta device (the check is skipped there)")
    pages = {'SC_PAGE_SIZE': 4096, 'SC_PHYS_PAGES': 4 * 2 ** 30 // 4096}
    monkeypatch.setattr(flag_checks.os, 'sysconf', lambda name: pages[name])
    code, err = run_in_process(main_finetune, capsys, '--model', 'vit_large_patch16', *common)
    assert code == 2 and err.strip() == ("error: --input_size 224: --model vit_large_patch16 at that size needs 5 GiB "
                                         "for its weights (with their gradients and optimizer state), more than this "
                                         "machine's 4 GiB")
    assert not out.exists()
    pages['SC_PHYS_PAGES'] *= 2
    flag_checks.check_model_fits(models_vit.MODELS['vit_large_patch16'], main_finetune.get_args_parser().parse_args(
        ['--model', 'vit_large_patch16']))


# ---------------------------------------------------------------------------------------------------- --help
def one_spaced(text):
    return ' '.join(text.split())


@pytest.mark.parametrize('script', ['main_pretrain.py', 'main_finetune.py', 'main_linprobe.py',
                                    'submitit_pretrain.py', 'submitit_finetune.py', 'submitit_linprobe.py'])
def test_help_shows_every_default(script):
    parser = PARSERS[script][0]()
    text = one_spaced(parser.format_help())
    defaults = {a.dest: a.default for a in parser._actions}
    assert f"--epochs EPOCHS default: {defaults['epochs']}" in text
    assert f"batch_size * accum_iter * # gpus) (default: {defaults['batch_size']})" in text
    assert "--input_size INPUT_SIZE images input size (default: 224)" in text
    assert f"(default: {defaults['model']})" in text and defaults['model'].endswith(('patch16', 'patch14'))
    assert "--seed SEED default: 0" in text and "--num_workers NUM_WORKERS default: 10" in text
    assert '--lr LR learning rate (absolute lr) --blr' in text  # (a default of None: nothing to show)


def test_every_flag_that_takes_a_value_says_its_default():
    for script, (make, _) in PARSERS.items():
        parser = make()
        formatter = parser._get_formatter()
        for a in parser._actions:
            if a.option_strings and a.nargs != 0 and a.default not in (None, '') and a.help != '==SUPPRESS==':
                assert 'default' in formatter._expand_help(a).lower(), (script, a.dest)
