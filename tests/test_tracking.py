"""[new] --wandb_project: the TensorBoard scalars and the log.txt rows also in W&B, at the same x; a resumed run
continues the same W&B run and sends no point twice. Real offline runs of wandb (WANDB_MODE=offline), read back
from the files wandb writes (util/training/tracking.py's docstring says what goes where)."""
import glob
import json
import struct
import sys

import pytest

import main_pretrain
from conftest import TINY, read_log, resume_argv, run_in_process, run_script, run_with_fault, tb_scalars

wandb = pytest.importorskip('wandb')


def offline_records(wandb_dir):
    """The records of every offline run under ``wandb_dir`` in the order written: [(run id, kind, fields)], read
    from wandb's .wandb files (a LevelDB-style log of protobuf ``Record``s after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    found = []
    for path in sorted(glob.glob(f'{wandb_dir}/wandb/offline-run-*/run-*.wandb')):  # (time-stamped: in run order)
        data, pos, chunk = open(path, 'rb').read(), 7, b''
        assert data[:4] == b':W&B'
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
            if kind == 0:
                break
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or its last piece
                record = pb.Record()
                record.ParseFromString(chunk)
                chunk = b''
                which = record.WhichOneof('record_type')
                if which == 'history':
                    found.append((path, 'history', {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
                                                   for i in record.history.item}))
                elif which == 'run':
                    found.append((path, 'run', record.run.run_id))
                    found.append((path, 'config', {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
                                                   for i in record.run.config.update}))
                elif which == 'config':
                    found.append((path, 'config', {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
                                                   for i in record.config.update}))
    return found


def history(records):
    return [fields for _, kind, fields in records if kind == 'history']


def wandb_env(tmp_path):
    return {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path / 'wandb_dir'), 'WANDB_SILENT': 'true'}


def points(rows, tag, axis):
    return [[row[axis], row[tag]] for row in rows if tag in row]


def assert_same_points(ours, tensorboard):
    assert [x for x, _ in ours] == [x for x, _ in tensorboard]
    assert [v for _, v in ours] == pytest.approx([v for _, v in tensorboard], rel=1e-6)  # (TensorBoard: float32)


def assert_like_tensorboard_and_log(rows, out):
    """W&B holds TensorBoard's curves at TensorBoard's steps, and log.txt's rows at their epochs, each once."""
    scalars = tb_scalars(out)
    for tag in ('train_loss', 'lr'):
        assert_same_points(points(rows, tag, 'epoch_1000x'), scalars[tag])
    epochs = [row for row in rows if 'epoch' in row]
    logged = read_log(out)
    assert [row['epoch'] for row in epochs] == [r['epoch'] for r in logged]
    for row, line in zip(epochs, logged):
        assert {k: row[f'epoch/{k}'] for k in line if k != 'epoch'} == pytest.approx(
            {k: v for k, v in line.items() if k != 'epoch'}, rel=1e-6)
    assert [row['_step'] for row in rows] == list(range(len(rows)))  # W&B's own step: one per row, never back


@pytest.mark.slow
def test_a_run_logs_its_curves_rows_and_flags_to_wandb(tmp_path):
    out, env = tmp_path / 'out', wandb_env(tmp_path)
    ran = run_script(*resume_argv(out, '--wandb_project', 'mae-test', '--knn_every', '1', '--knn_data_path', TINY),
                     env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    records = offline_records(env['WANDB_DIR'])
    run_id = (out / 'wandb_id.txt').read_text().strip()
    assert {r for _, kind, r in records if kind == 'run'} == {run_id}
    rows = history(records)
    assert len(points(rows, 'train_loss', 'epoch_1000x')) == 3 * 8  # every optimizer step of 3 epochs
    assert_like_tensorboard_and_log(rows, out)
    # the kNN monitor's points, as TensorBoard has them (x: the epoch)
    assert_same_points(points(rows, 'knn_top1', 'epoch'), tb_scalars(out)['knn_top1'])
    # the run's flags (those of args.yaml) as its config
    config = {}
    for _, kind, fields in records:
        config.update(fields if kind == 'config' else {})
    assert config['model'] == 'mae_vit_tiny_patch4' and config['batch_size'] == 2 and config['epochs'] == 3
    assert 'output_dir' not in config and config['lr'] is None and config['blr'] == 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('fault', ['stop:11', 'step:1:5'])  # asked to stop in epoch 1 (SIGUSR1); killed in epoch 1
def test_a_resumed_run_continues_the_same_wandb_run_without_a_point_twice(tmp_path, fault):
    out, env = tmp_path / 'out', wandb_env(tmp_path)
    argv = resume_argv(out, '--wandb_project', 'mae-test', '--save_every_iters', '2')
    stopped = run_with_fault(fault, argv, env=env)
    assert stopped.returncode != 0
    resumed = run_script(*argv, env=env)
    assert resumed.returncode == 0 and 'Auto-resume' in resumed.stdout, resumed.stderr[-3000:]
    records = offline_records(env['WANDB_DIR'])
    assert {r for _, kind, r in records if kind == 'run'} == {(out / 'wandb_id.txt').read_text().strip()}
    rows = history(records)
    xs = [row['epoch_1000x'] for row in rows if 'epoch_1000x' in row]
    assert len(xs) == len(set(xs))  # no optimizer step twice
    assert [row['_step'] for row in rows] == sorted(row['_step'] for row in rows)  # W&B's step never goes back
    if fault.startswith('stop'):  # the stopped process sent all it had: W&B has the whole run, each point once
        assert len({path for path, _, _ in records}) == 2 and len(xs) == 3 * 8
        assert_like_tensorboard_and_log(rows, out)
    else:  # a killed process loses what wandb had not written yet; the resumed one sends from where it goes on
        resumed_rows = history([r for r in records if r[0] == max(path for path, _, _ in records)])
        sent = [row['epoch_1000x'] for row in resumed_rows if 'epoch_1000x' in row]
        assert sent == list(range(1500, 3000, 125))  # (from its checkpoint at iteration 4 of epoch 1)


def test_without_wandb_installed_it_says_how_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # (import wandb then fails as where it is not installed)
    code, err = run_in_process(main_pretrain, capsys, '--data_path', TINY, '--output_dir', tmp_path / 'out',
                               '--device', 'cpu', '--wandb_project', 'mae-test')
    assert code == 2 and err.strip() == ("error: --wandb_project needs the wandb package, which is not installed: "
                                         "pip install wandb")
    assert not (tmp_path / 'out').exists()
