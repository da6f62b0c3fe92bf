"""[new] ``--wandb_project NAME``: a training run's curves also in Weights & Biases (optional: ``pip install wandb``).

``open_log_writer`` gives the run its TensorBoard writer, or, with ``--wandb_project``, a ``WandbTee`` around it:
every ``add_scalar(tag, value, step)`` the engines write to TensorBoard also goes to W&B, at the same x: the
per-step curves (loss, lr) against ``epoch_1000x`` (TensorBoard's step: 1000 x the fractional epoch), the points
of each epoch's end (the kNN monitor's, fine-tuning's test accuracy) and each epoch's ``log.txt`` row (as
``epoch/<key>``) against ``epoch``. The run's flags (those of ``args.yaml``) are its config.

A resumed run continues the same W&B run: its id is kept in ``<output_dir>/wandb_id.txt``. W&B cannot take a point
back, so none is sent twice: the points are sent in batches (every ``SEND_EVERY`` seconds, and at each epoch's end),
and before each batch the last x it holds is written to ``<output_dir>/wandb_sent.json``; a resumed run skips the
points up to that x (it computes the same ones again: resuming is exact). A run killed between that file and the
batch leaves a gap in W&B rather than a double point. Works offline (``WANDB_MODE=offline``; ``wandb sync`` later).
"""
import atexit
import json
import os
import time

from util.config_file import repeatable
from util.errors import UsageError

ID_FILE, SENT_FILE = 'wandb_id.txt', 'wandb_sent.json'
SEND_EVERY = 10.0  # seconds between batches of points (W&B's live charts lag by at most this, or an epoch's end)
STEP_AXIS, EPOCH_AXIS = 'epoch_1000x', 'epoch'


def check_args(args):
    """Before anything is computed: --wandb_project needs wandb installed."""
    if getattr(args, 'wandb_project', None):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--wandb_project needs the wandb package, which is not installed: pip install wandb") \
                from None


def open_log_writer(args, purge_step, continuing):
    """Rank 0's writer of the run's scalars: TensorBoard's ``SummaryWriter`` in ``--log_dir`` (if any; hiding its
    points from ``purge_step``), teed to W&B with ``--wandb_project``; ``continuing``: the run resumes a checkpoint
    (then the W&B run whose id ``--output_dir`` keeps goes on)."""
    tensorboard = None
    if args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(log_dir=args.log_dir, purge_step=purge_step)
    if not getattr(args, 'wandb_project', None):
        return tensorboard
    return WandbTee(tensorboard, args, continuing)


def send_epoch_row(writer, log_stats):
    """The epoch's ``log.txt`` row to W&B (nothing without --wandb_project)."""
    writer = getattr(writer, 'writer', writer)  # (inside util.training.run.LogWriter)
    if isinstance(writer, WandbTee):
        writer.add_row(log_stats)


class WandbTee:
    """TensorBoard's writer (or none) with each scalar also sent to a W&B run (see the module's docstring)."""

    def __init__(self, tensorboard, args, continuing):
        import wandb
        self.tensorboard, self.folder = tensorboard, args.output_dir
        self.log_dir = tensorboard.log_dir if tensorboard is not None else None
        run_id, self.sent = self._read_state() if continuing else (None, {})
        self.run = wandb.init(project=args.wandb_project, id=run_id,
                              resume='allow', config=repeatable(args, getattr(args, 'world_size', 1)),
                              name=os.path.basename(os.path.realpath(self.folder)) if self.folder else None,
                              dir=None if os.environ.get('WANDB_DIR') or not self.folder else self.folder)
        self.run.define_metric(STEP_AXIS)
        self.run.define_metric(EPOCH_AXIS)
        self.run.define_metric('epoch/*', step_metric=EPOCH_AXIS)
        self._axis = {}  # tag -> its x axis
        self._row_epoch = None  # the epoch of the last log.txt row
        # W&B's own step, monotonic across resumes (offline, a resumed run's would start again at 0)
        self._step = max(self.run.step, self.sent.get('_step', -1) + 1)
        self._open = None  # (axis, x, {tag: value}): the row being filled
        self._ready = []  # rows complete, not sent yet
        self._last_send = time.time()
        if self.folder:
            self._write(ID_FILE, self.run.id + '\n')
        atexit.register(self.close)  # (a stop or an error ends the run without Run.close: the rows still go)
        print(f"W&B: run {self.run.id} of project {args.wandb_project}"
              + (f" (continued; points up to {self.sent} were sent before)" if self.sent else ''))

    def _read_state(self):
        try:
            with open(os.path.join(self.folder, ID_FILE), encoding='utf-8') as f:
                run_id = f.read().strip()
        except OSError:
            return None, {}
        try:
            with open(os.path.join(self.folder, SENT_FILE), encoding='utf-8') as f:
                return run_id, json.load(f)
        except (OSError, ValueError):
            return run_id, {}

    def _write(self, name, text):
        path = os.path.join(self.folder, name)
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(path + '.tmp', path)

    # ------------------------------------------------------------------------------------------ what the run writes
    def add_scalar(self, tag, value, step):
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        axis = self._axis.get(tag)
        if axis is None:  # the points of an epoch's end come after its row (add_row), at x = the epoch
            axis = EPOCH_AXIS if step == self._row_epoch else STEP_AXIS
            self._axis[tag] = axis
            self.run.define_metric(tag, step_metric=axis)
        self._add(axis, step, {tag: float(value)})

    def add_row(self, log_stats):
        row = {f'epoch/{k}': v for k, v in log_stats.items() if isinstance(v, (int, float)) and k != 'epoch'}
        self._row_epoch = log_stats['epoch']
        self._add(EPOCH_AXIS, log_stats['epoch'], row)

    def _add(self, axis, x, values):
        if x <= self.sent.get(axis, -1):
            return  # sent by the run this one continues
        if self._open is not None and self._open[:2] != (axis, x):
            self._ready.append(self._open)
            self._open = None
        if self._open is None:
            self._open = (axis, x, {})
        self._open[2].update(values)
        if time.time() - self._last_send >= SEND_EVERY:
            self._send(keep_open=True)

    def _send(self, keep_open=False):
        rows, self._ready = self._ready, []
        if self._open is not None and not keep_open:
            rows.append(self._open)
            self._open = None
        self._last_send = time.time()
        if not rows:
            return
        for axis, x, _ in rows:
            self.sent[axis] = max(x, self.sent.get(axis, -1))
        first, self._step = self._step, self._step + len(rows)
        self.sent['_step'] = self._step - 1
        if self.folder:  # first the claim, then the points: a kill in between leaves a gap, never a double
            self._write(SENT_FILE, json.dumps(self.sent) + '\n')
        for k, (axis, x, values) in enumerate(rows):
            self.run.log({axis: x, **values}, step=first + k)

    def flush(self):
        if self.tensorboard is not None:
            self.tensorboard.flush()
        self._send()

    def close(self):
        if self.run is None:
            return
        self._send()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.run.finish()
        self.run = None
