"""Dense CRF on the real pydensecrf, label assembly, the referring merge, SAM matching."""

from __future__ import annotations

import numpy as np
import pytest

from car_backend.engine import EngineConfig, ModelLoadError, ModelSpecError, Segmenter, get_preset
from car_backend.engine.postprocess import (
    SamRefiner,
    assemble_label_map,
    crf_masks,
    dense_crf,
    match_sam_masks,
    merge_referring,
)
from car_backend.engine.result import QueryMasks, resize_nearest
from tests.support.engine import scene


def two_region_image() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :30] = (200, 40, 40)
    image[:, 30:] = (40, 40, 200)
    truth = np.zeros((40, 60), dtype=int)
    truth[:, 30:] = 1
    return image, truth


def test_dense_crf_snaps_noisy_probabilities_to_the_image():
    image, truth = two_region_image()
    rng = np.random.default_rng(0)
    right = np.clip(np.where(truth == 1, 0.65, 0.35) + rng.normal(0, 0.25, truth.shape), 0.01, 0.99)
    probabilities = np.stack([1 - right, right]).astype(np.float32)
    noisy_accuracy = (probabilities.argmax(0) == truth).mean()
    labels = dense_crf(image, probabilities)
    assert labels.shape == truth.shape
    assert noisy_accuracy < 0.9 and (labels == truth).mean() > 0.98


def test_crf_masks_joint_are_disjoint_and_separate_are_per_query():
    image, truth = two_region_image()
    left = np.where(truth == 0, 0.9, 0.05).astype(np.float32)
    everywhere = np.full(truth.shape, 0.8, dtype=np.float32)
    joint = crf_masks(image, np.stack([left, everywhere]), separate=False)
    assert joint.shape == (2, 40, 60) and not (joint[0] & joint[1]).any()
    assert joint[0][truth == 0].mean() > 0.95
    separate = crf_masks(image, np.stack([left, everywhere]), separate=True)
    assert separate[1].mean() > 0.95 and separate[0][truth == 0].mean() > 0.95  # overlapping allowed


def test_label_map_paints_in_ascending_score_so_the_best_wins():
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[1, 1:3] = True
    masks[2] = True
    label_map = assemble_label_map(masks, np.array([0.9, 0.5, 0.0]))  # query 2 was dropped
    assert label_map.tolist() == [[1] * 4, [1] * 4, [2] * 4, [0] * 4]


def test_referring_merge_is_score_weighted_with_a_union_fallback():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, :6] = True
    masks[1, 4:] = True
    assert merge_referring(masks, np.array([0.8, 0.2, 0.0])).sum() == 60  # 0.8 of the weight on mask 0
    assert merge_referring(masks, np.array([0.5, 0.5, 0.0])).sum() == 100  # ties reach 0.5 everywhere
    tiny = np.zeros((2, 10, 10), dtype=bool)
    tiny[0, 0, :3] = True
    tiny[1, 9, :2] = True
    assert merge_referring(tiny, np.array([0.6, 0.4])).sum() == 5  # area <= 5%: the union


def test_sam_matching_keeps_high_iom_masks_and_replaces_on_high_iou():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True  # 100 px
    inside = np.zeros_like(mask)
    inside[3:12, 2:12] = True  # covers 90% of mask
    spill = np.zeros_like(mask)
    spill[2:12, 12:13] = True  # next to it, no overlap
    far = np.zeros_like(mask)
    far[15:, 15:] = True
    refined = match_sam_masks(mask, [inside, spill, far], iom_threshold=0.7, min_pred_threshold=0.05,
                              iou_threshold=0.85)
    assert np.array_equal(refined, inside)  # IoU 0.9 > 0.85: replaced
    kept = match_sam_masks(mask, [inside], iom_threshold=0.7, min_pred_threshold=0.05, iou_threshold=0.95)
    assert np.array_equal(kept, mask)  # IoU 0.9 <= 0.95: unchanged
    small = np.zeros_like(mask)
    small[2:4, 2:4] = True  # inside the mask, 4% of it: IoM counts I/|sam| only if I/|mask| >= min_pred
    assert np.array_equal(match_sam_masks(mask, [small, far], 0.7, 0.05, 0.0), small)  # best one kept
    assert np.array_equal(match_sam_masks(np.zeros_like(mask), [inside], 0.7, 0.05, 0.0), np.zeros_like(mask))


