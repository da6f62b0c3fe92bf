"""How many project functions a reader enters to follow one pre-training step: from ``get_args_parser()`` to the
first ``optimizer.step()`` of ``main_pretrain.py`` (tiny model and data, CPU, one process), traced as it runs.

    python benchmarks/hops.py

Each function (or method) is counted once, by file and name. Left out, and listed apart:
- the model's own code (``models_mae.py``, ``util/pos_embed.py``): the model is one step of the reader's path;
- one-statement accessors a reader need not open (``get_rank``, ``get_world_size``, ``is_main_process``,
  ``is_dist_avail_and_initialized``, ``MetricLogger.add_meter``, ``ResumableSampler.__len__``) and the
  time-stamping ``print`` that every print goes through;
- the DataLoader's per-sample work (the sampler's iteration, ``ImageFolder.__getitem__`` and the image decoding),
  which runs in the loader's worker processes with the default ``--num_workers``.
Counted the same way, the reference's path (facebookresearch/mae) enters 12: ``get_args_parser``, ``main``,
``init_distributed_mode``, ``setup_for_distributed``, ``__init__`` (its loss scaler's, ``MetricLogger``'s and
``SmoothedValue``'s), ``load_model``, ``train_one_epoch``, ``log_every``, ``update``, ``adjust_learning_rate``, the
loss scaler's ``__call__`` and ``get_grad_norm_`` (it reads the loss, ``all_reduce_mean``, after the step).
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
PER_SAMPLE = {(os.path.join('util', 'loaders.py'), '__iter__'), (os.path.join('util', 'image_folder.py'), '__getitem__'),
              (os.path.join('util', 'image_folder.py'), '_load'), (os.path.join('util', 'image_folder.py'), 'load_rgb'),
              (os.path.join('util', 'image_folder.py'), 'to_rgb')}


class Stepped(Exception):
    pass


def trace(argv):
    """The project functions entered, in order, until the first optimizer step."""
    import main_pretrain
    import util.errors as errors
    entered, stepped = [], []

    def step(self, *args, **kwargs):
        stepped.append(True)
        raise Stepped

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if stepped or event != 'call' or not path.startswith(ROOT + os.sep):
            return
        key = (os.path.relpath(path, ROOT), frame.f_code.co_name)
        if not key[1].startswith('<') and key not in entered and not key[0].startswith(('tests', 'benchmarks')):
            entered.append(key)

    real_step = torch.optim.AdamW.step
    torch.optim.AdamW.step = step
    sys.setprofile(profile)
    try:
        errors.run_main(main_pretrain.main, main_pretrain.get_args_parser(), argv)
    except Stepped:
        pass
    finally:
        sys.setprofile(None)
        torch.optim.AdamW.step = real_step
        while errors.AT_MAIN_EXIT:
            errors.AT_MAIN_EXIT.pop()()
    return entered


def main():
    data = os.path.join(ROOT, 'tests', 'data', 'tiny_imagefolder')
    with tempfile.TemporaryDirectory() as out, open(os.devnull, 'w') as quiet, \
            contextlib.redirect_stdout(quiet):
        entered = trace(['--model', 'mae_vit_tiny_patch4', '--input_size', '16', '--batch_size', '4',
                         '--epochs', '1', '--data_path', data, '--output_dir', out, '--num_workers', '0',
                         '--device', 'cpu'])
    model = [k for k in entered if k[0] in MODEL_FILES]
    left_out = [k for k in entered if k[0] not in MODEL_FILES and (k[1] in ACCESSORS or k in PER_SAMPLE)]
    hops = [k for k in entered if k not in model and k not in left_out]
    say = getattr(builtins.print, '_mae_builtin', builtins.print)  # the run stamped print
    for n, (path, name) in enumerate(hops, 1):
        say(f'{n:3d}  {path}  {name}')
    say(f'{len(hops)} hops in {len({p for p, _ in hops})} files')
    say(f'left out: {len(left_out)} accessors, print and per-sample loader functions '
        f'({", ".join(name for _, name in left_out)}); {len(model)} functions of the model')
    say(f'every project function entered, the model\'s excepted: {len(hops) + len(left_out)}')


if __name__ == '__main__':
    main()
