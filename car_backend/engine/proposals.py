"""Mask proposals: Grad-CAM on CLIP ViT-B/16 at native resolution, refined with CLIP-ES affinity.

What the official code computes per query (spec section 2), computed here once per image where the text
does not matter:
- the trunk (patch embedding + the first L-1 blocks) and block L's forward run once per image
  (`encode_image`); the head-averaged attention of the last 8 blocks gives the affinity operator,
  Sinkhorn-normalised, symmetrised and squared once per image;
- Grad-CAM needs, per query, the spatial mean of d p_i / d ln_1(block L). That mean is a single vector per
  query, so the backward is done by hand (`_grad_cam_weights`) for all queries at once, without weight
  gradients, and without materialising the per-token gradients of q, k and v: it needs one
  (tokens x 4D x D) product per query instead of autograd's full backward (~3x fewer FLOPs);
- the refinement of all queries is one (N x N) @ (N x Q) product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from car_backend.engine.imageops import cv2_linear_resize, pil_bicubic_resize
from car_backend.engine.models import ClipModel
from car_backend.engine.vit import block_forward, check_plain_vit, embed_patches, normalise

AFFINITY_BLOCKS = 8  # CLIP-ES: attention of the last 8 blocks
SINKHORN_ROUNDS = 3
CAM_EPSILON = 1e-15  # the official scale_cam_image's epsilon
_CHUNK_ELEMENTS = 48_000_000  # cap on (queries x tokens x 4D) floats held at once in the backward


@dataclass
class LastBlock:
    """Block L's forward on one image, in float32, with what its hand-written backward needs."""

    ln1: torch.Tensor  # (T, D) ln_1 output: the Grad-CAM activations (row 0 is CLS)
    q: torch.Tensor  # (H, T, d) unscaled queries
    k: torch.Tensor  # (H, T, d)
    v: torch.Tensor  # (H, T, d)
    probs: torch.Tensor  # (H, T, T) attention probabilities
    context: torch.Tensor  # (H, T, d) probs @ v
    ln2_hat: torch.Tensor  # (N, D) normalised ln_2 input, patch tokens
    ln2_inv_std: torch.Tensor  # (N, 1)
    post_hat: torch.Tensor  # (N, D) normalised ln_post input, patch tokens
    post_inv_std: torch.Tensor  # (N, 1)
    mlp_gain: torch.Tensor  # (N, 4D) activation derivative at the MLP input, times post_inv_std
    mlp_correction: torch.Tensor  # (N, D) ((ls_2 * post_hat) @ c_proj.weight * mlp_gain) @ c_fc.weight
    embedding: torch.Tensor  # (E,) image embedding: mean of ln_post(patch tokens) @ proj


@dataclass
class DenseFeatures:
    """What a mask head reads of one image (engine.head): its (N, 2D) float32 patch features on the device,
    for an (h, w) patch grid (N = h * w)."""

    features: torch.Tensor
    grid: tuple[int, int]


@dataclass
class ProposalImage:
    """Everything about one image the proposal step needs, computed once."""

    size: tuple[int, int]  # (H, W) of the original image
    grid: tuple[int, int]  # (h, w) patch grid
    last_block: LastBlock
    transition: torch.Tensor  # (N, N) CLIP-ES affinity operator


