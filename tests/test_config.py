"""``--config FILE.yaml`` on every entry point (the file gives the flags' defaults, the command line overrides it,
a wrong key or value is one line naming the file and the key, exit code 2), and ``<output_dir>/args.yaml``: a
training run's flags, from which ``--config args.yaml --output_dir NEW`` repeats the run byte for byte."""
import filecmp

import pytest
import yaml

import main_finetune
import main_pretrain
from conftest import TINY, parsed_args, pretrain_argv, read_log, reference_argv, run_script, save_pretrained
from test_flags import PARSERS
from main_pretrain import check_args
from util.config_file import NOT_REPEATED, write_args
from util.flags import Range


def write(tmp_path, text, name='c.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(capsys, parser, argv):
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


def test_the_file_gives_defaults_and_the_command_line_overrides_it(tmp_path):
    config = write(tmp_path, "model: mae_vit_tiny_patch4\nblr: 1e-3\nepochs: 3\nnorm_pix_loss: true\n"
                             "mask_ratio: 0.6\nmean: [0.5, 0.5, 0.5]\ndecoder_depth: null\n")
    args = parsed_args(main_pretrain, '--config', config, '--epochs', '5')
    assert (args.model, args.blr, args.epochs, args.norm_pix_loss, args.mask_ratio, args.mean) == (
        'mae_vit_tiny_patch4', 1e-3, 5, True, 0.6, [0.5, 0.5, 0.5])
    assert args.decoder_depth is None and args.config == str(config)
    # the flags the file does not name keep their defaults
    assert args.batch_size == parsed_args(main_pretrain).batch_size == 64
    # a flag that takes no value, by its own name (true: given) or by its destination (args.yaml's global_pool)
    assert parsed_args(main_finetune, '--config', write(tmp_path, "cls_token: true\n")).global_pool is False
    assert parsed_args(main_finetune, '--config', write(tmp_path, "global_pool: false\n")).global_pool is False
    assert parsed_args(main_finetune, '--config', write(tmp_path, "cls_token: true\n"), '--global_pool').global_pool
    assert parsed_args(main_pretrain, '--config', write(tmp_path, "no_pin_mem: true\n")).pin_mem is False


def test_a_flag_standing_for_others_sets_them_and_the_files_own_keys_win(tmp_path):
    args = parsed_args(main_pretrain, '--config', write(tmp_path, "amp: fp16\nfast: true\n"))
    assert args.fast and args.compile and args.no_host_sync and args.fused_adamw and args.amp == 'fp16'
    assert parsed_args(main_pretrain, '--config', write(tmp_path, "fast: true\n")).amp == 'bf16'


@pytest.mark.parametrize('text, says', [
    ("epochs: 0\n", "epochs: must be at least 1, got 0"),  # the flag's Range
    ("epochs: 2.5\n", "epochs: invalid int value: 2.5"),  # no silent rounding
    ("blr: -1.0\n", "blr: must be positive, got -1.0"),
    ("mask_ratio: high\n", "mask_ratio: invalid float value: 'high'"),
    ("norm_pix_loss: 1\n", "norm_pix_loss: takes true or false, got 1"),
    ("epochs: true\n", "epochs: invalid value True"),
    ("mask_type: zigzag\n", "mask_type: invalid choice 'zigzag'"),
    ("batch_size: null\n", "batch_size: null: this flag has a value"),
    ("mean: [0.5, x]\n", "mean: invalid float value: 'x'"),
    ("epoch: 3\n", "unknown key 'epoch' (no such flag)"),
    ("layer_decay: 0.75\n", "unknown key 'layer_decay'"),  # fine-tuning's flag, not pre-training's
    ("- epochs\n- 3\n", "must be a mapping of flag names to values, got a list"),
    ("epochs: [3\n", "not valid YAML"),
])
def test_a_wrong_key_or_value_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text, says):
    config = write(tmp_path, text)
    line = refused(capsys, main_pretrain.get_args_parser(), ['--config', config])
    assert line.startswith(f"error: --config {config}: ") and says in line, line


def test_a_missing_file_is_one_line(tmp_path, capsys):
    line = refused(capsys, main_pretrain.get_args_parser(), ['--config', tmp_path / 'none.yaml'])
    assert line == f"error: --config {tmp_path / 'none.yaml'}: cannot be read (No such file or directory)"
    (tmp_path / 'weights.pth').write_bytes(b'PK\x03\x04\xff\xfe\x00')  # a checkpoint given by mistake
    line = refused(capsys, main_pretrain.get_args_parser(), ['--config', tmp_path / 'weights.pth'])
    assert line == f"error: --config {tmp_path / 'weights.pth'}: not valid YAML (not UTF-8 text)"


