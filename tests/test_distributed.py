"""torchrun beyond one process: fine-tuning on 2 processes with accumulation, interrupted and resumed; and a
2-node rendezvous (two torchrun agents on this machine, --nnodes 2 --node_rank 0/1, c10d) for pre-training."""
import socket
import subprocess
import sys

from conftest import DATA, ROOT, run_script
from helpers import save_pretrained

TINY = DATA / 'tiny_imagefolder'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def finetune_ddp(out, pretrained, env=None):
    # 16 images over 2 processes, batch 2: 4 iterations per epoch, an optimizer step every 2 (accumulation)
    return run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'main_finetune.py',
                      '--model', 'vit_tiny_patch4', '--input_size', '32', '--nb_classes', '2', '--batch_size', '2',
                      '--accum_iter', '2', '--epochs', '2', '--warmup_epochs', '1', '--save_every_iters', '1',
                      '--device', 'cpu', '--num_workers', '0', '--data_path', TINY, '--finetune', pretrained,
                      '--output_dir', out, '--log_dir', out, env=env, timeout=300)


def test_finetune_two_processes_with_accumulation_resume(tmp_path):
    pretrained = save_pretrained(tmp_path / 'mae_tiny.pth')
    full = finetune_ddp(tmp_path / 'full', pretrained)
    assert full.returncode == 0, full.stderr[-3000:]
    # rank 0's 4th checkpoint write (end of epoch 1) is cut short: the last one is mid-epoch 1, iteration 2
    crashed = finetune_ddp(tmp_path / 'crashed', pretrained, env={'MAE_FAULT': 'save:4'})
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
