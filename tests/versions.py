"""Which versions the tests' reference numbers were computed with, and what the tests check on other versions.

The vectors and runs in ``tests/data/`` were computed with the versions in ``REFERENCE_STACK`` (``model_vectors.pt``
records them under 'meta'). On that stack the tests compare with them as tightly as they always did. On any other
stack the requirements admit (constraints-oldest.txt is the oldest one CI runs), fp32 kernels sum in other orders
and torchvision/timm/Pillow transform images differently, so a test checks there what must still hold: the same
keys, rows, steps and schedule, finite numbers, model outputs within a few float32 roundings.
"""
import contextlib
from importlib.metadata import version
from unittest import mock

import torch

REFERENCE_STACK = {'torch': '2.14.1', 'torchvision': '0.29.1', 'timm': '1.0.31'}


def installed_stack():
    # a local version label (+cpu, +cu130) names the build, not other numbers on the CPU
    return {name: version(name).split('+')[0] for name in REFERENCE_STACK}


def exact_numbers_expected():
    """True on the stack the reference numbers were computed with."""
    return installed_stack() == REFERENCE_STACK


def stack_note():
    """For assertion messages: the versions here against the reference's."""
    here = installed_stack()
    return ', '.join(f'{k} {here[k]} (reference {v})' for k, v in REFERENCE_STACK.items())


@contextlib.contextmanager
def meta_device():
    """Build modules on the meta device (no memory, no initialisation). timm before 1.0.21 computes the drop-path
    rates with ``.item()`` on a ``torch.linspace`` made on the default device, which the meta device cannot give;
    those few numbers are made on the CPU here, as newer timm does itself."""
    linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        kwargs.setdefault('device', 'cpu')
        return linspace(*args, **kwargs)

    with torch.device('meta'), mock.patch.object(torch, 'linspace', cpu_linspace):
        yield
