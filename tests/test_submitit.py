"""submitit_*.py without a cluster: the generated SLURM job (a fake sbatch), a tiny pre-training run by submitit's
local executor, the requeue path (checkpoint(), and a real signal: save, requeue, resume, same log), and the message
when submitit is missing."""
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from conftest import TINY, read_log, run_script

submitit = pytest.importorskip("submitit")

import submitit_finetune  # noqa: E402
import submitit_linprobe  # noqa: E402
import submitit_pretrain  # noqa: E402
import util.slurm.submitit_job as submitit_job  # noqa: E402
import util.slurm.submitit_trainer as submitit_trainer  # noqa: E402
from util.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts



def tiny_args(job_dir, *extra, epochs=2):
    return submitit_pretrain.parse_args([
        '--ngpus', '1', '--nodes', '1', '--job_dir', str(job_dir),
        '--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--epochs', str(epochs),
        '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', '0', '--data_path', str(TINY), *extra])


def wait_for(job, timeout=240):
    deadline = time.time() + timeout
    while job.state == 'RUNNING':
        if time.time() > deadline:
            job.cancel()
            pytest.fail(f"job {job.job_id} still running after {timeout} s:\n{job.stdout()}\n{job.stderr()}")
        time.sleep(0.2)


def run_local(job_dir, *extra):
    job = submitit_job.submit(tiny_args(job_dir, *extra), 'main_pretrain', cluster='local')
    wait_for(job)
    return job, Path(str(job_dir).replace('%j', job.job_id))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    job, out = run_local(tmp_path_factory.mktemp('local') / '%j')
    return job, out


# ---------------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize('script', [submitit_pretrain, submitit_finetune, submitit_linprobe])
def test_reference_flags(script):
    try:
        args = script.parse_args(['--data_path', 'x'])
    except UsageError as e:  # a trainer that is not written yet
        pytest.skip(str(e))
    assert (args.ngpus, args.nodes, args.timeout, args.job_dir, args.partition, args.use_volta32, args.comment) == \
        (8, 2, 4320, '', 'learnfair', False, '')
    assert args.data_path == 'x' and hasattr(args, 'dist_url') and hasattr(args, 'auto_resume')


def test_shared_folder(tmp_path, monkeypatch):
    assert submitit_job.get_shared_folder(str(tmp_path / 'exp' / '%j')) == tmp_path / 'exp'
    assert submitit_job.get_shared_folder(str(tmp_path / 'run1')) == tmp_path / 'run1'
    monkeypatch.setattr(submitit_job, 'CHECKPOINT_ROOT', tmp_path / 'checkpoint')
    with pytest.raises(UsageError, match="no shared folder for the job: .* pass --job_dir"):
        submitit_job.get_shared_folder('')
    (tmp_path / 'checkpoint').mkdir()
    monkeypatch.setenv('USER', 'someone')
    assert submitit_job.get_shared_folder('') == tmp_path / 'checkpoint' / 'someone' / 'experiments'
    init = submitit_job.get_init_file(tmp_path / 'exp')
    assert init.parent == tmp_path / 'exp' and not init.exists() and init.name.endswith('_init')


def test_no_shared_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(submitit_job, 'CHECKPOINT_ROOT', tmp_path / 'checkpoint')
    with pytest.raises(SystemExit) as e:
        submitit_pretrain.main(['--data_path', str(TINY), '--batch_size', '1'])  # (1 image per process of 16)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no shared folder for the job") and err.count('\n') == 1


def test_local_executor_refuses_several_nodes(tmp_path):
    args = tiny_args(tmp_path / '%j', '--nodes', '2')
    with pytest.raises(UsageError, match="local executor: .*one node"):
        submitit_job.submit(args, 'main_pretrain', cluster='local')


