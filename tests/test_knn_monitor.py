"""The kNN monitor of pre-training (util/evaluation/knn_monitor.py, main_pretrain.py --knn_every): its numbers, and that it
changes nothing else: every other log.txt value, TensorBoard point, weight and random stream is that of a run without
it, and a run with it resumes exactly."""
import random

import numpy as np
import pytest
import torch

import main_pretrain
import models_mae
import util.training.process as process
from conftest import TINY, parsed_args, pretrain_argv, read_log, run_in_process, run_script, run_with_fault, tb_scalars
from util.evaluation import knn_monitor
from util.checkpoints.from_checkpoint import features
from util.evaluation.knn import knn_accuracy

KNN = ['--knn_every', '1', '--knn_data_path', TINY]
KNN_KEYS = ('knn_top1', 'knn_top5', 'knn_mean_top1', 'knn_mean_top5')


def monitor_args(**kwargs):
    args = dict(knn_every=2, knn_data_path=str(TINY), knn_train_subset=0, knn_val_subset=0, epochs=3,
                batch_size=4, num_workers=0, input_size=32, device='cpu', amp='fp16')
    return parsed_args(main_pretrain, **{**args, **kwargs})


def test_monitor_numbers_streams_and_mode():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4().train()
    monitor = knn_monitor.KnnMonitor(monitor_args(), torch.device('cpu'))
    assert [e for e in range(3) if monitor.due(e)] == [1, 2]  # every 2 epochs, and after the last
    assert monitor(model, 0) == {}

    random.seed(1)
    np.random.seed(1)
    streams = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    stats = monitor(model, 1)
    assert torch.equal(torch.get_rng_state(), streams[0]) and (np.random.get_state()[1] == streams[1]).all()
    assert random.getstate() == streams[2] and model.training

    # the same numbers by hand: every image through the encoder, then the classifier
    def embed(split):
        xs, ys = zip(*[split[i] for i in range(len(split))])
        return features(model, torch.stack(xs), ('cls', 'mean')), torch.tensor(ys)
    (train, train_y), (val, val_y) = embed(monitor.train_set), embed(monitor.val_set)
    for pool, prefix in [('cls', 'knn'), ('mean', 'knn_mean')]:
        expected = knn_accuracy(train[pool], train_y, val[pool], val_y, 2)
        assert (stats[f'{prefix}_top1'], stats[f'{prefix}_top5']) == (expected['top1'], expected['top5'])
    assert stats['knn_top5'] == 100.0  # two classes
    assert list(stats) == list(KNN_KEYS)


def test_subsets_are_drawn_by_their_own_generator():
    np.random.seed(3)
    state = np.random.get_state()[1].copy()
    monitor = knn_monitor.KnnMonitor(monitor_args(knn_train_subset=5, knn_val_subset=3), torch.device('cpu'))
    assert (np.random.get_state()[1] == state).all()
    assert len(monitor.train_set) == 5 and len(monitor.val_set) == 3
    again = knn_monitor.KnnMonitor(monitor_args(knn_train_subset=5, knn_val_subset=3), torch.device('cpu'))
    assert monitor.train_set.indices == again.train_set.indices == sorted(monitor.train_set.indices)


def test_off_builds_nothing(tmp_path, monkeypatch):
    """--knn_every 0 (the default): no monitor is built, no folder scanned."""
    monkeypatch.setattr(knn_monitor, 'KnnMonitor', lambda *args: pytest.fail('a kNN monitor was built'))
    process.run_main(main_pretrain.main, main_pretrain.get_args_parser(),
                    [str(a) for a in pretrain_argv(tmp_path, epochs=1)[1:]])
    assert [row['epoch'] for row in read_log(tmp_path)] == [0]


