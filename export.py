"""Export a checkpoint where others use ViTs [new]: timm, or the Hugging Face format of transformers.

    python export.py --checkpoint output_dir/checkpoint-last.pth --to timm --out mae_vit_base.pth
    python export.py --checkpoint output_dir/checkpoint-last.pth --to hf --out vit-mae-base/

``--to timm`` writes the encoder's state dict in timm's ``VisionTransformer`` layout (a classifier's head too; a
linear probe's BatchNorm is folded into its linear head), checks that timm loads it strictly, and prints the call
that loads it. The timm model of each of ours:

    mae_vit_base_patch16  -> timm.create_model('vit_base_patch16_224.mae', pretrained=True,
                                               pretrained_cfg_overlay=dict(file='mae_vit_base.pth'))
    mae_vit_large_patch16 -> 'vit_large_patch16_224.mae';  mae_vit_huge_patch14 -> 'vit_huge_patch14_224.mae'
    vit_*  fine-tuned     -> 'vit_base_patch16_224' (etc.) with num_classes=N and global_pool='avg' (global pooling)
                             or 'token' (class token), and pretrained_cfg_overlay=dict(file=..., num_classes=N)
    mae_vit_tiny_patch4 / mae_vit_small_patch4 (not models of the paper) -> 'vit_tiny_patch16_224' with the
                             architecture as keyword arguments (patch_size=4, embed_dim=64, depth=2, num_heads=4,
                             img_size=32, num_classes=0, ...): a timm VisionTransformer of that shape

Another --input_size than 224 adds img_size=...; the printed call is the one to use. The MAE's decoder is not part
of a timm model. A file ending in .safetensors is written with safetensors, anything else with torch.save.

``--to hf`` writes a folder that ``transformers.ViTMAEForPreTraining.from_pretrained`` loads (decoder included; the
same loss for the same ``noise``), or with ``--hf_encoder_only`` (or an encoder-only checkpoint) a ``ViTMAEModel``
folder, in transformers 4.x's key names, which 4.x and 5.x both load; the run's image processor and a model card go
with it. ``--out`` is checked before the checkpoint is read: writable, never the checkpoint by any name, and for
``--to hf`` a new or empty folder, one export.py wrote, or any with ``--overwrite``. docs/evaluation-and-export.md
says more.
"""
import argparse
import json
import os

import torch

import models_mae
from util.training.process import run_main
from util.data import data_stats
from util.checkpoints import from_checkpoint
from util.errors import UsageError
from util.flags import Parser
from util.training.output_dir import check_outputs
from util.training.output_dir import read_log_row

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's ViTs of the paper's shapes: (patch, width, depth, heads) -> name
TIMM_NAMES = {(16, 768, 12, 12): 'vit_base_patch16_224', (16, 1024, 24, 16): 'vit_large_patch16_224',
              (14, 1280, 32, 16): 'vit_huge_patch14_224'}
TIMM_GENERIC = 'vit_tiny_patch16_224'  # any other shape: this constructor with the architecture as arguments
LOG_ROWS = 5
# the model card's words by which a folder is known to be one export.py wrote (and may be written again)
EXPORT_MARK = "by this project's `export.py`"


