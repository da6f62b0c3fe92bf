"""Fixed 2-D sine-cosine position embeddings and their resizing for fine-tuning.

The tables are computed in float64 with numpy, exactly as the reference does (its ``np.float`` was float64), and
only cast to float32 when copied into a model, so the values are bit-identical to the reference's.
"""
import numpy as np
import torch
import torch.nn.functional as F


def _as_hw(grid_size):
    if isinstance(grid_size, int):
        return grid_size, grid_size
    h, w = grid_size
    return int(h), int(w)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Sin-cos table for a grid of patches.

    grid_size: an int for a square grid, or (grid_h, grid_w) for a rectangular one.
    Returns a float64 array of shape (grid_h * grid_w, embed_dim), with a leading all-zero row for the class token
    when ``cls_token`` is set. Rows are in raster order (row-major over the patch grid), like ``PatchEmbed``'s tokens.
    """
    grid_h, grid_w = _as_hw(grid_size)
    # meshgrid(w, h): the first plane holds the column index, the second the row index; the first half of the
    # channels encodes the first plane. This is the reference's (and MoCo v3's) convention; keep it so that
    # square grids give the very same table.
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    if embed_dim % 2 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs an even embed_dim, got {embed_dim}")
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: channels per position; pos: positions of any shape. Returns (pos.size, embed_dim) float64."""
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos position embedding needs an even embed_dim, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)  # float32 positions promote to float64
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def interpolate_pos_embed(model, checkpoint_model, key='pos_embed'):
    """Resize ``checkpoint_model[key]`` in place to the patch grid of ``model`` (bicubic, as DeiT/the reference);
    ``key`` 'decoder_pos_embed' resizes an MAE decoder's. Class/extra tokens are kept as they are. Works for square
    and rectangular grids; a checkpoint's grid is taken to be square (all released checkpoints are)."""
    if key not in checkpoint_model:
        return
    pos_embed_checkpoint = checkpoint_model[key]
    embedding_size = pos_embed_checkpoint.shape[-1]
    grid_h, grid_w = model.patch_embed.grid_size
    num_patches = grid_h * grid_w
    num_extra_tokens = getattr(model, key).shape[-2] - num_patches
    orig_tokens = pos_embed_checkpoint.shape[-2] - num_extra_tokens
    orig_size = int(orig_tokens ** 0.5)
    if orig_size * orig_size != orig_tokens:
        raise ValueError(f"checkpoint pos_embed has {orig_tokens} patch positions, which is not a square grid")
    if (orig_size, orig_size) == (grid_h, grid_w):
        return
    print(("Position interpolate" if key == 'pos_embed' else f"{key}: position interpolate")
          + " from %dx%d to %dx%d" % (orig_size, orig_size, grid_h, grid_w))
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(grid_h, grid_w), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    checkpoint_model[key] = torch.cat((extra_tokens, pos_tokens), dim=1)
