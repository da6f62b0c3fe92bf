"""torchrun beyond one process (gloo on the CPU): pre-training, fine-tuning and partial fine-tuning with
accumulation and --dist_eval, killed and resumed; and a 2-node rendezvous (two torchrun agents on this machine,
--nnodes 2 --node_rank 0/1, c10d)."""
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, pretrain_argv, read_log, run_script, save_pretrained, tb_scalars

pytestmark = pytest.mark.slow


def torchrun(*argv, fault=None, env=None):
    """``torchrun --standalone --nproc_per_node=2 <script> ...``, with ``fault`` (see conftest.run_with_fault)."""
    script = ['tests/faults.py', fault] if fault else []
    return run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *script, *argv, env=env,
                      timeout=300)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def finetune_ddp(out, pretrained, fault=None):
    # 16 images over 2 processes, batch 2: 4 iterations per epoch, an optimizer step every 2 (accumulation)
    return torchrun('main_finetune.py',
                    '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '2',
                    '--accum_iter', '2', '--epochs', '2', '--warmup_epochs', '1', '--save_every_iters', '1',
                    '--device', 'cpu', '--num_workers', '0', '--data_path', TINY, '--finetune', pretrained,
                    '--output_dir', out, '--log_dir', out, fault=fault)


def test_finetune_two_processes_with_accumulation_resume(tmp_path):
    pretrained = save_pretrained(tmp_path / 'mae_tiny.pth')
    full = finetune_ddp(tmp_path / 'full', pretrained)
    assert full.returncode == 0, full.stderr[-3000:]
    # rank 0's 4th checkpoint write (end of epoch 1) is cut short: the last one is mid-epoch 1, iteration 2
    crashed = finetune_ddp(tmp_path / 'crashed', pretrained, fault='save:4')
    assert crashed.returncode != 0
    resumed = finetune_ddp(tmp_path / 'crashed', pretrained)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming epoch 1 at iteration 2 of 4' in resumed.stdout
    assert (tmp_path / 'crashed' / 'log.txt').read_text() == (tmp_path / 'full' / 'log.txt').read_text()


def test_pretrain_two_node_rendezvous(tmp_path):
    out = tmp_path / 'run'
    port = free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={rank}',
               '--nproc_per_node=1', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}', '--rdzv_id=mae-test',
               'main_pretrain.py', '--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '2',
               '--epochs', '1', '--warmup_epochs', '1', '--data_path', str(TINY), '--device', 'cpu',
               '--num_workers', '0', '--output_dir', str(out), '--log_dir', str(out)]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert 'effective batch size: 4' in outputs[0] + outputs[1]
    assert (out / 'log.txt').read_text().count('"epoch": 0') == 1


def test_pretrain_two_processes(tmp_path):
    out = tmp_path / 'ddp'
    r = torchrun(*pretrain_argv(out, '--accum_iter', '2', '--batch_size', '2', epochs=2))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_log(out)
    assert [row['epoch'] for row in rows] == [0, 1]
    assert all(row['train_loss'] > 0 for row in rows)
    assert 'distributed init (rank 0)' in r.stdout and 'effective batch size: 8' in r.stdout
    assert 'find_unused_parameters' not in r.stderr  # DDP's warning, once per process before
    ckpt = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert len(ckpt['rng']) == 2 and ckpt['epoch'] == 1


def test_no_host_sync_on_two_processes_gives_the_reference_log_and_points(tmp_path):
    """--no_host_sync reads the losses and their means over the processes (one all-reduce per read) at the
    console's prints: in fp32 on the CPU the same log.txt and TensorBoard points as the reference's per-step reads."""
    runs = {}
    for name, extra in (('ref', []), ('fast', ['--no_host_sync'])):
        r = torchrun(*pretrain_argv(tmp_path / name, '--accum_iter', '2', *extra, epochs=2, batch_size=2))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (tmp_path / name / 'log.txt').read_text(), tb_scalars(tmp_path / name)
    assert runs['fast'] == runs['ref'] and len(runs['ref'][1]['train_loss']) == 4


def test_pretrain_two_processes_with_accumulation_resume(tmp_path):
    def ddp(out, fault=None):
        return torchrun(*pretrain_argv(out, '--accum_iter', '2', '--save_every_iters', '1', epochs=3, batch_size=2),
                        fault=fault)
    full = ddp(tmp_path / 'full')
    assert full.returncode == 0, full.stderr[-3000:]
    # rank 0's fourth checkpoint write (end of epoch 1) is cut short: the last one is mid-epoch 1, iteration 2
    crashed = ddp(tmp_path / 'crashed', fault='save:4')
    assert crashed.returncode != 0
    resumed = ddp(tmp_path / 'crashed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resuming epoch 1 at iteration 2 of 4' in resumed.stdout
    assert (tmp_path / 'crashed' / 'log.txt').read_text() == (tmp_path / 'full' / 'log.txt').read_text()


def test_partial_finetune_two_processes_with_accumulation_and_dist_eval(tmp_path):
    pretrained = save_pretrained(tmp_path / 'mae_tiny.pth')
    out = tmp_path / 'out'
    r = torchrun('main_finetune.py',
                 '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '2',
                 '--accum_iter', '2', '--epochs', '1', '--warmup_epochs', '0', '--train_blocks', '1', '--dist_eval',
                 '--device', 'cpu', '--num_workers', '0', '--data_path', TINY, '--finetune', pretrained,
                 '--output_dir', out, '--log_dir', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row['epoch'] for row in read_log(out)] == [0]
    assert 'Accuracy of the network on the 8 test images' in r.stdout


def test_a_stop_on_two_processes_is_said_once(tmp_path):
    out = tmp_path / 'run'
    r = torchrun(*pretrain_argv(out, '--batch_size', '2', '--save_every_iters', '1', epochs=2), fault='stop:2')
    assert r.returncode != 0
    assert r.stderr.count('stopped: signal 10 received, stopped at epoch 0 iteration 2: saved ') == 1, r.stderr[-3000:]
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['resume_iter'] == 2


def test_a_dist_url_torch_cannot_use_is_one_line_on_each_rank_before_joining(tmp_path):
    out = tmp_path / 'run'
    r = torchrun(*pretrain_argv(out, '--dist_url', 'garbage', epochs=1, batch_size=2))
    assert r.returncode != 0
    line = ("error: --dist_url garbage: not a rendezvous URL torch knows: give env:// (torchrun's), tcp://HOST:PORT "
            "or file:///PATH/TO/A/NEW/FILE\n")
    assert r.stderr.count(line) == 2 and 'exitcode  : 2' in r.stderr, r.stderr[-3000:]
    assert 'No rendezvous handler' not in r.stderr and not out.exists()
