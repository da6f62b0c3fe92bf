"""Any MAE/ViT checkpoint into a model, for the tools that use trained weights (demo/visualize.py,
extract_features.py, export.py, the kNN monitor's features).

The checkpoints it reads (all hold a ``model`` state dict):

- ours: main_pretrain.py's ``checkpoint-*.pth`` (the full MAE, with its flags under ``args``), main_finetune.py's and
  main_linprobe.py's (a ViT classifier: ``head.*``, ``fc_norm.*`` with global pooling; a linear probe's head is a
  BatchNorm + Linear, ``head.0.*``/``head.1.*``);
- the reference's released ones, which have no ``args``: ``mae_pretrain_vit_*.pth`` (the encoder only),
  ``mae_visualize_vit_*.pth`` and ``mae_pretrain_vit_*_full.pth`` (the full MAE), ``mae_finetuned_vit_*.pth``
  (classifiers). Their model is recognised from the weights' shapes.

Public API::

    state_dict, saved_args = read(path)          # the file's 'model' (ema=True: 'model_ema') and its flags
    layout(state_dict)                           # 'mae' (with the decoder), 'encoder' or 'classifier'
    infer_model(state_dict)                      # the models_mae name of its shapes, or None
    model, info = load_mae(path)                 # the full MAE (a models_mae.MaskedAutoencoderViT), eval mode
    model, info = load_encoder(path)             # the encoder as a models_vit.VisionTransformer without head
    tokens = encode(model, images)               # (N, 1 + L, D): class token first, no masking
    f = features(model, images, pool='cls')      # 'cls' (N, D), 'mean' (N, D) or 'tokens' (N, 1 + L, D)

``info`` says what was loaded: ``layout``, ``mae_model``/``vit_model`` (the names in models_mae / models_vit),
``input_size``, ``in_chans``, ``global_pool``, ``norm_pix_loss`` (load_mae), ``num_classes`` (a classifier's head),
``args`` (the checkpoint's flags). Every file that does not fit is a one-line ``UsageError`` naming it.

``encode``/``features`` take either model (the MAE being trained, or the loaded encoder) and run the encoder on
every patch, without masking: the patch embedding plus the position embedding, the class token in front, the
blocks, the final ``norm``. ``'mean'`` is the mean of the patch tokens (class token left out) after that norm; a
global-pool classifier has no final norm but ``fc_norm`` after the mean (as it classifies): its ``'mean'`` is that,
its ``'cls'`` and ``'tokens'`` are not normalised.
"""
import math
import os

import torch

import models_mae
import models_vit
import util.checkpoint as ckpt_io
from util.errors import UsageError
from util.pos_embed import interpolate_pos_embed

ENCODER_KEYS = ('patch_embed.proj.weight', 'pos_embed')
DECODER_KEYS = ('decoder_embed.weight', 'decoder_pred.weight', 'mask_token')
POOLS = ('cls', 'mean', 'tokens')
# keys whose length depends on the image size, not on the architecture
_SIZED = ('pos_embed', 'decoder_pos_embed')


# ---------------------------------------------------------------------------------------------------- the file
def read(path, what='--checkpoint', ema=False):
    """``(state_dict, flags)`` of a checkpoint file: its ``model`` entry (``ema``: its ``model_ema``, the average
    of the weights that main_finetune.py --model_ema keeps), refused in one line when it holds no ViT encoder, and
    its flags as a dict (ours store a dict, the reference's a Namespace, released files none)."""
    checkpoint = ckpt_io.load(path, what=what)
    if ema and checkpoint.get('model_ema') is None:
        raise UsageError(f"--ema: {what} {path} holds no EMA of the weights (main_finetune.py --model_ema keeps "
                         f"one); leave out --ema for its weights")
    state_dict = checkpoint['model_ema' if ema else 'model']
    if not isinstance(state_dict, dict) or any(k not in state_dict for k in ENCODER_KEYS):
        raise UsageError(f"{what} {path} holds no MAE/ViT encoder (its 'model' has no "
                         f"{' / '.join(ENCODER_KEYS)})")
    return state_dict, ckpt_io.stored_args(checkpoint)


def layout(state_dict):
    """'mae' (a full MAE, decoder included), 'classifier' (a fine-tuned or linear-probed ViT: ``head.*``) or
    'encoder' (the encoder only, like the released ``mae_pretrain_vit_*.pth``)."""
    if all(k in state_dict for k in DECODER_KEYS):
        return 'mae'
    if any(k.startswith('head.') for k in state_dict):
        return 'classifier'
    return 'encoder'


def num_classes(state_dict):
    """The class count of a classifier's head (a Linear, or a linear probe's BatchNorm + Linear), else None."""
    for key in ('head.weight', 'head.1.weight'):
        if key in state_dict:
            return state_dict[key].shape[0]
    return None


def _unique_models():
    seen, names = set(), []
    for name, fn in models_mae.MODELS.items():  # aliases (the *_dec512d8b names) map to the same builder
        if fn not in seen:
            seen.add(fn)
            names.append(name)
    return names


def _encoder_part(key):
    return not (key.startswith(('decoder', 'head.', 'fc_norm.')) or key == 'mask_token')


