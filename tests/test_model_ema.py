"""main_finetune.py --model_ema [new]: the exponential moving average of the weights (timm's ModelEmaV3) follows each
optimizer step taken, by the formula its help states; it is evaluated beside the raw weights without changing
them, kept in the checkpoints and restored exactly on resume (at an epoch's end or inside one); a resume that would
lose or restart it, and a bad decay, are one line; --eval evaluates it too."""
import pytest
import torch
from timm.utils import ModelEmaV3

import export
import extract_features
import main_finetune
import models_vit
import util.checkpoints.from_checkpoint as from_checkpoint
import util.misc as misc
import util.slurm.submitit_job as submitit_job
from conftest import (TINY, one_line_error, read_log, run_in_process, run_script, run_with_fault,
                      save_pretrained)
from engine_finetune import train_one_epoch
from util.checkpoints.saver import CheckpointSaver


# ---------------------------------------------------------------------------------------------------- the formula
class WeightsAfterEachStep(CheckpointSaver):
    """Keeps a copy of the model's weights after each optimizer step, where a checkpoint would be written."""

    def __init__(self, args, model):
        super().__init__(args, 'main_finetune.py', model, None, None)
        self.snapshots = []

    def save_or_stop(self, epoch, next_iter, metric_logger):
        self.snapshots.append({k: v.detach().clone().double() for k, v in self.model.state_dict().items()})


def test_the_average_follows_each_optimizer_step_taken():
    """accum_iter 2 over 6 batches, the second one non-finite (its window is skipped): 2 optimizer steps, so 2 updates
    of ema = decay * ema + (1 - decay) * weights from the initial weights (no warm-up; the first update too)."""
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(img_size=32, num_classes=2)
    initial = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    decay = 0.6
    model_ema = ModelEmaV3(model, decay=decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(6)]
    batches[1] = (torch.full((2, 3, 32, 32), float('nan')), torch.tensor([0, 1]))
    args = main_finetune.get_args_parser().parse_args(['--accum_iter', '2', '--lr', '1e-2', '--min_lr', '0',
                                                       '--warmup_epochs', '0', '--epochs', '1', '--device', 'cpu',
                                                       '--amp', 'none', '--skip_nonfinite', '1', '--output_dir', ''])
    hooks = WeightsAfterEachStep(args, model)
    train_one_epoch(model, torch.nn.CrossEntropyLoss(), batches, optimizer, torch.device('cpu'), 0,
                    misc.NativeScalerWithGradNormCount(args), args=args, model_ema=model_ema, saver=hooks)
    assert len(hooks.snapshots) == 2  # iterations 3 and 5; the window of iterations 0-1 was skipped
    expected = dict(initial)
    for weights in hooks.snapshots:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    averaged = model_ema.module.state_dict()
    assert list(averaged) == list(expected)
    for k, value in averaged.items():
        torch.testing.assert_close(value.double(), expected[k], rtol=0, atol=1e-6, msg=k)
    # it is neither the first nor the last weights (a third update, e.g. of the skipped step, would show too)
    head = averaged['head.weight'].double()
    assert not torch.allclose(head, initial['head.weight'], atol=1e-4)
    assert not torch.allclose(head, hooks.snapshots[-1]['head.weight'], atol=1e-4)


def test_the_flags_and_their_one_line_errors(tmp_path, capsys):
    args = main_finetune.get_args_parser().parse_args([])
    assert (args.model_ema, args.model_ema_decay, args.opt_betas) == (False, 0.9999, None)
    for make in (main_finetune.get_args_parser, lambda: submitit_job.get_args_parser('main_finetune', 'submitit')):
        parsed = make().parse_args(['--model_ema', '--model_ema_decay', '0.99', '--opt_betas', '0.9', '0.95'])
        assert (parsed.model_ema, parsed.model_ema_decay, parsed.opt_betas) == (True, 0.99, [0.9, 0.95])
    helps = {a.dest: a.help for a in main_finetune.get_args_parser()._actions}
    assert all(helps[dest].startswith('[new] ') for dest in ('model_ema', 'model_ema_decay', 'opt_betas'))
    for extra, expect in ((['--model_ema_decay', '1'], '--model_ema_decay must be in (0, 1), got 1.0'),
                          (['--model_ema_decay', '0'], '--model_ema_decay must be in (0, 1), got 0.0'),
                          (['--opt_betas', '0.9', '1'], '--opt_betas must be in [0, 1), got 1.0'),
                          (['--opt_betas', '0.9'], '--opt_betas takes AdamW\'s two betas (e.g. 0.9 0.95), got 0.9')):
        code, err = run_in_process(main_finetune, capsys, *tiny_argv(tmp_path / 'out', '--model_ema', *extra))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0] == f'error: {expect}', err
        assert not (tmp_path / 'out' / 'log.txt').exists()


