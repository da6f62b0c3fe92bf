"""Running the plan: each run here, one after the other, or submitted as a SLURM job (paper scale), with its progress.

The runner owns ``timings.json`` (the compute each run took here, summed over its attempts) and ``jobs.json`` (the
SLURM job of each submitted run) in the work dir; it sets each run's ``status``, ``message``, ``seconds`` and
``job_id`` for the reports.
"""
import datetime
import json
import os
import signal
import subprocess
import time

from studies.plan import REPO, command, is_number, shown
from studies.recipes import EVALUATIONS
from util.errors import RunInterrupted
from util.training.output_dir import set_aside


def relative_cost(run):
    """A run's cost in units of one epoch of baseline pre-training, for the estimate of the time left: the encoder
    sees (1 - mask_ratio) of the patches (and attention is quadratic in them); an evaluation's is its kind's
    (EVALUATIONS: per epoch, or per run for the frozen-feature ones). Rough, but only ratios matter."""
    if run.kind == 'pretrain':
        visible = 1 - float(run.flags.get('mask_ratio', 0.75))
        return run.epochs * (0.5 + 3 * visible ** 2) / (0.5 + 3 * 0.25 ** 2)
    return (run.epochs if run.trains else 1) * EVALUATIONS[run.kind].cost


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """Elapsed time and an estimate of the time left: the runs left, at the speed measured so far for runs of their
    kind (or of any kind, for a kind not run yet)."""

    def __init__(self, todo):
        self.start = time.time()
        self.left = list(todo)
        self.done = {}  # kind -> [cost, seconds]

    def skipped(self, run):
        self.left.remove(run)

    def finished(self, run, took):
        self.left.remove(run)
        done = self.done.setdefault(run.kind, [0.0, 0.0])
        done[0] += relative_cost(run)
        done[1] += took

    def line(self):
        elapsed = f"elapsed {fmt_time(time.time() - self.start)}"
        if not self.done:
            return elapsed
        overall = sum(t for _, t in self.done.values()) / sum(c for c, _ in self.done.values())
        left = 0.0
        for run in self.left:
            cost, took = self.done.get(run.kind, (0.0, 0.0))
            left += relative_cost(run) * (took / cost if cost else overall)
        return f"{elapsed}, about {fmt_time(left)} left"


def seconds_value(value):
    return is_number(value) and value >= 0


def job_id_value(value):
    return isinstance(value, str) and bool(value.strip())


