"""The project's errors, each reported by ``util.training.process.run_main`` as one line and an exit code (no
traceback for a mistake the user can fix), and ``one_line``, that line."""


class UsageError(Exception):
    """A mistake the user can fix (a flag, a path, a file): reported as one line, exit code 2, nothing written."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss): reported as one line, exit code 1."""


class RunInterrupted(Exception):
    """A requested stop (SIGUSR1/SIGTERM, e.g. SLURM's warning before the time limit) after a checkpoint from which
    the run continues was written: reported as one line, exit code 1."""


class RunComplete(Exception):
    """Nothing to do (e.g. the run in --output_dir already finished): reported as one line, exit code 0."""


def one_line(e):
    """The message of ``e`` as one line. An exception raised in a DataLoader worker comes back with the worker's
    traceback in its message; its last line is the message itself."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last
