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

``--to hf`` writes a ``save_pretrained`` folder: ``transformers.ViTMAEForPreTraining.from_pretrained(folder)`` loads a
full MAE (decoder included; the same loss for the same ``noise``), ``ViTMAEModel.from_pretrained(folder)`` its
encoder; an encoder-only checkpoint (the released ``mae_pretrain_vit_*.pth``) gives a ``ViTMAEModel`` folder. The
keys follow the installed transformers' layout (4.x: ``vit.encoder.layer.N.attention.attention.{query,key,value}``,
``intermediate``/``output``; 5.x: ``vit.layers.N.attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``; the qkv matrix is
split in three in both). It adds the image processor's settings and a model card (README.md: the training flags,
the data statistics, the last rows of the run's log.txt when it lies beside the checkpoint). transformers is an
optional dependency: ``pip install transformers``.
"""
import argparse
import json
import os

import torch

import models_mae
from util import from_checkpoint
from util.errors import UsageError, run_main
from util.output_dir import read_log_row

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's ViTs of the paper's shapes: (patch, width, depth, heads) -> name
TIMM_NAMES = {(16, 768, 12, 12): 'vit_base_patch16_224', (16, 1024, 24, 16): 'vit_large_patch16_224',
              (14, 1280, 32, 16): 'vit_huge_patch14_224'}
TIMM_GENERIC = 'vit_tiny_patch16_224'  # any other shape: this constructor with the architecture as arguments
LOG_ROWS = 5


def get_args_parser():
    parser = argparse.ArgumentParser('MAE export', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('--checkpoint', required=True, help='ours (checkpoint-*.pth) or a released MAE/ViT file')
    parser.add_argument('--to', required=True, choices=('timm', 'hf'), help='timm state dict, or a Hugging Face folder')
    parser.add_argument('--out', required=True, help='--to timm: a .pth/.safetensors file; --to hf: a folder')
    parser.add_argument('--model', default=None,
                        help="the architecture (default: the checkpoint's, else recognised from its weights)")
    parser.add_argument('--ema', action='store_true',
                        help='[new] the EMA of the weights that main_finetune.py --model_ema keeps in its '
                             'checkpoints, instead of the weights themselves')
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


def timm_call(state_dict, mae_name, input_size, file):
    """``(name, kwargs)`` of the ``timm.create_model`` call that loads the exported ``state_dict`` strictly."""
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
    return name, dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(file), num_classes=classes,
                                                                   custom_load=False), **kwargs)


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
    save_file(tensors, out)
    name, kwargs = timm_call(tensors, mae_name, input_size, out)
    try:
        timm.create_model(name, **kwargs)  # strict: timm refuses a missing or unexpected key
    except (RuntimeError, KeyError) as e:
        os.remove(out)
        raise UsageError(f"--checkpoint {path}: timm's {name} does not load its weights "
                         f"({str(e).splitlines()[0]})") from None
    return name, kwargs


# ---------------------------------------------------------------------------------------------------- Hugging Face
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


def export_hf(path, out, model=None, ema=False):
    """Write the ``save_pretrained`` folder ``out`` of checkpoint ``path``; returns the transformers class saved."""
    state_dict, _ = from_checkpoint.read(path, ema=ema)
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
    # a full MAE as built (its fixed sin-cos tables for its size), or the encoder alone (ViTMAEModel)
    load = from_checkpoint.load_mae if kind == 'mae' else from_checkpoint.load_encoder
    net, info = load(path, model=model, ema=ema)
    if info['norm_pix_loss'] is None:
        info['norm_pix_loss'] = False
    config = hf_config(transformers, net, info, state_dict['patch_embed.proj.weight'].shape[-1])
    with torch.random.fork_rng(devices=[]):  # (transformers draws initial weights, replaced right after)
        hf = transformers.ViTMAEForPreTraining(config) if kind == 'mae' else transformers.ViTMAEModel(config)
    layout = installed_layout(hf)
    tensors = to_hf(net.state_dict(), layout)
    if kind != 'mae':
        tensors = {k[len('vit.'):]: v for k, v in tensors.items()}  # ViTMAEModel is the 'vit' of the full model
    hf.load_state_dict(tensors, strict=True)
    hf.save_pretrained(out)
    try:
        transformers.ViTImageProcessor(size={'height': info['input_size'], 'width': info['input_size']},
                                       image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
                                       ).save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - the weights are written; the processor's settings are a convenience
        print(f"Note: no preprocessor_config.json ({type(e).__name__}: {e})")
    with open(os.path.join(out, 'README.md'), 'w') as f:
        f.write(model_card(path, info, type(hf).__name__, transformers.__version__, layout))
    return type(hf).__name__


def _log_rows(path):
    log = os.path.join(os.path.dirname(os.path.abspath(str(path))), 'log.txt')
    try:
        with open(log, 'rb') as f:
            lines = f.read().split(b'\n')
    except OSError:  # (none, or unreadable: the card goes without)
        return []
    # (a damaged log.txt: only its readable rows)
    return [line.decode('utf-8').strip() for line in lines if read_log_row(line)[0] is not None][-LOG_ROWS:]


def model_card(path, info, class_name, version, layout):
    """README.md of the exported folder: what it is, how to load it, the data statistics, the training flags and
    the last rows of the run's log.txt (when it lies beside the checkpoint)."""
    saved = info['args']
    lines = ['---', 'library_name: transformers', 'tags:', '- vit-mae', '- masked-autoencoder',
             '- image-feature-extraction', '---', '', f"# {info['mae_model']} (MAE)", '',
             f"A masked autoencoder (He et al., 2021, https://arxiv.org/abs/2111.06377) exported from "
             f"`{os.path.basename(str(path))}` by this project's `export.py` (transformers {version}, its "
             f"{layout}.x key layout).", '', '```python', f"from transformers import {class_name}",
             f"model = {class_name}.from_pretrained('<this folder>')", '```', '',
             f"Images: {info['input_size']} x {info['input_size']} pixels, {info['in_chans']} channels; target: "
             f"{'per-patch normalised' if info['norm_pix_loss'] else 'plain'} pixels.", '', '## Data statistics', '']
    stats = {k: v for k, v in saved.items() if any(w in k for w in ('mean', 'std', 'data_path', 'channels'))}
    lines += [f"- `{k}`: {v}" for k, v in sorted(stats.items())]
    if not any(k in saved for k in ('mean', 'std')):
        lines += [f"- input normalisation: mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)} (ImageNet's, the "
                  f"training default)"]
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
def main(args):
    if args.to == 'timm':
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: give a file name in an existing folder")
        name, kwargs = export_timm(args.checkpoint, args.out, args.model, args.ema)
        call = ', '.join([repr(name)] + [f'{k}={v!r}' for k, v in kwargs.items()])
        print(f"wrote {args.out}; timm loads it strictly with:\n    timm.create_model({call})")
        return
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file; --to hf writes a folder")
    class_name = export_hf(args.checkpoint, args.out, args.model, args.ema)
    print(f"wrote {args.out}/: transformers.{class_name}.from_pretrained({json.dumps(args.out)})"
          + (" (and ViTMAEModel for the encoder)" if class_name == 'ViTMAEForPreTraining' else ''))


if __name__ == '__main__':
    run_main(main, get_args_parser())
