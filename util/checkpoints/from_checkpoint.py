"""Any MAE/ViT checkpoint into a model: the model built from the file, for the tools that use trained weights
(demo/visualize.py, extract_features.py, export.py, the kNN monitor's features); and the weights of a file made
elsewhere into the model a training run builds (``--finetune`` of main_finetune.py / main_linprobe.py, as the
reference loads it; ``--init_from`` of main_pretrain.py). Every file is read by ``util.checkpoints.checkpoint.load``.

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
    load_pretrained_encoder(vit, path)           # --finetune: the encoder into a classifier being trained
    load_finetune_weights(args, vit, std, resuming)  # the same with the head's initialisation, as the reference
    init_from_checkpoint(mae, path)              # --init_from: an MAE's weights into the MAE being pre-trained

``info`` says what was loaded: ``layout``, ``mae_model``/``vit_model`` (the names in models_mae / models_vit),
``input_size``, ``in_chans``, ``global_pool``, ``norm_pix_loss`` (load_mae), ``num_classes`` (a classifier's head),
``args`` (the checkpoint's flags). Every file that does not fit is a one-line ``UsageError`` naming it.

``encode``/``features`` take either model (the MAE being trained, or the loaded encoder) and run the encoder on
every patch, without masking: the patch embedding plus the position embedding, the class token in front, the
blocks, the final ``norm``. ``'mean'`` is the mean of the patch tokens (class token left out) after that norm; a
global-pool classifier has no final norm but ``fc_norm`` after the mean (as it classifies): its ``'mean'`` is that,
its ``'cls'`` and ``'tokens'`` are not normalised.
"""
import contextlib
import io
import math
import os

import torch
from timm.layers import trunc_normal_

import models_mae
import models_vit
import util.checkpoints.checkpoint as ckpt_io
from util.errors import UsageError
from util.pos_embed import interpolate_pos_embed

ENCODER_KEYS = ('patch_embed.proj.weight', 'pos_embed', 'blocks.0.attn.qkv.weight')  # every MAE/ViT encoder has them
DECODER_KEYS = ('decoder_embed.weight', 'decoder_pred.weight', 'mask_token')
HEAD_KEYS = ('head.weight', 'head.bias')
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
        raise UsageError(f"{what} {path} is not an MAE/ViT checkpoint: it holds no MAE/ViT encoder (its 'model' "
                         f"has no {' / '.join(ENCODER_KEYS)})")
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


# ------------------------------------------------------------------------------------------ training: --finetune
def expected_missing(model):
    """The classifier keys a pre-trained (encoder-only) checkpoint does not hold."""
    keys = set(HEAD_KEYS)
    if model.global_pool:
        keys |= {'fc_norm.weight', 'fc_norm.bias'}
    return keys