class ProposalGenerator:
    """Soft masks (one per query, at image size, each min-max normalised) from a CLIP ViT."""

    def __init__(self, clip: ClipModel, half_positions: bool = False):
        """`half_positions`: round the position embeddings to fp16 (CAR_COMPAT=official; see embed_patches)."""
        check_plain_vit(clip)
        self.clip = clip
        self.half_positions = half_positions
        patch = clip.visual.patch_size
        self._patch = patch[0] if isinstance(patch, tuple) else patch

    # ----------------------------------------------------------------------------------------- per image
    @torch.inference_mode()
    def prepare(self, pixels: torch.Tensor) -> ProposalImage:
        """Run the image-dependent, text-independent part once. `pixels`: (3, H, W) uint8 on the device."""
        height, width = pixels.shape[-2:]
        grid, tokens = self._tokens(pixels)
        blocks = self.clip.visual.transformer.resblocks
        first_with_weights = max(0, len(blocks) - AFFINITY_BLOCKS)
        attentions = []
        for index, block in enumerate(blocks[:-1]):
            tokens, weights = block_forward(block, tokens, need_weights=index >= first_with_weights)
            if weights is not None:
                attentions.append(weights[0].float())
        last = self._last_block(tokens[0].float())
        attentions.append(last.probs.mean(0))
        affinity = torch.stack(attentions[-AFFINITY_BLOCKS:]).mean(0)[1:, 1:]
        return ProposalImage(size=(height, width), grid=grid, last_block=last, transition=_transition(affinity))

    @torch.no_grad()  # not inference_mode: a head's training saves these for its backward
    def dense_features(self, pixels: torch.Tensor) -> DenseFeatures:
        """The patch features `engine.head.dense_features` reads from `prepare`'s result (block L's ln_1 rows
        and the ln_post output of the patch tokens), without keeping any attention map or the affinity: what
        a mask head trains on, a few MB per image where `prepare` holds ~1 GB at 1024 x 1024 (ViT-B/16).
        Equal to prepare's within float rounding: the attentions run fused here, as no weights are kept.
        `pixels`: (3, H, W) uint8 on the device."""
        grid, tokens = self._tokens(pixels)
        blocks = self.clip.visual.transformer.resblocks
        for block in blocks[:-1]:
            tokens, _ = block_forward(block, tokens, need_weights=False)
        x = tokens[0].float()
        block, visual = blocks[-1], self.clip.visual
        attn = block.attn
        width = x.shape[-1]
        ln1 = _layer_norm(block.ln_1, x)
        qkv = F.linear(ln1, attn.in_proj_weight.float(), _float(attn.in_proj_bias))
        q, k, v = (t.reshape(-1, attn.num_heads, width // attn.num_heads).transpose(0, 1)
                   for t in qkv.split(width, dim=-1))
        context = F.scaled_dot_product_attention(q, k, v)
        attended = F.linear(context.transpose(0, 1).reshape(-1, width), attn.out_proj.weight.float(),
                            _float(attn.out_proj.bias))
        z1 = (x + _layer_scale(block.ls_1, attended))[1:]
        fc, act, proj = block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj
        pre = F.linear(_affine(block.ln_2, _normalise(z1, block.ln_2.eps)[0]), fc.weight.float(), _float(fc.bias))
        z2 = z1 + _layer_scale(block.ls_2, F.linear(act(pre), proj.weight.float(), _float(proj.bias)))
        post_hat, _ = _normalise(z2, visual.ln_post.eps)
        return DenseFeatures(torch.cat([ln1[1:], _affine(visual.ln_post, post_hat)], dim=-1), grid)

    def _tokens(self, pixels: torch.Tensor) -> tuple[tuple[int, int], torch.Tensor]:
        """(patch grid (h, w), embedded tokens (1, T, D)) of (3, H, W) uint8 pixels, resized to whole patches."""
        height, width = pixels.shape[-2:]
        grid = (math.ceil(height / self._patch), math.ceil(width / self._patch))
        resized = pil_bicubic_resize(pixels[None], (grid[0] * self._patch, grid[1] * self._patch))
        return grid, embed_patches(self.clip.visual, normalise(self.clip.visual, resized, self.clip.dtype),
                                   self.half_positions)

    def _last_block(self, x: torch.Tensor) -> LastBlock:
        visual = self.clip.visual
        block = visual.transformer.resblocks[-1]
        attn = block.attn
        heads = attn.num_heads
        width = x.shape[-1]
        head_dim = width // heads
        ln1 = _layer_norm(block.ln_1, x)
        qkv = F.linear(ln1, attn.in_proj_weight.float(), _float(attn.in_proj_bias))
        q, k, v = (t.reshape(-1, heads, head_dim).transpose(0, 1) for t in qkv.split(width, dim=-1))
        probs = torch.softmax((q * head_dim ** -0.5) @ k.transpose(-1, -2), dim=-1)
        context = probs @ v
        attended = F.linear(context.transpose(0, 1).reshape(-1, width), attn.out_proj.weight.float(),
                            _float(attn.out_proj.bias))
        z1 = (x + _layer_scale(block.ls_1, attended))[1:]  # the CLS output is not pooled: patches only
        ln2_hat, ln2_inv_std = _normalise(z1, block.ln_2.eps)
        fc, act, proj = block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj
        pre = F.linear(_affine(block.ln_2, ln2_hat), fc.weight.float(), _float(fc.bias))
        with torch.inference_mode(False), torch.enable_grad():  # the activation is elementwise: its
            pre_leaf = pre.clone().requires_grad_(True)              # derivative is the gradient of its sum
            (act_grad,) = torch.autograd.grad(act(pre_leaf).sum(), pre_leaf)
        z2 = z1 + _layer_scale(block.ls_2, F.linear(act(pre), proj.weight.float(), _float(proj.bias)))
        post_hat, post_inv_std = _normalise(z2, visual.ln_post.eps)
        pooled = _affine(visual.ln_post, post_hat).mean(0)
        mlp_gain = act_grad * post_inv_std
        post_mlp = _layer_scale(block.ls_2, post_hat) @ proj.weight.float()
        return LastBlock(
            ln1=ln1, q=q, k=k, v=v, probs=probs, context=context,
            ln2_hat=ln2_hat, ln2_inv_std=ln2_inv_std, post_hat=post_hat, post_inv_std=post_inv_std,
            mlp_gain=mlp_gain, mlp_correction=(post_mlp * mlp_gain) @ fc.weight.float(),
            embedding=pooled @ visual.proj.float(),
        )

    # ----------------------------------------------------------------------------------------- per query set
    @torch.inference_mode()
    def cams(self, image: ProposalImage, foreground: torch.Tensor, background: torch.Tensor, referring: bool
             ) -> torch.Tensor:
        """Raw Grad-CAM maps (Q, h, w) of the foreground texts (Q, E) against [foreground; background].

        Semantic mode: one softmax over all texts. Referring mode: query i's softmax covers only text i and
        the background (the official code runs one CLIPCAM call per sentence). A map that comes out all zero
        is recomputed without the background texts, as the official code does.
        """
        count = len(foreground)
        texts = torch.cat([foreground, background])
        queries = torch.arange(count, device=texts.device)
        sets = torch.zeros(count, len(texts), dtype=torch.bool, device=texts.device)
        if referring:
            sets[queries, queries] = True
        else:
            sets[:, :count] = True
        sets[:, count:] = True
        cams = self.grad_cams(image, texts, sets, queries)
        empty = cams.flatten(1).amax(dim=1) == 0
        if empty.any():
            sets[:, count:] = False
            cams[empty] = self.grad_cams(image, texts, sets[empty], queries[empty])
        return cams

    def grad_cams(self, image: ProposalImage, texts: torch.Tensor, softmax_sets: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of each target text, as the official CAM class computes it, at patch resolution: (Q, h, w).

        `texts` (M, E) are unit text embeddings; map i's target is the softmax probability of text
        `targets[i]` over the texts where `softmax_sets[i]` (Q, M bool) is True. Each map is ReLU'd and
        min-max normalised twice (once per layer, once after aggregating the single layer), as officially.
        """
        last = image.last_block
        grads = self._embedding_gradients(last.embedding, texts, softmax_sets, targets)
        weights = torch.cat([self._grad_cam_weights(last, g) for g in _chunks(grads, last)])
        cams = torch.relu(weights @ last.ln1[1:].T)
        cams = _min_max(_min_max(cams))
        return cams.reshape(-1, *image.grid)

    def _embedding_gradients(self, embedding: torch.Tensor, texts: torch.Tensor, sets: torch.Tensor,
                             targets: torch.Tensor) -> torch.Tensor:
        """d p_i / d embedding (Q, E), p_i = softmax(scale * cos(embedding, texts)) over set i, at targets[i]."""
        norm = embedding.norm()
        unit = embedding / norm
        scale = self.clip.logit_scale
        logits = scale * (texts @ unit)
        probs = torch.softmax(logits.masked_fill(~sets, float("-inf")), dim=-1)  # (Q, M), zero off-set
        target = probs.gather(1, targets[:, None])
        d_unit = scale * target * (texts[targets] - probs @ texts)
        return (d_unit - (d_unit @ unit)[:, None] * unit) / norm

    def _grad_cam_weights(self, last: LastBlock, grad_embedding: torch.Tensor) -> torch.Tensor:
        """Spatial mean over patch tokens of d p / d ln_1 output (Q, D): the hand-written backward of block L.

        Row-vector convention, Linear layers y = x W^T. T = N + 1 tokens, token 0 is CLS. The CLS output is
        not pooled and the MLP is per token, so every cotangent before the attention is zero on token 0.
        """
        visual = self.clip.visual
        block = visual.transformer.resblocks[-1]
        attn = block.attn
        width = last.ln1.shape[-1]
        heads, _, head_dim = last.q.shape
        patches = last.post_hat.shape[0]
        # ln_post + mean over patches: every patch receives u / N, u = d p / d pooled
        u = grad_embedding @ visual.proj.float().T
        g = visual.ln_post.weight.float() * u / patches
        centred = g - g.mean(-1, keepdim=True)
        beta = (g @ last.post_hat.T) / width  # (Q, N): mean(g * post_hat_m)
        d_z2 = last.post_inv_std * (centred[:, None, :] - beta[..., None] * last.post_hat)
        # MLP. d_z2[q, m] = post_inv_std[m] * (centred[q] - beta[q, m] * post_hat[m]), so with w = (ls_2 *
        # centred) @ W2: d_ln2[q, m] = (mlp_gain[m] * w[q]) @ W1 - beta[q, m] * mlp_correction[m]. The first
        # term for all queries is one (N x 4D) @ (4D x Q*D) product with per-query scaled copies of W1.
        w = _layer_scale(block.ls_2, centred) @ block.mlp.c_proj.weight.float()
        w1 = block.mlp.c_fc.weight.float()
        scaled = (w.T[:, :, None] * w1[:, None, :]).reshape(w1.shape[0], -1)
        d_ln2 = (last.mlp_gain @ scaled).reshape(patches, -1, width).transpose(0, 1)
        d_ln2 = d_ln2 - beta[..., None] * last.mlp_correction
        g2 = block.ln_2.weight.float() * d_ln2
        d_z1 = d_z2 + last.ln2_inv_std * (
            g2 - g2.mean(-1, keepdim=True) - last.ln2_hat * (g2 * last.ln2_hat).mean(-1, keepdim=True)
        )
        # attention: only the sums over patch tokens of d q, d k, d v are needed
        d_attended = _layer_scale(block.ls_1, d_z1)
        d_context = (d_attended @ attn.out_proj.weight.float()).reshape(-1, patches, heads, head_dim).transpose(1, 2)
        probs_from_patches = last.probs[:, 1:, :]  # (H, N, T): rows n >= 1
        zeta = (d_context * last.context[None, :, 1:]).sum(-1)  # (Q, H, N): rowsum(dP * P)
        spread = torch.einsum("hnm,qhnd->qhmd", probs_from_patches, d_context)
        col_sums = (last.v[None] * spread).sum(-1) - torch.einsum("hnm,qhn->qhm", probs_from_patches, zeta)
        scale = head_dim ** -0.5
        sum_dq = scale * torch.einsum("qhm,hmd->qhd", col_sums, last.k)
        d_scores_cls = last.probs[None, :, 1:, 0] * (d_context @ last.v[:, 0, :, None]).squeeze(-1) - (
            last.probs[None, :, 1:, 0] * zeta
        )
        sum_dk = -scale * torch.einsum("qhm,hmd->qhd", d_scores_cls, last.q[:, 1:])
        sum_dv = torch.einsum("hm,qhmd->qhd", 1.0 - last.probs[:, 1:, 0], d_context)
        w_q, w_k, w_v = attn.in_proj_weight.float().split(width)
        sums = [s.reshape(len(s), width) for s in (sum_dq, sum_dk, sum_dv)]
        return (sums[0] @ w_q + sums[1] @ w_k + sums[2] @ w_v) / patches

    def refine(self, image: ProposalImage, cams: torch.Tensor, clipes_threshold: float) -> torch.Tensor:
        """CLIP-ES class-aware refinement of raw cams (Q, h, w) -> soft maps (Q, H, W) in [0, 1]."""
        boxes = np.stack([box_mask(cam, clipes_threshold) for cam in cams.cpu().numpy()])
        boxes = torch.as_tensor(boxes, device=cams.device).flatten(1)
        refined = (image.transition @ (boxes * cams.flatten(1)).T).T
        refined = _min_max(refined).reshape(cams.shape)
        return cv2_linear_resize(refined, image.size)


def box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """CLIP-ES's box mask from a cam at patch resolution: union of the boxes of all thresholded contours.

    Threshold = int(lambda * max(uint8(cam * 255))), strict; lambda drops by 0.1 until a pixel passes (the
    official loop stops at lambda <= 0: an all-zero cam gives an empty mask). Boxes end at (x + w, y + h)
    clipped to (W - 1, H - 1) and fill [y0, y1) x [x0, x1), as the official code does.
    """
    height, width = cam.shape
    scores = (cam * 255).astype(np.uint8)
    while True:
        _, binary = cv2.threshold(scores, int(threshold * scores.max()), 255, cv2.THRESH_BINARY)
        if binary.max() > 0 or threshold <= 0:
            break
        threshold -= 0.1
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros((height, width), dtype=np.float32)
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        mask[y:min(y + h, height - 1), x:min(x + w, width - 1)] = 1.0
    return mask


def _transition(affinity: torch.Tensor) -> torch.Tensor:
    """Sinkhorn (columns then rows, 3 rounds), symmetrise, square."""
    t = affinity
    for _ in range(SINKHORN_ROUNDS):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-row (x - min) / (eps + max) over the last dimension."""
    x = x - x.amin(dim=-1, keepdim=True)
    return x / (CAM_EPSILON + x.amax(dim=-1, keepdim=True))


def _chunks(grads: torch.Tensor, last: LastBlock) -> list[torch.Tensor]:
    per_query = last.mlp_gain.shape[1] * max(last.mlp_gain.shape[0], last.ln1.shape[1])
    size = max(1, _CHUNK_ELEMENTS // per_query)
    return list(grads.split(size))


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    inv_std = torch.rsqrt(var + eps)
    return (x - mean) * inv_std, inv_std


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, _float(norm.weight), _float(norm.bias), norm.eps)


def _affine(norm: torch.nn.LayerNorm, x_hat: torch.Tensor) -> torch.Tensor:
    return x_hat * norm.weight.float() + norm.bias.float()


def _layer_scale(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x times a LayerScale's gamma (open_clip uses nn.Identity when there is none)."""
    gamma = getattr(module, "gamma", None)
    return x * gamma.float() if gamma is not None else x


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None