def read_json(path, valid):
    """The {run folder: value} of one of the runner's files (``timings.json``: seconds; ``jobs.json``: job ids), {}
    where there is none. A damaged one (not UTF-8 JSON of an object, or values that ``valid`` refuses) is set aside
    under another name, never deleted, and rebuilt from its readable entries, in one line."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode('utf-8'))
    except ValueError as e:  # (UnicodeDecodeError, json.JSONDecodeError)
        data, why = {}, f"not UTF-8 JSON: {e}"
    else:
        if not isinstance(data, dict):
            data, why = {}, f"a JSON {type(data).__name__}, not an object"
        else:
            bad = [k for k, v in data.items() if not valid(v)]
            why = f"{len(bad)} value(s) of another kind, e.g. {bad[0]}: {json.dumps(data[bad[0]])}" if bad else None
            data = {k: v for k, v in data.items() if k not in bad}
    if why is None:
        return data
    try:
        side = set_aside(path)
    except FileNotFoundError:  # another invocation on this work dir set it aside first
        return data
    write_json(path, data)
    print(f"Note: {path} is damaged ({why}): set aside as {side}; rebuilt with its {len(data)} readable entries")
    return data


def write_json(path, data):
    tmp = path.with_suffix(f'.{os.getpid()}.tmp')  # (two invocations on one work dir never share a temporary file)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')
    os.replace(tmp, path)


class Runner:
    """Runs (or submits) the plan's runs cell by cell, skipping the finished ones."""

    def __init__(self, plan, setup):
        self.plan, self.setup = plan, setup
        self.timings_file = setup.work_dir / 'timings.json'
        self.jobs_file = setup.work_dir / 'jobs.json'
        self.timings = read_json(self.timings_file, seconds_value)
        self.jobs = read_json(self.jobs_file, job_id_value)
        for run in plan.runs.values():
            run.seconds = self.timings.get(setup.rel(run.out))
        self.child = None
        self.stop_signal = None

    def _on_signal(self, signum, frame):
        # the child runs in its own session (a Ctrl-C reaches only us): ask it to save and stop, as SLURM would
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run_all(self, on_progress):
        """Every run not finished yet; ``on_progress()`` after each run here (the reports)."""
        runs = list(self.plan.runs.values())
        todo = [r for r in runs if not r.finished()]
        for r in runs:
            if r not in todo:
                r.status = 'done'
        progress = Progress(todo)
        print(f"{len(runs)} runs in {len(self.plan.cells)} cells: {len(runs) - len(todo)} done before, {len(todo)} "
              f"to {'submit' if self.setup.scale.name == 'paper' else 'run'}")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run_cells(progress, on_progress)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_cells(self, progress, on_progress):
        cells = self.plan.cells
        for i, (cell_name, cell_runs) in enumerate(cells, 1):
            for run in cell_runs:
                if run.status != 'todo':
                    continue
                where = f"[cell {i}/{len(cells)} {cell_name}] {run.kind} {self.setup.rel(run.out)}"
                if run.source is not None and run.source.status in ('failed', 'skipped'):
                    run.status, run.message = 'skipped', 'its pre-training failed'
                    progress.skipped(run)
                    print(f"{where}: skipped, its pre-training failed")
                    continue
                if self.setup.scale.name == 'paper':
                    self._submit(run, where)
                    continue
                if self.stop_signal:  # it came between two runs
                    raise RunInterrupted(f"signal {self.stop_signal} received before {self.setup.rel(run.out)} "
                                         f"started; the same command continues")
                print(f"{where}: running ({run.describe()}; {progress.line()})", flush=True)
                took = self._run_local(run)
                if self.stop_signal:
                    raise RunInterrupted(f"signal {self.stop_signal} received: {self.setup.rel(run.out)} "
                                         f"{run.message}; the same command continues")
                progress.finished(run, took)
                if run.status == 'failed':
                    print(f"{where}: FAILED after {fmt_time(took)}: {run.message} (see {run.out / 'console.txt'})")
                else:
                    acc = run.accuracy()
                    print(f"{where}: done in {fmt_time(took)}" + (f", top-1 {acc[0]:.2f}" if acc else '')
                          + f"; {progress.line()}", flush=True)
                on_progress()

    def _run_local(self, run):
        run.out.mkdir(parents=True, exist_ok=True)
        if not run.trains and run.result_file.exists():  # there, yet the run is not done: it cannot be read
            side = set_aside(run.result_file)
            print(f"Note: {run.result_file} is damaged (not JSON of an object with a number "
                  f"{EVALUATIONS[run.kind].metric}): set aside as {side}; the evaluation runs again")
        cmd = command(run, self.setup)
        before = checkpoints(run.out)
        start = time.time()
        with open(run.out / 'console.txt', 'a', encoding='utf-8') as console:
            console.write(f"\n$ {shown(cmd)}\n")
            console.flush()
            self.child = subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT,
                                          env=dict(os.environ, PYTHONUNBUFFERED='1'), start_new_session=True)
            code = self.child.wait()
            self.child = None
        took = time.time() - start
        run.seconds = (run.seconds or 0.0) + took
        # read again before writing: another invocation on this work dir (another study, another seed) may have
        # timed its own runs since this one started, and their times stay
        self.timings = dict(read_json(self.timings_file, seconds_value), **{self.setup.rel(run.out): run.seconds})
        write_json(self.timings_file, self.timings)
        if code == 0 and run.finished():
            run.status = 'ran'
        elif self.stop_signal:
            # the entry point saves where it is when asked to stop, unless it had not started training yet
            run.status = 'interrupted'
            if not run.trains:
                run.message = 'stopped (it runs again from the start, in seconds)'
            elif checkpoints(run.out) != before:
                run.message = 'saved where it was'
            elif before:
                run.message = 'saved nothing new (it continues from its last checkpoint)'
            else:
                run.message = 'had nothing saved yet (stopped before its first checkpoint)'
        else:
            run.status, run.message = 'failed', last_message(run.out / 'console.txt', code)
        return took

    def _submit(self, run, where):
        key = self.setup.rel(run.out)
        pending = self.jobs.get(key)
        if pending and slurm_job_alive(pending):
            run.job_id, run.status = pending, 'submitted'
            print(f"{where}: job {pending} is still queued or running; not submitted again")
            return
        run.out.mkdir(parents=True, exist_ok=True)
        cmd = command(run, self.setup)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            run.status = 'failed'
            run.message = (result.stderr.strip().splitlines() or ['no job id printed'])[-1]
            print(f"{where}: NOT submitted: {run.message}")
            return
        run.job_id, run.status = lines[-1].strip(), 'submitted'
        self.jobs[key] = run.job_id
        write_json(self.jobs_file, self.jobs)
        after = f" after job {run.source.job_id}" if run.source is not None and run.source.job_id else ''
        print(f"{where}: submitted as job {run.job_id}{after}")


def checkpoints(folder):
    """The checkpoints in ``folder`` as they are now (name, size and time of each), to tell whether a run wrote one."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob('checkpoint-*.pth')}


def last_message(console, code):
    """The one-line error an entry point printed last (or the last line of its output)."""
    try:
        lines = [line for line in console.read_text(encoding='utf-8', errors='replace').splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith(('error: ', 'stopped: ')):
            return line
    return f"exit code {code}: {lines[-1] if lines else 'no output'}"


def slurm_job_alive(job_id):
    try:
        out = subprocess.run(['squeue', '-h', '-j', str(job_id), '-o', '%T'], capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0 and bool(out.stdout.strip())
