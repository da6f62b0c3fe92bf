"""Loading a pre-trained MAE encoder (``--finetune``) into a ViT classifier, with clear errors for files that do not
fit, as the reference's fine-tuning and linear-probing entry points load it."""
import contextlib
import io

from timm.layers import trunc_normal_

from util.checkpoint import fmt_keys
from util.checkpoint import load as load_checkpoint
from util.errors import UsageError
from util.pos_embed import interpolate_pos_embed

# keys every MAE/ViT encoder has
ENCODER_KEYS = ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight')
HEAD_KEYS = ('head.weight', 'head.bias')


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
    checkpoint = load_checkpoint(path, what=what)
    print("Load pre-trained checkpoint from: %s" % path)
    checkpoint_model = checkpoint['model']
    if not isinstance(checkpoint_model, dict) or any(k not in checkpoint_model for k in ENCODER_KEYS):
        raise UsageError(f"{what} {path} is not an MAE/ViT checkpoint: its 'model' entry has no ViT encoder (no "
                         f"{' / '.join(ENCODER_KEYS)})")
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
                         f"{fmt_keys(shapes, 4)}")

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
        parts = ([f"missing keys: {fmt_keys(missing)}"] if missing else []) + \
                ([f"keys of blocks the model does not have: {fmt_keys(extra_blocks)}"] if extra_blocks else [])
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
DECODER_KEYS = ('decoder_embed.weight', 'decoder_pred.weight', 'mask_token')
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
    checkpoint = load_checkpoint(path, what=what)
    state = checkpoint['model']
    if not isinstance(state, dict) or any(k not in state for k in ENCODER_KEYS):
        raise UsageError(f"{what} {path} is not an MAE/ViT checkpoint: its 'model' entry has no ViT encoder (no "
                         f"{' / '.join(ENCODER_KEYS)})")
    if 'fc_norm.weight' in state and 'norm.weight' not in state:
        raise UsageError(f"{what} {path} is a ViT classifier fine-tuned with global pooling (head, fc_norm), not "
                         f"an MAE: its encoder has no final norm to start pre-training from; to train on from it, "
                         f"use main_finetune.py --finetune {path} (or --resume to continue its fine-tuning)")
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
                   f"channels (mean filter x {old_chans}/{in_chans}; README, \"Your own images\")")

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
                         f"{fmt_keys(shapes, 4)}")
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and (full or not k.startswith(('decoder_', 'mask_token')))]
    if extra or missing:
        parts = ([f"keys the model does not have: {fmt_keys(extra)}"] if extra else []) + \
                ([f"missing keys: {fmt_keys(missing)}"] if missing else [])
        raise UsageError(f"{fits} (another depth?): " + '; '.join(parts))
    if check_only:
        return
    model.load_state_dict(state, strict=False)
    print(f"Initialised from {path} ({what}): " + (
        f"encoder and decoder, {len(state)} tensors" if full else
        f"encoder only, {len(state)} tensors; the decoder keeps its own initialisation (as the reference's "
        f"pre-training from scratch)") + adapted + "; optimizer, schedule and epochs start afresh")
