"""CAR_COMPAT=official against the literal implementation's quirks, exactly, and the fixed default.

The official quirks (spec sections 2 and 4): position embeddings stored as fp16; the CRF fed the BGR image
minus the mean cast to uint8; `F.one_hot` of the CRF's labels without a class count, zipped with the
survivors. The default (fixed) drops a survivor that wins no CRF pixel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from car_backend.engine import EngineConfig, Segmenter, get_preset
from car_backend.engine.postprocess import crf_image, crf_masks, pixel_winners
from car_backend.engine.reference import LiteralCaR
from car_backend.engine.vit import embed_patches, interpolate_positions, normalise
from tests.support.engine import scene


@pytest.fixture
def literal(tiny_models):
    proposal, proposal_tokenizer, classifier, classifier_tokenizer = tiny_models

    def make(compat: str) -> LiteralCaR:
        return LiteralCaR(proposal, proposal_tokenizer, classifier, classifier_tokenizer, get_preset("coco"),
                          compat=compat)

    return make


@pytest.mark.parametrize("grid", [(6, 8), (14, 14)])
def test_fp16_positions_equal_the_literal_ones_exactly(tiny_models, literal, grid):
    proposal = tiny_models[0]
    visual = proposal.visual
    expected = literal("official").upsample_positions(visual.positional_embedding.detach(), grid).float()
    got = interpolate_positions(visual, grid).half().float()
    assert torch.equal(got, expected)
    assert not torch.equal(got, literal("fixed").upsample_positions(visual.positional_embedding.detach(), grid))
    pixels = torch.from_numpy(scene(1, grid[0] * 16, grid[1] * 16)).permute(2, 0, 1)[None]
    images = normalise(visual, pixels, torch.float32)
    with torch.no_grad():
        rounded = embed_patches(visual, images, half_positions=True)
        plain = embed_patches(visual, images)
    assert not torch.equal(rounded, plain)  # the rounding reaches the tokens in fp32


def test_official_crf_image_is_bgr_minus_mean_wrapped_to_uint8():
    rgb = np.array([[[200, 150, 120], [0, 0, 0]]], dtype=np.uint8)
    assert crf_image(rgb, official=False) is rgb
    official = crf_image(rgb, official=True)
    assert official.dtype == np.uint8 and official.flags["C_CONTIGUOUS"]
    assert official[0, 0].tolist() == [15, 33, 77]  # (120 - 104.008, 150 - 116.669, 200 - 122.675)
    expected_wrap = (np.array([-104.008, -116.669, -122.675], dtype=np.float32)).astype(np.uint8)
    assert official[0, 1].tolist() == expected_wrap.tolist()


def _proposals(height: int, width: int) -> np.ndarray:
    """Three soft proposals: 0 strong on the left, 1 nowhere above the background, 2 strong on the right."""
    proposals = np.full((3, height, width), 0.05, dtype=np.float32)
    proposals[0, :, : width // 2] = 0.95
    proposals[2, :, width // 2:] = 0.95
    return proposals


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2)], ids=["middle", "trailing", "leading"])
@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
def test_one_hot_truncation_matches_the_literal_zip_exactly(literal, order, separate):
    rgb = scene(2, 40, 64)
    proposals = _proposals(40, 64)[list(order)]
    official = literal("official")
    literal_rows = official.crf(rgb, proposals, separate)  # the literal one-hot, possibly fewer rows
    masks = crf_masks(crf_image(rgb, official=True), proposals, separate)
    aligned, kept = pixel_winners(masks, separate, official=True)
    assert kept.sum() == len(literal_rows)
    assert np.array_equal(aligned[kept], literal_rows)
    empty = order.index(1)  # the survivor that wins no pixel
    if separate or empty == 2:
        assert not kept[-1]  # truncated
    else:
        assert kept.all() and not aligned[empty].any()  # kept, with an empty mask
    fixed_masks, fixed_kept = pixel_winners(masks, separate, official=False)
    assert fixed_kept.tolist() == [i != empty for i in range(3)] and np.array_equal(fixed_masks, masks)


def test_a_survivor_that_wins_no_pixel_is_dropped_by_default_and_kept_officially(tiny_clips):
    """The parity case voc-0: 'tree person' survives the recurrence but wins no CRF pixel."""
    queries = ["cat", "dog", "car", "tree person", "red apple", "boat"]
    base = get_preset("voc")
    preset = dataclasses.replace(base, confidence_threshold=0.04, mask_threshold=base.mask_threshold + 1e-5)
    image = scene(0, 96, 128)
    results = {}
    for compat in ("fixed", "official"):
        segmenter = Segmenter(EngineConfig(device="cpu", compat=compat), proposal_model=tiny_clips[0],
                              classifier_model=tiny_clips[1])
        results[compat] = segmenter.segment(image, queries, preset=preset)
    fixed, official = results["fixed"], results["official"]
    assert "tree person" in official.kept and not official.masks[queries.index("tree person")].any()
    assert "tree person" not in fixed.kept and fixed.scores[queries.index("tree person")] == 0
    assert all(fixed.masks[queries.index(query)].any() for query in fixed.kept)
    assert EngineConfig(compat="official").fingerprint() != EngineConfig().fingerprint()
