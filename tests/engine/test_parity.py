"""The fast engine against the literal official-order implementation (car_backend/engine/reference.py).

Same random-weight models, images and queries: the same kept queries and steps, scores within 1e-4 and
masks agreeing on >= 99.5% of pixels. Every case runs in both modes (CAR_COMPAT=fixed against the literal
implementation with the fixes, CAR_COMPAT=official against it with the official quirks). The cases use presets with lowered theta (random weights give
near-uniform scores) chosen so that queries get dropped, several survive, and the loop runs > 2 steps;
`test_cases_exercise_branching` checks that they still do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from car_backend.engine import ClipModel, EngineConfig, Segmenter, get_preset
from car_backend.engine.config import COMPAT_MODES
from car_backend.engine.reference import LiteralCaR
from car_backend.testing.precision import PARITY_CASES
from tests.support.engine import random_clip, scene

# The cases live in the harness, which benchmarks/precision.py shares (`Case`: see there).
CASES = PARITY_CASES


def compare(fast, literal) -> dict:
    return {
        "kept_fast": fast.kept,
        "kept_literal": literal.kept,
        "steps": (fast.steps, literal.steps),
        "max_score_diff": float(np.abs(fast.scores - literal.scores).max()),
        "mask_agreement": float((fast.masks == literal.masks).mean()),
        "label_agreement": float((fast.label_map == literal.label_map).mean()),
    }


@pytest.fixture(scope="module", params=COMPAT_MODES)
def outcomes(request, tiny_models, tiny_clips):
    compat = request.param
    proposal, proposal_tokenizer, classifier, classifier_tokenizer = tiny_models
    segmenter = Segmenter(EngineConfig(device="cpu", compat=compat), proposal_model=tiny_clips[0],
                          classifier_model=tiny_clips[1])
    results = []
    for case in CASES:
        preset = case.resolved_preset()
        image = scene(case.seed, 96, 128)
        fast = segmenter.segment(image, list(case.queries), preset=preset, mode=case.mode)
        if preset.classify_with_proposal_model:
            literal_car = LiteralCaR(proposal, proposal_tokenizer, proposal, proposal_tokenizer, preset, compat=compat)
        else:
            literal_car = LiteralCaR(proposal, proposal_tokenizer, classifier, classifier_tokenizer, preset,
                                     compat=compat)
        results.append((case, fast, compare(fast, literal_car.segment(image, list(case.queries), case.mode))))
    return results


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c.preset}-{c.mode}-{c.seed}" for c in CASES])
def test_fast_engine_matches_literal(outcomes, index):
    case, _, figures = outcomes[index]
    assert figures["kept_fast"] == figures["kept_literal"], figures
    assert figures["steps"][0] == figures["steps"][1], figures
    assert figures["max_score_diff"] < 1e-4, figures
    assert figures["mask_agreement"] >= 0.995, figures
    assert figures["label_agreement"] >= 0.995, figures


def test_cases_exercise_branching(outcomes):
    """The parity cases must cover drops, several survivors and more than two steps, in both modes."""
    semantic = [(c, fast) for c, fast, _ in outcomes if c.mode == "semantic"]
    referring = [(c, fast) for c, fast, _ in outcomes if c.mode == "referring"]
    assert any(len(fast.kept) < len(c.queries) for c, fast in semantic)
    assert any(len(fast.kept) >= 2 for _, fast in semantic)
    assert any(fast.steps > 2 for _, fast in semantic)
    assert any(len(fast.kept) >= 2 for _, fast in referring)
    assert any(len(fast.kept) < len(c.queries) for c, fast in referring)


def test_vit_b16_architecture_matches_literal(tiny_models):
    """The real ViT-B/16 proposal architecture (random weights) on a small image, tiny classifier."""
    proposal, proposal_tokenizer = random_clip("ViT-B-16", seed=3)
    _, _, classifier, classifier_tokenizer = tiny_models
    # A short background list keeps the literal run's 77-token text encodes few.
    preset = dataclasses.replace(get_preset("coco"), confidence_threshold=0.12, background=("sky", "road", "wall"))
    queries = ["cat", "dog", "car", "boat", "sofa"]
    image = scene(11, 80, 112)
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=ClipModel(proposal, proposal_tokenizer),
                          classifier_model=ClipModel(classifier, classifier_tokenizer))
    fast = segmenter.segment(image, queries, preset=preset)
    literal = LiteralCaR(proposal, proposal_tokenizer, classifier, classifier_tokenizer, preset).segment(image, queries)
    figures = compare(fast, literal)
    assert figures["kept_fast"] == figures["kept_literal"], figures
    assert figures["steps"][0] == figures["steps"][1], figures
    assert figures["max_score_diff"] < 1e-4, figures
    assert figures["mask_agreement"] >= 0.995, figures
    assert len(fast.kept) < len(queries)
