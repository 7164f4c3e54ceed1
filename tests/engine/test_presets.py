"""Preset values against the official configs (spec section 5)."""

from __future__ import annotations

import pytest

from car_backend.engine import PRESETS, get_preset
from car_backend.engine.presets import BACKGROUND_WORDS, SEMANTIC_TEMPLATES
from car_backend.settings import PRESETS as SETTING_CHOICES

EXPECTED = {
    # name: (eta, theta, lambda, prompts, templates?, iom, classify with the proposal (B/16) model)
    "voc": (0.4, 0.6, 0.4, {"circle", "blur"}, True, 0.6, False),
    "coco": (0.5, 0.3, 0.5, {"blur", "gray"}, True, 0.7, False),
    "context": (0.6, 0.25, 0.4, {"blur", "circle"}, True, 0.5, False),
    "ade": (0.6, 0.25, 0.7, {"gray", "blur"}, True, 0.6, False),
    "refcoco": (0.5, 0.3, 0.5, {"circle"}, False, 0.5, True),
    "refcoco+": (0.2, 0.1, 0.5, {"circle", "blur"}, False, 0.5, True),
    "refcocog": (0.5, 0.1, 0.6, {"circle", "blur"}, False, 0.5, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_values(name):
    eta, theta, lam, prompts, templated, iom, proposal_classifier = EXPECTED[name]
    preset = get_preset(name)
    assert (preset.mask_threshold, preset.confidence_threshold, preset.clipes_threshold) == (eta, theta, lam)
    assert set(preset.visual_prompts) == prompts
    assert (preset.templates == SEMANTIC_TEMPLATES) if templated else preset.templates is None
    assert preset.iom_threshold == iom
    assert preset.classify_with_proposal_model is proposal_classifier
    assert preset.background == BACKGROUND_WORDS


def test_shared_constants_and_choices():
    assert len(BACKGROUND_WORDS) == 23 and BACKGROUND_WORDS[0] == "ground" and BACKGROUND_WORDS[-1] == "bridge"
    assert len(SEMANTIC_TEMPLATES) == 15 and SEMANTIC_TEMPLATES[0] == "a clean origami {}."
    assert get_preset("voc").sam_min_pred_threshold == 0.05
    assert get_preset("context").stuff_visual_prompts == ("blur", "gray")
    assert set(PRESETS) == set(SETTING_CHOICES)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("cityscapes")