def infer_model(state_dict):
    """The name in ``models_mae.MODELS`` whose weights have the shapes of ``state_dict`` (patch size, width, depth;
    decoder width and depth when it has a decoder), or None. An encoder-only or classifier state dict is compared on
    its encoder. Candidates are built on the meta device: no memory, no time."""
    proj = state_dict['patch_embed.proj.weight']
    p, in_chans = proj.shape[-1], proj.shape[1]
    full = layout(state_dict) == 'mae'
    decoder = models_mae.decoder_size(state_dict) if full else {}
    own = {k: tuple(v.shape) for k, v in state_dict.items()
           if k not in _SIZED and (full or _encoder_part(k))}
    for name in _unique_models():
        try:
            with torch.device('meta'):
                candidate = models_mae.MODELS[name](img_size=p, in_chans=in_chans, **decoder)
        except ValueError:  # another patch size (p is not a multiple of it), or decoder head width
            continue
        theirs = {k: tuple(v.shape) for k, v in candidate.state_dict().items()
                  if k not in _SIZED and (full or _encoder_part(k))
                  and (k in state_dict or not k.startswith('norm.'))}  # a global-pool classifier has no norm
        if theirs == own:
            return name
    return None


def grid_input_size(state_dict):
    """The image size of a square patch grid from the position embedding's length, or None."""
    n = state_dict['pos_embed'].shape[1] - 1
    g = math.isqrt(n)
    return g * state_dict['patch_embed.proj.weight'].shape[-1] if g * g == n else None


def vit_name(mae_name):
    """The models_vit classifier whose encoder is that of the models_mae model ``mae_name``."""
    return mae_name[len('mae_'):].replace('_dec512d8b', '')


def _mae_name(name, state_dict, path, what):
    """The models_mae name of ``name`` (an MAE or a ViT name, e.g. the flags of a fine-tuning run), or of the
    weights' shapes when ``name`` is None."""
    if name is None:
        found = infer_model(state_dict)
        if found is None:
            raise UsageError(f"{what} {path}: its weights fit none of {', '.join(_unique_models())}; pass --model")
        return found
    if name in models_mae.MODELS:
        return name
    if 'mae_' + name in models_mae.MODELS:
        return 'mae_' + name
    raise UsageError(f"--model {name} is not an MAE/ViT model; choose one of: " + ', '.join(models_mae.MODELS))


def _input_size(input_size, saved, state_dict, patch, path, what):
    size = input_size or saved.get('input_size') or grid_input_size(state_dict) or 224
    if size % patch:
        raise UsageError(f"{what} {path}: --input_size {size} is not a multiple of the patch size {patch}")
    return size


# ---------------------------------------------------------------------------------------------------- loading
def load_mae(path, model=None, input_size=None, norm_pix_loss=None, what='--checkpoint', ema=False):
    """The full MAE of ``path`` (decoder included), in eval mode, and ``info``. ``model`` / ``input_size`` /
    ``norm_pix_loss`` default to the checkpoint's flags, else its shapes; a released file does not say its target:
    it is taken to be normalised pixels for ``mae_pretrain_vit_*_full.pth`` (so its authors say), plain pixels
    otherwise (a note says so). ``ema``: the checkpoint's EMA of the weights (``read``)."""
    state_dict, saved = read(path, what, ema)
    missing = [k for k in DECODER_KEYS if k not in state_dict]
    if missing:
        kind = ('a fine-tuned classifier (head.weight)' if layout(state_dict) == 'classifier'
                else 'an encoder only (like the released mae_pretrain_vit_*.pth)')
        raise UsageError(f"{what} {path} holds {kind}, no decoder ({', '.join(missing)} missing): "
                         f"reconstructions need a full MAE checkpoint with the decoder_* keys, e.g. "
                         f"main_pretrain.py's checkpoint-*.pth or the reference's mae_visualize_vit_*.pth")
    name = _mae_name(model or saved.get('model'), state_dict, path, what)
    if norm_pix_loss is None:
        if 'norm_pix_loss' in saved:
            norm_pix_loss = bool(saved['norm_pix_loss'])
        else:
            # the released files say nothing; their authors' word is that the *_full ones predict normalised
            # pixels and the visualisation ones plain pixels
            base = os.path.basename(str(path))
            norm_pix_loss = base.startswith('mae_pretrain_vit_') and base.endswith('_full.pth')
            print(f"Note: {base} does not say how it was trained; taking its target to be "
                  f"{'normalised' if norm_pix_loss else 'plain'} pixels "
                  f"(--{'no_' if norm_pix_loss else ''}norm_pix_loss to change)")
    proj = state_dict['patch_embed.proj.weight']
    input_size = input_size or saved.get('input_size') or grid_input_size(state_dict) or 224
    try:
        with torch.random.fork_rng(devices=[]):  # building draws the initial weights: not from the caller's stream
            # the decoder as trained (main_pretrain.py --decoder_depth/--decoder_embed_dim), from the weights' shapes
            net = models_mae.MODELS[name](img_size=input_size, in_chans=proj.shape[1], norm_pix_loss=norm_pix_loss,
                                          **models_mae.decoder_size(state_dict))
    except ValueError as e:  # an input size that is not a multiple of the patch size, or a foreign decoder width
        raise UsageError(f"{what} {path} does not fit --model {name} at --input_size {input_size}: {e}") from None
    except RuntimeError as e:  # its position embeddings: (input_size / patch)^2 rows
        if 'allocate' not in str(e):
            raise
        raise UsageError(f"--input_size {input_size}: {name} at that size does not fit in memory") from None

    # the position embeddings are fixed sin-cos tables: for another image size the model's own are the right ones
    own = net.state_dict()
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k in _SIZED and k in own and v.shape != own[k].shape)}
    state_dict.update({k: own[k] for k in _SIZED if k not in state_dict})
    problem = ckpt_io.state_dict_mismatch(net, state_dict)
    if problem:
        raise UsageError(f"{what} {path} does not fit --model {name}: {problem}")
    net.load_state_dict(state_dict)
    info = {'layout': 'mae', 'mae_model': name, 'vit_model': vit_name(name), 'input_size': input_size,
            'in_chans': proj.shape[1], 'global_pool': False, 'norm_pix_loss': norm_pix_loss, 'num_classes': None,
            'args': saved, 'path': str(path)}
    return net.eval(), info


