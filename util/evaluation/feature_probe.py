"""A linear probe on cached features [new]: multinomial logistic regression of frozen features, trained full-batch
in seconds (``extract_features.py --probe``; the cheap evaluation of ``reproduce.py --evals probe``).

It stands in for the paper's linear probing (``main_linprobe.py``: a BatchNorm without affine parameters, then a
linear head, trained with LARS for 90 epochs on augmented images) at a fraction of the cost: each image is embedded
once (the evaluation transform, no augmentation), the features are standardised with the training features' mean
and standard deviation (what that BatchNorm does at evaluation), and a linear classifier with a small L2 penalty
is fitted to them, full batch, by L-BFGS from zero weights to (near) its optimum. The problem is convex and the
start fixed, so the result depends on nothing random and little on the optimiser: the same features give the same
numbers. (On 5,000 CIFAR-10 images embedded by a random ViT-S/4, 192-d: 36.9% top-1 on 1,000 test images after
about 700 iterations, a few seconds; 300 full-batch Adam steps stopped short of the optimum, at 34-35%.)
"""
import torch

STEPS = 1000  # at most; L-BFGS stops earlier once the gradient or the loss stops changing
WEIGHT_DECAY = 1e-4  # 0.5 x this x |W|^2 (not the bias), added to the mean cross-entropy
EPS = 1e-6


def standardise(train_features, test_features):
    """Both sets centred and scaled per dimension with the training set's mean and standard deviation."""
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, unbiased=False, keepdim=True)
    return (train_features - mean) / (std + EPS), (test_features - mean) / (std + EPS)


def fit(features, labels, num_classes, steps=STEPS, weight_decay=WEIGHT_DECAY):
    """``(weight (D, C), bias (C,))`` of the logistic regression of ``labels`` on ``features`` (float32)."""
    weight = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, max_eval=2 * steps, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, labels)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return weight.detach(), bias.detach()


def top_k(logits, labels, ranks):
    """Top-1 and top-``ranks`` accuracy (per cent) of ``logits``; ties go to the lower class index."""
    predictions = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :ranks]
    correct = predictions == labels[:, None]
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * correct.any(dim=1).float().mean().item()


def probe_accuracy(train_features, train_labels, test_features, test_labels, num_classes, steps=STEPS,
                   weight_decay=WEIGHT_DECAY):
    """``{'top1', 'top5', 'train_top1'}`` (per cent) of the linear probe fitted on ``train_features`` (N, D) with
    ``train_labels`` (N,) and evaluated on ``test_features`` (M, D); with fewer than 5 classes top-5 counts every
    class (100%)."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if len(train_features) == 0 or len(train_features) != len(train_labels) or len(test_features) == 0 or \
            len(test_features) != len(test_labels):
        raise ValueError(f"{len(train_features)} training features with {len(train_labels)} labels, "
                         f"{len(test_features)} test features with {len(test_labels)}: need as many of each, at least "
                         f"one")
    if steps < 1 or weight_decay < 0:
        raise ValueError(f"steps must be at least 1 and weight_decay not negative, got {steps} and {weight_decay}")
    train, test = standardise(train_features.float().cpu(), test_features.float().cpu())
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    with torch.enable_grad():
        weight, bias = fit(train, train_labels, num_classes, steps, weight_decay)
    ranks = min(5, num_classes)
    top1, top5 = top_k(test @ weight + bias, test_labels, ranks)
    train_top1, _ = top_k(train @ weight + bias, train_labels, ranks)
    return {'top1': top1, 'top5': top5, 'train_top1': train_top1}
