"""The project's errors, and how an entry point reports them: ``run_main`` parses the command line, runs ``main``
and turns each error into one line and an exit code (no traceback for a mistake the user can fix)."""
import sys

import util.misc as misc


class UsageError(Exception):
    """A mistake the user can fix (a flag, a path, a file): reported as one line, exit code 2, nothing written."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss): reported as one line, exit code 1."""


class RunInterrupted(Exception):
    """A requested stop (SIGUSR1/SIGTERM, e.g. SLURM's warning before the time limit) after a checkpoint from which
    the run continues was written: reported as one line, exit code 1."""


class RunComplete(Exception):
    """Nothing to do (e.g. the run in --output_dir already finished): reported as one line, exit code 0."""


AT_MAIN_EXIT = []  # what to call when the entry point's ``main`` returns or fails (e.g. letting go of a lock)


def one_line(e):
    """The message of ``e`` as one line. An exception raised in a DataLoader worker comes back with the worker's
    traceback in its message; its last line is the message itself."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run_main(main, parser, argv=None):
    """Parse the command line with ``parser`` (plus ``-h/--help``: the parsers are built without it, as the
    reference's, so that the submitit scripts can extend them) and run the entry point's ``main(args)``. A
    ``UsageError`` becomes one line on stderr and exit code 2, a ``TrainingStopped`` or ``RunInterrupted`` one line
    and exit code 1, a ``RunComplete`` one line on stdout and exit code 0, a second Ctrl-C one line and exit code
    130."""
    parser.add_argument('-h', '--help', action='help', help='show this help message and exit')
    args = parser.parse_args(argv)
    try:
        main(args)
    except RunComplete as e:
        print(one_line(e))
    except (UsageError, TrainingStopped, RunInterrupted) as e:
        if misc.is_main_process() or not isinstance(e, RunInterrupted):  # every rank stops together: say it once
            sys.stderr.write(f"{'stopped' if isinstance(e, RunInterrupted) else 'error'}: {one_line(e)}\n")
            sys.stderr.flush()
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves and stops at the next optimizer step)
        sys.stderr.write("stopped: interrupted (Ctrl-C twice), nothing saved since the last checkpoint\n")
        sys.exit(130)
    finally:
        while AT_MAIN_EXIT:
            AT_MAIN_EXIT.pop()()
        misc.shutdown_distributed()
