"""Weighted k-nearest-neighbour classification of features: the protocol of DINO's ``eval_knn.py`` (Caron et al.,
2021), used by the kNN monitor of pre-training (``util.evaluation.knn_monitor``) and ``extract_features.py --knn``.

Each test feature votes with its ``k`` most similar training features (cosine similarity of L2-normalised
features); a neighbour of similarity ``s`` adds ``exp(s / temperature)`` to its class. The classes with the most
votes are the predictions: top-1 and top-5 accuracy in per cent.

Ties are broken deterministically (the protocol leaves them to ``torch.topk``): among equally similar training
features the one that comes first in ``train_features`` is the nearer, and among classes with equal votes the one of
lower index ranks first.
"""
import torch

K = 20
TEMPERATURE = 0.07


def knn_predict(train_features, train_labels, test_features, num_classes, k=K, temperature=TEMPERATURE,
                batch_size=256):
    """The classes of ``test_features`` (M, D) ranked by their weighted votes: an (M, min(5, num_classes)) tensor,
    best first. ``train_features`` (N, D) with ``train_labels`` (N,) in ``[0, num_classes)``; ``k`` above N uses
    all N. Test features are classified ``batch_size`` at a time, so memory stays at ``batch_size x N``
    similarities."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if len(train_features) == 0 or len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features and {len(train_labels)} labels: need as many "
                         f"of each, at least one")
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be at least 1 and the temperature positive, got k={k}, temperature={temperature}")
    train = torch.nn.functional.normalize(train_features.float(), dim=1)
    train_labels = train_labels.long().to(train.device)
    k = min(k, len(train))
    ranks = min(5, num_classes)
    predictions = []
    for start in range(0, len(test_features), batch_size):
        test = torch.nn.functional.normalize(test_features[start:start + batch_size].float().to(train.device), dim=1)
        similarity = test @ train.T  # (B, N)
        # a stable sort: equally similar neighbours are taken in the order of the training set
        top_sim, top_idx = torch.sort(similarity, dim=1, descending=True, stable=True)
        top_sim, top_idx = top_sim[:, :k], top_idx[:, :k]
        votes = torch.zeros(len(test), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        predictions.append(torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :ranks])
    if not predictions:
        return torch.zeros(0, ranks, dtype=torch.long)
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes=None, k=K,
                 temperature=TEMPERATURE, batch_size=256):
    """``{'top1': ..., 'top5': ...}``, in per cent, of the weighted k-NN classifier (see ``knn_predict``) on
    ``test_features`` with ``test_labels``. ``num_classes`` defaults to one more than the largest label; with
    fewer than 5 classes top-5 counts every class (100%)."""
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if len(test_labels) else 1
    if len(test_labels) == 0:
        raise ValueError("no test features to classify")
    predictions = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature, batch_size)
    correct = predictions.cpu() == test_labels.cpu()[:, None]
    return {'top1': 100.0 * correct[:, 0].float().mean().item(),
            'top5': 100.0 * correct.any(dim=1).float().mean().item()}
