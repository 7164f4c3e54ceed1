"""Proposals: the hand-written batched Grad-CAM backward against autograd; CLIP-ES boxes and refinement."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from car_backend.engine.imageops import pil_bicubic_resize
from car_backend.engine.proposals import ProposalGenerator, box_mask
from car_backend.engine.vit import block_forward, embed_patches, normalise
from tests.support.engine import scene


def autograd_cam(generator: ProposalGenerator, pixels: torch.Tensor, texts: torch.Tensor, members: list[int],
                 target: int) -> torch.Tensor:
    """Grad-CAM of one target by plain autograd through block L (the official computation, one query)."""
    visual = generator.clip.visual
    grid = (pixels.shape[1] // 16 + (pixels.shape[1] % 16 > 0), pixels.shape[2] // 16 + (pixels.shape[2] % 16 > 0))
    with torch.no_grad():
        resized = pil_bicubic_resize(pixels[None], (grid[0] * 16, grid[1] * 16))
        tokens = embed_patches(visual, normalise(visual, resized, torch.float32))
        for block in visual.transformer.resblocks[:-1]:
            tokens, _ = block_forward(block, tokens, need_weights=False)
    last = visual.transformer.resblocks[-1]
    activations = last.ln_1(tokens).detach().requires_grad_(True)
    q, k, v = F.linear(activations, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
    heads = last.attn.num_heads
    q, k, v = (t.reshape(1, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(tokens.shape)
    x = tokens + last.attn.out_proj(attended)
    x = x + last.mlp(last.ln_2(x))
    embedding = F.normalize(visual.ln_post(x)[:, 1:].mean(1) @ visual.proj, dim=-1)
    logits = generator.clip.logit_scale * embedding @ texts[members].T
    probability = torch.softmax(logits, dim=-1)[0, members.index(target)]
    (gradient,) = torch.autograd.grad(probability, activations)
    cam = torch.relu(activations[0, 1:].detach() @ gradient[0, 1:].mean(0))
    for _ in range(2):
        cam = cam - cam.min()
        cam = cam / (1e-15 + cam.max())
    return cam.reshape(grid)


@pytest.mark.parametrize("referring", [False, True])
def test_batched_grad_cam_equals_autograd(tiny_clips, referring):
    clip = tiny_clips[0]
    generator = ProposalGenerator(clip)
    pixels = torch.from_numpy(scene(5, 70, 100)).permute(2, 0, 1).contiguous()
    prepared = generator.prepare(pixels)
    foreground = clip.embed_texts(["cat", "a red car", "tree", "dog", "boat"])
    background = clip.embed_texts([f"a clean origami {w}." for w in ("sky", "road", "wall")])
    cams = generator.cams(prepared, foreground, background, referring=referring)
    texts = torch.cat([foreground, background])
    for i in range(len(foreground)):
        members = ([i] if referring else list(range(len(foreground)))) + list(range(5, 8))
        expected = autograd_cam(generator, pixels, texts, members, i)
        if expected.max() == 0:  # the official fallback: recompute without the background
            expected = autograd_cam(generator, pixels, texts, members[: -3] or [i], i)
        assert torch.allclose(cams[i], expected, atol=2e-5), i


def test_box_mask_follows_clip_es_quirks():
    cam = np.zeros((6, 8), dtype=np.float32)
    cam[1:3, 1:3] = 1.0
    cam[3:6, 5:8] = 0.6  # touches the right and bottom edges
    mask = box_mask(cam, 0.4)
    assert mask[1:3, 1:3].all()
    assert mask[3:5, 5:7].all()
    assert not mask[5].any() and not mask[:, 7].any()  # boxes end at W - 1 / H - 1, exclusive
    assert mask.sum() == 4 + 4
    # only the high blob passes lambda = 0.7; with a blob too faint for any lambda, nothing does
    assert box_mask(cam, 0.7).sum() == 4
    assert not box_mask(np.zeros((4, 4), dtype=np.float32), 0.4).any()


def test_box_threshold_is_lowered_until_something_passes():
    cam = np.full((4, 4), 0.5, dtype=np.float32)
    cam[0, 0] = 0.502  # uint8(0.502 * 255) = 128 = int(1.0 * 128): nothing passes lambda = 1
    assert box_mask(cam, 1.0)[0, 0] == 1.0


def test_refinement_is_the_box_masked_transition_applied_to_the_cam(tiny_clips):
    generator = ProposalGenerator(tiny_clips[0])
    prepared = generator.prepare(torch.from_numpy(scene(2, 64, 96)).permute(2, 0, 1).contiguous())
    transition = prepared.transition.numpy()
    assert np.allclose(transition, transition.T, atol=1e-6)
    cams = torch.zeros(2, *prepared.grid)
    cams[0, 1:3, 2:4] = torch.tensor([[0.2, 1.0], [0.5, 0.7]])
    refined = generator.refine(prepared, cams, clipes_threshold=0.4).numpy()
    boxes = box_mask(cams[0].numpy(), 0.4).reshape(1, -1)
    expected = (transition * boxes) @ cams[0].numpy().reshape(-1)
    expected = (expected - expected.min()) / (1e-15 + (expected - expected.min()).max())
    expected = cv2.resize(expected.reshape(prepared.grid).astype(np.float32), (96, 64))
    assert np.abs(refined[0] - expected).max() < 1e-5
    assert refined[0].min() == 0.0 and 0.9 < refined[0].max() <= 1.0
    assert not refined[1].any()  # an all-zero cam has an empty box: nothing to propagate
