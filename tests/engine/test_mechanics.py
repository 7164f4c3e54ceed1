"""CaR's mechanics on a CLIP whose behaviour the test controls (tests/engine/colour_model.py).

Scenes hold three hues 120 degrees apart on grey; the vocabulary adds six absent hues 30 degrees from a
present one. (Hues half-way between two present ones are left out of the vocabulary: a mask covering both
regions looks like the half-way hue to a model that averages chroma, which a real CLIP would not do.) The
recurrence must drop every absent hue and segment the present ones well, while the paper's no-recurrence
ablation (T = 1: every step-1 proposal goes to the CRF) must be clearly worse.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from car_backend.engine import EngineConfig, Segmenter, get_preset
from car_backend.engine.postprocess import assemble_label_map, crf_masks
from car_backend.engine.presets import CAM_TEMPLATE
from tests.engine.colour_model import CLASSIFIER_NEUTRAL, HUES, PROPOSAL_NEUTRAL, colour_clip, hue_rgb

SEEDS = range(6)


def colour_scene(seed: int, size: int = 128):
    """(image, ground-truth label map over `vocabulary` (0 = grey), present hue names, vocabulary)."""
    rng = np.random.default_rng(seed)
    first = int(rng.integers(0, 12))
    present = [(first + 4 * i) % 12 for i in range(3)]
    vocabulary = sorted(present + [(first + offset) % 12 for offset in (1, 3, 5, 7, 9, 11)])
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    truth = np.zeros((size, size), dtype=np.int32)
    cells = [(0, 0), (0, 1), (1, 0), (1, 1)]
    rng.shuffle(cells)
    half = size // 2
    for hue, (row, col) in zip(present, cells[:3], strict=True):
        y0, x0 = row * half + int(rng.integers(2, 12)), col * half + int(rng.integers(2, 12))
        height, width = int(rng.integers(half // 2, half - 14)), int(rng.integers(half // 2, half - 14))
        region = np.zeros((size, size), dtype=np.uint8)
        if rng.random() < 0.5:
            region[y0:y0 + height, x0:x0 + width] = 1
        else:
            cv2.ellipse(region, (x0 + width // 2, y0 + height // 2), (width // 2, height // 2), 0, 0, 360, 1, -1)
        image[region > 0] = hue_rgb(hue)
        truth[region > 0] = vocabulary.index(hue) + 1
    image = np.clip(image.astype(int) + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)
    return image, truth, [HUES[h] for h in present], [HUES[h] for h in vocabulary]


def mean_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    classes = set(np.unique(prediction)) | set(np.unique(truth))
    return float(np.mean([((prediction == c) & (truth == c)).sum() / ((prediction == c) | (truth == c)).sum()
                          for c in classes]))


@pytest.fixture(scope="module")
def runs():
    proposal, classifier = colour_clip(PROPOSAL_NEUTRAL), colour_clip(CLASSIFIER_NEUTRAL)
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=proposal, classifier_model=classifier)
    generator = segmenter._generator()
    preset = get_preset("coco")
    background = proposal.embed_texts([CAM_TEMPLATE.format(w) for w in preset.background])
    results = []
    for seed in SEEDS:
        image, truth, present, vocabulary = colour_scene(seed)
        result = segmenter.segment(image, vocabulary, preset=preset)
        # The T = 1 ablation: step-1 proposals of every query straight into the CRF.
        prepared = segmenter.prepare(image)
        cams = generator.cams(prepared.proposal, proposal.embed_texts(vocabulary), background, referring=False)
        proposals = generator.refine(prepared.proposal, cams, preset.clipes_threshold).numpy()
        single = assemble_label_map(crf_masks(image, proposals, separate=False), np.ones(len(vocabulary)))
        results.append((result, truth, present, vocabulary, single))
    return results


def test_recurrence_drops_absent_and_keeps_present_classes(runs):
    for result, _, present, vocabulary, _ in runs:
        assert sorted(result.kept) == sorted(present), (result.kept, present)
        assert all(result.scores[vocabulary.index(q)] == 0 for q in vocabulary if q not in present)
        assert not result.masks[[vocabulary.index(q) for q in vocabulary if q not in present]].any()


def test_recurrence_segments_well_and_beats_a_single_step(runs):
    recurrent = [mean_iou(result.label_map, truth) for result, truth, _, _, _ in runs]
    single = [mean_iou(label_map, truth) for _, truth, _, _, label_map in runs]
    assert np.mean(recurrent) >= 0.85, recurrent
    assert min(recurrent) >= 0.6, recurrent
    assert np.mean(single) <= np.mean(recurrent) - 0.4, (single, recurrent)
