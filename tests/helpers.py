"""Shared pieces of the fine-tuning and linear-probing tests."""
import argparse
import json

import torch

import models_mae
from conftest import DATA

TINY = DATA / 'tiny_imagefolder'
REFERENCE = json.loads((DATA / 'finetune_reference.json').read_text())


def save_pretrained(path, encoder_only=False, seed=0):
    """A tiny MAE checkpoint as main_pretrain.py writes it ({'model': full MAE}), or encoder-only as the released
    pre-trained checkpoints; built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    sd = models_mae.mae_vit_tiny_patch4().state_dict()
    if encoder_only:
        sd = {k: v for k, v in sd.items() if not k.startswith('decoder') and k != 'mask_token'}
    torch.save({'model': sd}, path)
    return path


def reference_argv(which, pretrained, out=None):
    """The command line of a reference run in finetune_reference.json, with its placeholders filled in."""
    argv = [a.replace('<tiny_imagefolder>', str(TINY)).replace('<pretrained>', str(pretrained))
            for a in REFERENCE[which]['args']]
    if out is not None:
        argv += ['--output_dir', str(out), '--log_dir', str(out)]
    return [REFERENCE[which]['script']] + argv


def to_reference_format(src, dst):
    """Rewrite one of our checkpoints as the reference writes them: a pickled argparse.Namespace under 'args', no
    random streams nor other extras."""
    ckpt = torch.load(src, map_location='cpu', weights_only=True)
    out = {k: ckpt[k] for k in ('model', 'optimizer', 'epoch', 'scaler')}
    out['args'] = argparse.Namespace(**ckpt['args'])
    torch.save(out, dst)
    return dst


def read_log(out):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def acc_lines(stdout):
    return [line.split('] ', 1)[-1].strip() for line in stdout.splitlines() if '* Acc@1' in line]


def tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def assert_log_matches(rows, reference_rows, approx):
    assert [r['epoch'] for r in rows] == [r['epoch'] for r in reference_rows]
    for ours, ref in zip(rows, reference_rows):
        assert list(ours) == list(ref)
        for k, v in ref.items():
            assert ours[k] == approx(v, rel=1e-5, abs=1e-7), k


def assert_scalars_match(scalars, reference_scalars, approx):
    assert sorted(scalars) == sorted(reference_scalars)
    for tag, points in reference_scalars.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == approx([v for _, v in points], rel=1e-5, abs=1e-7), tag


def one_line_error(result):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
    return lines[0]


STOP_AT = """
import sys
import util.misc as misc
calls = [0]


def stop_requested():  # as if SIGUSR1 arrived during optimizer step number {n}
    calls[0] += 1
    return calls[0] == {n}


misc.stop_requested = stop_requested
import {module} as m
misc.run_main(m.main, m.get_args_parser().parse_args(sys.argv[1:]))
"""


def run_stopped_at(run_script, argv, n):
    """Run ``argv`` (script first) and ask it to stop, as a SIGUSR1 would, at its n-th optimizer step."""
    module = argv[0][:-len('.py')]
    return run_script('-c', STOP_AT.format(n=n, module=module), *argv[1:])
