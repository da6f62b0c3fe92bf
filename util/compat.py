"""Small shims for the oldest torch/timm that requirements.txt admits (torch 2.1, timm 1.0.3; see
constraints-oldest.txt). Each one does exactly what the newest versions do; nothing here changes numbers.
"""
import functools
import pickle
import time
import types
import warnings

import torch

try:  # timm >= 1.0.12 exports it here (and warns when it is imported from optim_factory)
    from timm.optim import param_groups_weight_decay
except ImportError:  # timm 1.0.3 to 1.0.11
    from timm.optim.optim_factory import param_groups_weight_decay

__all__ = ['GradScaler', 'destroy_process_group', 'load_weights_only', 'param_groups_weight_decay']


# CUDA's loss scaler: torch.amp.GradScaler('cuda') from torch 2.3, torch.cuda.amp.GradScaler before
GradScaler = functools.partial(torch.amp.GradScaler, 'cuda') if hasattr(torch.amp, 'GradScaler') else \
    torch.cuda.amp.GradScaler


def load_weights_only(path, allowed=(), **kwargs):
    """``torch.load(path, map_location='cpu', weights_only=True, **kwargs)``, also allowing the classes ``allowed``
    (the reference's checkpoints pickle their flags as an ``argparse.Namespace``, with ``pathlib`` paths in it when
    its submitit scripts made them) and no other."""
    with warnings.catch_warnings():
        # torch 2.1's weights-only loader itself goes through the deprecated TypedStorage, and says so on stderr
        warnings.filterwarnings('ignore', message='TypedStorage is deprecated', category=UserWarning)
        if not allowed:
            return torch.load(path, map_location='cpu', weights_only=True, **kwargs)
        if hasattr(torch.serialization, 'safe_globals'):  # torch >= 2.5
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(path, map_location='cpu', weights_only=True, **kwargs)
        # before, the weights-only loader cannot be told about a class: a standard unpickler that resolves only the
        # globals the weights-only loader allows, plus ``allowed``, loads the same files
        extra = {f'{c.__module__}.{c.__qualname__}': c for c in allowed}
        return torch.load(path, map_location='cpu', pickle_module=_restricted_pickle(extra), **kwargs)


def _restricted_pickle(extra):
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            from torch._weights_only_unpickler import _get_allowed_globals
            allowed = dict(_get_allowed_globals(), **extra)
            if f'{module}.{name}' not in allowed:
                raise pickle.UnpicklingError(f"Weights only load failed: unsupported global {module}.{name}")
            return allowed[f'{module}.{name}']
    # what torch.load needs of a pickle module
    return types.SimpleNamespace(__name__='restricted_pickle', Unpickler=Unpickler,
                                 load=lambda file, **kwargs: Unpickler(file, **kwargs).load())


def destroy_process_group():
    """``torch.distributed.destroy_process_group()``. Up to torch 2.7 the gloo group's destructor joins its worker
    threads while holding the GIL, and a worker still freeing the tensors of the last collective needs the GIL to do
    so: both wait forever (now and then, at the end of a run on the CPU). A short sleep lets the workers finish first
    (the sleep releases the GIL)."""
    if torch.distributed.get_backend() == 'gloo':
        time.sleep(0.1)
    torch.distributed.destroy_process_group()


def decode_png_16(data, path):
    """The pixels of the 16-bit PNG file ``path`` (its bytes ``data``) as an (H, W, C) uint16 array. torchvision's
    ``decode_png`` keeps the 16 bits from 0.21 (a uint16 tensor); before, only its private ``_read_png_16`` does (as
    int32, values 0..65535), and ``decode_png`` refuses the file."""
    import numpy as np
    from torchvision.io import image
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        if hasattr(image, '_read_png_16'):
            pixels = image._read_png_16(str(path), image.ImageReadMode.UNCHANGED)
        else:
            pixels = image.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                      mode=image.ImageReadMode.UNCHANGED)
    return pixels.to(torch.int32).permute(1, 2, 0).numpy().astype(np.uint16)


def torchvision_version():
    """The installed torchvision's (major, minor), e.g. (0, 16)."""
    import torchvision
    return tuple(int(x) for x in torchvision.__version__.split('+')[0].split('.')[:2])


# --data_loader gpu decodes a batch's JPEGs in one call: torchvision.io.decode_jpeg takes a list from 0.19
BATCHED_JPEG_DECODE = (0, 19)
