"""The pieces of an open_clip VisionTransformer that the engine runs itself.

Both CLIPs are run block by block rather than through `visual.forward`: the proposal model needs native
resolution (interpolated position embeddings), attention maps and block L's internals; the classifier needs
the penultimate block's CLS token.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from car_backend.engine.models import ClipModel, ModelSpecError


def check_plain_vit(clip: ClipModel) -> None:
    """The engine runs standard ViT blocks (pre-norm, nn.MultiheadAttention) pooled by ln_post + proj."""
    visual = clip.visual
    for block in visual.transformer.resblocks:
        if not isinstance(block, open_clip.transformer.ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise ModelSpecError(f"{clip.name}: CaR needs plain open_clip ViT blocks (ResidualAttentionBlock)")
    if visual.attn_pool is not None or visual.proj is None or visual.final_ln_after_pool:
        raise ModelSpecError(f"{clip.name}: CaR needs a ViT pooled by ln_post then proj")


def normalise(visual: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the tower's input, as ToTensor + Normalize compute it (in float32)."""
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), device=images.device).view(1, 3, 1, 1)
    return ((images.float() / 255.0 - mean) / std).to(dtype)


def embed_patches(visual: torch.nn.Module, x: torch.Tensor, half_positions: bool = False) -> torch.Tensor:
    """Tokens entering the first block for normalised images (B, 3, H, W): CLS + patches, positions, ln_pre.

    `half_positions` (CAR_COMPAT=official): the position embeddings, resized or not, are rounded to fp16
    before they are added, as the official wrapper stores them (`upsample_position_embedding` returns a
    half Parameter, on every call and for both CLIPs). A no-op for fp16 models; in fp32 it moves the
    tokens by ~1e-4 relative.
    """
    patches = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(len(x), 1, -1)
    patch_h, patch_w = _pair(visual.patch_size)
    grid = (x.shape[-2] // patch_h, x.shape[-1] // patch_w)
    positions = interpolate_positions(visual, grid)
    if half_positions:
        positions = positions.half()
    positions = positions.to(patches.dtype)
    return visual.ln_pre(torch.cat([cls, patches], dim=1) + positions)


def interpolate_positions(visual: torch.nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings resized bilinearly (align_corners=False) to the patch grid, CLS kept."""
    positions = visual.positional_embedding
    side_h, side_w = visual.grid_size
    if (side_h, side_w) == tuple(grid):
        return positions
    patch = positions[1:].float().T.reshape(1, -1, side_h, side_w)
    patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([positions[:1].float(), patch.reshape(positions.shape[1], -1).T])


def block_forward(block: torch.nn.Module, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ResidualAttentionBlock on (B, T, D) tokens; with `need_weights`, also its head-averaged attention."""
    attended, weights = _attention(block.attn, block.ln_1(x), need_weights)
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x))), weights


def _attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, need_weights: bool):
    batch, tokens, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    q, k, v = (
        t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        for t in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
    )
    if need_weights:
        probs = torch.softmax((q * head_dim ** -0.5) @ k.transpose(-1, -2), dim=-1)
        context, weights = probs @ v, probs.mean(1)
    else:
        context, weights = F.scaled_dot_product_attention(q, k, v), None
    out = F.linear(context.transpose(1, 2).reshape(batch, tokens, width), attn.out_proj.weight, attn.out_proj.bias)
    return out, weights


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)
