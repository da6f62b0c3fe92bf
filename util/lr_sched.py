"""Per-iteration learning-rate schedule: linear warm-up, then a half-cycle cosine down to ``min_lr``."""
import math


def adjust_learning_rate(optimizer, epoch, args):
    """Set every param group's lr for the fractional ``epoch`` (e.g. 3.25 is a quarter into the fourth epoch); a
    group's ``lr_scale`` (layer-wise decay) multiplies it. Returns the unscaled lr."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1. + math.cos(math.pi * progress))
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * param_group["lr_scale"] if "lr_scale" in param_group else lr
    return lr
