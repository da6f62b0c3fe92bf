"""Vision Transformer classifier for fine-tuning and linear probing MAE encoders.

A thin subclass of timm's ``VisionTransformer`` with the reference's (facebookresearch/mae, models_vit.py) parameter
names, construction order and pooling, so that
- the released MAE checkpoints load as they are: pre-trained ones (encoder only) miss exactly ``head.*`` and, with
  global pooling, ``fc_norm.*``; fine-tuned ones hold ``fc_norm``/``head``;
- with the same seed the freshly built model is bit-identical to the reference's (every layer draws from the global
  RNG when it is built, in the order timm builds them);
- fine-tuned weights also load, strictly, into ``timm.create_model('vit_base_patch16_224', num_classes=N,
  global_pool='avg')`` (global pooling) or ``global_pool='token'`` (class token).
"""
from functools import partial

import torch
import torch.nn as nn
import timm.models.vision_transformer
from torch.utils.checkpoint import checkpoint


class VisionTransformer(timm.models.vision_transformer.VisionTransformer):
    """ViT classifier pooling either the mean of the patch tokens followed by ``fc_norm`` (``global_pool=True``, no
    final ``norm``), or the class token after the final ``norm`` (``global_pool=False``).

    ``global_pool`` here is a bool, as in the reference; timm's own (string) ``global_pool`` stays at its default
    'token', so timm builds ``norm`` and an empty ``fc_norm``, which are then swapped exactly as the reference does
    (LayerNorm draws nothing from the RNG, so the swap keeps the random stream the reference's).
    """

    def __init__(self, global_pool=False, **kwargs):
        super().__init__(**kwargs)
        self.global_pool = global_pool
        if self.global_pool:
            self.fc_norm = kwargs['norm_layer'](kwargs['embed_dim'])
            del self.norm  # the patch-token mean is normalised by fc_norm instead

    def forward_features(self, x):
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        x = self.pos_drop(x)

        for blk in self.blocks:
            # [new] timm's set_grad_checkpointing(): recompute the block in the backward (drop-path draws the same)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)

        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # mean of the patch tokens, class token left out
        return self.norm(x)[:, 0]

    def forward(self, x):
        # the reference's head(forward_features(x)); timm's forward_head would pool a second time
        return self.head(self.forward_features(x))


def _vit(patch_size, embed_dim, depth, num_heads, **kwargs):
    return VisionTransformer(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_base_patch16(**kwargs):
    return _vit(16, 768, 12, 12, **kwargs)


def vit_large_patch16(**kwargs):
    return _vit(16, 1024, 24, 16, **kwargs)


def vit_huge_patch14(**kwargs):
    return _vit(14, 1280, 32, 16, **kwargs)


def vit_tiny_patch4(**kwargs):
    """[new] A very small ViT (64-d, 2 blocks, 32x32 images) for demos and tests on the CPU; not a model of the
    paper. Its encoder is that of ``models_mae.mae_vit_tiny_patch4``."""
    kwargs.setdefault('img_size', 32)
    return _vit(4, 64, 2, 4, **kwargs)


def vit_small_patch4(**kwargs):
    """[new] A small ViT for 32x32 images (CIFAR) on a CPU (192-d, 6 blocks of 3 heads, 4x4 patches), the classifier
    of ``reproduce.py --scale small``; not a model of the paper. Its encoder is that of
    ``models_mae.mae_vit_small_patch4``."""
    kwargs.setdefault('img_size', 32)
    return _vit(4, 192, 6, 3, **kwargs)


MODELS = {
    'vit_base_patch16': vit_base_patch16,
    'vit_large_patch16': vit_large_patch16,
    'vit_huge_patch14': vit_huge_patch14,
    'vit_tiny_patch4': vit_tiny_patch4,
    'vit_small_patch4': vit_small_patch4,
}


def final_norm(model):
    """The norm right before the head: ``fc_norm`` with global pooling, ``norm`` with the class token."""
    return model.fc_norm if model.global_pool else model.norm


def train_last_blocks(model, num_blocks):
    """Partial fine-tuning (paper, Figure 9): freeze every parameter except those of the last ``num_blocks``
    Transformer blocks, the final norm and the head (``num_blocks=0`` trains the final norm and the head only).
    Returns the names of the parameters left trainable."""
    depth = len(model.blocks)
    if not 0 <= num_blocks <= depth:
        raise ValueError(f"can train the last 0..{depth} blocks, not {num_blocks}")
    for p in model.parameters():
        p.requires_grad = False
    trainable = [final_norm(model), model.head] + list(model.blocks)[depth - num_blocks:]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad = True
    return [n for n, p in model.named_parameters() if p.requires_grad]
