"""How many project functions a reader meets following one pre-training step: from ``get_args_parser()`` to the
first ``optimizer.step()`` of ``main_pretrain.py`` (tiny model and data, CPU, one process), traced as it runs.

    python benchmarks/hops.py

A hop is a project function called from the code a reader reads top to bottom to follow the step: the script's
spine (``run_main``, ``get_args_parser``, ``main``, ``engine_pretrain.train_one_epoch``, each a hop itself). What
those functions call in turn is theirs to explain: a reader opens a hop's function only to see how it does its one
job. Each function (or method) is counted once, by file and name. Left out, and listed apart:
- the model's own code (``models_mae.py``, ``util/pos_embed.py``): the model is one step of the reader's path;
- one-statement accessors a reader need not open (``get_rank``, ``get_world_size``, ``is_main_process``,
  ``is_dist_avail_and_initialized``, ``MetricLogger.add_meter``, ``ResumableSampler.__len__``) and the
  time-stamping ``print`` that every print goes through;
- the DataLoader's per-sample work (the sampler's iteration, ``ImageFolder.__getitem__`` and the image decoding),
  which runs in the loader's worker processes with the default ``--num_workers``.
Counted the same way, the reference's path (facebookresearch/mae) has 10: ``get_args_parser``, ``main``,
``init_distributed_mode``, ``__init__`` (its loss scaler's, ``MetricLogger``'s and ``SmoothedValue``'s),
``load_model``, ``train_one_epoch``, ``log_every``, ``update``, ``adjust_learning_rate`` and the loss scaler's
``__call__``. The script also prints every project function entered at any depth (the count the earlier versions
of this script reported: the reference enters 12).
"""
import builtins
import contextlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

MODEL_FILES = ('models_mae.py', 'models_vit.py', os.path.join('util', 'pos_embed.py'))
ACCESSORS = {'get_rank', 'get_world_size', 'is_main_process', 'is_dist_avail_and_initialized', 'add_meter',
             'stamped_print', '__len__'}
PER_SAMPLE = {(os.path.join('util', 'data', 'loaders.py'), '__iter__'),
              (os.path.join('util', 'data', 'image_folder.py'), '__getitem__'),
              (os.path.join('util', 'data', 'image_folder.py'), '_load'),
              (os.path.join('util', 'data', 'image_folder.py'), 'load_rgb'),
              (os.path.join('util', 'data', 'image_folder.py'), 'to_rgb')}


class Stepped(Exception):
    pass


SPINE = {('main_pretrain.py', 'get_args_parser'), ('main_pretrain.py', 'main'),
         ('engine_pretrain.py', 'train_one_epoch'), (os.path.join('util', 'training', 'process.py'), 'run_main')}


def trace(argv):
    """The project functions entered, in order, until the first optimizer step, and those of them that the spine
    calls (or that are the spine)."""
    import main_pretrain
    import util.training.process as process
    entered, met, stepped = [], [], []

    def step(self, *args, **kwargs):
        stepped.append(True)
        raise Stepped

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if stepped or event != 'call' or not path.startswith(ROOT + os.sep):
            return
        key = (os.path.relpath(path, ROOT), frame.f_code.co_name)
        if key[1].startswith('<') or key[0].startswith(('tests', 'benchmarks', '.')) or 'site-packages' in key[0]:
            return  # (nor the libraries of a virtualenv kept in the checkout: the README's .venv, CI's .ci-venv)
        if key not in entered:
            entered.append(key)
        caller = frame.f_back
        by = caller and (os.path.relpath(caller.f_code.co_filename, ROOT), caller.f_code.co_name)
        if (key in SPINE or by in SPINE) and key not in met:
            met.append(key)

    real_step = torch.optim.AdamW.step
    torch.optim.AdamW.step = step
    sys.setprofile(profile)
    try:
        process.run_main(main_pretrain.main, main_pretrain.get_args_parser(), argv)  # (its end lets go of the lock)
    except Stepped:
        pass
    finally:
        sys.setprofile(None)
        torch.optim.AdamW.step = real_step
    return entered, met


def main():
    data = os.path.join(ROOT, 'tests', 'data', 'tiny_imagefolder')
    with tempfile.TemporaryDirectory() as out, open(os.devnull, 'w') as quiet, \
            contextlib.redirect_stdout(quiet):
        entered, met = trace(['--model', 'mae_vit_tiny_patch4', '--input_size', '16', '--batch_size', '4',
                              '--epochs', '1', '--data_path', data, '--output_dir', out, '--num_workers', '0',
                              '--device', 'cpu'])

    def counted(keys):
        return [k for k in keys if k[0] not in MODEL_FILES and k[1] not in ACCESSORS and k not in PER_SAMPLE]

    left_out = [k for k in entered if k[0] not in MODEL_FILES and (k[1] in ACCESSORS or k in PER_SAMPLE)]
    hops, every = counted(met), counted(entered)
    say = getattr(builtins.print, '_mae_builtin', builtins.print)  # the run stamped print
    for n, (path, name) in enumerate(hops, 1):
        say(f'{n:3d}  {path}  {name}')
    say(f'{len(hops)} hops in {len({p for p, _ in hops})} files (the spine and what it calls)')
    say(f'left out: {len(left_out)} accessors, print and per-sample loader functions '
        f'({", ".join(name for _, name in left_out)}); '
        f'{len([k for k in entered if k[0] in MODEL_FILES])} functions of the model')
    say(f'every project function entered at any depth, the model\'s and those left out excepted: {len(every)} '
        f'(besides the hops: {", ".join(f"{p}:{n}" for p, n in every if (p, n) not in hops)})')


if __name__ == '__main__':
    main()
