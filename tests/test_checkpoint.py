"""Checkpoint files under faults: a write that fails inside torch's zip writer (a full disk) is one line and keeps the
previous checkpoint; a file damaged after it was written is refused at load and passed over by auto-resume, which
falls back to the newest good one; files that are not MAE checkpoints are passed over."""
import errno
import struct
import subprocess
import sys
import zipfile
from collections import namedtuple

import pytest
import torch

import util.checkpoints.checkpoint as ckpt_io
from conftest import ROOT, our_stderr
from util.errors import TrainingStopped, UsageError

# what torch's zip writer raises when the file's write fails (ENOSPC on a full tmpfs, EFBIG past RLIMIT_FSIZE)
WRITER_FAILURE = '[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662'


def tiny(epoch, **extra):
    torch.manual_seed(epoch)
    return {'model': {'w': torch.randn(2000), 'b': torch.zeros(3)}, 'epoch': epoch, 'args': {'lr': 0.1}, **extra}


# ---------------------------------------------------------------------------------------------------- a full disk
def test_write_failing_inside_torchs_zip_writer_is_one_line(tmp_path):
    """A real failure of torch's writer: the file size limit (RLIMIT_FSIZE) makes the write fail with EFBIG as a
    full disk does with ENOSPC; torch turns it into a RuntimeError."""
    path = tmp_path / 'checkpoint-last.pth'
    code = f'''
import resource, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import util.checkpoints.checkpoint as ckpt_io
from util.errors import TrainingStopped
ckpt_io.atomic_save({{'model': {{'w': torch.zeros(10)}}, 'epoch': 1}}, {str(path)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    ckpt_io.atomic_save({{'model': {{'w': torch.zeros(100_000)}}, 'epoch': 2}}, {str(path)!r})
except TrainingStopped as e:
    print(e)
'''
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and our_stderr(r.stderr) == '', r.stderr[-2000:]
    assert r.stdout == (f"cannot write {path}: File too large; free space in {tmp_path} and run the same command "
                        f"again: the previous checkpoint there is intact\n")
    assert torch.load(path, weights_only=True)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint-last.pth']


def test_full_disk_inside_torchs_zip_writer_says_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'
    ckpt_io.atomic_save(tiny(1), path)

    def full(obj, f):  # as torch's writer does: the OSError of the file's write is the RuntimeError's context
        try:
            raise OSError(errno.ENOSPC, 'No space left on device')
        except OSError:
            raise RuntimeError(WRITER_FAILURE)
    monkeypatch.setattr(ckpt_io.torch, 'save', full)
    with pytest.raises(TrainingStopped) as e:
        ckpt_io.atomic_save(tiny(2), path)
    assert str(e.value) == (f"cannot write {path} (the disk is full): No space left on device; free space in "
                            f"{tmp_path} and run the same command again: the previous checkpoint there is intact")
    assert torch.load(path, weights_only=True)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint-last.pth']


