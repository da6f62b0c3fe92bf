"""The kNN monitor's curve next to the training loss, from a run's log.txt (main_pretrain.py --knn_every N):

    python demo/plot_knn.py demo_output/log.txt --out demo_output/knn_monitor.png

Left: train_loss per epoch; right: knn_top1 (class token, the headline) and knn_mean_top1 (mean of the patch tokens)
at the epochs the monitor ran. Needs matplotlib (pip install matplotlib; not a dependency of the training code).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.training.process import run_main  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.flags import Parser  # noqa: E402
from util.training.output_dir import check_outputs  # noqa: E402


def get_args_parser():
    parser = Parser('kNN monitor plot', description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('log', help="a run's log.txt")
    parser.add_argument('--out', default='knn_monitor.png', help='the PNG to write')
    parser.add_argument('--title', default='', help='a line above the plots')
    return parser


def main(args):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("demo/plot_knn.py needs matplotlib: pip install matplotlib") from None
    kinds = plt.figure().canvas.get_supported_filetypes()
    plt.close('all')
    if Path(args.out).suffix[1:].lower() not in kinds:
        raise UsageError(f"--out {args.out}: give a file name ending in one of .{', .'.join(sorted(kinds))}")
    check_outputs([args.out], '--out', [('the log', args.log)])
    try:
        rows = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UsageError(f"{args.log}: cannot be read as a log.txt ({e})") from None
    knn = [r for r in rows if 'knn_top1' in r]
    if not knn:
        raise UsageError(f"{args.log} has no knn_top1: the run had no --knn_every")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    left.plot([r['epoch'] for r in rows], [r['train_loss'] for r in rows], color='tab:blue')
    left.set(xlabel='epoch', ylabel='train_loss', title='reconstruction loss')
    right.plot([r['epoch'] for r in knn], [r['knn_top1'] for r in knn], 'o-', color='tab:orange', ms=3,
               label='knn_top1 (class token)')
    right.plot([r['epoch'] for r in knn], [r['knn_mean_top1'] for r in knn], 's--', color='tab:green', ms=3,
               label='knn_mean_top1 (mean of patches)')
    right.set(xlabel='epoch', ylabel='top-1 (%)', title='kNN monitor (k=20, T=0.07)')
    right.legend(fontsize=8, loc='lower right')
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({len(rows)} epochs, {len(knn)} kNN evaluations)")


if __name__ == '__main__':
    run_main(main, get_args_parser())