# ---------------------------------------------------------------------------------------------------- whole runs
def tiny_argv(out, *extra, pretrained=None):
    """Fine-tuning of the tiny ViT on TINY: 2 epochs of 4 steps (batch 4), Mixup/CutMix, one process."""
    return ['--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '4',
            '--epochs', '2', '--warmup_epochs', '1', '--blr', '5e-2', '--mixup', '0.8', '--cutmix', '1.0',
            '--device', 'cpu', '--num_workers', '0', '--data_path', TINY, '--output_dir', out, '--log_dir', out,
            *(['--finetune', pretrained] if pretrained else []), *extra]


EMA = ['--model_ema', '--model_ema_decay', '0.7']  # a decay whose average moves within 8 steps


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    return save_pretrained(tmp_path_factory.mktemp('pretrained') / 'mae_tiny.pth')


def finetune(out, *extra, pretrained):
    r = run_script('main_finetune.py', *tiny_argv(out, *extra, pretrained=pretrained))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def plain(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp('plain')
    return out, finetune(out, pretrained=pretrained)


@pytest.fixture(scope='module')
def with_ema(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp('ema')
    return out, finetune(out, *EMA, pretrained=pretrained)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


EMA_KEYS = ['test_loss_ema', 'test_acc1_ema', 'test_acc5_ema']


@pytest.mark.slow
def test_off_changes_nothing_and_on_changes_nothing_of_the_raw_weights(plain, with_ema):
    (plain_out, plain_run), (ema_out, ema_run) = plain, with_ema
    # off: no EMA in the checkpoints, the log rows, the console
    for name in ('checkpoint-0.pth', 'checkpoint-1.pth'):
        assert 'model_ema' not in load(plain_out / name)
    assert not any(k.endswith('_ema') for row in read_log(plain_out) for k in row)
    assert 'EMA' not in plain_run.stdout
    # on: the raw weights train as without it (the EMA's evaluation puts the random streams back), to the bit
    rows, plain_rows = read_log(ema_out), read_log(plain_out)
    assert [{k: v for k, v in row.items() if k not in EMA_KEYS} for row in rows] == plain_rows
    assert [list(row) for row in rows] == [[*list(plain_rows[0])[:5], *EMA_KEYS, 'epoch', 'n_parameters']] * 2
    ckpt, plain_ckpt = load(ema_out / 'checkpoint-1.pth'), load(plain_out / 'checkpoint-1.pth')
    assert all(torch.equal(v, plain_ckpt['model'][k]) for k, v in ckpt['model'].items())
    assert list(ckpt['model_ema']) == list(ckpt['model'])
    assert not torch.equal(ckpt['model_ema']['head.weight'], ckpt['model']['head.weight'])
    # each epoch prints the EMA's accuracy beside the raw one's
    for row in rows:
        assert f"* EMA Acc@1 {row['test_acc1_ema']:.3f} Acc@5 {row['test_acc5_ema']:.3f} loss " \
               f"{row['test_loss_ema']:.3f}" in ema_run.stdout
        assert f"Accuracy of the EMA weights on the 8 test images: {row['test_acc1_ema']:.1f}%" in ema_run.stdout
    assert ema_run.stdout.count('* Acc@1') == 2 and ema_run.stdout.count('* EMA Acc@1') == 2


@pytest.mark.slow
@pytest.mark.parametrize('fault,extra,where', [
    ('step:1:1', [], 'checkpoint-last.pth'),  # killed after epoch 1's first step: from epoch 0's checkpoint
    ('step:1:3', ['--save_every_iters', '2'], 'Resuming epoch 1 at iteration 2 of 4'),  # from inside epoch 1
])
def test_resume_gives_the_uninterrupted_average(tmp_path, pretrained, with_ema, fault, extra, where):
    ema_out, _ = with_ema
    out = tmp_path / 'out'
    crashed = run_with_fault(fault, ['main_finetune.py', *tiny_argv(out, *EMA, *extra, pretrained=pretrained)])
    assert crashed.returncode == -9
    resumed = finetune(out, *EMA, *extra, pretrained=pretrained)
    assert f'Auto-resume: continuing from {out / "checkpoint-last.pth"}' in resumed.stdout
    assert where in resumed.stdout and 'Epoch: [0]' not in resumed.stdout
    assert (out / 'log.txt').read_text() == (ema_out / 'log.txt').read_text()
    ckpt, whole = load(out / 'checkpoint-last.pth'), load(ema_out / 'checkpoint-last.pth')
    for key in ('model', 'model_ema'):
        assert list(ckpt[key]) == list(whole[key])
        assert all(torch.equal(v, whole[key][k]) for k, v in ckpt[key].items()), key


@pytest.mark.slow
def test_a_resume_that_would_lose_or_restart_the_average_is_one_line(tmp_path, capsys, pretrained, plain, with_ema):
    (plain_out, _), (ema_out, _) = plain, with_ema
    cases = [  # auto-resume in the run's folder (its flags are compared), and --resume into a new folder
        (plain_out, EMA, '--model_ema False there, True here'),
        (ema_out, [], '--model_ema True there, False here'),
        (tmp_path / 'a', ['--resume', plain_out / 'checkpoint-1.pth', *EMA],
         f"--model_ema: --resume {plain_out / 'checkpoint-1.pth'} holds no EMA weights"),
        (tmp_path / 'b', ['--resume', ema_out / 'checkpoint-1.pth'],
         f"--resume {ema_out / 'checkpoint-1.pth'} is of a run trained with --model_ema (it holds the EMA's weights): "
         f"continue it with --model_ema --model_ema_decay 0.7"),
    ]
    for out, extra, expect in cases:
        code, err = run_in_process(main_finetune, capsys, *tiny_argv(out, *extra, '--epochs', '3'))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and expect in lines[0], err
    assert [row['epoch'] for row in read_log(plain_out)] == [0, 1]  # nothing was written


@pytest.mark.slow
def test_eval_evaluates_the_average_too(tmp_path, plain, with_ema):
    (plain_out, _), (ema_out, _) = plain, with_ema
    argv = ['main_finetune.py', '--eval', '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2',
            '--batch_size', '4', '--device', 'cpu', '--num_workers', '0', '--data_path', TINY, '--output_dir', '']
    last = read_log(ema_out)[-1]
    r = run_script(*argv, '--resume', ema_out / 'checkpoint-1.pth', '--model_ema')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Accuracy of the network on the 8 test images: {last['test_acc1']:.1f}%" in r.stdout
    assert f"* EMA Acc@1 {last['test_acc1_ema']:.3f} Acc@5 {last['test_acc5_ema']:.3f}" in r.stdout
    # without the flag, as before: the raw weights only
    r = run_script(*argv, '--resume', ema_out / 'checkpoint-1.pth')
    assert r.returncode == 0 and 'EMA' not in r.stdout, r.stderr[-3000:]
    line = one_line_error(run_script(*argv, '--resume', plain_out / 'checkpoint-1.pth', '--model_ema'))
    assert 'holds no EMA weights' in line


def test_extract_and_export_read_the_average_with_ema(tmp_path, capsys, plain, with_ema):
    (plain_out, _), (ema_out, _) = plain, with_ema
    ckpt = load(ema_out / 'checkpoint-1.pth')
    for ema, key in ((False, 'model'), (True, 'model_ema')):
        encoder, _ = from_checkpoint.load_encoder(ema_out / 'checkpoint-1.pth', ema=ema)
        assert torch.equal(encoder.state_dict()['blocks.0.attn.qkv.weight'], ckpt[key]['blocks.0.attn.qkv.weight'])
        out = tmp_path / f'timm_{key}.pth'
        export.main(export.get_args_parser().parse_args(
            ['--checkpoint', str(ema_out / 'checkpoint-1.pth'), '--to', 'timm', '--out', str(out)]
            + (['--ema'] if ema else [])))
        assert torch.equal(load(out)['head.weight'], ckpt[key]['head.weight'])
    assert not torch.equal(ckpt['model']['blocks.0.attn.qkv.weight'], ckpt['model_ema']['blocks.0.attn.qkv.weight'])
    code, err = run_in_process(extract_features, capsys, TINY / 'val', '--checkpoint', plain_out / 'checkpoint-1.pth',
                               '--ema', '--out', tmp_path / 'f.npz', '--device', 'cpu')
    assert code == 2 and err.strip() == (f"error: --ema: --checkpoint {plain_out / 'checkpoint-1.pth'} holds no EMA "
                                         f"of the weights (main_finetune.py --model_ema keeps one); leave out --ema "
                                         f"for its weights")
    code, err = run_in_process(extract_features, capsys, TINY / 'val', '--random_init', '--model', 'vit_tiny_patch4',
                               '--ema', '--out', tmp_path / 'f.npz', '--device', 'cpu')
    assert code == 2 and "--ema reads a checkpoint's EMA of the weights; --random_init has none" in err


def test_the_decay_is_compared_on_resume_only_where_an_average_is_kept():
    from util.checkpoints.resume import changed_flags
    args = main_finetune.get_args_parser().parse_args(['--model_ema_decay', '0.99'])
    there = dict(vars(args), model_ema_decay=0.9999)
    assert changed_flags(there, args) == []  # neither run keeps an average: its decay is no flag of either
    args.model_ema = there['model_ema'] = True
    assert changed_flags(there, args) == ['--model_ema_decay 0.9999 there, 0.99 here']
