"""[new] The progress lines of long jobs that otherwise say nothing for minutes (util.misc.Progress): at most one
every PROGRESS_EVERY seconds with the time left, on a terminal only (piped output, logs and tests unchanged)."""
import io
import sys

import util.data.data_stats as data_stats
import util.data.image_sources as image_sources
import util.misc as misc
from conftest import TINY


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """time.time() for util.misc: 3 s per call."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 3.0
        return self.now


def test_a_line_at_most_every_10_seconds_with_the_time_left(monkeypatch):
    monkeypatch.setattr(sys, 'stdout', Terminal())
    monkeypatch.setattr(misc.time, 'time', Clock())
    items = list(misc.progress(range(20), 'Measuring data stats', unit='images'))
    assert items == list(range(20))
    # one call at the start, one per item: a line every 4th item (12 s >= 10 s), the rate 3 s per image
    lines = sys.stdout.getvalue().splitlines()
    assert lines[0] == 'Measuring data stats: 4/20 images, 0:00:48 left'
    assert lines[1] == 'Measuring data stats: 8/20 images, 0:00:36 left'
    assert len(lines) == 5 and lines[-1] == 'Measuring data stats: 20/20 images, 0:00:00 left'


def test_without_a_total_it_counts_and_it_says_nothing_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(misc.time, 'time', Clock())
    found = misc.Progress('Listing', stream=Terminal())
    monkeypatch.setattr(sys, 'stdout', Terminal())
    for _ in range(4):
        found.update()
    assert sys.stdout.getvalue() == 'Listing: 4 images so far, 0:00:12\n'
    monkeypatch.undo()
    monkeypatch.setattr(misc.time, 'time', Clock())
    assert list(misc.progress(range(20), 'quiet')) == list(range(20))
    assert capsys.readouterr().out == ''  # (pytest's captured stdout is no terminal)


def test_the_long_jobs_report_their_progress(monkeypatch):
    monkeypatch.setattr(sys, 'stdout', Terminal())
    monkeypatch.setattr(misc, 'PROGRESS_EVERY', 0)  # a line after every image
    paths = image_sources.list_images(str(TINY / 'train'))
    data_stats.measure(paths, 3)
    lines = sys.stdout.getvalue().splitlines()
    assert [line for line in lines if line.startswith('Listing')][-1].startswith(
        f"Listing the images of {TINY / 'train'}: 16 images so far")
    assert [line for line in lines if line.startswith('Measuring')][-1].startswith(
        'Measuring data stats: 16/16 images, 0:00:00 left')


def test_the_knn_monitor_reports_its_embedding(monkeypatch):
    import models_mae
    import torch
    from util.evaluation import knn_monitor
    monkeypatch.setattr(sys, 'stdout', Terminal())
    monkeypatch.setattr(misc, 'PROGRESS_EVERY', 0)
    train, val, _ = knn_monitor.knn_datasets(str(TINY), 32)
    knn_monitor.embed(models_mae.mae_vit_tiny_patch4(), train, torch.device('cpu'), batch_size=4)
    lines = [line for line in sys.stdout.getvalue().splitlines() if line.startswith('kNN monitor: embedding')]
    assert [line.split(',')[0] for line in lines] == [f'kNN monitor: embedding: {n}/16 images' for n in (4, 8, 12, 16)]
