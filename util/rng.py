"""A process's random streams (torch's CPU and CUDA generators, numpy's, python's) as tensors and plain values, so
that a checkpoint keeps them (``torch.load(weights_only=True)`` reads them back) and a resumed run draws on."""
import random

import numpy as np
import torch


def rng_state():
    """This process's random streams (torch CPU and CUDA, numpy, python) as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        'numpy': {'name': np_state[0], 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_version, 'state': torch.tensor(py_state, dtype=torch.int64), 'gauss': py_gauss},
    }


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state'].tolist()), p['gauss']))
