"""The paper's studies: what each table or figure varies, what each of its cells measures, and the paper's numbers.

The numbers are ImageNet-1K top-1 of ViT-L/16 unless said. Values read off a figure are approximate and marked so;
the tables' are exact.
"""
from dataclasses import dataclass

from studies.recipes import EVALUATIONS, PAPER_FINETUNE_BASE, PAPER_LINPROBE_BASE, PAPER_SCRATCH, PAPER_SCRATCH_BASE
from util.errors import UsageError

APPROX = 'approx'

# Figure 5 (ViT-L, 800 epochs): only the 75% points are exact (Table 1's baseline, 84.9 / 73.5); the others are
# read off the figure's curves and may be off by about half a point (fine-tuning) or a point (linear probing)
FIGURE5 = {0.1: (83.0, 54.6), 0.2: (83.3, 58.9), 0.3: (83.7, 63.6), 0.4: (84.2, 66.5), 0.5: (84.5, 69.9),
           0.6: (84.7, 71.8), 0.7: (84.9, 73.0), 0.75: (84.9, 73.5), 0.8: (84.7, 71.8), 0.9: (84.4, 66.1)}
TABLE1A = {1: (84.8, 65.5), 2: (84.9, 70.0), 4: (84.9, 71.9), 8: (84.9, 73.5)}
TABLE1B = {128: (84.9, 69.1), 256: (84.8, 71.3), 512: (84.9, 73.5), 768: (84.4, 73.1), 1024: (84.3, 73.1)}
TABLE1D = [('pixel (w/o norm)', {}, (84.9, 73.5)), ('pixel (w/ norm)', {'norm_pix_loss': True}, (85.4, 73.9)),
           ('PCA', None, (84.6, 72.3)), ('dVAE token', None, (85.3, 71.6))]
TABLE1F = [('random', 0.75, (84.9, 73.5)), ('block', 0.5, (83.9, 72.3)), ('block', 0.75, (82.8, 63.9)),
           ('grid', 0.75, (84.0, 66.0))]
# Figure 9, MAE ViT-L: top-1 with the last K blocks fine-tuned (K=0: the linear probe)
FIGURE9 = {0: 73.5, 1: 81.0, 2: 83.1, 4: 84.2, 6: 84.4, 12: 84.6, 18: 84.7, 24: 84.9}
# Table 3: from scratch (the paper's own from-scratch recipe, Appendix A.2) vs MAE (1600 epochs, normalised pixels)
TABLE3 = {'ViT-B/16': (82.3, 83.6), 'ViT-L/16': (82.6, 85.9)}
TABLE3_MAE = {'norm_pix_loss': True, 'epochs': 1600}
TABLE3_VIT_B = {'finetune': PAPER_FINETUNE_BASE, 'linprobe': PAPER_LINPROBE_BASE}  # each evaluation's ViT-B recipe
# its from-scratch column at paper scale: the paper's supervised recipe (Appendix A.2), with the EMA it reports
TABLE3_SCRATCH = {'ViT-B/16': PAPER_SCRATCH_BASE, 'ViT-L/16': PAPER_SCRATCH}

STUDIES = ('mask_ratio', 'decoder_depth', 'decoder_width', 'target', 'mask_sampling', 'partial_ft', 'scratch')
VALUE_STUDIES = ('mask_ratio', 'decoder_depth', 'decoder_width', 'partial_ft')  # the ones --values applies to
ABLATIONS = ('mask_ratio', 'decoder_depth', 'decoder_width', 'target', 'mask_sampling')  # Figure 5, Table 1
# The evaluations of each cell unless --evals says otherwise, the first the study's headline. At paper scale the
# paper's columns. At small scale the ablations' findings are in linear probing (Figure 5's rise to 75%, Table 1's
# spread of 2-10 points where fine-tuning's is under 1), so they get the cheap evaluations of frozen features: the
# feature probe (the proxy of linear probing, beside the paper's number) and kNN; fine-tuning is a column on
# request (--evals probe knn finetune). Figure 9 and Table 3 are findings about fine-tuning, for which frozen
# features are no proxy: they keep the paper's columns.
PAPER_EVALS = dict({name: ('finetune', 'linprobe') for name in STUDIES}, scratch=('finetune',))
SMALL_EVALS = dict(PAPER_EVALS, **{name: ('probe', 'knn') for name in ABLATIONS})
DEFAULT_EVALS = {'paper': PAPER_EVALS, 'small': SMALL_EVALS, 'quick': SMALL_EVALS}
FROZEN = ('linprobe', 'probe', 'knn')  # evaluations of frozen features: partial_ft's K = 0
# the paper's measure beside a column of ours that is not the paper's own (its header in the paper's column)
PAPER_MEASURE = {'probe': 'linear probing'}


