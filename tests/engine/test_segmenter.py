"""The Segmenter API: result contract, inputs, prepared-image cache, loop rules (cap, zero proposals)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from car_backend.engine import EngineConfig, PreparedImage, Segmenter, get_preset
from car_backend.engine import segmenter as segmenter_module
from car_backend.engine.postprocess import crf_masks, crf_masks_with_margin
from car_backend.engine.result import QueryMasks
from tests.support.engine import scene

QUERIES = ["cat", "dog", "car", "boat", "sofa"]
LOW_THETA = dataclasses.replace(get_preset("coco"), confidence_threshold=0.04)


@pytest.fixture
def segmenter(tiny_clips):
    return Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1])


def test_result_contract(segmenter):
    image = scene(1, 72, 100)
    result = segmenter.segment(image, QUERIES, preset=LOW_THETA)
    assert result.queries == QUERIES and result.mode == "semantic" and result.size == (100, 72)
    assert result.label_map.shape == (72, 100) and result.label_map.dtype == np.int32
    assert result.masks.shape == (5, 72, 100) and result.masks.dtype == bool
    assert result.scores.shape == (5,) and result.scores.dtype == np.float32
    assert result.steps >= 2
    kept = [i for i, s in enumerate(result.scores) if s > 0]
    assert result.kept == [QUERIES[i] for i in kept] and 0 < len(kept) < 5
    for i in range(5):
        if i not in kept:
            assert not result.masks[i].any()
        assert np.array_equal(result.label_map == i + 1, result.masks[i])  # joint CRF: disjoint masks
    assert {"trunk", "text", "cam", "refine", "prompts", "classify", "crf", "total"} <= set(result.timings)
    assert result.timings["total"] >= sum(v for k, v in result.timings.items() if k != "total") * 0.99


def test_pil_and_array_inputs_agree_and_the_trunk_is_cached(segmenter):
    image = scene(2, 64, 96)
    first = segmenter.segment(image, QUERIES, preset=LOW_THETA)
    second = segmenter.segment(Image.fromarray(image), QUERIES, preset=LOW_THETA)
    assert first.timings["trunk"] > 0 and second.timings["trunk"] == 0
    assert np.array_equal(first.label_map, second.label_map) and np.array_equal(first.scores, second.scores)
    prepared = segmenter.prepare(image)
    assert isinstance(prepared, PreparedImage) and segmenter.prepare(image.copy()) is prepared
    third = segmenter.segment(prepared, QUERIES[:3], preset=LOW_THETA)
    assert third.timings["trunk"] == 0 and third.size == (96, 64)


def test_image_forms(segmenter):
    rgb = scene(3, 48, 64)
    gray = rgb[..., 0]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert segmenter.segment(gray, ["cat"]).size == (64, 48)
    assert np.array_equal(segmenter.segment(rgba, QUERIES).label_map, segmenter.segment(rgb, QUERIES).label_map)
    with pytest.raises(ValueError, match="uint8"):
        segmenter.segment(rgb.astype(np.float32), ["cat"])
    with pytest.raises(ValueError, match="non-empty"):
        segmenter.segment(rgb, [])
    with pytest.raises(ValueError, match="non-empty"):
        segmenter.segment(rgb, ["cat", " "])
    with pytest.raises(TypeError):
        segmenter.segment(rgb, "cat")
    with pytest.raises(ValueError, match="mode"):
        segmenter.segment(rgb, ["cat"], mode="panoptic")


def test_one_query_always_survives_with_score_one_after_two_steps(segmenter):
    result = segmenter.segment(scene(4, 64, 64), ["zebra"])
    assert result.steps == 2 and result.scores.tolist() == [1.0] and result.kept == ["zebra"]


def test_max_steps_caps_the_recurrence(tiny_clips):
    image = scene(1, 96, 128)
    queries = ["dog", "car", "tree person", "red apple", "boat", "sofa"]  # takes 5 steps uncapped
    uncapped = Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1])
    assert uncapped.segment(image, queries, preset=LOW_THETA).steps == 5
    capped = Segmenter(EngineConfig(device="cpu", max_steps=2), proposal_model=tiny_clips[0],
                       classifier_model=tiny_clips[1])
    result = capped.segment(image, queries, preset=LOW_THETA)
    assert result.steps == 2
    assert 0 < len(result.kept) < len(queries)


def test_all_zero_proposals_at_the_last_step_reuse_the_previous_steps(segmenter, monkeypatch):
    """From step 2 on every proposal is zeroed: the CRF must get the survivors' step-1 proposals."""
    generator = segmenter._generator()
    original = generator.refine
    step_one = []

    def refine(image, cams, threshold):
        maps = original(image, cams, threshold)
        step_one.append(maps)
        return maps if len(step_one) == 1 else torch.zeros_like(maps)

    crf_inputs = []

    def crf(rgb, proposals, separate):
        crf_inputs.append(proposals)
        return crf_masks_with_margin(rgb, proposals, separate)

    monkeypatch.setattr(generator, "refine", refine)
    monkeypatch.setattr(segmenter_module, "crf_masks_with_margin", crf)
    image = scene(3, 64, 80)
    queries = ["cat", "dog", "car"]
    result = segmenter.segment(image, queries, preset=LOW_THETA)
    assert result.steps >= 2 and result.kept and len(step_one) == result.steps
    (given,) = crf_inputs
    rows = [i for i in range(len(queries)) if any(np.array_equal(given[j], step_one[0][i].numpy())
                                                  for j in range(len(given)))]
    assert len(rows) == len(given) and given.any()
    assert np.array_equal(given, step_one[0][rows].numpy())
    kept = [queries.index(q) for q in result.kept]
    assert set(kept) <= set(rows)
    expected = crf_masks(image, step_one[0][rows].numpy(), separate=False)
    assert np.array_equal(np.asarray(result.masks)[rows], expected)


