"""``--output_dir``'s own files besides the checkpoints: the lock that lets one run at a time use the folder, and the
``log.txt`` rows, appended durably and cut back to the point a continued run starts from; and the check, before
anything is computed, that a script's outputs can be written and destroy none of its inputs (``check_outputs``)."""
import datetime
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path

import util.misc as misc
from util.errors import UsageError
from util.training import tracking

LOCK = '.run.lock'
_held = []  # the lock file this process holds open (the lock lasts as long as it is open)


def lock_output_dir(path):
    """Create ``path``, check it is writable, and hold its lock (rank 0; every rank gets the same answer) until
    ``release_output_dir`` (the end of the entry point's ``run_main``) or the end of the process. Returns the open lock
    file."""
    error, handle = None, None
    if misc.is_main_process():
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            handle = open(Path(path) / LOCK, 'a+', encoding='utf-8', errors='replace')  # (its holder's line)
        except OSError as e:
            error = f"--output_dir {path} is not writable ({e.strerror or e})"
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or 'a process that holds its lock'
                handle.close()
                error = (f"--output_dir {path} is in use by another run ({holder}): let it finish or stop it, or "
                         f"pass another --output_dir")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(f"process {os.getpid()} on {socket.gethostname()}, started "
                             f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
                handle.flush()
                _held.append(handle)
    if misc.get_world_size() > 1:
        error = misc.all_gather(error)[0]
    if error:
        raise UsageError(error)
    return handle


def release_output_dir():
    """Let go of the --output_dir lock this process holds, if any."""
    while _held:
        _held.pop().close()


def probe_write(folder):
    """Make and remove a file in ``folder``: raises the OSError a write there would (read-only or immutable
    folders and full quotas too, which no permission bit shows to root)."""
    fd, probe = tempfile.mkstemp(prefix='.write-check-', dir=folder)
    os.close(fd)
    os.remove(probe)


def check_outputs(paths, flag, inputs=(), folder=False):
    """Refuse in one line (``UsageError``, naming ``flag``) an output that cannot be written, checked before any model
    is loaded or anything computed: ``paths`` (files, or with ``folder`` folders to write into, created later if
    absent) whose nearest existing folder is a file or is not writable (a file is made and removed there, so that
    read-only or immutable folders and full quotas fail here, for root too), a file where a folder is meant or the
    reverse, a read-only file; and an output that is one of ``inputs`` (``(flag, path)`` pairs: the same file by
    any name, symbolic or hard link included), which writing would destroy."""
    taken = {}
    for what, path in inputs:
        try:
            st = os.stat(path)
        except (OSError, TypeError, ValueError):  # (none, a URL, or a missing file: its own check says so)
            continue
        taken.setdefault((st.st_dev, st.st_ino), (what, path))
    probed = set()
    for path in paths:
        path = str(path)
        if not path:
            raise UsageError(f"{flag} is empty; give a {'folder' if folder else 'file name'}")
        if folder and os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a file; give a folder")
        if not folder and os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder; give a file name")
        existing = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
        if existing not in probed:
            try:
                probe_write(existing)
            except OSError as e:
                raise UsageError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None
            probed.add(existing)
        if folder or not os.path.isfile(path):
            continue
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in taken:
            what, given = taken[(st.st_dev, st.st_ino)]
            linked = ', by a link' if os.path.abspath(path) != os.path.abspath(given) else ''
            raise UsageError(f"{flag} {path} is {what} {given} (the same file{linked}): writing it would destroy that "
                             f"input; give another {flag}")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} is read-only")


def move_log_rows_after(output_dir, last_epoch):
    """Move the ``log.txt`` rows of epochs after ``last_epoch`` (and any row cut short by a kill) to a side file
    named on the console, so that the run continued from that epoch neither duplicates nor loses rows (rank 0;
    nothing without --output_dir)."""
    # A damaged log.txt (bytes that are not UTF-8, a row that is not a JSON object of a numbered epoch, a row that
    # is not JSON before the last) is set aside whole under another name and rebuilt from its readable rows up to
    # last_epoch: the run goes on, nothing is lost.
    path = os.path.join(output_dir, 'log.txt')
    if not (output_dir and misc.is_main_process() and os.path.isfile(path)):
        return
    with open(path, 'rb') as f:
        lines = f.read().split(b'\n')
    if lines[-1] == b'':
        lines.pop()
    kept, moved, damage = [], [], []
    for number, raw in enumerate(lines, 1):
        row, why = read_log_row(raw)
        if why is None:
            (kept if row.get('epoch', -1) <= last_epoch else moved).append(raw.decode('utf-8') + '\n')
        elif why == 'not JSON' and number == len(lines):  # a row cut short by a kill
            moved.append(raw.decode('utf-8') + '\n')
        else:
            damage.append(f"line {number}: {why}")
    if damage:
        side = set_aside(path)
        _write_rows(output_dir, kept)
        print(f"Note: {path} is damaged ({len(damage)} unreadable row(s), {damage[0]}): set aside as {side}; "
              f"log.txt rebuilt from its {len(kept)} readable row(s) up to epoch {last_epoch}")
        return
    if not moved:
        return
    side = os.path.join(output_dir, f"log-moved-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.txt")
    with open(side, 'w', encoding='utf-8') as f:
        f.writelines(moved)
    _write_rows(output_dir, kept)
    print(f"Note: moved {len(moved)} log.txt row(s) written after the point this run starts from to {side}")


def set_aside(path):
    """Rename a damaged bookkeeping file to ``<path>.damaged-<time>-<pid>`` (kept as it was, every byte: never
    deleted) and return the new name."""
    side = f"{path}.damaged-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    os.rename(path, side)
    return side


def read_log_row(raw):
    """``(row, None)`` for a readable ``log.txt`` row (the bytes of one line), else ``(None, what is wrong)``."""
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        return None, 'not UTF-8'
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None, 'not JSON'
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    epoch = row.get('epoch', -1)
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return None, f"epoch {epoch!r} is not a number"
    return row, None


def _write_rows(output_dir, rows):
    tmp = os.path.join(output_dir, '.log.txt.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(rows)
    os.replace(tmp, os.path.join(output_dir, 'log.txt'))


def append_log(output_dir, stats, log_writer=None):
    """An epoch's row in ``log.txt`` (rank 0; nothing without --output_dir), on disk before its checkpoint is
    written, after TensorBoard's points so far (as the reference)."""
    if not (output_dir and misc.is_main_process()):
        return
    if log_writer is not None:
        log_writer.flush()
    with open(os.path.join(output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tracking.send_epoch_row(log_writer, stats)  # [new] --wandb_project: the row in W&B too


