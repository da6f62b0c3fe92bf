"""Engine logic that matters on GPUs, checked on the CPU: mixed-precision choices, loss scaling, and DDP's
gradient sync skipped on accumulation micro-steps."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

import main_pretrain
import models_mae
import util.misc as misc
import util.training.process as process
from conftest import parsed_args
from util import compat
from engine_pretrain import train_one_epoch


@pytest.mark.parametrize('device,amp,expected', [
    ('cuda', 'fp16', ('cuda', torch.float16, True)),   # the reference
    ('cuda:1', 'bf16', ('cuda', torch.bfloat16, True)),
    ('cuda', 'none', ('cuda', torch.float16, False)),
    ('cpu', 'fp16', ('cpu', torch.float16, False)),     # the CPU's default runs fp32, as the reference there
    ('cpu', 'none', ('cpu', torch.float16, False)),
    ('cpu', 'bf16', ('cpu', torch.bfloat16, True)),     # opt-in: bf16 autocast on the CPU
])
def test_amp_settings(device, amp, expected):
    assert misc.amp_settings(parsed_args(main_pretrain, device=device, amp=amp)) == expected


def test_fast_keeps_fp32_on_the_cpu_and_bf16_on_cuda():
    fast = main_pretrain.get_args_parser().parse_args(['--fast', '--device', 'cpu'])
    assert fast.amp == 'bf16' and misc.amp_settings(fast) == ('cpu', torch.bfloat16, False)
    assert process.precision_line(fast, torch.device('cpu')).startswith('Precision: fp32 (--fast keeps fp32')
    fast.device = 'cuda'
    assert misc.amp_settings(fast) == ('cuda', torch.bfloat16, True)


@pytest.mark.parametrize('device,amp,scales', [('cuda', 'fp16', True), ('cuda', 'bf16', False),
                                               ('cuda', 'none', False), ('cpu', 'fp16', False),
                                               ('cpu', 'bf16', False)])
def test_loss_scaling_only_for_fp16_on_cuda(device, amp, scales, monkeypatch):
    monkeypatch.setattr(compat, 'GradScaler', lambda enabled: SimpleNamespace(enabled=enabled))
    args = parsed_args(main_pretrain, device=device, amp=amp)
    assert misc.NativeScalerWithGradNormCount(args)._scaler.enabled is scales


class CountingDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: counts the forward passes run under ``no_sync()``."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.in_no_sync = False
        self.synced, self.unsynced = 0, 0

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, *args, **kwargs):
        if self.in_no_sync:
            self.unsynced += 1
        else:
            self.synced += 1
        return self.module(*args, **kwargs)


def test_accumulation_micro_steps_skip_the_gradient_sync():
    torch.manual_seed(0)
    model = CountingDDP(models_mae.mae_vit_tiny_patch4())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2)) for _ in range(6)]
    args = main_pretrain.get_args_parser().parse_args(['--accum_iter', '3', '--lr', '1e-3', '--warmup_epochs', '1',
                                                       '--epochs', '2', '--device', 'cpu', '--amp', 'fp16'])
    stats = train_one_epoch(model, batches, optimizer, torch.device('cpu'), 0,
                            misc.NativeScalerWithGradNormCount(args), args=args)
    assert (model.unsynced, model.synced) == (4, 2)  # 2 of every 3 micro-steps stay local
    assert stats['loss'] > 0


@pytest.mark.parametrize('amp, line', [
    ('fp16', 'Precision: fp32 (--amp fp16 applies on CUDA only; --amp bf16 runs bf16 autocast on the CPU)'),
    ('none', 'Precision: fp32 (--amp none)'),
    ('bf16', 'Precision: bf16 autocast on the CPU (--amp bf16 [new]: the forward\'s matrix products in bfloat16; '
             'weights, gradients and optimizer in fp32)'),
])
def test_the_cpu_precision_line_says_what_the_forward_runs_in(amp, line, monkeypatch):
    monkeypatch.setattr(process, 'cpu_has_fast_bf16', lambda: True)
    assert process.precision_line(parsed_args(main_pretrain, device='cpu', amp=amp), torch.device('cpu')) == line


def test_bf16_on_a_cpu_without_bf16_instructions_says_it_will_be_slow(monkeypatch):
    monkeypatch.setattr(process, 'cpu_has_fast_bf16', lambda: False)
    line = process.precision_line(parsed_args(main_pretrain, device='cpu', amp='bf16'), torch.device('cpu'))
    assert line.startswith('Precision: bf16 autocast on the CPU') and 'no bf16 matrix instructions' in line
    fp16 = parsed_args(main_pretrain, device='cpu', amp='fp16')
    assert 'no bf16' not in process.precision_line(fp16, torch.device('cpu'))


def train_tiny(amp):
    """Three optimizer steps of the tiny MAE on the CPU with ``--amp amp``: (mean loss, the dtypes the encoder's
    first qkv Linear put out, how much each weight moved)."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4)) for _ in range(3)]
    dtypes = set()
    model.blocks[0].attn.qkv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    args = main_pretrain.get_args_parser().parse_args(['--lr', '1e-3', '--warmup_epochs', '0', '--epochs', '1',
                                                       '--device', 'cpu', '--amp', amp])
    stats = train_one_epoch(model, batches, optimizer, torch.device('cpu'), 0,
                            misc.NativeScalerWithGradNormCount(args), args=args)
    return stats['loss'], dtypes, {k: v - before[k] for k, v in model.state_dict().items()}


def test_amp_bf16_on_the_cpu_trains_in_bf16_close_to_fp32():
    fp32_loss, fp32_dtypes, fp32_moved = train_tiny('fp16')  # the default: fp32 on the CPU
    bf16_loss, bf16_dtypes, bf16_moved = train_tiny('bf16')
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    # the same masks and data: only bf16's rounding (8 bits of mantissa) differs (measured: 1.6367 vs 1.6372)
    assert math.isfinite(bf16_loss) and bf16_loss != fp32_loss
    assert abs(bf16_loss - fp32_loss) < 0.005 * fp32_loss
    # the weights stay fp32 (autocast casts the matrix products' inputs) and move the same way (cosine 0.998)
    for name in ('blocks.0.attn.qkv.weight', 'decoder_pred.weight'):
        assert bf16_moved[name].dtype == torch.float32 and not torch.equal(bf16_moved[name], fp32_moved[name])
        assert torch.cosine_similarity(bf16_moved[name].flatten(), fp32_moved[name].flatten(), dim=0) > 0.99
