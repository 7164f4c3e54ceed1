"""Two-stage proposals (CAR_PROPOSALS=sam): SAM's class-agnostic masks classified over the labels CaR kept,
with a classifier whose behaviour the test controls (tests/support/colour_model.py: it sees hue)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from car_backend.engine import EngineConfig, ModelLoadError, Segmenter, get_preset, two_stage
from car_backend.engine.classifier import MaskClassifier
from car_backend.engine.postprocess import SamRefiner
from car_backend.engine.two_stage import assign, label_masks, mask_prompted_inputs, mean_colour
from tests.support.colour_model import CLASSIFIER_NEUTRAL, PROPOSAL_NEUTRAL, colour_clip, colour_scene


@pytest.fixture(scope="module")
def colour_models():
    return colour_clip(PROPOSAL_NEUTRAL), colour_clip(CLASSIFIER_NEUTRAL)


@pytest.fixture
def grey_fill(monkeypatch):
    """The hue classifier reads chroma, and OpenAI's mean colour (123, 117, 104) has some: for it the neutral
    fill is grey (for a trained CLIP the mean colour is what normalises to zero)."""
    monkeypatch.setattr(two_stage, "mean_colour", lambda classifier: (128, 128, 128))


def two_stage_segmenter(models, masks_for):
    refiner = SamRefiner("unused", "vit_b", "cpu", generate=masks_for)
    return Segmenter(EngineConfig(device="cpu", proposals="sam"), proposal_model=models[0],
                     classifier_model=models[1], sam_refiner=refiner)


@pytest.mark.parametrize("seed", range(4))
def test_generated_masks_go_to_the_labels_the_classifier_prefers(colour_models, grey_fill, seed):
    image, truth, present, vocabulary = colour_scene(seed)
    regions = [truth == k for k in np.unique(truth) if k > 0]
    split = regions[0].copy()
    split[:, : split.shape[1] // 2] = False  # part of a region, overlapping the whole one
    generated = [*regions, split]
    result = two_stage_segmenter(colour_models, lambda rgb: generated).segment(image, vocabulary, preset="coco")
    assert "sam" in result.timings and result.margin is None
    for region in regions:
        label = int(truth[region][0])
        assert (result.label_map[region] == label).all(), vocabulary[label - 1]
    assert (result.label_map[truth == 0] == 0).all()  # no SAM mask there: background
    assert sorted(result.kept) == sorted(q for q in present if (result.label_map == vocabulary.index(q) + 1).any())
    assert set(result.kept) <= set(present)


def test_only_labels_cars_recurrence_kept_compete(colour_models, grey_fill):
    image, truth, present, vocabulary = colour_scene(1)
    regions = [truth == k for k in np.unique(truth) if k > 0]
    plain = Segmenter(EngineConfig(device="cpu"), proposal_model=colour_models[0],
                      classifier_model=colour_models[1]).segment(image, vocabulary, preset="coco")
    result = two_stage_segmenter(colour_models, lambda rgb: regions).segment(image, vocabulary, preset="coco")
    assert set(result.kept) <= set(plain.kept) | set(present)
    absent = [q for q in vocabulary if q not in present]
    assert not any(result.scores[vocabulary.index(q)] for q in absent)


def test_a_mask_below_theta_stays_background(colour_models, grey_fill):
    image, truth, _, vocabulary = colour_scene(2)
    regions = [truth == k for k in np.unique(truth) if k > 0]
    strict = dataclasses.replace(get_preset("coco"), confidence_threshold=0.9999999)
    result = two_stage_segmenter(colour_models, lambda rgb: regions).segment(image, vocabulary, preset=strict)
    assert not result.label_map.any() and result.kept == []


def test_assignment_rules():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.45, 0.35, 0.2], [0.3, 0.6, 0.1]])
    assignment = assign(probabilities, labels=2, threshold=0.4)  # class 2 is a background word
    assert assignment.labels.tolist() == [0, -1, 0, 1]
    masks = np.zeros((4, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[2, 1:3] = True  # overlaps mask 0 on row 1, lower score: mask 0 keeps row 1
    masks[3, 3] = True
    label, scores = label_masks(masks, assignment, labels=2)
    assert label[0].any(axis=1).tolist() == [True, True, True, False] and label[1][3].all()
    assert scores.tolist() == pytest.approx([0.7, 0.6])


def test_mask_prompt_fills_outside_with_the_mean_colour_and_crops_to_the_box(colour_models):
    classifier = MaskClassifier(colour_models[1])
    pixels = torch.full((3, 40, 60), 200, dtype=torch.uint8)
    mask = torch.zeros(1, 40, 60, dtype=torch.bool)
    mask[0, 10:30, 5:25] = True
    mask[0, 17:23, 12:18] = False  # a hole at the box's centre: filled with the mean colour too
    (inputs,) = mask_prompted_inputs(classifier, pixels, mask, ("blur",))
    assert inputs.shape == (3, classifier.input_size, classifier.input_size)
    fill = torch.tensor(mean_colour(classifier), dtype=torch.uint8).view(3, 1)
    centre = inputs[:, classifier.input_size // 2, classifier.input_size // 2]
    assert (centre == fill[:, 0]).all()  # the hole, at the crop's centre
    assert (inputs[:, 5, 5] == 200).all()  # the crop holds the mask's box, not the image around it


def test_two_stage_without_sam_fails_the_job(colour_models):
    image, _, _, vocabulary = colour_scene(0)
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=colour_models[0],
                          classifier_model=colour_models[1])
    with pytest.raises(ModelLoadError, match="CAR_SAM_CHECKPOINT"):
        segmenter.segment(image, vocabulary, proposals="sam")
    with pytest.raises(ValueError, match="proposals"):
        segmenter.segment(image, vocabulary, proposals="ovseg")


def test_settings_reach_the_engine_and_sam_proposals_need_a_checkpoint():
    from car_backend.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="CAR_PROPOSALS=sam.*CAR_SAM_CHECKPOINT"):
        Settings.from_env({"CAR_PROPOSALS": "sam"})
    config = Settings.from_env({"CAR_PROPOSALS": "sam", "CAR_SAM_CHECKPOINT": "/w/sam2.1_hiera_large.pt",
                                "CAR_SAM_MODEL_TYPE": "sam2.1_hiera_l", "CAR_SAM_MODE": "prompted",
                                "CAR_COMPAT": "official"}).engine_config()
    assert (config.proposals, config.sam_model_type, config.sam_mode, config.compat) == (
        "sam", "sam2.1_hiera_l", "prompted", "official")
    assert len({config.fingerprint(), EngineConfig().fingerprint(),
                EngineConfig(sam_checkpoint="/w/x.pt", sam_mode="prompted").fingerprint(),
                EngineConfig(sam_checkpoint="/w/x.pt").fingerprint()}) == 4