def load_pretrained_encoder(model, path, model_name='', what='--finetune'):
    """Load the encoder of the MAE/ViT checkpoint ``path`` into ``model`` (``strict=False``), as the reference:

    - a head of another class count is dropped (with the reference's message);
    - the position embedding is interpolated to the model's patch grid (bicubic, class token kept);
    - the decoder of a full MAE checkpoint (ours, the visualisation ones) and the encoder's final ``norm`` (unused
      with global pooling) are unexpected and ignored;
    - the model may miss only the head and, with global pooling, ``fc_norm`` (a fine-tuned checkpoint holds them).

    Anything else is a ``UsageError`` naming the keys: a file that is not an MAE/ViT checkpoint, another width or
    patch size (shapes), another depth (missing or extra blocks). Returns what ``load_state_dict`` reported.
    """
    checkpoint_model, _ = read(path, what)
    print("Load pre-trained checkpoint from: %s" % path)
    fits = f"{what} {path} does not fit --model {model_name}" if model_name else f"{what} {path} does not fit the model"

    state_dict = model.state_dict()
    for k in HEAD_KEYS:
        if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
            print(f"Removing key {k} from pretrained checkpoint")
            del checkpoint_model[k]

    # shapes first (the position embedding only by its width: its length is resized below)
    shapes = []
    for k, v in checkpoint_model.items():
        if k not in state_dict:
            continue
        own = state_dict[k].shape
        if (v.shape[-1] != own[-1]) if k == 'pos_embed' else (v.shape != own):
            shapes.append(f"{k} {tuple(v.shape)} vs {tuple(own)}")
    if shapes:
        raise UsageError(f"{fits} (another width or patch size?): other shapes (checkpoint vs model): "
                         f"{ckpt_io.fmt_keys(shapes, 4)}")

    try:
        interpolate_pos_embed(model, checkpoint_model)
    except ValueError as e:
        raise UsageError(f"{fits}: {e}") from None
    if 'pos_embed' in checkpoint_model and checkpoint_model['pos_embed'].shape != state_dict['pos_embed'].shape:
        raise UsageError(f"{fits}: pos_embed {tuple(checkpoint_model['pos_embed'].shape)} cannot be resized to "
                         f"{tuple(state_dict['pos_embed'].shape)}")

    missing = set(state_dict) - set(checkpoint_model) - expected_missing(model)
    extra_blocks = [k for k in checkpoint_model if k.startswith('blocks.') and k not in state_dict]
    if missing or extra_blocks:
        parts = ([f"missing keys: {ckpt_io.fmt_keys(missing)}"] if missing else []) + \
                ([f"keys of blocks the model does not have: {ckpt_io.fmt_keys(extra_blocks)}"] if extra_blocks else [])
        raise UsageError(f"{fits}: " + '; '.join(parts))

    msg = model.load_state_dict(checkpoint_model, strict=False)
    unused = sorted({k.split('.')[0] for k in msg.unexpected_keys})
    print(f"Loaded the encoder of {path}: {len(checkpoint_model) - len(msg.unexpected_keys)} tensors"
          + (f"; not used: {', '.join(unused)}" if unused else '')
          + f"; initialised afresh: {', '.join(sorted(msg.missing_keys)) or 'nothing'}")
    return msg


def load_finetune_weights(args, model, head_init_std, resuming):
    """The reference's start of training from ``--finetune``: load the encoder, then draw the head's weights with
    ``trunc_normal_(std=head_init_std)``. When ``resuming``, the file is not read (the checkpoint's weights replace
    everything), but the head is still drawn, so that the random stream goes on as in the reference's resumed run."""
    if not args.finetune or args.eval:
        return
    if resuming:
        print(f"Resuming from {args.resume}: --finetune {args.finetune} is not loaded")
    else:
        load_pretrained_encoder(model, args.finetune, model_name=args.model)
    trunc_normal_(model.head.weight, std=head_init_std)


# ---------------------------------------------------------------------------------------------------- warm start
CLASSIFIER_PREFIXES = ('head.', 'fc_norm.')


def adapt_patch_embed(weight, in_chans):
    """The patch projection ``weight`` (D, C0, p, p) of a C0-channel model for ``in_chans`` channels: every new
    channel gets the mean of the old filters, scaled by C0 / in_chans. An image whose ``in_chans`` channels all hold
    the same values g then gives exactly the activation the old model gave for C0 channels all equal to g (sum over
    channels: in_chans * mean * C0 / in_chans = the old filters' sum), so the encoder's activations keep their scale.
    For one channel this is the RGB filters summed: a grey image is what an RGB model sees of a grey photo."""
    c0 = weight.shape[1]
    return weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (c0 / in_chans)


def adapt_pixel_head(weight_or_bias, old_chans, in_chans):
    """The decoder's prediction head (``decoder_pred``: p*p*C0 outputs, a patch's pixels as (row, col, channel))
    for ``in_chans`` channels: each new channel predicts the mean of the old channels' predictions. Outputs are
    per-channel pixel values, so no rescaling: for a grey image the old channels' predictions agree, and their mean
    is the grey value."""
    rest = weight_or_bias.shape[1:]
    per_pixel = weight_or_bias.reshape(-1, old_chans, *rest)
    return per_pixel.mean(dim=1, keepdim=True).repeat(1, in_chans, *([1] * len(rest))).reshape(-1, *rest)


