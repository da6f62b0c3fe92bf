"""Run an entry point with a fault injected from outside the production code, for the crash tests:

    python tests/faults.py FAULT SCRIPT.py [flags...]      (also as the script of torchrun)

FAULT is ``step:E:I`` (the process kills itself right after optimizer step I of epoch E), ``save:N`` (it kills
itself during its N-th checkpoint write: the temporary file complete, not yet renamed) or ``stop:N`` (a stop is
requested, as SIGUSR1 does, at its N-th optimizer step). The signal is SIGKILL, or $FAULT_SIGNAL (e.g. TERM). INT
goes to the whole process group, DataLoader workers included, as a terminal's Ctrl-C does (run the script in a
session of its own); INT2 is Ctrl-C pressed twice.
"""
import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import util.training.process as process  # noqa: E402
import util.misc as misc  # noqa: E402
from util.checkpoints.saver import CheckpointSaver  # noqa: E402

fault, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
kind, *where = fault.split(':')
where = [int(w) for w in where]
sig_name = os.environ.get('FAULT_SIGNAL', 'KILL')
sig = getattr(signal, 'SIG' + sig_name.rstrip('2'))


def send_fault_signal():
    if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole foreground process group
        for _ in range(2 if sig_name == 'INT2' else 1):
            os.killpg(os.getpgrp(), sig)
    else:
        os.kill(os.getpid(), sig)
save_or_stop, replace, steps, writes = CheckpointSaver.save_or_stop, os.replace, [0], [0]


def faulty_save_or_stop(self, epoch, next_iter, metric_logger):
    steps[0] += 1
    if kind == 'step' and [epoch, next_iter] == where:
        send_fault_signal()
    if kind == 'stop' and steps[0] == where[0]:
        misc.request_stop(signal.SIGUSR1)
    return save_or_stop(self, epoch, next_iter, metric_logger)


def faulty_replace(src, dst):
    # a checkpoint write renames its temporary file over the checkpoint; a second name of a finished checkpoint
    # (checkpoint-last.pth as a hard link of checkpoint-<epoch>.pth) is not a write
    if kind == 'save' and os.path.basename(str(src)).startswith('.checkpoint-') and os.stat(src).st_nlink == 1:
        writes[0] += 1
        if writes[0] == where[0]:
            send_fault_signal()
    return replace(src, dst)


CheckpointSaver.save_or_stop = faulty_save_or_stop
os.replace = faulty_replace
module = importlib.import_module(Path(script).stem)
process.run_main(module.main, module.get_args_parser(), argv)
