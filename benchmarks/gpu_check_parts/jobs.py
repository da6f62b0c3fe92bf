"""Running the check's jobs: each script in a subprocess with a time limit (``Runner``, ``Job``), jobs that wait
for others side by side (``Graph``), each part's deadline (``Budget``)."""
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from .plan import ROOT, SHARES


class Job:
    """What one subprocess did: its command, exit code (None: stopped at its time limit), seconds, output."""

    def __init__(self, name, argv):
        self.name, self.argv = name, [str(a) for a in argv]
        self.rc, self.seconds, self.timed_out, self.killed, self.output, self.note = None, 0.0, False, False, '', ''

    @property
    def ok(self):
        return self.rc == 0

    def tail(self, lines=25):
        return '\n'.join(self.output.rstrip().splitlines()[-lines:])

    def summary(self):
        state = ('stopped at its time limit' if self.timed_out else 'killed (SIGKILL) as planned' if self.killed
                 else f'exit code {self.rc}')
        return f'{state}, {self.seconds:.1f} s' + (f'; {self.note}' if self.note else '')

    def to_json(self):
        return dict(name=self.name, command=' '.join(self.argv), rc=self.rc, seconds=round(self.seconds, 2),
                    timed_out=self.timed_out, killed=self.killed, note=self.note,
                    **({} if self.ok or self.killed else {'tail': self.tail()}))


class Runner:
    """Starts the scripts as subprocesses (each in its own process group, so that a kill or a time limit ends what
    it started too: DataLoader workers, inductor's compile workers; in this script's session, so that whatever ends
    this script's session ends them too), keeps their output under ``work/logs`` and the end of it in
    ``logs.txt``."""

    def __init__(self, work, log_file, env):
        self.logs, self.log_file, self.env = Path(work) / 'logs', Path(log_file), env
        self.logs.mkdir(parents=True, exist_ok=True)
        self.lock, self.live = threading.Lock(), {}  # pid -> tag

    def run(self, name, argv, timeout, env=None, kill_after=None, tag=''):
        """Run ``python argv...`` from the repository root for at most ``timeout`` seconds. ``kill_after=(path,
        n)``: SIGKILL it as soon as ``path`` has been replaced for the n-th time (a new file: inode and mtime)."""
        job = Job(name, [sys.executable] + list(argv))
        if timeout < 1:
            job.note = 'not started: no time left in its part\'s budget'
            return job
        log = self.logs / f'{name}.txt'
        start = time.monotonic()
        with open(log, 'wb') as out:
            group = dict(process_group=0) if sys.version_info >= (3, 11) else dict(start_new_session=True)
            proc = subprocess.Popen(job.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(self.env, **(env or {})), **group)
            with self.lock:
                self.live[proc.pid] = tag
            seen = set()
            try:
                while proc.poll() is None:
                    if time.monotonic() - start > timeout:
                        self.kill(proc.pid)
                        job.timed_out = True
                        break
                    if kill_after:
                        try:
                            st = os.stat(kill_after[0])
                            seen.add((st.st_ino, st.st_mtime_ns))
                        except FileNotFoundError:
                            pass
                        if len(seen) >= kill_after[1]:
                            self.kill(proc.pid)
                            job.killed = True
                            job.note = f'killed {time.monotonic() - start:.1f} s in, after checkpoint write {len(seen)}'
                            break
                    time.sleep(0.005 if kill_after else 0.1)
                proc.wait()
            finally:
                with self.lock:
                    self.live.pop(proc.pid, None)
        job.rc = None if job.timed_out else proc.returncode
        job.seconds = time.monotonic() - start
        job.output = log.read_text(errors='replace')
        if kill_after and not job.killed and not job.timed_out:
            job.note = f'ended before the kill ({len(seen)} checkpoint writes seen, {kill_after[1]} awaited)'
        with self.lock, open(self.log_file, 'a') as f:
            f.write(f"\n===== {name}: {job.summary()}\n$ {' '.join(job.argv)}\n{job.tail(60)}\n")
        return job

    def kill(self, pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_tagged(self, tag):
        with self.lock:
            pids = [pid for pid, t in self.live.items() if tag is None or t == tag]
        for pid in pids:
            self.kill(pid)


class Budget:
    """Each part ends by its deadline: the start plus the shares of the parts up to it, scaled to --budget."""

    def __init__(self, total, parts):
        self.start = time.monotonic()
        scale = total / sum(SHARES[p] for p in parts)
        ends, self.deadlines = 0.0, {}
        for p in parts:
            ends += SHARES[p] * scale
            self.deadlines[p] = self.start + ends

    def left(self, part):
        return self.deadlines[part] - time.monotonic()


class Graph:
    """Jobs that wait for others, run side by side in ``slots`` at a time."""

    def __init__(self, slots):
        self.slots, self.threads, self.done, self.results = threading.Semaphore(slots), [], {}, {}

    def add(self, name, fn, deps=()):
        self.done[name] = threading.Event()

        def body():
            for d in deps:
                self.done[d].wait()
            try:
                with self.slots:
                    self.results[name] = fn(*(self.results.get(d) for d in deps))
            except Exception:  # noqa: BLE001 (recorded: the other jobs go on)
                self.results[name] = {'error': traceback.format_exc(limit=4)}
            finally:
                self.done[name].set()
        t = threading.Thread(target=body, daemon=True)
        self.threads.append(t)
        t.start()

    def wait(self):
        for t in self.threads:
            t.join()


class PartFailed(Exception):
    def __init__(self, message, tail=''):
        super().__init__(message)
        self.tail = tail