def test_every_entry_point_takes_a_config(tmp_path, capsys):
    for script, (make, needed) in PARSERS.items():
        parser = make()
        # an int flag that takes 7 (export.py has none: its --model, a name)
        flag, value = next(((a.dest, 7) for a in parser._actions if isinstance(a.type, Range)
                            and a.type.kind is int and a.type.admits(7) and a.nargs is None), ('model', 'vit_x'))
        good = write(tmp_path, f"{flag}: {value}\n")
        assert getattr(parser.parse_args(needed + ['--config', str(good)]), flag) == value, script
        line = refused(capsys, make(), needed + ['--config', write(tmp_path, "no_such_flag: 1\n")])
        assert "unknown key 'no_such_flag'" in line, script
    # a flag the command line requires can come from the file instead
    config = write(tmp_path, "checkpoint: mae.pth\nto: timm\nout: vit.pth\n")
    args = PARSERS['export.py'][0]().parse_args(['--config', str(config)])
    assert (args.checkpoint, args.to, args.out) == ('mae.pth', 'timm', 'vit.pth')


@pytest.mark.slow
def test_args_yaml_repeats_the_run_and_a_resumed_run_rewrites_it(tmp_path):
    first, again = tmp_path / 'first', tmp_path / 'again'
    ran = run_script(*pretrain_argv(first, '--blr', '1.5e-4', '--norm_pix_loss', '--mask_ratio', '0.6'))
    assert ran.returncode == 0, ran.stderr[-2000:]
    flags = yaml.safe_load((first / 'args.yaml').read_text())
    assert flags['mask_ratio'] == 0.6 and flags['norm_pix_loss'] is True and flags['epochs'] == 2
    assert flags['lr'] is None and flags['blr'] == 1.5e-4  # as given: a repeat on more GPUs scales it again
    assert not set(flags) & set(NOT_REPEATED)  # where it wrote, what it resumed, the process layout: not repeated
    repeat = run_script('main_pretrain.py', '--config', first / 'args.yaml', '--output_dir', again)
    assert repeat.returncode == 0, repeat.stderr[-2000:]
    assert filecmp.cmp(first / 'log.txt', again / 'log.txt', shallow=False)
    assert len(read_log(again)) == 2
    # the same run continued for a third epoch: args.yaml holds the flags its remaining epochs use
    more = run_script(*pretrain_argv(first, '--blr', '1.5e-4', '--norm_pix_loss', '--mask_ratio', '0.6', epochs=3))
    assert more.returncode == 0 and 'Auto-resume' in more.stdout, more.stderr[-2000:]
    assert yaml.safe_load((first / 'args.yaml').read_text())['epochs'] == 3
    assert not (first / 'args.yaml.tmp').exists()
    assert str(TINY) == yaml.safe_load((again / 'args.yaml').read_text())['data_path']


@pytest.mark.slow
@pytest.mark.parametrize('which', ['finetune', 'linprobe'])
def test_args_yaml_repeats_a_classifier_run(tmp_path, which):
    """Fine-tuning (Mixup, CutMix, --clip_grad, --accum_iter) and linear probing (the class token, LARS): the same."""
    pretrained = save_pretrained(tmp_path / 'mae_tiny.pth')
    first, again = tmp_path / 'first', tmp_path / 'again'
    ran = run_script(*reference_argv(which, pretrained, first))
    assert ran.returncode == 0, ran.stderr[-2000:]
    flags = yaml.safe_load((first / 'args.yaml').read_text())
    assert flags['finetune'] == str(pretrained) and flags['global_pool'] is (which == 'finetune')
    repeat = run_script(reference_argv(which, pretrained)[0], '--config', first / 'args.yaml', '--output_dir', again)
    assert repeat.returncode == 0, repeat.stderr[-2000:]
    assert filecmp.cmp(first / 'log.txt', again / 'log.txt', shallow=False)


def test_args_yaml_keeps_the_flags_as_given_where_main_resolved_them(tmp_path):
    """--lr from --blr and the statistics --data_stats auto measured are written as given (null), so that the
    repeat resolves them again; the values a checkpoint supplied are written as values."""
    args = parsed_args(main_pretrain, '--data_stats', 'auto', '--batch_size', '8', '--blr', '1e-3', '--data_path', TINY,
                       '--output_dir', tmp_path / 'run', lr=1e-3 * 8 / 256, mean=[0.4, 0.5, 0.6], std=[0.2] * 3,
                       in_chans=3)
    write_args(args, tmp_path)
    flags = yaml.safe_load((tmp_path / 'args.yaml').read_text())
    assert (flags['lr'], flags['mean'], flags['std'], flags['data_stats'], flags['in_chans']) == (
        None, None, None, 'auto', 3)
    again = parsed_args(main_pretrain, '--config', tmp_path / 'args.yaml')
    check_args(again)  # (--mean with --data_stats auto would be refused)
    assert (again.lr, again.blr, again.batch_size, again.output_dir) == (None, 1e-3, 8, './output_dir')
    given = parsed_args(main_pretrain, '--lr', '0.5', '--output_dir', tmp_path / 'run', mean=[0.4] * 3, std=[0.2] * 3)
    write_args(given, tmp_path)
    flags = yaml.safe_load((tmp_path / 'args.yaml').read_text())
    assert (flags['lr'], flags['mean'], flags['std']) == (0.5, [0.4] * 3, [0.2] * 3)