@dataclass(frozen=True)
class Measure:
    """One number of a table: an evaluation (``kind``: one of EVALUATIONS, with ``flags`` on top of its recipe) of
    the encoder pre-trained with ``pretrain`` (flags on top of the recipe), or of a randomly initialised one when
    ``pretrain`` is None (training from scratch)."""
    kind: str
    pretrain: tuple = ()  # sorted (flag, value) pairs; None: from scratch
    flags: tuple = ()  # sorted (flag, value) pairs


def measure(kind, pretrain=None, scratch=False, **flags):
    return Measure(kind, None if scratch else tuple(sorted((pretrain or {}).items())), tuple(sorted(flags.items())))


@dataclass
class Cell:
    """A row of a study's table: its label, what is measured in each column, and the paper's numbers."""
    label: str
    measures: dict  # column -> Measure (missing: not measured here)
    paper: dict  # column -> number, or (number, APPROX)


@dataclass
class Study:
    name: str
    title: str
    columns: list  # (column key, header)
    cells: list
    row_header: str
    # for the plotted studies: {'x': label of the x axis, 'values': x of each cell, and 'paper': {x: the paper's
    # number} where the paper's curve has x values of its own (e.g. Figure 9's blocks of ViT-L)}
    curve: dict = None
    note: str = ''
    recipes: tuple = ()  # (title, flags) of recipes its cells use besides their kinds' (the paper's from scratch)


def evals_per_study(items, studies, scale_name='paper'):
    """``--evals`` as {study: its evaluation kinds}: an item KIND applies to every study, STUDY=KIND[,KIND] to that
    study only; a study given neither keeps the scale's default (DEFAULT_EVALS)."""
    common, own = (), {}
    for item in items or ():
        study, _, kinds = item.rpartition('=')
        kinds = tuple(kinds.split(','))
        for kind in kinds:
            if kind not in EVALUATIONS:
                raise UsageError(f"--evals {item}: no evaluation {kind!r}; choose from {', '.join(EVALUATIONS)}")
            if scale_name == 'paper' and EVALUATIONS[kind].submitit_script is None:
                raise UsageError(f"--evals {item}: {kind} runs here on extracted features, not as a SLURM job; at "
                                 f"--scale paper choose from " + ', '.join(
                                     k for k, e in EVALUATIONS.items() if e.submitit_script))
        if study and study not in studies:
            raise UsageError(f"--evals {item}: {study} is not one of the studies run ({', '.join(studies)})")
        if study:
            own[study] = own.get(study, ()) + kinds
        else:
            common += kinds
    return {s: tuple(dict.fromkeys(own.get(s) or common or DEFAULT_EVALS[scale_name][s])) for s in studies}


def default_mark(label, is_default):
    return f"{label} (default)" if is_default else label


def eval_columns(evals):
    return [(kind, EVALUATIONS[kind].title) for kind in evals]


def paper_pair(pair, approx=False):
    """The paper's (fine-tuning, linear probing) as each column's number: the feature probe stands beside the
    paper's linear probing (its proxy); kNN has none (the paper reports no kNN)."""
    ft, lin = ((v, APPROX) if approx else v for v in pair)
    return {'finetune': ft, 'linprobe': lin, 'probe': lin}


def ablation(name, title, row_header, rows, evals, **study):
    """A study of pre-training flags: one cell per (label, flags, the paper's numbers), each pre-training evaluated
    by each of ``evals``; flags None: not implemented here (the paper's row is shown)."""
    cells = [Cell(label, {} if flags is None else {k: measure(k, flags) for k in evals}, paper)
             for label, flags, paper in rows]
    return Study(name, title, eval_columns(evals), cells, row_header, **study)


def mask_ratio(scale, values, evals):
    default = scale.pretrain['mask_ratio']
    xs = values or sorted(FIGURE5)
    rows = [(default_mark(f"{x:g}", x == default), {} if x == default else {'mask_ratio': x},
             paper_pair(FIGURE5[x], approx=x != 0.75) if x in FIGURE5 else {}) for x in xs]
    return ablation('mask_ratio', "Masking ratio (paper: Figure 5)", 'mask ratio', rows, evals,
                    curve={'x': 'masking ratio', 'values': list(xs)},
                    note="The paper's values other than 75% are read off Figure 5 (approximate).")


def decoder_depth(scale, values, evals):
    xs = [int(x) for x in values] if values else sorted(TABLE1A)
    rows = [(default_mark(str(x), x == scale.decoder_depth), {} if x == scale.decoder_depth else {'decoder_depth': x},
             paper_pair(TABLE1A[x]) if x in TABLE1A else {}) for x in xs]
    return ablation('decoder_depth', "Decoder depth (paper: Table 1a)", 'decoder blocks', rows, evals)