def test_missing_submitit_message(tmp_path):
    code = ("import runpy, sys; sys.modules['submitit'] = None; "
            f"sys.argv = ['submitit_pretrain.py', '--job_dir', {str(tmp_path / '%j')!r}]; "
            "runpy.run_path('submitit_pretrain.py', run_name='__main__')")
    result = run_script('-c', code, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: submitit is not installed: pip install submitit"


# ---------------------------------------------------------------------------------------------------- SLURM job
def test_generated_slurm_job(tmp_path, monkeypatch):
    """A fake ``sbatch`` records the job submitit generates for the reference's flags."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, body in [('srun', 'exit 0'), ('sbatch', 'echo "Submitted batch job 4242"')]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv('PATH', f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pythonpath = os.environ.get('PYTHONPATH')
    args = submitit_pretrain.parse_args([
        '--job_dir', str(tmp_path / 'jobs' / '%j'), '--use_volta32', '--comment', 'deadline',
        '--data_path', str(TINY), '--model', 'mae_vit_tiny_patch4', '--batch_size', '1'])  # (16 images, 16 tasks)
    job = submitit_job.submit(args, 'main_pretrain')
    assert job.job_id == '4242'
    assert os.environ.get('PYTHONPATH') == pythonpath  # restored after the submission
    sbatch = job.paths.submission_file.read_text()
    for line in ['#SBATCH --nodes=2', '#SBATCH --gpus-per-node=8', '#SBATCH --ntasks-per-node=8',
                 '#SBATCH --cpus-per-task=10', '#SBATCH --mem=320GB', '#SBATCH --time=4320',
                 '#SBATCH --partition=learnfair', '#SBATCH --signal=USR2@120', '#SBATCH --constraint=volta32gb',
                 '#SBATCH --comment=deadline', '#SBATCH --job-name=mae']:
        assert line in sbatch.splitlines(), (line, sbatch)
    assert 'submitit.core._submit' in sbatch
    # the pickled job: our Trainer, with a file:// init in the shared folder and the job folder as output
    delayed = submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle)
    trainer = delayed.function
    assert isinstance(trainer, submitit_trainer.Trainer) and trainer.module == 'main_pretrain'
    assert trainer.args.output_dir == str(tmp_path / 'jobs' / '%j')
    assert trainer.args.dist_url.startswith('file://' + str(tmp_path / 'jobs') + '/')
    assert delayed._timeout_countdown == 30  # slurm_max_num_timeout


# ---------------------------------------------------------------------------------------------------- requeue path
def test_checkpoint_returns_fresh_submission(tmp_path):
    args = tiny_args(tmp_path / '%j', '--no_auto_resume')
    job = submitit_job.submit(args, 'main_pretrain', cluster='debug')  # the debug executor runs nothing until asked
    trainer = job.submission().function
    assert isinstance(trainer, submitit_trainer.Trainer)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    new = delayed.function
    assert isinstance(new, submitit_trainer.Trainer) and new is not trainer and new.module == 'main_pretrain'
    assert new.args.dist_url != trainer.args.dist_url and new.args.dist_url.startswith('file://')
    init = Path(new.args.dist_url[len('file://'):])
    assert init.parent == tmp_path and not init.exists()
    assert new.args.output_dir == trainer.args.output_dir
    assert new.args.resume == '' and new.args.auto_resume is True and trainer.args.auto_resume is False
    # what submitit does with it: pickle it over the job's pickle and load it in the requeued job
    delayed.dump(tmp_path / 'requeued.pkl')
    again = submitit.helpers.DelayedSubmission.load(tmp_path / 'requeued.pkl').function
    assert vars(again.args) == vars(new.args)


def test_local_job_runs_to_completion(uninterrupted):
    job, out = uninterrupted
    assert job.result() is None
    rows = read_log(out)
    assert [r['epoch'] for r in rows] == [0, 1]
    assert (out / 'checkpoint-1.pth').exists() and (out / 'checkpoint-last.pth').exists()
    assert "Process group: 1 tasks, rank: 0" in job.stdout()


def task_pids(controller_pid):
    """The task processes submitit's local controller started."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            stat_fields = Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()
            cmdline = Path(f'/proc/{entry}/cmdline').read_bytes()
        except OSError:
            continue
        if int(stat_fields[1]) == controller_pid and b'submitit.core._submit' in cmdline:
            pids.append(int(entry))
    return pids


def submit_and_wait_for_handlers(tmp_path):
    """Submit the tiny run to the local executor; return once its task has taken the stop signals over (then a
    signal stops it at the end of its first training step at the latest)."""
    job = submitit_job.submit(tiny_args(tmp_path / '%j'), 'main_pretrain', cluster='local')
    out = tmp_path / job.job_id
    stdout = out / f'{job.job_id}_0_log.out'
    deadline = time.time() + 120
    while not (stdout.exists() and 'Stop handlers installed' in stdout.read_text()):
        assert job.state == 'RUNNING' and time.time() < deadline, job.stderr()
        time.sleep(0.02)
    return job, out


@pytest.mark.skipif(not Path('/proc').is_dir(), reason="finds the task process through /proc")
def test_signal_saves_requeues_and_resumes_exactly(tmp_path, uninterrupted):
    """submitit's pre-timeout signal in the middle of training: the checkpoint is written, the job requeues
    itself, and the requeued job continues to the same log as the uninterrupted run."""
    _, reference_out = uninterrupted
    job, out = submit_and_wait_for_handlers(tmp_path)
    pids = task_pids(int(job.job_id))
    assert len(pids) == 1
    sig = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG)
    os.kill(pids[0], sig)
    wait_for(job)
    assert job.result() is None
    log = job.stdout()
    assert log.count('Stop handlers installed') == 2, log  # started twice
    assert f"Run interrupted (signal {int(sig)} here)" in log and 'Requeuing ' in log, log
    assert f"Auto-resume: continuing from {out / 'checkpoint-last.pth'}" in log, log
    assert read_log(out) == read_log(reference_out)


@pytest.mark.skipif(not Path('/proc').is_dir(), reason="finds the task process through /proc")
def test_sigterm_saves_and_stops_without_requeue(tmp_path):
    """SIGTERM (scancel, or a preemption SLURM requeues by itself): save and stop, no requeue."""
    job, out = submit_and_wait_for_handlers(tmp_path)
    os.kill(task_pids(int(job.job_id))[0], signal.SIGTERM)
    wait_for(job)
    with pytest.raises(Exception, match="RunInterrupted"):
        job.result()
    log = job.stdout()
    assert f"Run interrupted (signal {int(signal.SIGTERM)} here)" in log and 'Requeuing' not in log, log
    assert log.count('Stop handlers installed') == 1
    assert (out / 'checkpoint-last.pth').exists()
