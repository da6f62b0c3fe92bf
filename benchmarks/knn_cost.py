"""The kNN monitor's cost per evaluation (main_pretrain.py --knn_every): seconds to embed --knn_data_path's train/
and val/ subsets without masking and classify val, for a model of a given size (its weights do not change the cost).

    python benchmarks/knn_cost.py --knn_data_path demo/data --model mae_vit_tiny_patch4 --input_size 64
    python benchmarks/knn_cost.py --knn_data_path cifar_knn --model mae_vit_small_patch4 --input_size 32 \\
        --knn_train_subset 5000 --knn_val_subset 1000 --batch_size 256 --num_workers 2

(``cifar_knn``: a folder with ``train`` and ``val`` links to the CIFAR-10 JPEG tree's train/ and test/.) Prints each
evaluation's time and the median of ``--repeats``; the first also pays the DataLoader workers' start and the page
cache.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_mae  # noqa: E402
from util.evaluation import knn_monitor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--knn_data_path', required=True)
    parser.add_argument('--model', default='mae_vit_tiny_patch4', choices=list(models_mae.MODELS))
    parser.add_argument('--input_size', default=64, type=int)
    parser.add_argument('--knn_train_subset', default=0, type=int)
    parser.add_argument('--knn_val_subset', default=0, type=int)
    parser.add_argument('--batch_size', default=64, type=int)
    parser.add_argument('--num_workers', default=2, type=int)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', default=3, type=int)
    args = parser.parse_args()
    args.knn_every, args.epochs, args.amp = 1, 1, 'fp16'
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models_mae.MODELS[args.model](img_size=args.input_size).to(device)
    monitor = knn_monitor.KnnMonitor(args, device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        monitor(model, 0)
        times.append(time.perf_counter() - start)
    n = len(monitor.train_set) + len(monitor.val_set)
    print(f"{args.model} at {args.input_size}px on {args.device}, {torch.get_num_threads()} threads, "
          f"{args.num_workers} workers: {n} images ({len(monitor.train_set)} train + {len(monitor.val_set)} val); "
          f"per evaluation {', '.join(f'{t:.2f}' for t in times)} s, median {statistics.median(times):.2f} s "
          f"({n / statistics.median(times):.0f} images/s)")


if __name__ == '__main__':
    main()
