"""benchmarks/gpu_check.py: the GPU check's script, known to work before GPU time is spent on it. Its smoke mode
runs all four parts on the CPU with the tiny models (the kill-and-resume comparison must find bit-identical logs
there); the pieces that decide a verdict (the log comparison, the kill after the n-th checkpoint write, the time
limit) are checked on their own."""
import json
import math
import sys

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / 'benchmarks'))  # where gpu_check.py finds its parts
from gpu_check_parts import correctness, jobs, plan, speed  # noqa: E402


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_log(folder, losses, lrs):
    folder.mkdir()
    rows = [dict(train_lr=lr, train_loss=loss, epoch=k) for k, (loss, lr) in enumerate(zip(losses, lrs))]
    (folder / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return folder


@pytest.mark.parametrize('loss,lr,tol,passed', [
    (1.0005, 1e-4, 1e-3, True),    # within an fp16 tolerance
    (1.002, 1e-4, 1e-3, False),    # a loss 2e-3 away
    (1.0, 1.0001e-4, 1e-3, False),  # the lr is the host's: any difference fails
    (1.0 + 1e-7, 1e-4, 0.0, False),  # fp32 on the CPU: bit-identical or nothing
    (1.1, 1e-4, None, True),       # DALI: losses reported, not judged
])
def test_log_comparison_applies_the_tolerance(tmp_path, loss, lr, tol, passed):
    full = write_log(tmp_path / 'full', [1.2, 1.0], [5e-5, 1e-4])
    resumed = write_log(tmp_path / 'resumed', [1.2, loss], [5e-5, lr])
    result = correctness.compare_runs(full, resumed, tol)
    assert result['passed'] is passed, result
    assert result['max_rel_diff_log'] == pytest.approx(abs(loss - 1.0), abs=1e-12)


def test_log_comparison_fails_on_missing_epochs(tmp_path):
    full = write_log(tmp_path / 'full', [1.2, 1.0], [5e-5, 1e-4])
    resumed = write_log(tmp_path / 'resumed', [1.2], [5e-5])
    result = correctness.compare_runs(full, resumed, 1e-3)
    assert not result['passed'] and 'epochs' in result['problems'][0]


def test_runner_kills_after_the_nth_write_and_stops_at_its_time_limit(tmp_path):
    runner = jobs.Runner(tmp_path / 'work', tmp_path / 'logs.txt', {})
    target = tmp_path / 'ckpt'
    # replaces ``target`` (write to a temporary name, rename) every 0.7 s, 6 times
    writer = ("import os, sys, time\nfor k in range(1, 7):\n    open(sys.argv[1] + '.tmp', 'w').write(str(k))\n"
              "    os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n    time.sleep(0.7)\n")
    job = runner.run('writer', ['-c', writer, target], timeout=60, kill_after=(target, 2))
    assert job.killed and job.rc == -9, job.output
    assert target.read_text() == '2'
    job = runner.run('sleeper', ['-c', 'import time; time.sleep(60)'], timeout=1)
    assert job.timed_out and job.rc is None and job.seconds < 30
    assert '===== writer: killed (SIGKILL) as planned' in (tmp_path / 'logs.txt').read_text()


def test_bench_step_rows_are_parsed():
    text = ("| mae_vit_large_patch16 | 128 | fast | 2542.1 | 50.4 | 412 | 52% | 30.1 GiB |\n"
            "| mae_vit_huge_patch14 | 256 | fast_ckpt | OOM | | | | |\n"
            "matmul peaks measured: float16 780.2 TFLOP/s, bfloat16 791.0 TFLOP/s\n")
    rows, peaks = speed.parse_bench_step(text)
    assert rows[0] == dict(model='mae_vit_large_patch16', batch=128, path='fast', img_s=2542.1, ms=50.4, tflops=412.0,
                           of_peak=0.52, memory_gib=30.1)
    assert rows[1]['oom'] and peaks == {'float16': 780.2, 'bfloat16': 791.0}


def job(rc, output='', killed=False):
    j = jobs.Job('job', ['python', 'x.py'])
    j.rc, j.output, j.killed = rc, output, killed
    return j


def test_a_check_fails_unless_its_job_shows_what_it_should(tmp_path):
    assert correctness.run_check('eval', job(0, 'done\n'), correctness.accuracy_line)['status'] == 'failed'
    assert correctness.run_check('eval', job(1, '* Acc@1 1\n'), correctness.accuracy_line)['status'] == 'failed'
    ok = correctness.run_check('eval', job(0, '[10:00:01] * Acc@1 15.000 Acc@5 45.000 loss 2.303\n'),
                               correctness.accuracy_line)
    assert ok['status'] == 'ok' and ok['detail'] == '* Acc@1 15.000 Acc@5 45.000 loss 2.303'
    full = write_log(tmp_path / 'full', [1.2, 1.0], [5e-5, 1e-4])
    same = write_log(tmp_path / 'same', [1.2, 1.0], [5e-5, 1e-4])
    resumed = job(0, 'Resuming epoch 1 at iteration 8 of 16\n')
    verdict = correctness.kill_check('x', '', 'fp16', job(0), job(-9, killed=True), resumed, full, same)
    assert verdict['status'] == 'ok', verdict
    late = correctness.kill_check('x', '', 'fp16', job(0), job(0), resumed, full, same)  # the run ended first
    assert late['status'] == 'failed' and late['detail'].startswith('the killed run')
    fresh = correctness.kill_check('x', '', 'fp16', job(0), job(-9, killed=True), job(0, 'Auto-resume: ...'), full,
                                   same)  # resumed from an epoch's end, not inside one
    assert fresh['status'] == 'failed' and 'did not resume inside an epoch' in fresh['detail']


@pytest.mark.slow
def test_smoke_run_writes_every_part_and_the_resumed_runs_match(tmp_path):
    out = tmp_path / 'report'
    r = run_script('benchmarks/gpu_check.py', out, '--smoke', timeout=1800)
    md = out / 'report.md'
    assert r.returncode == 0, r.stderr[-3000:] + (md.read_text() if md.exists() else r.stdout[-3000:])
    report = json.loads((out / 'report.json').read_text())
    assert report['mode'] == 'smoke' and report['finished']
    parts = {p['name']: p for p in report['parts']}
    assert list(parts) == ['env', 'correctness', 'steps', 'input']
    assert all(p['status'] == 'ok' for p in parts.values()), [(p['name'], p.get('error')) for p in parts.values()]

    info = parts['env']['info']
    assert info['torch'] and info['gpu'] is None and info['cpu_cores'] >= 1
    assert sorted(info['matmul_tflops']) == ['bf16', 'fp32'] and all(v > 0 for v in info['matmul_tflops'].values())

    checks = parts['correctness']['checks']
    kills = [c for c in checks if 'SIGKILL' in c['check']]
    assert [c['path'] for c in kills] == ['default', 'fast']
    for c in kills:
        full, killed, resumed = c['jobs']
        assert c['status'] == 'ok' and killed['rc'] == -9 and killed['killed'] and full['rc'] == resumed['rc'] == 0
        assert c['resumed_at'].startswith('Resuming epoch 1 at iteration ')
        cmp = c['comparison']
        assert cmp['passed'] and cmp['identical_log'] and cmp['tolerance'] == 0
        assert cmp['max_rel_diff_log'] == cmp['max_rel_diff_steps'] == 0 and cmp['loss_step_spread'] > 0
    others = {c['check'].split(',')[0].split(' on ')[0]: c for c in checks if c not in kills}
    assert all(c['status'] == 'ok' for c in others.values()), others
    assert 'test_acc1' in others['main_finetune.py']['detail'] and 'test_acc1' in others['main_linprobe.py']['detail']
    assert others['main_finetune.py --eval of the fine-tuned checkpoint']['detail'].startswith('* Acc@1 ')
    assert (out / 'reconstruction.png').stat().st_size > 0

    rows = parts['steps']['rows']
    assert sorted((r['model'], r['path']) for r in rows) == sorted(
        [(m, p) for m in ('mae_vit_tiny_patch4', 'vit_tiny_patch4') for p in ('faithful', 'fast_eager', 'fast')]
        + [('mae_vit_tiny_patch4', 'fast_ckpt')])
    assert all(is_number(r[k]) and r[k] > 0 for r in rows for k in ('img_s', 'ms', 'tflops'))

    (run,) = parts['input']['runs']
    assert [r['workers'] for r in run['table']] == [2]
    assert all(is_number(run['table'][0][k]) for k in ('pil', 'fast_cpu'))
    assert [e['input'] for e in run['end_to_end']] == ['synthetic batch on the device', 'pil', 'fast_cpu']
    assert all(is_number(e['img_s']) and e['img_s'] > 0 for e in run['end_to_end'])

    verdicts = {t['key']: t['verdict'] for t in report['targets']}
    assert verdicts['mae_B_speedup'] == 'not measured'  # no ViT-B row in the smoke run
    assert verdicts['mae_L_speedup'] == verdicts['e2e'] == 'n/a (CPU smoke run)'
    assert all(is_number(t['value']) for t in report['targets'] if t['verdict'] != 'not measured')

    md = md.read_text()
    for title in plan.TITLES.values():
        assert f'\n## {title}\n' in md
    assert md.count('| ok |') >= 4 + len(checks) and 'failed' not in md
