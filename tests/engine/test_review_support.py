"""What the active-learning loop relies on: the CRF margin, and step 1 reused across threshold sweeps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from car_backend.engine import EngineConfig, Segmenter, get_preset
from car_backend.engine.postprocess import SamRefiner, crf_masks, crf_masks_with_margin, top_two_margin
from car_backend.engine.segmenter import FIRST_PROPOSALS_CACHE_SIZE, FIRST_STEP_CACHE_SIZE
from tests.support.engine import scene

QUERIES = ["cat", "dog", "car", "boat", "sofa"]
SENTENCES = ["the cat on the left", "a red car", "the small boat", "a big cow"]
LOW_THETA = dataclasses.replace(get_preset("coco"), confidence_threshold=0.04)
THETAS = (0.0, 0.03, 0.04, 0.06, 0.1, 0.3)
ETAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # the calibration grid (car_backend.review.store.THRESHOLD_BOUNDS)


def make_segmenter(tiny_clips, **kwargs) -> Segmenter:
    return Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1], **kwargs)


def two_region_proposals(high: float) -> tuple[np.ndarray, np.ndarray]:
    """A red left half and a blue right half, and one proposal per half at `high` inside, 1 - high outside."""
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :30] = (200, 40, 40)
    image[:, 30:] = (40, 40, 200)
    right = np.zeros((40, 60), dtype=bool)
    right[:, 30:] = True
    proposals = np.stack([np.where(right, 1 - high, high), np.where(right, high, 1 - high)]).astype(np.float32)
    return image, proposals


def test_top_two_margin():
    marginals = np.array([[0.7, 0.5, 1.0], [0.2, 0.5, 0.0], [0.1, 0.0, 0.0]])[:, None, :]
    assert np.allclose(top_two_margin(marginals), [[0.5, 0.0, 1.0]])


@pytest.mark.parametrize("separate", [False, True])
def test_crf_margin_is_higher_for_confident_proposals(separate):
    means = {}
    for high in (0.98, 0.55):
        image, proposals = two_region_proposals(high)
        masks, margin = crf_masks_with_margin(image, proposals, separate)
        assert np.array_equal(masks, crf_masks(image, proposals, separate))
        assert margin.shape == image.shape[:2] and margin.min() >= 0 and margin.max() <= 1
        means[high] = float(margin.mean())
    # The CRF's pairwise terms push flat regions towards certainty, so both are near 1.
    assert means[0.98] > means[0.55]


@pytest.mark.parametrize(("queries", "preset", "mode"), [(QUERIES, LOW_THETA, "semantic"),
                                                         (SENTENCES, get_preset("refcoco+"), "referring")])
def test_segmentation_carries_the_crf_margin(tiny_clips, queries, preset, mode):
    image = scene(7, 64, 96)
    result = make_segmenter(tiny_clips).segment(image, queries, preset=preset, mode=mode)
    assert isinstance(result.margin, float) and 0 <= result.margin <= 1


def test_sam_refinement_keeps_the_crf_margin(tiny_clips):
    image = scene(3, 64, 80)
    plain = make_segmenter(tiny_clips).segment(image, QUERIES, preset=LOW_THETA)
    grown = [mask | np.roll(mask, 1, axis=1) for mask in plain.masks if mask.any()]  # IoU stays high
    refiner = SamRefiner("unused", "vit_b", "cpu", generate=lambda rgb: grown)
    refined = make_segmenter(tiny_clips, sam_refiner=refiner).segment(image, QUERIES, preset=LOW_THETA)
    assert not np.array_equal(refined.masks, plain.masks)
    assert refined.margin == plain.margin


def same_segmentation(a, b) -> bool:
    return (np.array_equal(a.label_map, b.label_map) and np.array_equal(a.masks, b.masks)
            and np.array_equal(a.scores, b.scores) and a.steps == b.steps and a.kept == b.kept
            and a.margin == b.margin)


@pytest.mark.parametrize(("queries", "preset", "mode", "seed", "thetas"), [
    (QUERIES, LOW_THETA, "semantic", 1, (0.0, 0.03, 0.04, 0.06, 0.1, 0.3)),
    (SENTENCES, get_preset("refcoco+"), "referring", 6, (0.0, 0.2, 0.3, 0.4)),
])
def test_theta_sweep_matches_fresh_segmenters(tiny_clips, queries, preset, mode, seed, thetas):
    image = scene(seed, 96, 128)
    segmenter = make_segmenter(tiny_clips)
    prepared = segmenter.prepare(image)
    outcomes = set()
    for theta in thetas:
        swept_preset = dataclasses.replace(preset, confidence_threshold=theta)
        swept = segmenter.segment(prepared, queries, preset=swept_preset, mode=mode)
        fresh = make_segmenter(tiny_clips).segment(image, queries, preset=swept_preset, mode=mode)
        assert same_segmentation(swept, fresh), theta
        outcomes.add((swept.steps, tuple(swept.kept)))
    assert len(outcomes) >= 3  # the sweep does change the recurrence
    assert len(prepared.first_steps) == 1


@pytest.mark.parametrize(("queries", "preset", "mode", "seed"), [
    (QUERIES, LOW_THETA, "semantic", 1),
    (SENTENCES, get_preset("refcoco+"), "referring", 6),
])
def test_eta_sweep_matches_fresh_segmenters(tiny_clips, queries, preset, mode, seed):
    image = scene(seed, 96, 128)
    segmenter = make_segmenter(tiny_clips)
    prepared = segmenter.prepare(image)
    step_one_scores = set()
    for eta in ETAS:
        swept_preset = dataclasses.replace(preset, mask_threshold=eta)
        swept = segmenter.segment(prepared, queries, preset=swept_preset, mode=mode)
        fresh = make_segmenter(tiny_clips).segment(image, queries, preset=swept_preset, mode=mode)
        assert same_segmentation(swept, fresh), eta
        _, scores, _ = next(reversed(prepared.first_steps.values()))  # this call's, the most recently used
        step_one_scores.add(scores.tobytes())
    assert len(step_one_scores) >= 3  # eta does change step 1's scores
    assert len(prepared.first_proposals) == 1 and len(prepared.first_steps) == len(ETAS)
    (proposals,) = prepared.first_proposals.values()
    assert all(cached is proposals for cached, _, _ in prepared.first_steps.values())


class StepOneCounter:
    """Per segment call: generator.cams calls, and whether step 1's scores were computed (a _scores call on
    the cached step-1 proposals; later steps' proposals are never cached)."""

    def __init__(self, segmenter: Segmenter, prepared, monkeypatch):
        self.segmenter, self.prepared = segmenter, prepared
        self.cams, self.scored = 0, False
        generator = segmenter._generator()
        cams, scores = generator.cams, segmenter._scores

        def counted_cams(*args):
            self.cams += 1
            return cams(*args)

        def counted_scores(prepared, classifier, proposals, *args):
            self.scored |= any(proposals is cached for cached in prepared.first_proposals.values())
            return scores(prepared, classifier, proposals, *args)

        monkeypatch.setattr(generator, "cams", counted_cams)
        monkeypatch.setattr(segmenter, "_scores", counted_scores)

    def __call__(self, preset, **kwargs) -> tuple[int, bool, int]:
        """(cams calls, step-1 scores computed, steps) of one segment call."""
        self.cams, self.scored = 0, False
        result = self.segmenter.segment(self.prepared, QUERIES, preset=preset, **kwargs)
        return self.cams, self.scored, result.steps


