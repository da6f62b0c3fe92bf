"""How a flag is declared, and the flags every entry point shares (the reference's and the [new] run-control ones).

A numeric flag declares its valid range where it is defined, as its ``type``::

    parser.add_argument('--mask_ratio', default=0.75, type=Range(float, 0, 1, high_open=True), help=...)

argparse then refuses a value outside it while parsing, in one line naming the flag ('error: --mask_ratio must be in
[0, 1), got 1.0', exit code 2), before anything is written or computed. A flag declared with a plain ``type=float``
still works, with a note that it is unchecked. The constraints between flags are ``util/flag_checks.py``'s."""
import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass

import util.config_file as config_file
from util.data import data_stats, hf_datasets

SEED_MAX = 2 ** 32 - 1  # numpy seeds each process with --seed + its rank, and takes 0 .. 2**32 - 1 only


@dataclass(frozen=True)
class Range:
    """A numeric flag's ``type``: parses the value as ``kind`` (int, float) and refuses one outside ``low`` ..
    ``high`` (``low_open``/``high_open``: that bound excluded), nan and inf, unless it is one of ``special``, values
    with a meaning of their own that ``meaning`` says (e.g. ``special=(-1,), meaning='-1 (all)'``). A flag with
    ``nargs`` checks each of its values."""
    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()
    meaning: str = ''

    @property
    def __name__(self):  # argparse names the kind in "invalid int value: 'x'"
        return self.kind.__name__

    def __call__(self, text):
        value = self.kind(text)
        if not self.admits(value):
            raise argparse.ArgumentTypeError(
                f"must be {'' if math.isfinite(value) else 'finite and '}{self.rule()}, got {value}")
        return value

    def admits(self, value):
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False  # (nan passes no comparison: `nan < 0` and `nan >= 0` are both false)
        return ((value > self.low) if self.low_open else (value >= self.low)) and \
            ((value < self.high) if self.high_open else (value <= self.high))

    def rule(self):
        """The range in words: 'at least 1', 'positive', 'in [0, 1)', '-1 (all) or at least 0'."""
        if self.high == math.inf and self.low == -math.inf:
            words = 'a number'
        elif self.high == math.inf:
            words = (('positive' if self.low == 0 else f'more than {self.low}') if self.low_open
                     else f'at least {self.low}')
        else:
            words = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{self.meaning} or {words}" if self.meaning else words


def shows_default(action):
    """Whether ``--help`` should show this flag's default: one that takes a value and has a default to show (not
    None, False or '')."""
    default = action.default
    nothing = default is None or default is False or default is argparse.SUPPRESS or default == ''
    return bool(action.option_strings) and action.nargs != 0 and action.help != argparse.SUPPRESS and not nothing


