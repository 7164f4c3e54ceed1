"""The classifier prompts and encodes each distinct prompted image once per `segment` call.

A prompted image depends only on its binary mask (the image, prompts and classifier being fixed in a call):
`MaskClassifier.mask_keys` names it, and `Segmenter._scores` reuses the embeddings of keys seen before, in
the same step (equal masks, every unprompted query) or an earlier one. The parity tests check that answers
are unchanged; these check that the work is done once.
"""

from __future__ import annotations

import torch

from car_backend.engine import EngineConfig, Segmenter
from car_backend.engine.classifier import MaskClassifier
from car_backend.testing.precision import PARITY_CASES


def test_mask_keys_name_the_prompted_image(tiny_clips):
    classifier = MaskClassifier(tiny_clips[1])
    soft = torch.zeros(5, 8, 8)
    soft[0, :4] = 0.9  # prompted
    soft[1, :4] = 0.7  # other values, the same mask at eta 0.5: the same image
    soft[2, 4:] = 0.9  # another mask
    soft[3, 0, 0] = 0.9  # a mask, but the proposal sums to <= 1: unprompted, as officially
    keys = classifier.mask_keys(soft, 0.5)  # row 4: all zero, unprompted
    assert keys[0] == keys[1] and keys[0] not in (keys[2], b"")
    assert keys[3] == keys[4] == b""


def test_a_call_encodes_each_distinct_prompted_image_once(tiny_clips):
    case = next(c for c in PARITY_CASES if c.mode == "referring")  # referring CAMs do not depend on the others
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1])
    classifier = segmenter._classifier(case.resolved_preset())
    asked: list[bytes] = []
    encoded: list[int] = []
    keys, embed = classifier.mask_keys, classifier.embed_images

    def recording_keys(proposals, threshold):
        found = keys(proposals, threshold)
        asked.extend(found)
        return found

    def recording_embed(inputs):
        encoded.append(len(inputs))
        return embed(inputs)

    classifier.mask_keys, classifier.embed_images = recording_keys, recording_embed
    try:
        result = segmenter.segment(case.image(), list(case.queries), preset=case.resolved_preset(), mode=case.mode)
    finally:
        del classifier.mask_keys, classifier.embed_images
    assert result.steps > 2
    assert sum(encoded) == len(set(asked)) < len(asked)