def test_step_one_runs_once_per_sweep_and_again_when_its_inputs_change(tiny_clips, monkeypatch):
    segmenter = make_segmenter(tiny_clips)
    prepared = segmenter.prepare(scene(1, 96, 128))
    counted = StepOneCounter(segmenter, prepared, monkeypatch)

    cams, scored, steps = counted(LOW_THETA)
    assert cams == steps and scored
    for theta in THETAS:  # step 1 entirely reused
        cams, scored, steps = counted(dataclasses.replace(LOW_THETA, confidence_threshold=theta))
        assert cams == steps - 1 and not scored, theta
    # Step 1's proposals reused, its scores recomputed.
    for changed in ({"mask_threshold": 0.3}, {"visual_prompts": ("circle",)}, {"templates": None}):
        cams, scored, steps = counted(dataclasses.replace(LOW_THETA, **changed))
        assert cams == steps - 1 and scored, changed
    # Step 1 recomputed.
    cams, scored, steps = counted(dataclasses.replace(LOW_THETA, clipes_threshold=0.3))
    assert cams == steps and scored
    cams, scored, steps = counted(LOW_THETA, background=["sky"])
    assert cams == steps and scored
    cams, scored, steps = counted(LOW_THETA, mode="referring")
    assert cams == steps and scored


def test_step_one_cams_run_once_per_eta_sweep_and_again_when_lambda_changes(tiny_clips, monkeypatch):
    segmenter = make_segmenter(tiny_clips)
    prepared = segmenter.prepare(scene(4, 96, 128))
    counted = StepOneCounter(segmenter, prepared, monkeypatch)
    for lam in (LOW_THETA.clipes_threshold, 0.3):
        for index, eta in enumerate(ETAS):
            cams, scored, steps = counted(dataclasses.replace(LOW_THETA, mask_threshold=eta, clipes_threshold=lam))
            assert cams == (steps if index == 0 else steps - 1) and scored, (lam, eta)
        assert len(ETAS) <= FIRST_STEP_CACHE_SIZE
        for eta in ETAS:  # the whole step 1 is cached now
            cams, scored, steps = counted(dataclasses.replace(LOW_THETA, mask_threshold=eta, clipes_threshold=lam))
            assert cams == steps - 1 and not scored, (lam, eta)
    assert len(prepared.first_proposals) == 2


def test_first_step_cache_is_bounded_per_image(tiny_clips):
    segmenter = make_segmenter(tiny_clips)
    prepared = segmenter.prepare(scene(2, 48, 64))
    for index in range(FIRST_STEP_CACHE_SIZE + 2):
        segmenter.segment(prepared, QUERIES[:2], preset=dataclasses.replace(LOW_THETA, mask_threshold=0.1 * index))
    assert len(prepared.first_steps) == FIRST_STEP_CACHE_SIZE
    assert all(not scores.flags.writeable for _, scores, _ in prepared.first_steps.values())


def test_first_proposals_cache_is_bounded_and_never_modified(tiny_clips):
    segmenter = make_segmenter(tiny_clips)
    prepared = segmenter.prepare(scene(2, 48, 64))
    segmenter.segment(prepared, QUERIES, preset=LOW_THETA)
    (first,) = prepared.first_proposals.values()
    before = first.clone()
    for eta in ETAS:
        for theta in (0.0, 0.1, 0.3):
            preset = dataclasses.replace(LOW_THETA, mask_threshold=eta, confidence_threshold=theta)
            segmenter.segment(prepared, QUERIES, preset=preset)
    assert torch.equal(first, before)
    for index in range(FIRST_PROPOSALS_CACHE_SIZE + 2):
        segmenter.segment(prepared, QUERIES[:2], preset=dataclasses.replace(LOW_THETA, clipes_threshold=0.1 * index))
    assert len(prepared.first_proposals) == FIRST_PROPOSALS_CACHE_SIZE
