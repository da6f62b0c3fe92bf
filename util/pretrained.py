"""Loading a pre-trained MAE encoder (``--finetune``) into a ViT classifier, with clear errors for files that do not
fit, as the reference's fine-tuning and linear-probing entry points load it."""
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