def get_args_parser():
    parser = Parser('MAE export', description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('--checkpoint', required=True, help='ours (checkpoint-*.pth) or a released MAE/ViT file')
    parser.add_argument('--to', required=True, choices=('timm', 'hf'), help='timm state dict, or a Hugging Face folder')
    parser.add_argument('--out', required=True, help='--to timm: a .pth/.safetensors file; --to hf: a folder')
    parser.add_argument('--model', default=None,
                        help="the architecture (default: the checkpoint's, else recognised from its weights)")
    parser.add_argument('--ema', action='store_true',
                        help='[new] the EMA of the weights that main_finetune.py --model_ema keeps in its '
                             'checkpoints, instead of the weights themselves')
    parser.add_argument('--overwrite', action='store_true',
                        help='[new] --to hf: write into a folder that holds files export.py did not write (its '
                             'config.json, model.safetensors, preprocessor_config.json and README.md are replaced)')
    parser.add_argument('--hf_encoder_only', action='store_true',
                        help='[new] --to hf: write the encoder alone, a ViTMAEModel folder without the decoder '
                             '(default: a full MAE checkpoint gives a ViTMAEForPreTraining folder)')
    return parser


# ---------------------------------------------------------------------------------------------------- timm
def _shape(state_dict):
    proj = state_dict['patch_embed.proj.weight']
    depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
    return proj.shape[-1], proj.shape[0], depth, proj.shape[1]


def timm_state_dict(state_dict):
    """The encoder of ``state_dict`` (and a classifier's ``fc_norm``/head) in timm's VisionTransformer layout; a
    linear probe's head (BatchNorm without affine, then Linear) becomes one Linear: W / s and b - W mean / s, with
    s = sqrt(running_var + eps)."""
    out = {k: v for k, v in state_dict.items() if from_checkpoint._encoder_part(k) or k.startswith('fc_norm.')}
    if 'head.weight' in state_dict:
        out.update({k: state_dict[k] for k in ('head.weight', 'head.bias')})
    elif 'head.1.weight' in state_dict:
        scale = (state_dict['head.0.running_var'] + 1e-6).sqrt()  # main_linprobe.py's BatchNorm1d(eps=1e-6)
        weight = state_dict['head.1.weight'] / scale
        out['head.weight'] = weight
        out['head.bias'] = state_dict['head.1.bias'] - weight @ state_dict['head.0.running_mean']
    return {k: v.contiguous() for k, v in out.items()}


def timm_call(state_dict, mae_name, input_size, file, stats=None):
    """``(name, kwargs)`` of the ``timm.create_model`` call that loads the exported ``state_dict`` strictly; its
    ``pretrained_cfg`` carries ``stats`` (``{'mean', 'std'}``: the run's normalisation, ImageNet's when None) and
    our evaluation resize (bicubic, crop ratio ``eval_crop_pct``), which timm's ``resolve_data_config`` and
    ``create_transform`` then apply."""
    patch, width, depth, in_chans = _shape(state_dict)
    with torch.device('meta'):  # (the head count is not in the weights' shapes)
        heads = models_mae.MODELS[mae_name](img_size=patch).blocks[0].attn.num_heads
    classes = from_checkpoint.num_classes(state_dict) or 0
    name = TIMM_NAMES.get((patch, width, depth, heads))
    kwargs = {}
    if name is None:
        name = TIMM_GENERIC
        kwargs.update(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads)
    elif not classes:
        name += '.mae'  # timm's MAE encoders: no head
    kwargs.update(num_classes=classes)
    if classes:
        kwargs['global_pool'] = 'avg' if 'fc_norm.weight' in state_dict else 'token'
    if input_size != 224:
        kwargs['img_size'] = input_size
    if in_chans != 3:
        kwargs['in_chans'] = in_chans
    # (custom_load=False: our file is a plain state dict, not the .npz that some of timm's configs name; timm 1.0.3
    # would otherwise read it as one)
    stats = stats or {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD}
    overlay = dict(file=str(file), num_classes=classes, custom_load=False, mean=tuple(stats['mean']),
                   std=tuple(stats['std']), interpolation='bicubic', crop_pct=eval_crop_pct(input_size))
    return name, dict(pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def eval_crop_pct(input_size):
    """The crop ratio of our evaluation transform (util/datasets.py eval_transform): resize the short side to
    input_size / ratio, then take the central input_size square."""
    return 224 / 256 if input_size <= 224 else 1.0


def run_stats(saved, state_dict):
    """``{'mean', 'std', 'in_chans'}`` the checkpoint's images were normalised with (its --mean/--std, measured by
    --data_stats auto or given; ImageNet's for checkpoints that store none)."""
    return data_stats.stats_from_checkpoint(saved, state_dict)


def check_shape(state_dict, mae_name, path):
    """Refuse in one line weights of another shape than ``mae_name``'s (a --model of another size): the timm model
    is built with its head count."""
    patch, width, depth, in_chans = _shape(state_dict)
    with torch.device('meta'):  # (no memory, no random draw)
        net = models_mae.MODELS[mae_name](in_chans=in_chans)
    own = (net.patch_embed.proj.weight.shape[-1], net.patch_embed.proj.weight.shape[0], len(net.blocks))
    if own != (patch, width, depth):
        raise UsageError(f"--checkpoint {path} does not fit --model {mae_name}: its weights are patch {patch}, "
                         f"width {width}, {depth} blocks; {mae_name} is patch {own[0]}, width {own[1]}, {own[2]} "
                         f"blocks")


def save_file(tensors, path):
    if str(path).endswith('.safetensors'):
        from safetensors.torch import save_file as save_safetensors
        save_safetensors(tensors, str(path))
    else:
        torch.save(tensors, path)


def export_timm(path, out, model=None, ema=False):
    """Write the timm state dict of checkpoint ``path`` (``ema``: of its EMA of the weights) to ``out``, check that
    timm loads it strictly, and return ``(name, kwargs)`` of the ``timm.create_model`` call that does."""
    import timm
    state_dict, saved = from_checkpoint.read(path, ema=ema)
    mae_name = from_checkpoint._mae_name(model or saved.get('model'), state_dict, path, '--checkpoint')
    check_shape(state_dict, mae_name, path)
    input_size = saved.get('input_size') or from_checkpoint.grid_input_size(state_dict) or 224
    tensors = timm_state_dict(state_dict)
    # written beside ``out`` and renamed over it once timm loads it: a file already there (maybe a hard link of
    # another) is replaced whole or not at all, never written through
    folder, base = os.path.split(os.path.abspath(out))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{base}")  # (the same extension: the same format)
    try:
        save_file(tensors, tmp)
        name, kwargs = timm_call(tensors, mae_name, input_size, tmp, run_stats(saved, state_dict))
        try:
            timm.create_model(name, **kwargs)  # strict: timm refuses a missing or unexpected key
        except (RuntimeError, KeyError) as e:
            raise UsageError(f"--checkpoint {path}: timm's {name} does not load its weights "
                             f"({str(e).splitlines()[0]})") from None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return timm_call(tensors, mae_name, input_size, out, run_stats(saved, state_dict))


# ---------------------------------------------------------------------------------------------------- Hugging Face
# The key layout written, whichever transformers is installed: 4.x's. transformers 4.x reads only its own; 5.x
# converts 4.x's names on loading (its conversion mapping for checkpoints of before 5.0), and the folder loads in
# both with no missing or unexpected key. (5.x's own save_pretrained writes the decoder's blocks as
# decoder.decoder_encoder.layer.N, which 4.x does not read: it gets a random decoder.)
HF_LAYOUT = '4'


def _block_map(ours, theirs, layout):
    """Our key names of one Transformer block -> transformers' (qkv: the three it is split into)."""
    if layout == '4':
        qkv = [f'{theirs}.attention.attention.{n}' for n in ('query', 'key', 'value')]
        names = {'attn.proj': f'{theirs}.attention.output.dense', 'mlp.fc1': f'{theirs}.intermediate.dense',
                 'mlp.fc2': f'{theirs}.output.dense'}
    else:
        qkv = [f'{theirs}.attention.{n}_proj' for n in ('q', 'k', 'v')]
        names = {'attn.proj': f'{theirs}.attention.o_proj', 'mlp.fc1': f'{theirs}.mlp.fc1',
                 'mlp.fc2': f'{theirs}.mlp.fc2'}
    names.update({'norm1': f'{theirs}.layernorm_before', 'norm2': f'{theirs}.layernorm_after'})
    out = {}
    for part in ('weight', 'bias'):
        out[f'{ours}.attn.qkv.{part}'] = [f'{q}.{part}' for q in qkv]
        out.update({f'{ours}.{k}.{part}': [f'{v}.{part}'] for k, v in names.items()})
    return out


def _plain_names():
    """Our keys outside the Transformer blocks -> transformers' (the same in 4.x and 5.x)."""
    names = {'cls_token': 'vit.embeddings.cls_token', 'pos_embed': 'vit.embeddings.position_embeddings',
             'patch_embed.proj.weight': 'vit.embeddings.patch_embeddings.projection.weight',
             'patch_embed.proj.bias': 'vit.embeddings.patch_embeddings.projection.bias',
             'norm.weight': 'vit.layernorm.weight', 'norm.bias': 'vit.layernorm.bias',
             'mask_token': 'decoder.mask_token', 'decoder_pos_embed': 'decoder.decoder_pos_embed'}
    for module in ('decoder_embed', 'decoder_norm', 'decoder_pred'):
        names.update({f'{module}.{p}': f'decoder.{module}.{p}' for p in ('weight', 'bias')})
    return names


def _layer_prefixes(layout):
    """Our block lists -> transformers' ('vit.encoder.layer.' in 4.x, 'vit.layers.' in 5.x)."""
    if layout not in ('4', '5'):
        raise ValueError(f"layout must be '4' or '5', got {layout!r}")
    return {'blocks': 'vit.encoder.layer.' if layout == '4' else 'vit.layers.',
            'decoder_blocks': 'decoder.decoder_layers.'}


def hf_key_map(state_dict, layout):
    """Our key -> the list of transformers ``ViTMAEForPreTraining`` keys it becomes, for the keys of
    ``state_dict`` and transformers ``layout`` '4' (4.x) or '5' (5.x)."""
    mapping = {k: [v] for k, v in _plain_names().items()}
    for ours, theirs in _layer_prefixes(layout).items():
        for n in sorted({int(k.split('.')[1]) for k in state_dict if k.startswith(ours + '.')}):
            mapping.update(_block_map(f'{ours}.{n}', f'{theirs}{n}', layout))
    return {k: v for k, v in mapping.items() if k in state_dict}


def to_hf(state_dict, layout):
    """``state_dict`` (a full MAE or an encoder, ours/the reference's keys) in transformers' ViTMAEForPreTraining
    keys of ``layout`` ('4' or '5'); the qkv matrices split in three (query, key, value)."""
    mapping = hf_key_map(state_dict, layout)
    unknown = sorted(set(state_dict) - set(mapping))
    if unknown:
        raise ValueError(f"keys with no transformers name: {', '.join(unknown[:5])}")
    out = {}
    for k, targets in mapping.items():
        parts = state_dict[k].chunk(len(targets), dim=0) if len(targets) > 1 else [state_dict[k]]
        out.update({t: p.clone() for t, p in zip(targets, parts)})
    return out


def from_hf(hf_state_dict, layout):
    """The inverse of ``to_hf``: transformers' keys of ``layout`` back to ours (query, key, value concatenated)."""
    candidates = dict.fromkeys(_plain_names())
    for ours, theirs in _layer_prefixes(layout).items():
        for n in {int(k[len(theirs):].split('.')[0]) for k in hf_state_dict if k.startswith(theirs)}:
            candidates.update(dict.fromkeys(_block_map(f'{ours}.{n}', f'{theirs}{n}', layout)))
    return {k: torch.cat([hf_state_dict[t] for t in targets])
            for k, targets in hf_key_map(candidates, layout).items() if all(t in hf_state_dict for t in targets)}


def installed_layout(model):
    """'4' or '5': the key layout of the installed transformers, read from a model it built."""
    keys = set(model.state_dict())
    if any('encoder.layer.0.attention.attention.query.weight' in k for k in keys):
        return '4'
    if any('layers.0.attention.q_proj.weight' in k for k in keys):
        return '5'
    raise UsageError("this transformers' ViTMAE has a key layout export.py does not know (neither 4.x's nor 5.x's)")


def hf_config(transformers, net, info, patch_size):
    """The ``ViTMAEConfig`` of ``net`` (our MAE, or an encoder: timm blocks, ``norm``)."""
    block = net.blocks[0]
    kwargs = dict(hidden_size=block.attn.qkv.in_features, num_hidden_layers=len(net.blocks),
                  num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
                  hidden_act='gelu', layer_norm_eps=net.norm.eps, image_size=info['input_size'],
                  patch_size=patch_size, num_channels=info['in_chans'], qkv_bias=True,
                  mask_ratio=float(info['args'].get('mask_ratio', 0.75)), norm_pix_loss=bool(info['norm_pix_loss']))
    if hasattr(net, 'decoder_blocks'):
        dec = net.decoder_blocks[0]
        kwargs.update(decoder_hidden_size=dec.attn.qkv.in_features, decoder_num_hidden_layers=len(net.decoder_blocks),
                      decoder_num_attention_heads=dec.attn.num_heads,
                      decoder_intermediate_size=dec.mlp.fc1.out_features)
    return transformers.ViTMAEConfig(**kwargs)


def export_hf(path, out, model=None, ema=False, encoder_only=False):
    """Write the ``save_pretrained`` folder ``out`` of checkpoint ``path`` (``encoder_only``: a ``ViTMAEModel``
    folder of its encoder, no decoder keys); returns the transformers class written."""
    state_dict, saved = from_checkpoint.read(path, ema=ema)
    kind = from_checkpoint.layout(state_dict)
    if kind == 'classifier':
        raise UsageError(f"--checkpoint {path} is a classifier (head.*), not an MAE: --to hf writes MAE "
                         f"pre-training models (ViTMAEForPreTraining / ViTMAEModel); export a classifier with "
                         f"--to timm")
    try:
        import transformers
    except ImportError:
        raise UsageError("--to hf needs the optional package transformers, which is not installed: "
                         "pip install transformers") from None
    if not transformers.utils.is_torch_available():  # e.g. transformers 5 with torch < 2.6: it builds no models
        raise UsageError(f"--to hf: the installed transformers {transformers.__version__} cannot use the installed "
                         f"torch {torch.__version__} (its models need a newer one): upgrade torch, or install a "
                         f"transformers release that supports torch {torch.__version__}")
    full = kind == 'mae' and not encoder_only
    # a full MAE as built (its fixed sin-cos tables for its size), or the encoder alone (ViTMAEModel)
    load = from_checkpoint.load_mae if full else from_checkpoint.load_encoder
    net, info = load(path, model=model, ema=ema)
    if info['norm_pix_loss'] is None:
        info['norm_pix_loss'] = False
    config = hf_config(transformers, net, info, state_dict['patch_embed.proj.weight'].shape[-1])
    class_name = 'ViTMAEForPreTraining' if full else 'ViTMAEModel'
    ours = net.state_dict()
    write_hf_weights(transformers, out, config, class_name, ours)
    stats = run_stats(saved, state_dict)
    try:
        hf_image_processor(transformers, info['input_size'], stats).save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - the weights are written; the processor's settings are a convenience
        print(f"Note: no preprocessor_config.json ({type(e).__name__}: {e})")
    with open(os.path.join(out, 'README.md'), 'w') as f:
        f.write(model_card(path, info, class_name, transformers.__version__, stats))
    return class_name


def hf_tensors(ours, class_name, layout=HF_LAYOUT):
    """Our state dict ``ours`` as the keys of transformers' ``class_name`` in ``layout`` (``ViTMAEModel`` is the
    ``vit`` of the full model: its keys lack that prefix, and it has no decoder)."""
    tensors = to_hf(ours, layout)
    if class_name == 'ViTMAEModel':
        tensors = {k[len('vit.'):]: v for k, v in tensors.items() if k.startswith('vit.')}
    return tensors


def write_hf_weights(transformers, out, config, class_name, ours):
    """config.json and model.safetensors (``HF_LAYOUT``'s keys) of our state dict ``ours`` in folder ``out``; then
    the installed transformers loads the folder, and must find every key it expects, no other, and our values."""
    from safetensors.torch import save_file as save_safetensors
    os.makedirs(out, exist_ok=True)
    config.architectures = [class_name]
    config.save_pretrained(out)
    weights = os.path.join(out, 'model.safetensors')
    save_safetensors({k: v.contiguous() for k, v in hf_tensors(ours, class_name).items()}, weights,
                     metadata={'format': 'pt'})  # (the metadata save_pretrained writes, which 4.x checks)
    # (quietly: 5.x draws a progress bar while loading, and both write their own report of a bad load, which the one
    # line below replaces)
    log, bars = transformers.utils.logging, transformers.utils.logging.is_progress_bar_enabled()
    verbosity = log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):  # (transformers draws initial weights, replaced on loading)
            loaded, report = getattr(transformers, class_name).from_pretrained(out, output_loading_info=True)
        problems = [f"{what.replace('_', ' ')}: {', '.join(sorted(report[what])[:3])}"
                    for what in ('missing_keys', 'unexpected_keys', 'mismatched_keys') if report.get(what)]
    except Exception as e:  # noqa: BLE001 - 5.x raises for mismatched shapes: said in the line below, as the others
        problems = [f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"]
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    if not problems:
        expected = hf_tensors(ours, class_name, installed_layout(loaded))
        theirs = loaded.state_dict()
        problems = [f"different values: {k}" for k in expected if k in theirs and not torch.equal(theirs[k],
                                                                                                   expected[k])][:1]
    if problems:
        os.remove(weights)
        raise UsageError(f"--to hf: the installed transformers {transformers.__version__} does not load the "
                         f"exported {class_name} as written ({'; '.join(problems)}): please report this, with "
                         f"that version")


def hf_image_processor(transformers, input_size, stats):
    """The ``ViTImageProcessor`` of the run: its normalisation and channel count (``stats``), bicubic resizing to
    ``input_size``. It cannot crop: our evaluation's centre crop (``eval_crop_pct``) is in the model card."""
    from transformers.image_utils import PILImageResampling
    return transformers.ViTImageProcessor(do_resize=True, size={'height': input_size, 'width': input_size},
                                          resample=PILImageResampling.BICUBIC, image_mean=list(stats['mean']),
                                          image_std=list(stats['std']))


def _log_rows(path):
    log = os.path.join(os.path.dirname(os.path.abspath(str(path))), 'log.txt')
    try:
        with open(log, 'rb') as f:
            lines = f.read().split(b'\n')
    except OSError:  # (none, or unreadable: the card goes without)
        return []
    # (a damaged log.txt: only its readable rows)
    return [line.decode('utf-8').strip() for line in lines if read_log_row(line)[0] is not None][-LOG_ROWS:]


def model_card(path, info, class_name, version, stats):
    """README.md of the exported folder: what it is, how to load it, the data statistics (``stats``: the run's
    normalisation) and preprocessing, the training flags and the last rows of the run's log.txt (when it lies beside
    the checkpoint)."""
    saved = info['args']
    size = info['input_size']
    resized = int(size / eval_crop_pct(size))
    lines = ['---', 'library_name: transformers', 'tags:', '- vit-mae', '- masked-autoencoder',
             '- image-feature-extraction', '---', '', f"# {info['mae_model']} (MAE)", '',
             f"A masked autoencoder (He et al., 2021, https://arxiv.org/abs/2111.06377) exported from "
             f"`{os.path.basename(str(path))}` {EXPORT_MARK} (with transformers {version}; the "
             f"weights in transformers 4.x's key names, which 4.x and 5.x both load).", '', '```python',
             f"from transformers import AutoImageProcessor, {class_name}",
             "processor = AutoImageProcessor.from_pretrained('<this folder>')",
             f"model = {class_name}.from_pretrained('<this folder>')",
             "inputs = processor(images, return_tensors='pt')  # " + (
                 "PIL images, RGB" if info['in_chans'] == 3 else
                 f"arrays (H, W, {info['in_chans']}), e.g. numpy.asarray(image)[..., None] for a grey PIL image "
                 f"(transformers 4.x's processor refuses a PIL image of other than 3 channels; 5.x takes it)"),
             '```', '',
             f"Images: {size} x {size} pixels, {info['in_chans']} channel{'s' if info['in_chans'] != 1 else ''}; "
             f"target: "
             f"{'per-patch normalised' if info['norm_pix_loss'] else 'plain'} pixels.", '', '## Data statistics', '',
             f"- input normalisation (in preprocessor_config.json): mean {stats['mean']}, std {stats['std']}"
             + ("" if stats['stored'] else " (ImageNet's, the training default)")]
    given = {k: v for k, v in saved.items() if any(w in k for w in ('data_path', 'data_stats', 'channels'))}
    lines += [f"- `{k}`: {v}" for k, v in sorted(given.items())]
    lines += ['', '## Preprocessing', '',
              f"The image processor resizes the whole image to {size} x {size} (bicubic) and normalises it. This "
              f"project evaluates differently: it resizes the short side to {resized} (bicubic) and takes the "
              f"central {size} x {size} square (util/datasets.py eval_transform); `ViTImageProcessor` cannot crop. "
              f"For the same pixels as ours, crop first:", '', '```python',
              'from torchvision import transforms',
              f"crop = transforms.Compose([transforms.Resize({resized}, interpolation=transforms.InterpolationMode."
              f"BICUBIC), transforms.CenterCrop({size})])",
              "inputs = processor([crop(image) for image in images], return_tensors='pt')", '```']
    lines += ['', '## Training flags', '']
    if saved:
        lines += ['| flag | value |', '|---|---|'] + [f"| `--{k}` | `{v}` |" for k, v in sorted(saved.items())]
    else:
        lines += ['The checkpoint holds no flags (a released file).']
    rows = _log_rows(path)
    if rows:
        lines += ['', '## Last rows of log.txt', '', '```'] + rows + ['```']
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------- main
def written_by_export(folder):
    """Whether ``folder`` holds a model card export.py wrote (so writing there again replaces only its own files)."""
    try:
        with open(os.path.join(folder, 'README.md'), encoding='utf-8', errors='replace') as f:
            return EXPORT_MARK in f.read(4096)
    except OSError:
        return False


def check_out(args):
    """``--out`` can be written, is not ``--checkpoint``, and (``--to hf``) holds nothing export.py did not write
    unless ``--overwrite``: said in one line before the checkpoint is read."""
    if args.hf_encoder_only and args.to != 'hf':
        raise UsageError("--hf_encoder_only is for --to hf (--to timm writes the encoder alone anyway)")
    inputs = [('--checkpoint', args.checkpoint)]
    if args.to == 'timm':
        if args.overwrite:
            raise UsageError("--overwrite is for --to hf's folder (--to timm replaces its --out file whole)")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: give a file name in an existing folder")
        check_outputs([args.out], '--out', inputs)
        return
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file; --to hf writes a folder")
    check_outputs([args.out], '--out', inputs, folder=True)
    held = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
    if held and not args.overwrite and not written_by_export(args.out):
        shown = ', '.join(held[:4]) + (f' (+{len(held) - 4} more)' if len(held) > 4 else '')
        raise UsageError(f"--out {args.out} holds files export.py did not write ({shown}): give a new or empty "
                         f"folder, or pass --overwrite to replace config.json, model.safetensors, "
                         f"preprocessor_config.json and README.md there")


def main(args):
    check_out(args)
    if args.to == 'timm':
        name, kwargs = export_timm(args.checkpoint, args.out, args.model, args.ema)
        call = ', '.join([repr(name)] + [f'{k}={v!r}' for k, v in kwargs.items()])
        print(f"wrote {args.out}; timm loads it strictly with:\n    timm.create_model({call})")
        return
    class_name = export_hf(args.checkpoint, args.out, args.model, args.ema, args.hf_encoder_only)
    print(f"wrote {args.out}/: transformers.{class_name}.from_pretrained({json.dumps(args.out)})"
          + (" (--hf_encoder_only: a ViTMAEModel folder of the encoder alone)"
             if class_name == 'ViTMAEForPreTraining' else ''))


if __name__ == '__main__':
    run_main(main, get_args_parser())
