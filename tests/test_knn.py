"""util/evaluation/knn.py: the weighted k-NN classifier (DINO's eval_knn.py protocol) on hand-made features with known
answers."""
import math

import pytest
import torch

from util.evaluation.knn import knn_accuracy, knn_predict


def unit(*angles_deg):
    """2-d unit vectors at the given angles: their cosine similarity is the cosine of the angle between them."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def test_nearest_neighbours_of_separated_clusters():
    train = torch.cat([unit(0, 5, -5), unit(90, 95, 85), unit(180, 185, 175)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    test = unit(2, 88, 178, 3)
    # k=1: each test point's nearest training point; scaling a feature changes nothing (cosine similarity)
    assert knn_predict(train * 7, labels, test * 0.1, 3, k=1)[:, 0].tolist() == [0, 1, 2, 0]
    result = knn_accuracy(train, labels, test, torch.tensor([0, 1, 2, 1]), k=3)
    assert result == {'top1': 75.0, 'top5': 100.0}  # 3 classes: top-5 holds every class


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # one neighbour of class 0 at similarity 1, two of class 1 at similarity cos(60) = 0.5
    train = unit(0, 60, -60)
    labels = torch.tensor([0, 1, 1])
    test = unit(0)
    # T = 0.07: exp(1/0.07) = 1.6e6 against 2 exp(0.5/0.07) = 2.5e3: the single close neighbour wins
    assert knn_predict(train, labels, test, 2, k=3).tolist() == [[0, 1]]
    # T = 10: exp(0.1) = 1.105 against 2 exp(0.05) = 2.10: the majority wins
    assert knn_predict(train, labels, test, 2, k=3, temperature=10).tolist() == [[1, 0]]
    # k = 1: only the nearest votes
    assert knn_predict(train, labels, test, 2, k=1, temperature=10)[0, 0].item() == 0


def test_k_larger_than_the_training_set_uses_all_of_it():
    train = unit(0, 60, -60)
    labels = torch.tensor([0, 1, 1])
    test = unit(0)
    assert torch.equal(knn_predict(train, labels, test, 2, k=20, temperature=10),
                       knn_predict(train, labels, test, 2, k=3, temperature=10))
    assert knn_predict(train, labels, test, 2, k=20, temperature=10).tolist() == [[1, 0]]


def test_ties_are_broken_by_training_order_then_class_index():
    # two training features equally similar to the test one (+-30 degrees), of classes 2 and 1
    train = unit(30, -30, 170)
    test = unit(0)
    # k = 1: the first of the tied neighbours in the training set
    assert knn_predict(train, torch.tensor([2, 1, 0]), test, 3, k=1)[0, 0].item() == 2
    assert knn_predict(train, torch.tensor([1, 2, 0]), test, 3, k=1)[0, 0].item() == 1
    # k = 2: both vote with the same weight; the lower class index ranks first, the class without a vote last
    assert knn_predict(train, torch.tensor([2, 1, 0]), test, 3, k=2).tolist() == [[1, 2, 0]]


def test_top5_counts_the_true_class_among_the_five_best():
    # 7 classes, one training feature each, at growing angles from the test feature: class c ranks c-th
    train = unit(*[10 * c for c in range(7)])
    labels = torch.arange(7)
    test = unit(0, 0, 0)
    ranking = knn_predict(train, labels, test, 7, k=20)
    assert ranking.tolist() == [[0, 1, 2, 3, 4]] * 3
    result = knn_accuracy(train, labels, test, torch.tensor([0, 4, 5]), k=20)
    assert result['top1'] == pytest.approx(100 / 3) and result['top5'] == pytest.approx(200 / 3)


def test_batches_give_the_same_predictions():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(23, 8, generator=g)
    labels = torch.randint(0, 6, (50,), generator=g)
    whole = knn_predict(train, labels, test, 6, batch_size=1000)
    assert whole.shape == (23, 5)
    assert torch.equal(knn_predict(train, labels, test, 6, batch_size=4), whole)
    assert torch.equal(knn_predict(train, labels, test, 6, batch_size=1), whole)


def test_bad_input():
    with pytest.raises(ValueError, match='features must be'):
        knn_predict(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match='at least one'):
        knn_predict(torch.zeros(0, 2), torch.zeros(0), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match='k must be'):
        knn_predict(torch.ones(3, 2), torch.zeros(3), torch.ones(2, 2), 2, k=0)
