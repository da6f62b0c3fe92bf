"""util/evaluation/feature_probe.py: the linear probe on cached features, on features whose best accuracy is known."""
import math

import pytest
import torch

from util.evaluation.feature_probe import probe_accuracy


def two_gaussians(n, dims, separation, seed):
    """``n`` points of two classes (alternating), unit-variance Gaussians in ``dims`` dimensions whose means are
    ``separation`` apart along the first: the best classifier's accuracy is Phi(separation / 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.randn(n, dims, generator=g)
    x[:, 0] += (labels.float() - 0.5) * separation
    return x, labels


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_the_probe_reaches_the_best_accuracy_of_two_gaussians():
    train, train_labels = two_gaussians(2000, 16, 2.0, seed=0)
    test, test_labels = two_gaussians(2000, 16, 2.0, seed=1)
    result = probe_accuracy(train, train_labels, test, test_labels, num_classes=2)
    best = 100 * phi(1.0)  # 84.1%; the standard error of 2000 test points is 0.82 points
    assert best - 2.5 < result['top1'] < best + 2.0
    assert result['top5'] == 100.0  # 2 classes: top-5 holds every class
    assert abs(result['train_top1'] - best) < 2.0


def test_the_probe_sees_through_the_features_scale_and_offset_and_is_deterministic():
    """The features are standardised with the training set's statistics (what the paper's BatchNorm does), and the
    fit starts from zero weights: a per-dimension scale and offset, or running it again, changes nothing."""
    train, train_labels = two_gaussians(600, 8, 1.0, seed=2)
    test, test_labels = two_gaussians(300, 8, 1.0, seed=3)
    result = probe_accuracy(train, train_labels, test, test_labels, 2)
    assert probe_accuracy(train, train_labels, test, test_labels, 2) == result
    scale, offset = torch.logspace(-2, 2, 8), torch.linspace(-50, 50, 8)
    moved = probe_accuracy(train * scale + offset, train_labels, test * scale + offset, test_labels, 2)
    assert abs(moved['top1'] - result['top1']) <= 100 / 300  # at most one test point on the boundary


def test_ten_classes_top1_and_top5():
    # ten clusters far apart on the axes of 10 dimensions: every point is classified right
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(500) % 10
    x = torch.nn.functional.one_hot(labels, 10).float() * 6 + torch.randn(500, 10, generator=g)
    result = probe_accuracy(x[:400], labels[:400], x[400:], labels[400:], 10)
    assert result['top1'] == 100.0 and result['top5'] == 100.0
    # the labels of the test points shuffled: chance (10%) for top-1, about 50% for top-5
    wrong = labels[400:][torch.randperm(100, generator=g)]
    shuffled = probe_accuracy(x[:400], labels[:400], x[400:], wrong, 10)
    assert shuffled['top1'] < 25 and shuffled['top5'] < 75


def test_mismatched_inputs_are_refused():
    x, y = two_gaussians(10, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match='features must be'):
        probe_accuracy(x, y, x[:, :2], y, 2)
    with pytest.raises(ValueError, match='need as many of each'):
        probe_accuracy(x, y[:5], x, y, 2)
    with pytest.raises(ValueError, match='steps must be at least 1'):
        probe_accuracy(x, y, x, y, 2, steps=0)
