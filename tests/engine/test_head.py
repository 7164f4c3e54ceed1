"""The CRIS-style mask head: training is deterministic and resumable, its stored form round-trips and refuses
what it is not, and the segmenter uses its masks only when given one."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from car_backend.engine import Segmenter
from car_backend.engine.config import EngineConfig
from car_backend.engine.head import (
    HeadConfig,
    HeadError,
    HeadExample,
    dense_features,
    head_from_bytes,
    head_to_bytes,
    patch_targets,
    start_training,
    state_from_bytes,
    state_to_bytes,
    train_head,
)
from car_backend.testing.scenes import SceneClass, labelled_scene

CLASSES = (SceneClass("red", (220, 40, 40), "flat", "ellipse"), SceneClass("blue", (40, 60, 220), "stripes", "rectangle"),
           SceneClass("green", (40, 200, 60), "checks", "ellipse"))
NAMES = [c.name for c in CLASSES]
SIZE = (96, 96)


@pytest.fixture(scope="module")
def segmenter(tiny_clips):
    proposal, classifier = tiny_clips
    return Segmenter(EngineConfig(device="cpu", max_steps=3), proposal_model=proposal, classifier_model=classifier)


@pytest.fixture(scope="module")
def examples(segmenter):
    clip = segmenter.proposal_clip
    out = []
    for seed in range(6):
        scene = labelled_scene(seed, CLASSES, SIZE)
        image = segmenter.prepare(scene.image).proposal
        out.append(HeadExample(dense_features(clip, image), clip.embed_texts(NAMES),
                               patch_targets([scene.masks.get(n) for n in NAMES], image.grid), image.grid))
    return out


def _config(segmenter) -> HeadConfig:
    return HeadConfig.for_clip(segmenter.proposal_clip, width=32, depth=1, heads=2)


def _weights(head) -> list[torch.Tensor]:
    return [p.detach().clone() for p in head.parameters()]


def test_training_is_deterministic_given_a_seed_and_lowers_the_loss(segmenter, examples):
    runs = [train_head(start_training(_config(segmenter), seed, "tiny"), examples, epochs=4, seed=seed)
            for seed in (3, 3, 4)]
    same = [torch.equal(a, b) for a, b in zip(_weights(runs[0].head), _weights(runs[1].head), strict=True)]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(runs[0].head), _weights(runs[2].head), strict=True))
    assert runs[0].losses[-1] < runs[0].losses[0]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(segmenter, examples):
    straight = train_head(start_training(_config(segmenter), 5, "tiny"), examples, epochs=4, seed=5)
    half = train_head(start_training(_config(segmenter), 5, "tiny"), examples, epochs=2, seed=5)
    resumed = train_head(state_from_bytes(state_to_bytes(half), "tiny"), examples, epochs=4, seed=5)
    assert resumed.epochs == 4 and resumed.losses[:2] == half.losses[:2]
    for a, b in zip(_weights(straight.head), _weights(resumed.head), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_time_budget_stops_after_an_epoch(segmenter, examples):
    state = train_head(start_training(_config(segmenter), 1, "tiny"), examples, epochs=50, seed=1, seconds=0.0)
    assert state.epochs == 1


def test_stored_form_round_trips_and_refuses_corrupt_or_foreign_blobs(segmenter, examples):
    state = train_head(start_training(_config(segmenter), 2, "tiny"), examples, epochs=1, seed=2)
    state.head.generation, state.head.blend = 3, 0.75
    blob = head_to_bytes(state.head)
    head, _, _ = head_from_bytes(blob, "tiny")
    assert (head.generation, head.blend, head.config) == (3, 0.75, state.head.config)
    features, texts = examples[0].features, examples[0].texts
    with torch.no_grad():
        torch.testing.assert_close(head(features, texts, examples[0].grid),
                                   state.head(features, texts, examples[0].grid))
    with pytest.raises(HeadError, match="trained on CLIP"):
        head_from_bytes(blob, "another-clip")
    for bad in (b"", b"not zlib", blob[: len(blob) // 2], zlib.compress(b"x" * 100),
                zlib.compress(zlib.decompress(blob)[:-10])):
        with pytest.raises(HeadError):
            head_from_bytes(bad)


def test_segmenter_uses_the_head_only_when_given(segmenter, examples):
    state = train_head(start_training(_config(segmenter), 0, "tiny"), examples, epochs=25, seed=0)
    scene = labelled_scene(500, CLASSES, SIZE)
    plain = segmenter.segment(scene.image, NAMES)
    headed = segmenter.segment(scene.image, NAMES, head=state.head)
    again = segmenter.segment(scene.image, NAMES)  # the head's step-1 cache entry is not the plain one's
    np.testing.assert_array_equal(plain.label_map, again.label_map)
    assert "head" in headed.timings and "head" not in again.timings
    assert not np.array_equal(plain.label_map, headed.label_map)
    referring = segmenter.segment(scene.image, ["a red blob"], mode="referring", head=state.head)
    assert "head" in referring.timings  # a sentence's text embedding goes through the head too
    state.head.blend = 0.5  # blended with the Grad-CAM proposals: both are computed
    blended = segmenter.segment(scene.image, NAMES, head=state.head)
    assert {"head", "cam"} <= set(blended.timings)


def test_patch_targets_are_area_fractions():
    mask = np.zeros((32, 32), bool)
    mask[:16, :8] = True
    targets = patch_targets([mask, None], (2, 2))
    np.testing.assert_allclose(targets[0].numpy(), [[0.5, 0.0], [0.0, 0.0]])
    assert targets[1].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU tests above cover the logic)")
def test_training_on_cuda_is_deterministic(segmenter, examples):
    runs = [train_head(start_training(_config(segmenter), 7, "tiny"), examples, epochs=2, seed=7, device="cuda")
            for _ in range(2)]
    for a, b in zip(_weights(runs[0].head), _weights(runs[1].head), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dense_features_are_prepares_without_its_attention_and_affinity(segmenter):
    """What a training keeps of an image: the features `prepare` holds, a small part of what it holds."""
    image = labelled_scene(7, CLASSES, (200, 312)).image
    prepared = segmenter.prepare(image, cache=False)
    dense = segmenter.dense_features(image)
    expected = dense_features(segmenter.proposal_clip, prepared.proposal)
    assert dense.grid == prepared.proposal.grid and dense.features.shape == expected.shape
    torch.testing.assert_close(dense.features, expected, atol=1e-4, rtol=1e-4)  # fused attention: rounding only
    assert not dense.features.is_inference()  # a head's backward may save it
    assert dense.features.numel() * 4 * 10 < prepared.held_bytes()
    again = segmenter.prepare(prepared.rgb, cache=False, original_size=(400, 624))  # its working pixels again
    assert again.original_size == (400, 624)
    assert torch.equal(again.proposal.transition, prepared.proposal.transition)