def decoder_width(scale, values, evals):
    # the paper's widths with its 512-d decoder; at other scales the same fractions of the model's own decoder
    factor = scale.decoder_embed_dim / 512
    xs = [int(x) for x in values] if values else [int(w * factor) for w in sorted(TABLE1B)]
    rows = []
    for x in xs:
        paper_width = x / factor
        label = str(x) if factor == 1 else f"{x} (paper's {paper_width:g})"
        flags = {} if x == scale.decoder_embed_dim else {'decoder_embed_dim': x}
        rows.append((default_mark(label, not flags), flags,
                     paper_pair(TABLE1B[paper_width]) if paper_width in TABLE1B else {}))
    return ablation('decoder_width', "Decoder width (paper: Table 1b)", 'decoder width', rows, evals,
                    note=f"Widths scale with the model's own decoder ({scale.decoder_embed_dim}-d, the paper's "
                         f"512-d); the attention heads keep their width, so wider decoders have more heads.")


def target(scale, values, evals):
    rows = [(default_mark(label, flags == {}), flags, paper_pair(pair)) for label, flags, pair in TABLE1D]
    return ablation('target', "Reconstruction target (paper: Table 1d)", 'target', rows, evals,
                    note="PCA and dVAE-token targets are not implemented here (the paper's rows are shown for "
                         "reference).")


def mask_sampling(scale, values, evals):
    rows = []
    for kind, ratio, pair in TABLE1F:
        flags = {} if kind == 'random' else {'mask_type': kind}
        if ratio != scale.pretrain['mask_ratio']:
            flags['mask_ratio'] = ratio
        rows.append((default_mark(f"{kind} {ratio:.0%}", not flags), flags, paper_pair(pair)))
    return ablation('mask_sampling', "Mask sampling (paper: Table 1f)", 'sampling (ratio)', rows, evals)


def partial_ft(scale, values, evals):
    """Figure 9: the last K blocks fine-tuned; K=0 is the linear probe, so ``evals`` keeps K=0 (its first
    evaluation of frozen features: linprobe, or the cheaper probe or knn) and/or K>0 (finetune)."""
    ks = [int(k) for k in values] if values else (sorted(FIGURE9) if scale.name == 'paper' else
                                                   sorted({0, 1, 2, 4, scale.depth} & set(range(scale.depth + 1))))
    for k in ks:
        if not 0 <= k <= scale.depth:
            raise UsageError(f"--values {k}: partial fine-tuning trains the last 0..{scale.depth} blocks of "
                             f"{scale.model_label}")
    frozen = next((kind for kind in evals if kind in FROZEN), None)
    ks = [k for k in ks if (frozen if k == 0 else 'finetune') in evals]
    if not ks:
        raise UsageError("--evals: partial_ft measures fine-tuning (K > 0 blocks) and linear probing (K = 0: "
                         f"{', '.join(FROZEN)}); it has no cell for {', '.join(evals)}")
    cells = []
    for k in ks:
        if k == 0:  # the paper's 0-block point is the linear probe
            m = measure(frozen)
        elif k == scale.depth:  # all blocks: end-to-end fine-tuning
            m = measure('finetune')
        else:
            m = measure('finetune', train_blocks=k)
        paper = FIGURE9.get(k) if scale.name == 'paper' else None
        zero = ' (linear probe)' if frozen == 'linprobe' else f" ({EVALUATIONS[frozen].title})" if frozen else ''
        cells.append(Cell(f"{k}" + (zero if k == 0 else ' (all)' if k == scale.depth else ''),
                          {'top1': m}, {'top1': paper} if paper is not None else {}))
    note = (f"K=0 is the linear probe{f' (here: {frozen})' if frozen else ''}; K=all is end-to-end fine-tuning "
            f"(the same run as the other studies').")
    if scale.name != 'paper':
        note += (f" The paper's curve is for the 24 blocks of ViT-L (K = 0/1/2/4/6/12/18/24: "
                 f"{' / '.join(str(v) for v in FIGURE9.values())}); our model has {scale.depth}.")
    return Study('partial_ft', "Partial fine-tuning (paper: Figure 9)", [('top1', 'top-1')], cells,
                 'blocks fine-tuned (K)', note=note,
                 curve={'x': 'blocks fine-tuned', 'values': ks, 'paper': {} if scale.name == 'paper' else FIGURE9})


