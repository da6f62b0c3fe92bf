"""Resuming: which checkpoint a run continues, whether it may continue it, and what it restores from it.

``choose_checkpoint`` picks the checkpoint (with auto-resume, the newest in ``--output_dir``, unless ``--resume`` is
further along) and refuses one that another script, model or set of training flags wrote; after the model, optimizer
and loss scaler are built, ``restart_from_checkpoint`` (one call, as DINO's) loads them and returns where the run
starts: a ``Start`` (epoch, position inside it, best accuracy so far, TensorBoard's purge step).
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import util.checkpoints.checkpoint as ckpt_io
import util.checkpoints.saver as saver
import util.misc as misc
from util.data.data_stats import DEFAULT_MEAN, fmt
from util.errors import RunComplete, UsageError

# Flags a continued run may change (docs/long-runs.md). Every other flag stored in the checkpoint must be the same.
CHANGEABLE_ON_RESUME = {
    'epochs', 'batch_size', 'accum_iter',  # a longer run; a smaller batch after running out of memory
    'num_workers', 'pin_mem', 'device', 'amp', 'data_path',  # how, and from where, the same data is read
    'output_dir', 'log_dir', 'resume', 'auto_resume', 'start_epoch', 'finetune', 'eval', 'dist_eval',
    'save_freq', 'save_every_iters', 'skip_nonfinite', 'skip_bad_images', 'seed',
    'config', 'wandb_project',  # [new] where the flags came from; where the curves also go
    # how fast the same training runs (docs/speed.md)
    'fast', 'fused_adamw', 'compile', 'no_host_sync', 'grad_checkpointing', 'data_loader',
    # the kNN monitor only watches (its own random streams; training is unchanged)
    'knn_every', 'knn_data_path', 'knn_train_subset', 'knn_val_subset',
    # the process layout (filled in by the launcher)
    'world_size', 'rank', 'gpu', 'local_rank', 'distributed', 'dist_backend', 'dist_url', 'dist_on_itp',
    # submitit's own flags
    'job_dir', 'ngpus', 'nodes', 'timeout', 'partition', 'use_volta32', 'comment', 'cluster', 'dependency',
}

NORMALISATION = ('in_chans', 'mean', 'std')  # how images are read and normalised: when not given, the checkpoint's


@dataclass
class Position:
    """Where an epoch interrupted in the middle continues, on this rank."""
    epoch: int
    iteration: int  # batches trained on (an optimizer-step boundary)
    meters: dict  # the running averages so far
    rng: dict  # the random streams at that point
    skipped: list = field(default_factory=list)  # indices of bad image files skipped so far


@dataclass
class Start:
    """Where a run starts: a fresh one at --start_epoch (0); a continued one after its checkpoint."""
    epoch: int = 0
    position: Optional[Position] = None  # set when the checkpoint is inside an epoch
    max_accuracy: float = 0.0  # the best test accuracy of the epochs before (fine-tuning, linear probing)
    purge_step: Optional[int] = None  # TensorBoard hides the points from this step on (written after the checkpoint)


# ---------------------------------------------------------------------------------------------------- which one
def choose_checkpoint(args, script):
    """``(path, checkpoint)`` for the run of ``script`` to start from, or ``(args.resume, None)`` when there is
    none: with auto-resume (when training), the newest checkpoint in ``--output_dir``, checked to belong to this run,
    unless ``--resume`` is further along; else ``--resume``, checked the same way (the same script, model and
    training flags). When training, a start with nothing to train is refused."""
    training = not getattr(args, 'eval', False)
    output_dir, script = args.output_dir if training else '', os.path.basename(script)
    found = ckpt_io.newest(output_dir) if training and args.auto_resume else ''
    given = ckpt_io.load(args.resume) if args.resume else None
    path, checkpoint = args.resume, given
    if found and not (args.resume and os.path.realpath(found) == os.path.realpath(args.resume)):
        newest = ckpt_io.load(found, what="the newest checkpoint in --output_dir,")
        if given is not None and ckpt_io.position(given) > ckpt_io.position(newest):
            misc.print_first(f"Note: --resume {args.resume} ({ckpt_io.describe_position(given)}) is further along "
                             f"than {found} in --output_dir: continuing from --resume")
            check_resumed(given, args.resume, args, script)
        else:
            check_continues(newest, found, args, output_dir, script)
            misc.print_first(f"Auto-resume: continuing from {found}" + (
                f" (further along than --resume {args.resume}, which is not used; pass --no_auto_resume to start "
                f"from --resume)" if args.resume else ''))
            path, checkpoint = found, newest
    elif given is not None and found:  # --resume names the folder's newest checkpoint: as auto-resume
        check_continues(given, found, args, output_dir, script)
    elif given is not None and training:
        check_resumed(given, args.resume, args, script)
    if training and checkpoint is not None:
        take_normalisation(args, checkpoint, path)
    if training:
        check_start(checkpoint, path, args)
    return path, checkpoint


def take_normalisation(args, checkpoint, path):
    """A continued run reads and normalises its images as its checkpoint's run did: --in_chans, --mean and --std
    not given are its (pre-training chooses its checkpoint before ``data_stats.resolve``; the given ones were
    compared with it)."""
    there = ckpt_io.stored_args(checkpoint)
    taken = [key for key in NORMALISATION if getattr(args, key, None) is None and there.get(key) is not None]
    for key in taken:
        setattr(args, key, there[key])
    if 'mean' in taken and (there.get('data_stats') or list(there['mean']) != list(DEFAULT_MEAN)):
        what = "Data statistics (--data_stats auto)" if there.get('data_stats') else "Normalisation (--mean/--std)"
        misc.print_first(f"{what} from {path}, the checkpoint this run continues: mean {fmt(there['mean'])} std "
                         f"{fmt(there['std'])}")


def check_continues(checkpoint, path, args, output_dir, script):
    """Refuse to continue a checkpoint in ``output_dir`` that another script, model or set of training flags
    wrote; stop with exit code 0 if it is this very run, finished."""
    folder = f"--output_dir {output_dir}"
    fix = "pass a new --output_dir, or --no_auto_resume to start afresh in that folder"
    check_same_run(checkpoint, args, script, f"{folder} holds a run",
                   f"{os.path.basename(path)}, {ckpt_io.describe_position(checkpoint)}",
                   f"run it with its own flags to continue it, or {fix}", fix)
    if checkpoint.get('epoch', -1) + 1 >= args.epochs:  # (a checkpoint inside a later epoch too: --epochs lowered)
        raise RunComplete(f"{folder} holds this run, complete: it finished epoch {checkpoint['epoch']} of "
                          f"--epochs {args.epochs}{beyond(checkpoint)}; nothing to do (raise --epochs to train longer)")


def check_resumed(checkpoint, path, args, script):
    """--resume FILE that is not the newest checkpoint of --output_dir: the same checks as auto-resume (another
    script, model or training flags would continue with a mixed recipe); one already at --epochs is refused (nothing
    to train; auto-resume's finished run in its own folder is the one that ends with exit code 0)."""
    weights = ("pass it as --init_from" if script == 'main_pretrain.py' else "pass it as --finetune") + \
        " to start a new run from its weights"
    # (a run with --model_ema continued without it, or one without it continued with it: restore_ema's line says
    # what to pass)
    there = ckpt_io.stored_args(checkpoint)
    ema_differs = bool(there.get('model_ema')) != bool(getattr(args, 'model_ema', False))
    check_same_run(checkpoint, args, script, f"--resume {path} is a run", ckpt_io.describe_position(checkpoint),
                   f"give it its own flags to continue it, or {weights}", weights,
                   ignore=('model_ema', 'model_ema_decay') if ema_differs else ())
    if continues(checkpoint, args) and checkpoint['epoch'] + 1 >= args.epochs:  # (also inside a later epoch)
        raise UsageError(f"--resume {path} has finished epoch {checkpoint['epoch']} of --epochs {args.epochs}"
                         f"{beyond(checkpoint)}: nothing to train (raise --epochs to train longer)")


def check_same_run(checkpoint, args, script, holds, where, flags_fix, run_fix, ignore=()):
    """Refuse a checkpoint (``holds`` says whose, ``where`` which and how far) of another script or model
    (``run_fix`` says what to do), or of other training flags (``flags_fix``; those in ``ignore`` are checked
    elsewhere)."""
    there = ckpt_io.stored_args(checkpoint)
    wrote, model = checkpoint.get('script'), there.get('model', args.model)
    if (wrote and wrote != script) or model != args.model:
        raise UsageError(f"{holds} of {wrote or 'another script'} --model {model} ({where}), not of {script} "
                         f"--model {args.model}: {run_fix}")
    changed = changed_flags({k: v for k, v in there.items() if k not in ignore}, args)
    if changed:
        raise UsageError(f"{holds} with other training flags ({'; '.join(changed)}): {flags_fix}")


def continues(checkpoint, args):
    """Whether a training run continues ``checkpoint`` (its optimizer and epoch), rather than starting from its
    weights at --start_epoch (as ``restart_from_checkpoint`` decides)."""
    return not getattr(args, 'eval', False) and 'optimizer' in checkpoint and 'epoch' in checkpoint


def beyond(checkpoint):
    return (f" and was stopped inside epoch {checkpoint['epoch'] + 1}, beyond --epochs"
            if 'resume_iter' in checkpoint else '')


def check_start(checkpoint, path, args):
    """Before anything is computed: a fresh start at or after --epochs is refused (it would end at once, with
    nothing written); --start_epoch beside a checkpoint that is continued is not used, which is said (a checkpoint
    continues from its own position, as the reference's load_model; its optimizer and schedule are there)."""
    if checkpoint is not None and continues(checkpoint, args):
        after = checkpoint['epoch'] + 1
        if args.start_epoch not in (0, after):
            misc.print_first(f"Note: --start_epoch {args.start_epoch} is not used: {path} continues at epoch {after}, "
                             f"where it stopped (its optimizer and schedule are there)")
    elif args.start_epoch >= args.epochs:
        raise UsageError(f"--start_epoch {args.start_epoch} with --epochs {args.epochs}: nothing to train (epochs "
                         f"are counted from 0; --start_epoch must be below --epochs)")


def changed_flags(there, args):
    """``--flag <stored> there, <now> here`` for each training flag that differs from a checkpoint's."""
    here = ckpt_io.args_to_dict(args)
    changed = []
    for key, value in there.items():
        if key in CHANGEABLE_ON_RESUME or key not in here or key == 'lr':
            continue
        if key in NORMALISATION and here[key] is None:
            continue  # (not given: the checkpoint's, ``take_normalisation``)
        if key == 'model_ema_decay' and not (here.get('model_ema') or there.get('model_ema')):
            continue  # (the decay of an average that neither run keeps)
        if here[key] != value:
            changed.append(f"--{key} {value} there, {here[key]} here")
    # the stored lr is the actual one; it came from --lr when it is not the linear scaling of --blr
    stored_lr, blr = there.get('lr'), there.get('blr')
    eff = there.get('batch_size', 0) * there.get('accum_iter', 1) * there.get('world_size', 1)
    lr_was_given = stored_lr is not None and blr is not None and abs(stored_lr - blr * eff / 256) > 1e-12 * abs(
        stored_lr)
    if args.lr is not None and stored_lr is not None and args.lr != stored_lr:
        changed.append(f"--lr {stored_lr} there, {args.lr} here")
    elif args.lr is None and lr_was_given:
        changed.append(f"--lr {stored_lr} there, none here")
    return changed


# ---------------------------------------------------------------------------------------------------- restoring
def restart_from_checkpoint(checkpoint, path, args, model, optimizer=None, loss_scaler=None, iters_per_epoch=0,
                            model_ema=None, data=None):
    """Load ``checkpoint`` (read from ``path``) into ``model`` (and ``model_ema``, [new] --model_ema) and, when
    training, ``optimizer`` and ``loss_scaler`` (setting ``args.start_epoch``, as the reference's ``load_model``);
    restore the random streams at an epoch boundary. Returns the ``Start`` after it (at ``--start_epoch`` for
    ``checkpoint`` None). ``iters_per_epoch``: the training loader's length; ``data``: its data set, compared with
    the one the checkpoint was trained on."""
    if checkpoint is None:
        return Start(epoch=args.start_epoch)
    problem = ckpt_io.state_dict_mismatch(model, checkpoint['model'])
    if problem:
        raise UsageError(f"--resume {path} does not fit --model {args.model}: {problem}")
    model.load_state_dict(checkpoint['model'])
    print("Resume checkpoint %s" % path)
    continued = continues(checkpoint, args)
    restore_ema(model_ema, checkpoint, path, args, model, continued)
    if not continued:
        return Start(epoch=args.start_epoch)
    load_optimizer_state(optimizer, checkpoint['optimizer'], f"--resume {path}")
    args.start_epoch = checkpoint['epoch'] + 1  # (as the reference's load_model; the checkpoints keep it)
    if 'scaler' in checkpoint:
        loss_scaler.load_state_dict(checkpoint['scaler'])
    print("With optim & sched!")
    # ours keep the best accuracy; the reference restarts it on resuming
    start = Start(epoch=args.start_epoch, max_accuracy=float(checkpoint.get('max_accuracy', 0.0)))
    return continue_position(start, checkpoint, args, iters_per_epoch, data_change(checkpoint, data))


def data_change(checkpoint, data):
    """How the training set ``data`` differs from the one ``checkpoint`` was trained on, in words ('' when it is the
    same, or either is unknown: checkpoints from before the identity was saved)."""
    now = saver.data_identity(data) if data is not None else {}
    then = {k: checkpoint.get(k) for k in now}
    if not now or None in then.values() or then == now:
        return ''
    size = (f"{then['data_size']} images then, {now['data_size']} now" if then['data_size'] != now['data_size']
            else f"{now['data_size']} images, other files")
    return f"the training data changed since it was saved ({size})"


def restore_ema(model_ema, checkpoint, path, args, model, continued):
    """--model_ema [new]: the average's weights from the checkpoint (an evaluation's, or a continued run's); a
    checkpoint of weights only starts the average at them. A run trained without --model_ema is not continued (nor
    evaluated) with it, nor one trained with it without it: its average would be lost, or start over."""
    saved = checkpoint.get('model_ema')
    if model_ema is None:
        if saved is not None and continued and hasattr(args, 'model_ema'):
            decay = ckpt_io.stored_args(checkpoint).get('model_ema_decay', args.model_ema_decay)
            raise UsageError(f"--resume {path} is of a run trained with --model_ema (it holds the EMA's weights): "
                             f"continue it with --model_ema --model_ema_decay {decay}")
        return
    if saved is None and (continued or getattr(args, 'eval', False)):
        raise UsageError(f"--model_ema: --resume {path} holds no EMA weights (its run was trained without "
                         f"--model_ema); continue or evaluate it without --model_ema")
    if saved is None:
        model_ema.set(model)
    else:
        model_ema.module.load_state_dict(saved)


def continue_position(start, checkpoint, args, iters_per_epoch, data_note=''):
    """The position inside ``start.epoch`` (a checkpoint written in the middle of an epoch, with the same batch
    layout, process count and training set), or the random streams at the epoch boundary; and TensorBoard's purge
    step. ``data_note``: how the training set changed (``data_change``): a position inside an epoch is an index into
    that epoch's permutation of the old set, so the epoch restarts from its beginning (the rest of it drawn from
    the new set's permutation would show some images twice and others never); at an epoch boundary it is said."""
    world, rank = misc.get_world_size(), misc.get_rank()
    there = ckpt_io.stored_args(checkpoint)
    states = checkpoint.get('rng') or []
    layout_note = ''
    if data_note and 'resume_iter' not in checkpoint:
        print(f"Note: {data_note}; epoch {start.epoch} and the later ones draw from it as it is now")
    if data_note and 'resume_iter' in checkpoint:
        layout_note = data_note
    elif states and len(states) != world:
        layout_note = f"its random streams are for {len(states)} processes, this run has {world}"
    elif 'resume_iter' in checkpoint and (there.get('batch_size'), there.get('accum_iter')) != (
            args.batch_size, args.accum_iter):
        layout_note = (f"its position is in batches of --batch_size {there.get('batch_size')} --accum_iter "
                       f"{there.get('accum_iter')}, this run has {args.batch_size} and {args.accum_iter}")
    if 'resume_iter' in checkpoint and not layout_note and states:
        it = checkpoint['resume_iter']
        start.position = Position(start.epoch, it, checkpoint['meters'][rank], states[rank],
                                  list(checkpoint.get('skipped_images') or []))
        print(f"Resuming epoch {start.epoch} at iteration {it} of {iters_per_epoch}")
        start.purge_step = int(((it - 1) / iters_per_epoch + start.epoch) * 1000) + 1
        return start
    eff_there = there.get('batch_size', 0) * there.get('accum_iter', 1) * there.get('world_size', 1)
    eff_here = args.batch_size * args.accum_iter * world
    if eff_there and eff_there != eff_here:
        advice = (f"keep the effective batch size (e.g. --accum_iter {eff_there // (args.batch_size * world)})"
                  if eff_there % (args.batch_size * world) == 0 else
                  f"keep the effective batch size (--batch_size x --accum_iter x processes = {eff_there})")
        print(f"Note: the effective batch size (batch_size x accum_iter x processes) is {eff_here}, it was "
              f"{eff_there}: the lr is {args.lr:.2e}, it was {there.get('lr', 0):.2e}. To keep the recipe, {advice}")
    if layout_note:
        where = f"restarting epoch {start.epoch} from its beginning" if 'resume_iter' in checkpoint else "continuing"
        print(f"Note: {layout_note}; {where} with fresh random streams")
    elif states:
        saver.set_rng_state(states[rank])
    start.purge_step = start.epoch * 1000 if start.epoch > 0 else None
    return start


def load_optimizer_state(optimizer, state, what):
    """``optimizer.load_state_dict(state)``; a saved optimizer that holds the first tensors of each of this
    optimizer's groups only (a reference linear probe with ``--global_pool`` kept ``fc_norm`` frozen, so its LARS
    has the head's 2 tensors where this run trains 4) is loaded for those, the others start fresh, and a note says
    so. Anything else that does not fit is a ``UsageError``."""
    saved, own = state['param_groups'], optimizer.state_dict()['param_groups']
    if len(saved) == len(own) and any(len(s['params']) < len(o['params']) for s, o in zip(saved, own)):
        groups, remap, fresh = [], {}, 0
        for s, o in zip(saved, own):
            if len(s['params']) > len(o['params']):
                break
            remap.update(zip(s['params'], o['params']))
            groups.append({**s, 'params': list(o['params'])})
            fresh += len(o['params']) - len(s['params'])
        else:
            state = {'state': {remap[k]: v for k, v in state['state'].items() if k in remap}, 'param_groups': groups}
            print(f"Note: {what}'s optimizer holds {sum(len(s['params']) for s in saved)} of this run's "
                  f"{sum(len(o['params']) for o in own)} trained tensors (a reference linear probe with --global_pool "
                  f"froze fc_norm); their state is restored, the {fresh} others start fresh")
    # how the update is computed (--fused_adamw) is this run's choice, not the checkpoint's: load_state_dict would
    # take the saved groups' settings
    implementation = [{k: g[k] for k in ('fused', 'foreach') if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{what}: its optimizer state does not fit this run ({e})") from None
    for group, own in zip(optimizer.param_groups, implementation):
        group.update(own)
        if own.get('fused'):  # the fused kernel keeps the step count beside the weights, as a float
            for p in group['params']:
                step = optimizer.state.get(p, {}).get('step')
                if torch.is_tensor(step):
                    optimizer.state[p]['step'] = step.to(p.device, torch.float32)