class ShowDefaults(argparse.HelpFormatter):
    """``--help`` shows each flag's default, '(default: 224)', unless its help says it already."""

    def _format_action(self, action):
        if not action.help and shows_default(action):  # (argparse shows no default for a flag without help)
            action = copy.copy(action)
            action.help = 'default: %(default)s'
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ''
        if not shows_default(action) or 'default' in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse's parser, where a value outside its flag's ``Range`` is one line as the project's other mistakes
    ('error: --lr must be positive, got -1.0', exit code 2; argparse's other errors keep its usage line), a
    numeric flag declared without a range is named in a note (it works, unchecked), and ``--help`` shows every
    flag's default (``ShowDefaults``, with the ``formatter_class`` given, e.g. argparse.RawDescriptionHelpFormatter),
    and ``--config FILE.yaml`` [new] gives flags from a file, the command line overriding it (util/config_file.py)."""

    @property
    def formatter_class(self):
        return self._formatter_class

    @formatter_class.setter
    def formatter_class(self, cls):  # (argparse's __init__ sets it: the one given, with ShowDefaults mixed in)
        self._formatter_class = cls if issubclass(cls, ShowDefaults) else \
            type(f"ShowDefaults{cls.__name__}", (ShowDefaults, cls), {})

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            if action.type in (int, float):
                print(f"Note: {'/'.join(action.option_strings) or action.dest}: no valid range declared "
                      f"(type=Range({action.type.__name__}, low, high) in its add_argument would check it)")
        if '--config' not in self._option_string_actions:  # (added here: a submitit parser has the trainer's as parent)
            self.add_argument('--config', default=None, metavar='FILE.yaml',
                              help='[new] flags from a YAML file (flag: value; e.g. configs/ or a run\'s args.yaml); '
                                   'the command line overrides it')
        args = sys.argv[1:] if args is None else list(args)
        config = argparse.ArgumentParser(prog=self.prog, add_help=False)
        config.add_argument('--config', default=None)
        path = config.parse_known_args(args)[0].config
        if path is None:
            return super().parse_known_args(args, namespace)
        try:
            defaults = config_file.read(path, self._actions)
        except config_file.ConfigError as e:
            self.exit(2, f"error: {e}\n")
        namespace = namespace if namespace is not None else argparse.Namespace()
        for dest, value in defaults.items():  # argparse fills in only the flags the namespace lacks
            if not hasattr(namespace, dest):
                setattr(namespace, dest, value)
        given = [a for a in self._actions if a.required and a.dest in defaults]
        for action in given:  # (a required flag the file gives is not required on the command line)
            action.required = False
        try:
            return super().parse_known_args(args, namespace)
        finally:
            for action in given:
                action.required = True

    def error(self, message):
        refused = re.fullmatch(r'argument (--\w+): (must be .*)', message)  # (a Range's ArgumentTypeError)
        if refused:
            self.exit(2, f"error: {refused[1]} {refused[2]}\n")
        super().error(message)


def add_common_args(parser, models, defaults, data_help, save_freq, optimizer='adamw', checkpointing=True,
                    data_loaders=None, stats_from=None):
    """The flags every entry point has: the reference's (batch, model, schedule, data, output, device, seed,
    resuming, loading, distributed) with the script's ``defaults`` (batch_size, epochs, model, weight_decay, blr,
    min_lr, warmup_epochs) and ``models`` to choose from, the [new] run-control flags (precision, checkpoint cadence,
    resuming, fault handling), and the [new] fast path (docs/speed.md), off by default: each flag, and ``--fast`` for
    all of them but ``--grad_checkpointing`` (a memory saving that costs a second forward of the encoder).
    ``optimizer``: the script's ('adamw' has a fused kernel; LARS has none); ``checkpointing``: whether gradients flow
    through the encoder blocks; ``data_loaders``: the --data_loader choices with their help ({name: help}), the
    reference's 'pil' first (None: 'pil' only, no flag); ``stats_from``: the flag whose checkpoint gives the
    normalisation when none is given (``add_normalisation_args``)."""
    parser.add_argument('--batch_size', default=defaults['batch_size'], type=Range(int, 1),
                        help='Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus)')
    parser.add_argument('--epochs', default=defaults['epochs'], type=Range(int, 1))
    parser.add_argument('--accum_iter', default=1, type=Range(int, 1),
                        help='Accumulate gradient iterations (for increasing the effective batch size under memory '
                             'constraints)')
    parser.add_argument('--model', default=defaults['model'], type=str, metavar='MODEL',
                        help='Name of model to train: ' + ', '.join(models))
    parser.add_argument('--input_size', default=224, type=Range(int, 1), help='images input size')
    parser.add_argument('--weight_decay', type=Range(float, 0), default=defaults['weight_decay'],
                        help='weight decay (default: %(default)s)')
    parser.add_argument('--lr', type=Range(float, 0, low_open=True), default=None, metavar='LR',
                        help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=Range(float, 0, low_open=True), default=defaults['blr'], metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=Range(float, 0), default=defaults['min_lr'], metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=Range(int, 0), default=defaults['warmup_epochs'], metavar='N',
                        help='epochs to warmup LR')
    parser.add_argument('--data_path', default='/datasets01/imagenet_full_size/061417/', type=str, help=data_help)
    hf_datasets.add_args(parser)  # [new] --hf_image_column, --hf_label_column
    add_normalisation_args(parser, stats_from)  # [new] --in_chans, --to_grayscale, --mean, --std, --data_stats
    parser.add_argument('--output_dir', default='./output_dir', help='path where to save, empty for no saving')
    parser.add_argument('--log_dir', default=None,
                        help='path where to tensorboard log (default: --output_dir; the reference: ./output_dir)')
    parser.add_argument('--wandb_project', default=None, metavar='NAME',
                        help='[new] also log the curves, each epoch\'s log.txt row and the flags to this Weights & '
                             'Biases project (pip install wandb; WANDB_MODE=offline works without an account); a '
                             'resumed run continues the same W&B run (docs/configs-and-tracking.md)')
    parser.add_argument('--device', default='cuda', help='device to use for training / testing')
    parser.add_argument('--seed', default=0, type=Range(int, 0, SEED_MAX))
    parser.add_argument('--resume', default='', help='resume from checkpoint')
    parser.add_argument('--start_epoch', default=0, type=Range(int, 0), metavar='N', help='start epoch')
    # data loading processes of each training process (the reference's 10): thousands would exhaust the processes
    # and memory of any node before the first batch
    parser.add_argument('--num_workers', default=10, type=Range(int, 0, 256))
    parser.add_argument('--pin_mem', action='store_true',
                        help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    # distributed training (both overwritten by torchrun's and submitit's environment)
    parser.add_argument('--world_size', default=1, type=Range(int, 1), help='number of distributed processes')
    parser.add_argument('--local_rank', default=-1, type=Range(int, -1))
    parser.add_argument('--dist_on_itp', action='store_true')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--amp', default='fp16', choices=['fp16', 'bf16', 'none'],
                        help='[new] mixed precision on CUDA: fp16 with loss scaling (the reference), bf16, or none '
                             '(fp32). On the CPU fp16 and none run fp32 (the default: the reference\'s numbers) and '
                             'bf16 runs the forward under bf16 autocast (opt-in: faster where the CPU has bf16 '
                             'matrix instructions, AVX-512 BF16 or AMX, much slower where it has not; the losses '
                             'differ slightly from fp32\'s)')
    parser.add_argument('--save_freq', default=save_freq, type=Range(int, 1),
                        help=f'[new] keep checkpoint-<epoch>.pth every N epochs and at the end (default {save_freq}, '
                             'as the reference); checkpoint-last.pth is rewritten every epoch regardless')
    parser.add_argument('--auto_resume', action='store_true',
                        help='[new] continue the run of the same script, model and training flags whose newest '
                             'checkpoint is in --output_dir (default on; see docs/long-runs.md)')
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                        help='[new] start afresh (or from --resume) even if --output_dir holds a run; its log.txt '
                             'rows are moved to a side file')
    parser.set_defaults(auto_resume=True)
    parser.add_argument('--save_every_iters', default=0, type=Range(int, 0), metavar='N',
                        help='[new] also rewrite checkpoint-last.pth every N optimizer steps within an epoch '
                             '(default 0: only at the end of each epoch)')
    parser.add_argument('--skip_nonfinite', default=0, type=Range(int, 0), metavar='N',
                        help='[new] skip up to N steps with a non-finite loss before stopping (default 0: stop)')
    parser.add_argument('--skip_bad_images', action='store_true',
                        help='[new] skip image files that cannot be read (truncated, not an image, empty, unreadable): '
                             'each is replaced by the next readable image, named once on stderr, and counted per '
                             'epoch (train_skipped_images in log.txt). Default: stop with an error naming the file')

    group = parser.add_argument_group('speed [new]', 'off by default: the reference\'s numerics and host syncs')
    fast = dict(amp='bf16', **({'fused_adamw': True} if optimizer == 'adamw' else {}), compile=True,
                no_host_sync=True)
    group.add_argument('--fast', action=SetsFlags, implies=fast,
                       help='[new] the fast path in one flag: ' + ' '.join(
                           f'--{k}' if v is True else f'--{k} {v}' for k, v in fast.items()) + ' (see each; a flag '
                       'given after --fast overrides it; the data loader and --grad_checkpointing are chosen '
                       'separately; on the CPU it keeps fp32: bf16 there is --amp bf16 alone)')
    if optimizer == 'adamw':
        group.add_argument('--fused_adamw', action='store_true',
                           help='[new] AdamW(fused=True): one kernel for all tensors, where this torch has it for '
                                'the device (CUDA; the CPU from torch 2.4), else the default AdamW with a note')
    group.add_argument('--compile', action='store_true',
                       help='[new] torch.compile the model (the first steps take minutes to compile; masks and '
                            'drop-path draw from inductor\'s random generator, not eager\'s)')
    group.add_argument('--no_host_sync', action='store_true',
                       help='[new] no per-step loss.item(), all-reduce or host sync: losses stay on the device and '
                            'reach the console, log and TensorBoard every 20 steps (same values); a step with a '
                            'non-finite loss or gradient is skipped on the device and reported (--skip_nonfinite) '
                            'at most 20 steps late; stop requests are seen every 20 steps. Without fused AdamW or '
                            'fp16\'s GradScaler the skip decision costs one sync per optimizer step')
    if checkpointing:
        group.add_argument('--grad_checkpointing', action='store_true',
                           help='[new] recompute each encoder block\'s activations in the backward instead of '
                                'keeping them: less activation memory, for bigger batches per GPU (e.g. ViT-H at '
                                '256), for about one more encoder forward of compute; the same numbers')
    if data_loaders:
        group.add_argument('--data_loader', default=next(iter(data_loaders)), choices=list(data_loaders),
                           help='[new] how training images are decoded and augmented: ' + '; '.join(
                               f'{k}: {v}' for k, v in data_loaders.items()) + '. The same crop and flip '
                           'distribution; the pixels differ slightly (resampling)')


def add_normalisation_args(parser, checkpoint_flag=None, measure=True):
    """``--in_chans``, ``--mean``, ``--std`` and (``measure``) ``--data_stats``. ``checkpoint_flag``: the flag
    naming the checkpoint whose values are the defaults (fine-tuning's --finetune), or None (pre-training:
    ImageNet's)."""
    default = f"the {checkpoint_flag} checkpoint's, else " if checkpoint_flag else ''
    parser.add_argument('--in_chans', default=None, type=Range(int, 1), metavar='N',
                        help=f'[new] image channels (default: {default}3). 1 keeps grayscale images as one channel; '
                             'an image of another channel count is a bad file (docs/own-images.md)')
    parser.add_argument('--to_grayscale', action='store_true',
                        help="[new] with --in_chans 1: convert colour images to grey (PIL's 'L'; without it an RGB "
                             "file whose channels are equal is read as one, and one of real colour is a bad file)")
    parser.add_argument('--mean', default=None, type=Range(float), nargs='+', metavar='M',
                        help=f'[new] per-channel mean the images are normalised with, in [0, 1] units, one value per '
                             f'channel (default: {default}ImageNet\'s {" ".join(map(str, data_stats.DEFAULT_MEAN))})')
    parser.add_argument('--std', default=None, type=Range(float, 0, low_open=True), nargs='+', metavar='S',
                        help=f'[new] per-channel std, one value per channel (default: {default}ImageNet\'s '
                             f'{" ".join(map(str, data_stats.DEFAULT_STD))})')
    if not measure:
        return
    parser.add_argument('--data_stats', default=None, choices=['auto'],
                        help=f'[new] auto: measure --mean/--std on {data_stats.SAMPLE_SIZE} training images (evenly '
                             f'spaced), print them and cache them in --output_dir/{data_stats.CACHE_NAME}')


def add_classifier_args(parser, global_pool, global_pool_help=None):
    """The flags of the two classifier scripts (fine-tuning, linear probing): the encoder to start from, the pooling
    (``global_pool``: its default), the classes, evaluation only."""
    parser.add_argument('--finetune', default='', help='finetune from checkpoint')
    parser.add_argument('--global_pool', action='store_true', help=global_pool_help)
    parser.set_defaults(global_pool=global_pool)
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='Use class token instead of global pool for classification')
    parser.add_argument('--nb_classes', default=1000, type=Range(int, 1), help='number of the classification types')
    parser.add_argument('--eval', action='store_true', help='Perform evaluation only')
    parser.add_argument('--dist_eval', action='store_true', default=False,
                        help='Enabling distributed evaluation (recommended during training for faster monitor')


class SetsFlags(argparse.Action):
    """A flag that stands for others (``--fast``): it sets them where it stands on the command line, so that the
    parsed flags are the ones the run uses, and a flag given after it overrides it."""

    def __init__(self, option_strings, dest, implies, **kwargs):
        self.implies = implies
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        for flag, value in self.implies.items():
            setattr(namespace, flag, value)