def scratch_columns(kind):
    """(key, header) of the from-scratch and from-MAE columns of an evaluation (fine-tuning's are Table 3's)."""
    if kind == 'finetune':
        return [('scratch', 'from scratch'), ('mae', 'fine-tuned from MAE')]
    title = EVALUATIONS[kind].title
    return [(f'scratch_{kind}', f'{title} of random weights'), (f'mae_{kind}', f'{title} of MAE')]


def scratch(scale, values, evals):
    """Table 3: fine-tuning from MAE vs training from random weights. At paper scale the latter is the paper's own
    supervised recipe (Appendix A.2, with its EMA); at the small scales the fine-tuning recipe, from random weights."""
    columns = [c for kind in evals for c in scratch_columns(kind)]
    recipes = ()
    if scale.name == 'paper':
        # Table 3's MAE: 1600 epochs with normalised pixels
        rows = [('ViT-B/16', dict(TABLE3_MAE, model='mae_vit_base_patch16'), TABLE3_VIT_B),
                ('ViT-L/16', TABLE3_MAE, {})]
        note = ("From scratch: the paper's supervised recipe (Appendix A.2, Table 11: AdamW with betas 0.9 / 0.95, "
                "base lr 1e-4, weight decay 0.3, batch 4096, 20 warm-up epochs, 300 epochs for ViT-B and 200 for "
                "ViT-L, drop path 0.1 / 0.2, RandAugment (9, 0.5), label smoothing 0.1, Mixup 0.8, CutMix 1.0, no "
                "random erasing nor layer-wise lr decay, an EMA of the weights with decay 0.9999); its top-1 is the "
                "EMA's, as the paper's (without EMA the paper has 82.1 for ViT-B, 81.5 for ViT-L; the raw weights' "
                "top-1 is test_acc1 in the run's log.txt). Fine-tuned from MAE: the fine-tuning recipe of "
                "FINETUNE.md (ViT-B's own for ViT-B).")
        recipes = tuple((f"training {label} from scratch", TABLE3_SCRATCH[label]) for label, *_ in rows
                        if 'finetune' in evals)
    else:
        rows = [(scale.model_label, {}, {})]
        notes = []
        if 'finetune' in evals:
            notes.append("From scratch and fine-tuned from MAE: this scale's fine-tuning recipe (below), from random "
                         "weights or from the baseline MAE; the paper's from-scratch numbers come from its own "
                         "supervised recipe (Appendix A.2, run by --scale paper) with an EMA of decay 0.9999 over "
                         "200-300 epochs, an average over about 10,000 steps where these runs take a few hundred, so "
                         "it is not used here.")
        frozen = ' and '.join(EVALUATIONS[k].title for k in evals if k != 'finetune')
        if frozen:
            notes.append(f"{frozen[:1].upper() + frozen[1:]}: the same encoder, frozen, with random weights (seed "
                         f"0) or after the baseline MAE.")
        note = ' '.join(notes + [f"The paper's Table 3: ViT-B/16 {TABLE3['ViT-B/16'][0]} vs "
                                 f"{TABLE3['ViT-B/16'][1]}, ViT-L/16 {TABLE3['ViT-L/16'][0]} vs "
                                 f"{TABLE3['ViT-L/16'][1]} (from scratch vs MAE after 1600 epochs)."])
    cells = []
    for label, pretrain, own_recipes in rows:
        measures = {}
        for kind in evals:
            (from_scratch, _), (from_mae, _) = scratch_columns(kind)
            flags = own_recipes.get(kind, {})
            own_scratch = TABLE3_SCRATCH[label] if scale.name == 'paper' and kind == 'finetune' else flags
            measures[from_scratch] = measure(kind, scratch=True, **own_scratch)
            measures[from_mae] = measure(kind, pretrain, **flags)
        paper = {'scratch': TABLE3[label][0], 'mae': TABLE3[label][1]} if label in TABLE3 else {}
        cells.append(Cell(label, measures, paper))
    return Study('scratch', "Training from scratch vs MAE (paper: Table 3)", columns, cells, 'model', note=note,
                 recipes=recipes)


BUILDERS = {'mask_ratio': mask_ratio, 'decoder_depth': decoder_depth, 'decoder_width': decoder_width,
            'target': target, 'mask_sampling': mask_sampling, 'partial_ft': partial_ft, 'scratch': scratch}


def build_study(name, scale, values=None, evals=None):
    """The cells of study ``name`` at ``scale`` (a ``Scale``); ``values`` replaces the study's x values, ``evals``
    (kinds of EVALUATIONS) the evaluations of each cell."""
    if name not in BUILDERS:
        raise UsageError(f"unknown study {name}")
    return BUILDERS[name](scale, values, tuple(evals or DEFAULT_EVALS[scale.name][name]))