def test_referring_mode_merges_sentence_masks(segmenter):
    sentences = ["the cat on the left", "a red car", "the small boat"]
    result = segmenter.segment(scene(7, 64, 96), sentences, preset="refcoco+", mode="referring")
    assert result.mode == "referring"
    assert set(np.unique(result.label_map)) <= {0, 1}
    assert result.label_map.any()
    assert result.masks[result.scores == 0].sum() == 0


def test_background_words_take_part_in_the_cam_softmax(segmenter):
    image = scene(8, 64, 96)
    default = segmenter.segment(image, QUERIES, preset=LOW_THETA)
    none = segmenter.segment(image, QUERIES, preset=LOW_THETA, background=[])
    other = segmenter.segment(image, QUERIES, preset=LOW_THETA, background=["sky", "wall"])
    assert not (np.array_equal(default.scores, none.scores) and np.array_equal(default.scores, other.scores))


def test_large_images_are_processed_at_max_side_and_answered_at_full_size(tiny_clips):
    image = scene(9, 96, 128)
    small = Segmenter(EngineConfig(device="cpu", max_side=64), proposal_model=tiny_clips[0],
                      classifier_model=tiny_clips[1])
    result = small.segment(image, QUERIES, preset=LOW_THETA)
    assert result.label_map.shape == (96, 128) and result.masks.shape == (5, 96, 128)
    reduced = cv2.resize(image, (64, 48), interpolation=cv2.INTER_AREA)
    direct = Segmenter(EngineConfig(device="cpu", max_side=None), proposal_model=tiny_clips[0],
                       classifier_model=tiny_clips[1]).segment(reduced, QUERIES, preset=LOW_THETA)
    assert direct.kept == result.kept
    assert np.array_equal(direct.label_map.repeat(2, axis=0).repeat(2, axis=1), result.label_map)
    # Memory bound: masks only for the kept queries, held at working resolution, resized when read.
    assert isinstance(result.masks, QueryMasks) and result.masks.rows.shape == (len(result.kept), 48, 64)
    assert [QUERIES[i] for i in result.masks.index] == result.kept
    assert np.array_equal(np.asarray(result.masks), np.asarray(direct.masks).repeat(2, axis=1).repeat(2, axis=2))


def test_plain_open_clip_models_can_be_injected(tiny_models):
    proposal, _, classifier, _ = tiny_models
    result = Segmenter(EngineConfig(device="cpu"), proposal_model=proposal, classifier_model=classifier).segment(
        scene(10, 48, 64), QUERIES)
    assert result.kept