def load_encoder(path, model=None, input_size=None, what='--checkpoint', ema=False):
    """The encoder of any checkpoint (full MAE, encoder only, classifier) as a ``models_vit.VisionTransformer``
    without head (``head`` is an Identity), in eval mode, and ``info``. A classifier trained with global pooling
    keeps its ``fc_norm`` (and has no final ``norm``). The position embedding is resized (bicubic, as for
    fine-tuning) when ``input_size`` is not the checkpoint's. ``ema``: the checkpoint's EMA of the weights."""
    state_dict, saved = read(path, what, ema)
    kind = layout(state_dict)
    name = _mae_name(model or saved.get('model'), state_dict, path, what)
    proj = state_dict['patch_embed.proj.weight']
    size = _input_size(input_size, saved, state_dict, proj.shape[-1], path, what)
    global_pool = 'norm.weight' not in state_dict and 'fc_norm.weight' in state_dict
    with torch.random.fork_rng(devices=[]):  # building draws the initial weights: not from the caller's stream
        net = models_vit.MODELS[vit_name(name)](img_size=size, in_chans=proj.shape[1], num_classes=0,
                                                global_pool=global_pool)
    own = net.state_dict()
    encoder = {k: v for k, v in state_dict.items() if k in own}
    fits = f"{what} {path} does not fit --model {vit_name(name)}"
    try:
        interpolate_pos_embed(net, encoder)
    except ValueError as e:
        raise UsageError(f"{fits}: {e}") from None
    problem = ckpt_io.state_dict_mismatch(net, encoder)
    extra_blocks = [k for k in state_dict if k.startswith('blocks.') and k not in own]
    if problem or extra_blocks:
        raise UsageError(f"{fits}: " + (problem or f"keys of blocks the model does not have: "
                                                    f"{ckpt_io.fmt_keys(extra_blocks)}"))
    net.load_state_dict(encoder)
    info = {'layout': kind, 'mae_model': name, 'vit_model': vit_name(name), 'input_size': size,
            'in_chans': proj.shape[1], 'global_pool': global_pool, 'num_classes': num_classes(state_dict),
            'norm_pix_loss': saved.get('norm_pix_loss'), 'args': saved, 'path': str(path)}
    return net.eval(), info


# ---------------------------------------------------------------------------------------------------- features
def encode(model, images):
    """The encoder's tokens for ``images`` (N, C, H, W), every patch kept (no masking, no random draw):
    (N, 1 + L, D), the class token first, after the final ``norm`` when the model has one. ``model``: an MAE
    (``models_mae``) or a ViT (``models_vit``/timm) of the image size of ``images``."""
    x = model.patch_embed(images)
    x = x + model.pos_embed[:, 1:, :]
    cls_token = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    norm = getattr(model, 'norm', None)  # (a global-pool classifier has none: fc_norm follows the mean)
    return norm(x) if norm is not None else x


def features(model, images, pool='cls'):
    """``pool`` of the encoder's tokens (see ``encode``), under ``torch.no_grad`` and in eval mode (the model's
    train/eval mode is put back): 'cls' the class token (N, D), 'mean' the mean of the patch tokens (N, D; a
    global-pool classifier's ``fc_norm`` applied to it), 'tokens' all (N, 1 + L, D). A tuple of pools gives a dict
    of them, from one pass of the encoder."""
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    for p in pools:
        if p not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {p!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens = encode(model, images)
            out = {'tokens': tokens, 'cls': tokens[:, 0]}
            if 'mean' in pools:
                mean = tokens[:, 1:, :].mean(dim=1)
                fc_norm = getattr(model, 'fc_norm', None)
                if getattr(model, 'norm', None) is None and fc_norm is not None:
                    mean = fc_norm(mean)
                out['mean'] = mean
    finally:
        model.train(was_training)
    return out[pool] if isinstance(pool, str) else {p: out[p] for p in pools}
