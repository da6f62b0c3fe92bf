"""``<study>.png`` for the curve studies, drawn with matplotlib (optional: without it the chart is not drawn and one
line says so; the table and the numbers do not need it)."""
import io
import math

from PIL import Image

from studies.paper import PAPER_MEASURE

OURS_COLOUR, PAPER_COLOUR = '#1f77b4', '#d62728'


def plot_curve(study, data, scale_name, path):
    """The curves as the paper draws them: one panel per measure and source (ours, the paper's), top-1 against the
    study's x, each with its own y range (the two are on different data and models). ``data``: the study's
    results (studies.report.results)."""
    try:
        from matplotlib.figure import Figure  # (no pyplot: no global state, no display needed)
    except ImportError:
        print(f"# note: {path.name} not drawn: matplotlib is not installed (pip install matplotlib)")
        return
    titles, xs = dict(study.columns), study.curve['values']
    panels = []
    for key in data['columns']:
        ours = [c['ours'][key]['final'] if c['ours'].get(key) else None for c in data['cells']]
        paper = [c['paper'].get(key) for c in data['cells']]
        if study.curve.get('paper') and not any(paper):  # the paper's curve at its own x (e.g. its 24 blocks)
            paper_xs, paper = list(study.curve['paper']), list(study.curve['paper'].values())
        else:
            paper_xs = xs
        panels.append((f"{titles[key]}: ours ({scale_name} scale)", xs, ours, OURS_COLOUR, 'no results yet'))
        panels.append((f"{PAPER_MEASURE.get(key, titles[key])}: paper (ImageNet, ViT-L)", paper_xs, paper, PAPER_COLOUR,
                       'no paper numbers at these x'))
    rows = math.ceil(len(panels) / 2)
    figure = Figure(figsize=(7.5, 0.4 + 2.4 * rows), dpi=100, layout='constrained')
    percent = all(0 < x < 1 for x in xs)  # ratios as percentages: 70 and 75 side by side stay legible
    figure.suptitle(f"{study.title}; x: {study.curve['x']}{' (%)' if percent else ''}, y: top-1 (%)", fontsize=10)
    for axes, panel in zip(figure.subplots(rows, 2, squeeze=False).flat, panels):
        # e.g. blocks 0, 1, 2, 4, 6, 12, 18, 24 evenly spaced, as the paper draws Figure 9
        draw_panel(axes, *panel, evenly_spaced=study.name == 'partial_ft', percent=percent)
    drawn = io.BytesIO()
    figure.savefig(drawn, format='png')
    Image.open(drawn).quantize(colors=64).save(path, optimize=True)  # a few colours: a file a tenth the size


def draw_panel(axes, title, xs, ys, colour, empty, evenly_spaced, percent):
    axes.set_title(title, fontsize=9, loc='left')
    axes.tick_params(labelsize=8)
    axes.spines[['top', 'right']].set_visible(False)
    positions = list(range(len(xs))) if evenly_spaced else xs
    axes.set_xticks(positions, [f"{100 * x:g}" if percent else f"{x:g}" for x in xs])
    pad = 0.06 * ((max(positions) - min(positions)) or 1)
    axes.set_xlim(min(positions) - pad, max(positions) + pad)  # every x, whether measured yet or not
    points = [(p, y) for p, y in zip(positions, ys) if y is not None]
    if not points:
        axes.text(0.5, 0.5, empty, transform=axes.transAxes, ha='center', va='center', color='gray', fontsize=9)
        axes.set_yticks([])
        return
    axes.plot(*zip(*points), '-o', color=colour, markersize=4, linewidth=1.5)
    below = False
    for i, (x, y) in enumerate(points):
        # a label goes under a point lower than its neighbours (off the line), and on the other side of its point
        # than the label of a close neighbour on the left
        neighbours = [n for _, n in points[max(i - 1, 0):i] + points[i + 1:i + 2]]
        close = i > 0 and x - points[i - 1][0] < 2 * pad
        below = (not below) if close else bool(neighbours) and y < min(neighbours)
        axes.annotate(f"{y:.1f}", (x, y), textcoords='offset points', xytext=(0, -12 if below else 5), ha='center',
                      fontsize=8, color=colour)
    axes.margins(y=0.3)
    axes.grid(axis='y', color='0.92')
