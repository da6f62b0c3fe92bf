"""Flags from a YAML file (``--config FILE.yaml``, every entry point) and a run's flags into one (``args.yaml``).

A config file is a mapping of flag names (without ``--``; ``args.yaml`` writes each flag's destination, e.g.
``global_pool: false`` for ``--cls_token``) to values. Its values become the flags' defaults: a flag given on the
command line overrides the file. Each value is checked as the command line's would be: through the flag's own
``type`` (so a ``Range`` refuses a value outside it), ``choices`` and number of values; a flag that takes no value
(``--norm_pix_loss``, ``--cls_token``) takes ``true`` (given) or ``false`` (its opposite); ``null`` restores a flag
whose default is none. An unknown key or a wrong value is one line naming the file and the key, exit code 2.

``args.yaml``: a training run's flags as they were parsed (the command line over its ``--config``), written by
rank 0 when the run takes its ``--output_dir``, so that ``--config <output_dir>/args.yaml --output_dir NEW`` repeats
it. Left out (``NOT_REPEATED``): where the run writes and what it continues from, and the process layout, which
belong to one launch, not to the recipe. A resumed run rewrites the file with the flags of the command that
continues it (the ones its remaining epochs use).
"""
import argparse
import os

import util.misc as misc

# the keys args.yaml leaves out: each belongs to one launch of a run, not to what it computes
NOT_REPEATED = {
    'output_dir': 'where this run writes: a repeat gets its own folder',
    'log_dir': 'TensorBoard\'s folder, --output_dir\'s by default',
    'resume': 'the checkpoint this launch continued from: a repeat starts afresh',
    'start_epoch': 'set from the checkpoint a resumed run continues',
    'config': 'the file the flags came from: args.yaml holds them all',
    'world_size': 'the process layout (torchrun\'s, submitit\'s)', 'local_rank': 'the process layout',
    'rank': 'the process layout', 'gpu': 'the process layout', 'distributed': 'the process layout',
    'dist_url': 'the process layout', 'dist_backend': 'the process layout', 'dist_on_itp': 'the process layout',
    # the submitit scripts' job flags (a repeat through main_*.py would not know them)
    'ngpus': 'the job\'s layout', 'nodes': 'the job\'s layout', 'timeout': 'the job\'s', 'job_dir': 'the job\'s',
    'partition': 'the job\'s', 'use_volta32': 'the job\'s', 'comment': 'the job\'s', 'cluster': 'the job\'s',
    'dependency': 'the job\'s',
}
ARGS_FILE = 'args.yaml'


class ConfigError(Exception):
    """A config file that cannot be used: its message names the file and the key."""


def import_yaml():
    try:
        import yaml
    except ImportError:  # (PyYAML comes with timm; a bare environment may lack it)
        raise ConfigError("--config needs PyYAML: pip install pyyaml") from None
    return yaml


def read(path, actions):
    """The defaults that the config file ``path`` gives the parser's ``actions``: ``{dest: value}``."""
    yaml = import_yaml()
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not valid YAML (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        where = getattr(e, 'problem_mark', None)
        raise ConfigError(f"--config {path}: not valid YAML ({getattr(e, 'problem', None) or e}"
                          + (f" at line {where.line + 1})" if where else ")")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must be a mapping of flag names to values, got a {type(data).__name__}")
    by_option = {o[2:]: a for a in actions for o in a.option_strings if o.startswith('--')}
    by_dest = {}
    for a in actions:
        if a.option_strings:
            by_dest.setdefault(a.dest, a)
    defaults, implied = {}, {}  # (a key the file gives wins over one a --fast-like key implies, wherever it stands)
    for key, value in data.items():
        action = by_option.get(key) or by_dest.get(key)
        if action is None or key in ('help', 'config'):
            raise ConfigError(f"--config {path}: unknown key '{key}' (no such flag)")
        try:
            values, implies = _value(action, value, key)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigError(f"--config {path}: {key}: {e}") from None
        defaults.update(values)
        implied.update(implies)
    return {**implied, **defaults}


def _value(action, value, key):
    """``({dest: value}, {dest: value it implies})`` for ``key: value``, checked as argparse would (the second: the
    flags that a flag standing for others, ``--fast``, sets)."""
    if action.nargs == 0:  # store_true/store_false/store_const, SetsFlags
        if not isinstance(value, bool):
            raise ValueError(f"takes true or false, got {value!r}")
        const = True if getattr(action, 'implies', None) is not None else action.const
        if key != action.dest and key in [o[2:] for o in action.option_strings]:  # by the flag's name: its sense
            chosen = const if value else (not const if isinstance(const, bool) else action.default)
        else:  # by the destination (args.yaml): the value itself
            chosen = value
        implied = dict(action.implies) if chosen is True and getattr(action, 'implies', None) else {}
        return {action.dest: chosen}, implied
    if value is None:
        if action.default is not None:
            raise ValueError(f"null: this flag has a value (default {action.default!r})")
        return {action.dest: None}, {}
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many:
        values = value if isinstance(value, list) else [value]
        if action.nargs == '+' and not values or isinstance(action.nargs, int) and len(values) != action.nargs:
            raise ValueError(f"takes {action.nargs if isinstance(action.nargs, int) else 'one or more'} values, "
                             f"got {len(values)}")
        return {action.dest: [_one(action, v) for v in values]}, {}
    if isinstance(value, (list, dict)):
        raise ValueError(f"takes one value, got {value!r}")
    return {action.dest: _one(action, value)}, {}


def _one(action, value):
    """One value through the flag's ``type`` (from its text, as on the command line: 2.5 is no int) and choices."""
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        raise ValueError(f"invalid value {value!r}")
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError):  # (a Range's own message, 'must be at least 1, got 0', passes as is)
        raise ValueError(f"invalid {getattr(action.type, '__name__', 'value')} value: {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"invalid choice {converted!r} (choose from {', '.join(map(str, action.choices))})")
    return converted


def repeatable(args, world_size=1):
    """The flags of ``args`` that args.yaml keeps (plain values: lists for tuples), in the order parsed. ``lr`` is
    null where it is --blr's linear scaling (the entry point's ``eff_batch_size``, on ``world_size`` processes), as
    the flags gave it, so that a repeat with another batch or number of GPUs scales it again; ``mean`` and ``std``
    are null where ``--data_stats auto`` measured them (the flags refuse both)."""
    flags = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in NOT_REPEATED}
    if flags.get('lr') is not None and flags.get('blr') is not None and flags['lr'] == \
            flags['blr'] * flags['batch_size'] * flags['accum_iter'] * world_size / 256:
        flags['lr'] = None
    if flags.get('data_stats'):  # --data_stats auto measured them: a repeat measures its data again
        flags['mean'] = flags['std'] = None
    return flags


def write_args(args, folder, world_size=1):
    """``<folder>/args.yaml``: the run's flags (``repeatable``), written whole or not at all (a new file renamed
    over the old one); rank 0 only, nothing without a folder."""
    if not (folder and misc.is_main_process()):
        return
    yaml = import_yaml()
    left_out = ', '.join(k for k in NOT_REPEATED if hasattr(args, k))
    text = (f"# The flags of this run (the command line over its --config). Repeat it with\n"
            f"#   --config {os.path.join(folder, ARGS_FILE)} --output_dir NEW_FOLDER\n"
            f"# Left out, as they belong to one launch (util/config_file.py): {left_out}\n"
            + yaml.safe_dump(repeatable(args, world_size), sort_keys=False, default_flow_style=None))
    path = os.path.join(folder, ARGS_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