@pytest.mark.parametrize('extra, expected', [
    (['--knn_every', '3'], '--knn_every 3 is larger than --epochs 2'),
    (['--knn_every', '1'], '--knn_data_path is needed'),
    (['--knn_data_path', TINY], '--knn_data_path is for the kNN monitor, which is off: add --knn_every N'),
    (['--knn_every', '1', '--knn_data_path', TINY / 'train'], f"--knn_data_path {TINY / 'train'} has no 'train/' "
                                                               "folder"),
    (['--knn_every', '1', '--knn_data_path', 'VAL_MISSING'], "has no 'val/' folder"),
    (['--knn_every', '-1'], '--knn_every must be 0 (off) or at least 1'),
    (['--knn_every', '1', '--knn_data_path', TINY, '--knn_val_subset', '-2'],
     '--knn_val_subset must be 0 (all) or at least 1'),
])
def test_bad_flags_are_one_line_before_anything_runs(tmp_path, capsys, extra, expected):
    if 'VAL_MISSING' in extra:
        (tmp_path / 'knn' / 'train' / 'a').mkdir(parents=True)
        extra = [str(tmp_path / 'knn') if a == 'VAL_MISSING' else a for a in extra]
    out = tmp_path / 'out'
    code, err = run_in_process(main_pretrain, capsys, *pretrain_argv(out, *extra)[1:])
    assert code == 2 and err.count('\n') == 1 and expected in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- end to end
def without_knn(rows):
    return [{k: v for k, v in row.items() if k not in KNN_KEYS} for row in rows]


@pytest.mark.slow
def test_the_monitor_changes_no_other_number(tmp_path):
    off, on = tmp_path / 'off', tmp_path / 'on'
    for out, extra in [(off, []), (on, KNN)]:
        r = run_script(*pretrain_argv(out, *extra))
        assert r.returncode == 0, r.stderr[-2000:]
    rows_on = read_log(on)
    assert without_knn(rows_on) == read_log(off)
    assert all(set(KNN_KEYS) <= set(row) for row in rows_on)
    scalars_on, scalars_off = tb_scalars(on), tb_scalars(off)
    assert {k: v for k, v in scalars_on.items() if k not in KNN_KEYS} == scalars_off
    assert [[s, v] for s, v in scalars_on['knn_top1']] == [[e, row['knn_top1']] for e, row in enumerate(rows_on)]
    a, b = (torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True) for out in (off, on))
    assert all(torch.equal(v, b['model'][k]) for k, v in a['model'].items())
    assert all(torch.equal(x, y) for x, y in zip(a['rng'][0]['torch'], b['rng'][0]['torch']))
    assert 'kNN monitor after epoch 1: top-1' in r.stdout and 's\n' in r.stdout.split('kNN monitor after epoch 1')[1]


@pytest.mark.slow
def test_resume_with_the_monitor_on_is_exact(tmp_path):
    def argv(out):
        return pretrain_argv(out, *KNN, '--save_every_iters', '2', epochs=3, batch_size=2)
    whole = tmp_path / 'whole'
    r = run_script(*argv(whole))
    assert r.returncode == 0, r.stderr[-2000:]
    crashed = run_with_fault('step:1:3', argv(tmp_path / 'resumed'))
    assert crashed.returncode == -9
    resumed = run_script(*argv(tmp_path / 'resumed'))
    assert resumed.returncode == 0 and 'Resuming epoch 1 at iteration 2' in resumed.stdout, resumed.stderr[-2000:]
    assert (tmp_path / 'resumed' / 'log.txt').read_text() == (whole / 'log.txt').read_text()
    assert tb_scalars(tmp_path / 'resumed') == tb_scalars(whole)


def test_the_flags_are_marked_new_and_off_by_default():
    parser = main_pretrain.get_args_parser()
    actions = {a.dest: a for a in parser._actions if a.dest.startswith('knn_')}
    assert sorted(actions) == ['knn_data_path', 'knn_every', 'knn_train_subset', 'knn_val_subset']
    assert all(a.help.startswith('[new]') for a in actions.values())
    assert parser.parse_args([]).knn_every == 0
