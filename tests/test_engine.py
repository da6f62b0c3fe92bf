"""Engine logic that matters on GPUs, checked on the CPU: mixed-precision choices, loss scaling, and DDP's
gradient sync skipped on accumulation micro-steps."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

import models_mae
import util.misc as misc
from util import compat
from engine_pretrain import train_one_epoch
from util.run import LoopHooks


@pytest.mark.parametrize('device,amp,expected', [
    ('cuda', 'fp16', ('cuda', torch.float16, True)),   # the reference
    ('cuda:1', 'bf16', ('cuda', torch.bfloat16, True)),
    ('cuda', 'none', ('cuda', torch.float16, False)),
    ('cpu', 'fp16', ('cpu', torch.float16, False)),     # the CPU runs fp32, as the reference there
    ('cpu', 'bf16', ('cpu', torch.bfloat16, False)),
])
def test_amp_settings(device, amp, expected):
    assert misc.amp_settings(SimpleNamespace(device=device, amp=amp)) == expected


@pytest.mark.parametrize('device,amp,scales', [('cuda', 'fp16', True), ('cuda', 'bf16', False),
                                               ('cuda', 'none', False), ('cpu', 'fp16', False)])
def test_loss_scaling_only_for_fp16_on_cuda(device, amp, scales, monkeypatch):
    monkeypatch.setattr(compat, 'GradScaler', lambda enabled: SimpleNamespace(enabled=enabled))
    assert misc.NativeScalerWithGradNormCount(SimpleNamespace(device=device, amp=amp))._scaler.enabled is scales


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
    args = SimpleNamespace(accum_iter=3, mask_ratio=0.75, lr=1e-3, min_lr=0., warmup_epochs=1, epochs=2,
                           device='cpu', amp='fp16', skip_nonfinite=0, output_dir='')
    stats = train_one_epoch(model, batches, optimizer, torch.device('cpu'), 0,
                            misc.NativeScalerWithGradNormCount(args), LoopHooks(), args=args)
    assert (model.unsynced, model.synced) == (4, 2)  # 2 of every 3 micro-steps stay local
    assert stats['loss'] > 0