def test_writer_failure_without_its_os_error_and_other_errors(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'

    def fails(obj, f):
        raise RuntimeError(WRITER_FAILURE)
    monkeypatch.setattr(ckpt_io.torch, 'save', fails)
    usage = namedtuple('usage', 'total used free')
    monkeypatch.setattr(ckpt_io.shutil, 'disk_usage', lambda folder: usage(10 ** 9, 10 ** 9, 0))
    with pytest.raises(TrainingStopped, match=r'^cannot write .* \(the disk is full\): No space left on device; '):
        ckpt_io.atomic_save(tiny(1), path)
    monkeypatch.setattr(ckpt_io.shutil, 'disk_usage', lambda folder: usage(10 ** 9, 0, 10 ** 9))
    with pytest.raises(TrainingStopped, match=r'^cannot write \S+: \[enforce fail at inline_container.cc:672\] . '
                                              r'unexpected pos 768 vs 662; free space in'):
        ckpt_io.atomic_save(tiny(1), path)

    def bug(obj, f):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')
    monkeypatch.setattr(ckpt_io.torch, 'save', bug)
    with pytest.raises(RuntimeError, match='CUDA error'):  # not a write error: not dressed up as one
        ckpt_io.atomic_save(tiny(1), path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- damage
def flip_tensor_bytes(path, count=4000):
    """Invert ``count`` bytes inside the data of the largest tensor of a torch zip file (its size unchanged)."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack('<HH', data[record.header_offset + 26:record.header_offset + 30])
    start = record.header_offset + 30 + name_len + extra_len
    assert record.file_size >= count + 100
    data[start + 100:start + 100 + count] = bytes(b ^ 0xFF for b in data[start + 100:start + 100 + count])
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys):
    ckpt_io.atomic_save(tiny(0), tmp_path / 'checkpoint-0.pth')
    ckpt_io.atomic_save(tiny(1), tmp_path / 'checkpoint-1.pth')
    ckpt_io.link_or_copy(tmp_path / 'checkpoint-1.pth', tmp_path / 'checkpoint-last.pth')  # as Run.save keeps one
    assert ckpt_io.newest(tmp_path) == str(tmp_path / 'checkpoint-last.pth')
    assert capsys.readouterr().out == ''
    size = (tmp_path / 'checkpoint-last.pth').stat().st_size
    flip_tensor_bytes(tmp_path / 'checkpoint-1.pth')  # (in place: checkpoint-last.pth is the same file)
    assert (tmp_path / 'checkpoint-last.pth').stat().st_size == size
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['epoch'] == 1  # torch does not notice

    assert ckpt_io.newest(tmp_path) == str(tmp_path / 'checkpoint-0.pth')
    notes = capsys.readouterr().out.splitlines()
    assert notes == [f"Note: skipping damaged checkpoint {tmp_path / name} (data/0 does not match the CRC-32 "
                     f"written with it)" for name in ('checkpoint-last.pth', 'checkpoint-1.pth')]
    with pytest.raises(UsageError) as e:
        ckpt_io.load(tmp_path / 'checkpoint-last.pth')
    assert str(e.value) == (f"--resume {tmp_path / 'checkpoint-last.pth'}: damaged since it was written (data/0 does "
                            f"not match the CRC-32 written with it)")
    assert ckpt_io.load(tmp_path / 'checkpoint-0.pth')['epoch'] == 0


def test_damaged_plain_values_are_refused_too(tmp_path):
    path = tmp_path / 'checkpoint-3.pth'
    torch.save(tiny(3, note='x' * 200), path)
    data = path.read_bytes()
    at = data.index(b'x' * 200)
    path.write_bytes(data[:at] + b'y' + data[at + 1:])  # the pickle of the plain values: still loads
    assert torch.load(path, weights_only=True)['note'].startswith('y')
    with pytest.raises(UsageError, match=r"damaged since it was written \(data.pkl does not match the CRC-32"):
        ckpt_io.load(path, '--finetune')


def test_checkpoints_without_crcs_still_load(tmp_path):
    """torch's legacy format (before 1.6) and files written without CRC-32s have nothing to check against."""
    legacy = tmp_path / 'legacy.pth'
    torch.save(tiny(4), legacy, _use_new_zipfile_serialization=False)
    assert ckpt_io.damage(legacy) is None and ckpt_io.load(legacy)['epoch'] == 4
    if hasattr(torch.serialization, 'set_crc32_options'):  # torch >= 2.6
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(tiny(5), tmp_path / 'no_crc.pth')
        finally:
            torch.serialization.set_crc32_options(True)
        assert ckpt_io.damage(tmp_path / 'no_crc.pth') is None
        assert ckpt_io.load(tmp_path / 'no_crc.pth')['epoch'] == 5


# ---------------------------------------------------------------------------------------------------- not ours
def test_a_bare_state_dict_in_the_folder_is_passed_over_and_named_as_found(tmp_path, capsys):
    torch.save({'w': torch.zeros(2)}, tmp_path / 'checkpoint-last.pth')  # torch.save(model.state_dict(), ...)
    assert ckpt_io.newest(tmp_path) == ''
    assert capsys.readouterr().out == (f"Note: skipping {tmp_path / 'checkpoint-last.pth'}: not an MAE checkpoint "
                                       f"(no 'model' entry)\n")
    ckpt_io.atomic_save(tiny(0), tmp_path / 'checkpoint-0.pth')
    assert ckpt_io.newest(tmp_path) == str(tmp_path / 'checkpoint-0.pth')
    with pytest.raises(UsageError) as e:  # (as util/checkpoints/resume.py names a file it found)
        ckpt_io.load(tmp_path / 'checkpoint-last.pth', what='the newest checkpoint in --output_dir,')
    assert str(e.value) == (f"the newest checkpoint in --output_dir, {tmp_path / 'checkpoint-last.pth'}: not an MAE "
                            f"checkpoint (no 'model' entry)")


# ---------------------------------------------------------------------------------------------------- what load refuses
def test_files_that_are_not_checkpoints_are_one_line_each(tmp_path):
    """Each family of bad file is named for what it is (torch's own messages are about zip central directories)."""
    good = tmp_path / 'good.pth'
    torch.save(tiny(1), good)
    data = good.read_bytes()
    legacy = tmp_path / 'legacy.pth'
    torch.save(tiny(1), legacy, _use_new_zipfile_serialization=False)
    files = {'empty.pth': b'', 'notes.txt': b'hello\n', 'cut.pth': data[:len(data) // 2],
             'cut_legacy.pth': legacy.read_bytes()[:200]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    expected = {
        'empty.pth': 'the file is empty (a copy or download that did not finish?)',
        'notes.txt': "cannot be read as a PyTorch checkpoint (neither torch.save's zip archive nor its legacy pickle",
        'cut.pth': 'cannot be read as a PyTorch checkpoint (a zip archive cut short: a copy or download that did not',
        'cut_legacy.pth': 'cannot be read as a PyTorch checkpoint (',
    }
    for name, words in expected.items():
        with pytest.raises(UsageError) as e:
            ckpt_io.load(tmp_path / name, what='--finetune')
        assert str(e.value).startswith(f"--finetune {tmp_path / name}: {words}"), str(e.value)
        assert '\n' not in str(e.value) and 'weights_only' not in str(e.value)
    assert ckpt_io.load(legacy)['epoch'] == 1 and ckpt_io.load(good)['epoch'] == 1
    with pytest.raises(UsageError, match=r'is a folder; give a checkpoint file \(e.g. .*checkpoint-last.pth\)'):
        ckpt_io.load(tmp_path)