def test_sam_refiner_errors_name_the_setting(tmp_path):
    missing = SamRefiner(str(tmp_path / "sam.pth"), "vit_b", "cpu")
    with pytest.raises(ModelLoadError, match="CAR_SAM_CHECKPOINT"):  # no such file, or no package
        missing.sam_masks(np.zeros((8, 8, 3), dtype=np.uint8))
    checkpoint = tmp_path / "present.pth"
    checkpoint.write_bytes(b"")
    with pytest.raises(ModelSpecError, match="CAR_SAM_MODEL_TYPE"):
        SamRefiner(str(checkpoint), "vit_z", "cpu").sam_masks(np.zeros((8, 8, 3), dtype=np.uint8))


def test_segmenter_refines_final_masks_with_sam(tiny_clips):
    image = scene(3, 64, 80)
    preset = get_preset("coco")
    plain = Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1])
    before = plain.segment(image, ["cat", "dog"], preset=preset)
    kept = int(np.argmax(before.scores))
    assert before.masks[kept].any()
    grown = before.masks[kept].copy()
    rows = np.flatnonzero(grown.any(axis=1))
    grown[rows[0]] = grown[rows[0]] | grown[rows[0] + 1]  # a few more pixels: IoU stays high
    grown[max(rows[0] - 1, 0)] |= grown[rows[0]]
    seen = []

    def generate(rgb):
        seen.append(rgb.shape)
        return [grown]

    refiner = SamRefiner("unused", "vit_b", "cpu", generate=generate)
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1],
                          sam_refiner=refiner)
    result = segmenter.segment(image, ["cat", "dog"], preset=preset)
    assert seen == [image.shape] and "sam" in result.timings
    assert not np.array_equal(grown, before.masks[kept])
    assert np.array_equal(result.masks[kept], grown)
    assert result.label_map[grown].tolist() == [kept + 1] * int(grown.sum())


def test_query_masks_read_like_the_full_array():
    rng = np.random.default_rng(0)
    rows = rng.random((2, 3, 4)) > 0.5
    masks = QueryMasks(rows, (1, 3), count=4, size=(6, 8))
    full = np.zeros((4, 6, 8), dtype=bool)
    full[[1, 3]] = rows.repeat(2, axis=1).repeat(2, axis=2)
    assert masks.shape == (4, 6, 8) and len(masks) == 4 and masks.dtype == bool
    assert np.array_equal(np.asarray(masks), full)
    assert np.array_equal(masks[3], full[3]) and np.array_equal(masks[-1], full[3]) and not masks[0].any()
    picked = masks[[3, 0, 3]]
    assert isinstance(picked, QueryMasks) and picked.rows.shape == (2, 3, 4)  # nothing resized
    assert np.array_equal(np.asarray(picked), full[[3, 0, 3]])
    assert np.array_equal(np.asarray(masks[np.array([False, True, False, False])]), full[[1]])
    assert np.array_equal(masks[:, 2], full[:, 2])
    assert np.array_equal(masks & full[::-1], full & full[::-1]) and (masks == full).all()
    assert masks.sum() == full.sum() and masks.any() and not masks[[0, 2]].any()
    with pytest.raises(IndexError):
        masks[4]


@pytest.mark.parametrize("size", [(50, 70), (120, 90)])
def test_referring_merge_before_the_resize_equals_merge_after_it(size):
    """The 5% area rule is measured on the answered grid, so merging at working resolution changes nothing."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        masks = np.zeros((2, 20, 30), dtype=bool)
        for mask in masks:
            y, x = rng.integers(0, 18), rng.integers(0, 28)
            mask[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = True
        scores = np.array([0.7, 0.3])
        early = resize_nearest(merge_referring(masks, scores, answered_size=size), size)
        late = merge_referring(resize_nearest(masks, size), scores)
        assert np.array_equal(early, late)
    assert not merge_referring(masks, np.zeros(2)).any()
