"""Masked Autoencoder with a Vision Transformer backbone (He et al., 2021).

Parameter names, module order and initialisation follow the reference implementation (facebookresearch/mae), so that
with the same seed the weights are bit-identical and the released checkpoints load as they are. The order in which
sub-modules are created below is part of that contract: each ``nn.Linear``/``nn.Conv2d`` draws from the global RNG
when it is built, and ``initialize_weights`` then draws again in module-registration order.
"""
import math
import random
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed
from torch.utils.checkpoint import checkpoint

from util.pos_embed import get_2d_sincos_pos_embed

# How the kept patches are chosen (the paper's Figure 6 and Table 1f): uniformly at random (the paper's and the
# reference's, the default), block-wise (BEiT's rectangles), or on a regular grid (one patch of every 2x2 cell)
MASK_TYPES = ('random', 'block', 'grid')
GRID_MASK_RATIO = 0.75  # grid-wise sampling keeps one patch of every four, so it masks 75% by construction


class MaskedAutoencoderViT(nn.Module):
    """MAE: a ViT encoder that sees only the visible patches, and a light decoder that reconstructs the pixels.

    ``img_size`` may be an int or ``(height, width)``; both must be multiples of ``patch_size``. ``in_chans`` sets the
    number of image channels for the input, the reconstruction and the loss (3 for RGB, 1 for grayscale, ...).
    ``mask_type`` [new]: 'random' (the reference), 'block' or 'grid'; see ``structured_noise``.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False, mask_type='random'):
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"image size {img_h}x{img_w} is not a multiple of the patch size {patch_size}")
        self.in_chans = in_chans

        # encoder
        self.patch_embed = PatchEmbed((img_h, img_w), patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos table: a parameter (so it is in the state dict, as in the released checkpoints) with no grad
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)

        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.mask_type = mask_type
        self.grad_checkpointing = False  # [new] see set_grad_checkpointing

        self.initialize_weights()

    # ------------------------------------------------------------------ initialisation
    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        decoder_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # the patch projection is initialised like a Linear layer on the flattened patch (as in the JAX ViT)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) with cutoff 2 is in effect normal(std=.02); the reference uses normal_
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def set_grad_checkpointing(self, enable=True):
        """[new] Recompute each encoder block's activations during the backward instead of keeping them (timm's
        name for it): less memory for about one more encoder forward; the same numbers (the recomputation replays
        the same operations)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ patches
    @property
    def patch_size(self):
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs):
        """(N, C, H, W) -> (N, L, p*p*C), patches in raster order, pixels within a patch as (row, col, channel)."""
        p = self.patch_size
        n, c, img_h, img_w = imgs.shape
        if c != self.in_chans or img_h % p or img_w % p:
            raise ValueError(f"patchify expects (N, {self.in_chans}, H, W) with H and W multiples of {p}, "
                             f"got {tuple(imgs.shape)}")
        h, w = img_h // p, img_w // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x):
        """(N, L, p*p*C) -> (N, C, H, W), for the model's own patch grid."""
        p = self.patch_size
        h, w = self.patch_embed.grid_size
        c = self.in_chans
        if x.shape[1] != h * w or x.shape[2] != p * p * c:
            raise ValueError(f"unpatchify expects (N, {h * w}, {p * p * c}), got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------ masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Keep a random subset of ``int(L * (1 - mask_ratio))`` tokens per sample.

        The subset is the tokens with the smallest ``noise``; ``noise`` defaults to ``torch.rand(N, L)`` (the
        reference's draw), and can be given to get a chosen or reproducible mask.
        Returns the kept tokens, the binary mask (0 keep, 1 remove, in the original order) and ``ids_restore``.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))

        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")

        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))

        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def structured_noise(self, n, mask_ratio, device):
        """``noise`` for ``random_masking`` that keeps the patches of a block-wise or grid-wise mask (``mask_type``,
        the paper's Table 1f): each image keeps exactly ``int(L * (1 - mask_ratio))`` patches, as with random masks,
        so batches stay rectangular and the loss is over the same number of patches. Kept patches get values in
        [0, 1), removed ones in [1, 2), all distinct (the order inside each group is the raster order)."""
        grid_h, grid_w = self.patch_embed.grid_size
        length = grid_h * grid_w
        if self.mask_type == 'grid':
            removed = grid_mask(n, grid_h, grid_w, mask_ratio)
        else:
            removed = block_mask(n, grid_h, grid_w, length - int(length * (1 - mask_ratio)))
        order = torch.arange(length, dtype=torch.float32) / length
        return (removed.float() + order).to(device)

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]

        # (random masks draw their noise in random_masking itself: the reference's draw, in the reference's place)
        if noise is None and self.mask_type != 'random':
            noise = self.structured_noise(x.shape[0], mask_ratio, x.device)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)

        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)

        # put mask tokens in the removed places and undo the shuffle (the class token stays in front)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)

        x = x + self.decoder_pos_embed

        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error on the removed patches only; with ``norm_pix_loss`` the target is each patch
        normalised by its own mean and (unbiased) variance."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5

        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def grid_mask(n, grid_h, grid_w, mask_ratio=GRID_MASK_RATIO):
    """Grid-wise sampling (the paper's Figure 6, right): keep one patch of every 2x2 cell, the same corner in every
    cell, that corner drawn per image (so that every patch is sometimes a target). Returns ``(n, grid_h * grid_w)``
    booleans, True for removed patches. Needs an even grid and ``mask_ratio`` 0.75, the only ratio it gives."""
    if mask_ratio != GRID_MASK_RATIO:
        raise ValueError(f"grid masking removes {GRID_MASK_RATIO} of the patches by construction, not {mask_ratio}")
    if grid_h % 2 or grid_w % 2:
        raise ValueError(f"grid masking needs an even patch grid (2x2 cells), not {grid_h}x{grid_w}")
    corner = torch.randint(0, 4, (n,))
    rows = torch.arange(grid_h).view(1, grid_h, 1) % 2
    cols = torch.arange(grid_w).view(1, 1, grid_w) % 2
    kept = (rows == (corner // 2).view(n, 1, 1)) & (cols == (corner % 2).view(n, 1, 1))
    return ~kept.reshape(n, grid_h * grid_w)


def block_mask(n, grid_h, grid_w, num_masked):
    """Block-wise sampling (the paper's Figure 6, middle; BEiT's ``MaskingGenerator``): rectangles of random area
    (at least BEiT's 16 patches of 196, scaled to the grid) and aspect ratio (0.3 to 1/0.3) are removed until
    ``num_masked`` patches are; BEiT may stop short when no rectangle fits the remainder, so the mask is then filled
    with random single patches, to remove exactly ``num_masked``. Returns ``(n, grid_h * grid_w)`` booleans, True for
    removed patches. One draw from torch's global generator per call seeds the rectangles, so ``torch.manual_seed``
    (and a resumed run's restored random state) gives the same masks."""
    length = grid_h * grid_w
    rng = random.Random(int(torch.randint(0, 2 ** 62, (1,)).item()))
    min_area = max(1, round(16 * length / 196))
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    masks = []
    for _ in range(n):
        removed = [False] * length
        count = 0
        while count < num_masked:
            added = _add_block(removed, grid_h, grid_w, min_area, num_masked - count, log_aspect, rng)
            if added == 0:
                break
            count += added
        if count < num_masked:
            rest = [i for i in range(length) if not removed[i]]
            for i in rng.sample(rest, num_masked - count):
                removed[i] = True
        masks.append(removed)
    return torch.tensor(masks, dtype=torch.bool)


def _add_block(removed, grid_h, grid_w, min_area, max_new, log_aspect, rng, attempts=10):
    """BEiT's ``_mask``: up to ``attempts`` tries to remove a rectangle that adds between 1 and ``max_new`` removed
    patches; returns how many it added (0: none fitted)."""
    for _ in range(attempts):
        area = rng.uniform(min_area, max_new)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if h < grid_h and w < grid_w:
            top = rng.randint(0, grid_h - h)
            left = rng.randint(0, grid_w - w)
            cells = [r * grid_w + c for r in range(top, top + h) for c in range(left, left + w)]
            new = [i for i in cells if not removed[i]]
            if 0 < len(new) <= max_new:
                for i in new:
                    removed[i] = True
                return len(new)
    return 0


def decoder_heads(decoder_embed_dim, head_dim):
    """The decoder's number of attention heads for a width: the width of each head stays that of the model's own
    decoder (32 for the paper's 512-d decoder of 16 heads), so Table 1b's widths change the number of heads."""
    if decoder_embed_dim < 1 or decoder_embed_dim % head_dim:
        raise ValueError(f"the decoder width must be a positive multiple of {head_dim} (the width of its attention "
                         f"heads), not {decoder_embed_dim}")
    return decoder_embed_dim // head_dim


def decoder_size(state_dict):
    """``{'decoder_embed_dim': D, 'decoder_depth': N}`` of a full MAE state dict, from its shapes (a checkpoint of
    ``--decoder_embed_dim``/``--decoder_depth`` builds with them)."""
    depth = len({k.split('.')[1] for k in state_dict if k.startswith('decoder_blocks.')})
    return {'decoder_embed_dim': state_dict['decoder_embed.weight'].shape[0], 'decoder_depth': depth}


def _mae(patch_size, embed_dim, depth, num_heads, decoder_embed_dim=None, decoder_depth=None, decoder_head_dim=32,
         own_decoder=(512, 8), **kwargs):
    """The paper's MAE models: ``decoder_embed_dim`` and ``decoder_depth`` [new] change the decoder only (the
    paper's Table 1a/1b); None (or not given) is the model's ``own_decoder`` (width, depth): the paper's 512-d
    decoder of 8 blocks."""
    decoder_embed_dim = own_decoder[0] if decoder_embed_dim is None else decoder_embed_dim
    decoder_depth = own_decoder[1] if decoder_depth is None else decoder_depth
    if decoder_depth < 1:
        raise ValueError(f"the decoder needs at least one block, not {decoder_depth}")
    return MaskedAutoencoderViT(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
        decoder_num_heads=decoder_heads(decoder_embed_dim, decoder_head_dim),
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _mae(16, 768, 12, 12, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _mae(16, 1024, 24, 16, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _mae(14, 1280, 32, 16, **kwargs)


def mae_vit_tiny_patch4(**kwargs):
    """[new] A very small MAE (64-d encoder of 2 blocks, 32-d decoder of 2 blocks) for demos and tests on the CPU;
    not a model of the paper. Its encoder matches ``models_vit.vit_tiny_patch4``."""
    kwargs.setdefault('img_size', 32)
    return _mae(4, 64, 2, 4, decoder_head_dim=8, own_decoder=(32, 2), **kwargs)


def mae_vit_small_patch4(**kwargs):
    """[new] A small MAE for 32x32 images (CIFAR) on a CPU, the model of ``reproduce.py --scale small``: 192-d
    encoder of 6 blocks (3 heads), 128-d decoder of 4 blocks (4 heads of 32), patches of 4x4 (an 8x8 grid). Not a
    model of the paper; its encoder matches ``models_vit.vit_small_patch4``."""
    kwargs.setdefault('img_size', 32)
    return _mae(4, 192, 6, 3, own_decoder=(128, 4), **kwargs)


# the recommended architectures: decoder of 512 dims and 8 blocks
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b

MODELS = {
    'mae_vit_base_patch16': mae_vit_base_patch16,
    'mae_vit_large_patch16': mae_vit_large_patch16,
    'mae_vit_huge_patch14': mae_vit_huge_patch14,
    'mae_vit_base_patch16_dec512d8b': mae_vit_base_patch16_dec512d8b,
    'mae_vit_large_patch16_dec512d8b': mae_vit_large_patch16_dec512d8b,
    'mae_vit_huge_patch14_dec512d8b': mae_vit_huge_patch14_dec512d8b,
    'mae_vit_tiny_patch4': mae_vit_tiny_patch4,
    'mae_vit_small_patch4': mae_vit_small_patch4,
}