def init_from_checkpoint(model, path, check_only=False, what='--init_from'):
    """Warm start of pre-training (``--init_from``): load the MAE weights of ``path`` into ``model`` (an MAE), the
    optimizer, schedule and epoch being the caller's, fresh. ``path``: a released full checkpoint (encoder and
    decoder, ``mae_visualize_vit_*.pth``), an encoder-only one (``mae_pretrain_vit_*.pth``: the decoder keeps the
    model's own initialisation, the reference's for pre-training from scratch, said in one line), or one of ours
    (pre-training's checkpoints; a fine-tuned classifier's head is left out).

    - Both position embeddings are resized to the model's patch grid (``interpolate_pos_embed``, as fine-tuning).
    - A checkpoint of RGB (or grey) weights is adapted to the model's ``in_chans``: the patch embedding by
      ``adapt_patch_embed``, the decoder's prediction head by ``adapt_pixel_head``. Weights of another channel
      count (4, 6, 13 bands) have no known relation to other channels: ``UsageError``.
    - Any other mismatch (width, depth, patch size, decoder size) is a ``UsageError`` naming the keys.

    ``check_only``: only the checks (``model`` may be on the meta device), before anything is computed."""
    state, _ = read(path, what)
    if 'fc_norm.weight' in state and 'norm.weight' not in state:
        raise UsageError(f"{what} {path} is a ViT classifier fine-tuned with global pooling (head, fc_norm), not an "
                         f"MAE: its encoder has no final norm to start pre-training from; to train on from it, use "
                         f"main_finetune.py --finetune {path} (or --resume to continue its fine-tuning)")
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    full = all(k in state for k in DECODER_KEYS)
    if not full:  # encoder only (or a stray decoder key): the decoder as the model initialised it
        state = {k: v for k, v in state.items() if not k.startswith(('decoder_', 'mask_token'))}
    fits = f"{what} {path} does not fit the model"

    old_chans, in_chans = state['patch_embed.proj.weight'].shape[1], model.in_chans
    adapted = ''
    if old_chans != in_chans:
        if old_chans not in (1, 3):
            raise UsageError(f"{what} {path} is a {old_chans}-channel model and --in_chans is {in_chans}: only RGB "
                             f"or grey weights can be adapted to another channel count (what its {old_chans} "
                             f"channels mean is not known); pass --in_chans {old_chans} or start from scratch")
        state['patch_embed.proj.weight'] = adapt_patch_embed(state['patch_embed.proj.weight'], in_chans)
        if full:
            for k in ('decoder_pred.weight', 'decoder_pred.bias'):
                state[k] = adapt_pixel_head(state[k], old_chans, in_chans)
        adapted = (f"; patch embedding{' and pixel head' if full else ''} adapted from {old_chans} to {in_chans} "
                   f"channels (mean filter x {old_chans}/{in_chans}; docs/own-images.md)")

    try:
        # (the checks before any compute say nothing: the real load right after says what it interpolates, once)
        with contextlib.redirect_stdout(io.StringIO()) if check_only else contextlib.nullcontext():
            for key in ('pos_embed', 'decoder_pos_embed'):
                interpolate_pos_embed(model, state, key)
    except ValueError as e:
        raise UsageError(f"{fits}: {e}") from None
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise UsageError(f"{fits} (another width, patch size or decoder size?): other shapes (checkpoint vs model): "
                         f"{ckpt_io.fmt_keys(shapes, 4)}")
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and (full or not k.startswith(('decoder_', 'mask_token')))]
    if extra or missing:
        parts = ([f"keys the model does not have: {ckpt_io.fmt_keys(extra)}"] if extra else []) + \
                ([f"missing keys: {ckpt_io.fmt_keys(missing)}"] if missing else [])
        raise UsageError(f"{fits} (another depth?): " + '; '.join(parts))
    if check_only:
        return
    model.load_state_dict(state, strict=False)
    print(f"Initialised from {path} ({what}): " + (
        f"encoder and decoder, {len(state)} tensors" if full else
        f"encoder only, {len(state)} tensors; the decoder keeps its own initialisation (as the reference's "
        f"pre-training from scratch)") + adapted + "; optimizer, schedule and epochs start afresh")


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
