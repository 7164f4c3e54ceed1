"""engine.instances: a label map split into object instances, with and without Segment Anything's objects,
and the objects the engine gets from SAM (automatic, prompted, two-stage), with models whose behaviour the
tests control (tests/support/colour_model.py: a CLIP that sees hue; SAM masks and answers the test gives)."""

from __future__ import annotations

import numpy as np
import pytest

from car_backend.engine import EngineConfig, Segmenter, two_stage
from car_backend.engine.instances import Parts, paint_parts, split_instances
from car_backend.engine.postprocess import SamRefiner, assemble_label_map
from car_backend.engine.refiners import SamModel
from tests.support.colour_model import CLASSIFIER_NEUTRAL, PROPOSAL_NEUTRAL, colour_clip, objects_scene

VOCABULARY = ["red", "blue", "green", "yellow"]


def _rect(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---- split_instances on label maps ----


def test_three_separate_objects_of_one_label_are_three_instances_with_its_score():
    _, truth, objects = objects_scene()
    found = split_instances(truth, [0.8, 0.6])
    assert found.labels == (1, 1, 1, 2) and found.scores == (0.8, 0.8, 0.8, 0.6)
    for j, obj in enumerate(objects):
        assert np.array_equal(found.mask(j), obj)
        ys, xs = np.nonzero(obj)
        assert found.box(j) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert found.of_label(1) == [0, 1, 2] and found.of_label(2) == [3]
    assert len(split_instances(truth, [0.8, 0.6], classes=[2])) == 1


def test_specks_go_to_their_neighbours_and_make_no_instance():
    label_map = np.zeros((20, 20), np.int32)
    label_map[2:10, 2:10] = 1
    label_map[15, 15] = 1  # a one-pixel speck on background
    found = split_instances(label_map, [0.5])
    assert len(found) == 1 and found.instance_map[15, 15] == 0
    assert len(split_instances(label_map, [0.5], min_area=1)) == 2


def test_objects_split_a_connected_label_and_score_with_their_quality():
    shape = (40, 60)
    left, right = _rect(shape, 5, 25, 5, 25), _rect(shape, 5, 25, 25, 45)  # touching: one connected part
    label_map = (left | right).astype(np.int32)
    label_map[30:36, 50:56] = 1  # a part of the label no object holds
    part_map = np.zeros(shape, np.int32)
    part_map[left] = 1
    part_map[right] = 2
    part_map[5:25, 43:45] = 0  # pixels of the right object SAM left out: they join the nearest object
    part_map[0, 0] = 3  # an object of another label (on background here): ignored
    parts = Parts(part_map, (0.9, 0.5, 1.0))
    found = split_instances(label_map, [0.8], parts=parts)
    assert found.labels == (1, 1, 1)
    assert found.scores == pytest.approx((0.8 * 0.9, 0.8 * 0.5, 0.8))
    assert np.array_equal(found.mask(0), left) and np.array_equal(found.mask(1), right)
    assert np.array_equal(found.mask(2), _rect(shape, 30, 36, 50, 56))
    assert len(split_instances(label_map, [0.8])) == 2  # without objects: connected parts


def test_an_object_with_fewer_than_min_area_pixels_of_the_label_is_no_instance():
    label_map = _rect((20, 20), 2, 12, 2, 12).astype(np.int32)
    part_map = np.zeros((20, 20), np.int32)
    part_map[2:12, 2:12] = 1
    part_map[2, 2:4] = 2  # 2 pixels: below MIN_AREA_PX, they go back to object 1
    found = split_instances(label_map, [1.0], parts=Parts(part_map, (0.7, 0.2)))
    assert found.scores == pytest.approx((0.7,)) and found.mask(0).sum() == 100


def test_painted_objects_follow_the_label_map_and_nested_objects_are_pieces():
    shape = (30, 30)
    masks = np.stack([_rect(shape, 0, 20, 0, 20), _rect(shape, 10, 30, 10, 30)])
    scores = np.array([0.4, 0.9])  # label 1 wins the overlap
    objects = [
        [(_rect(shape, 0, 20, 0, 20), 0.8), (_rect(shape, 2, 8, 2, 8), 0.99)],  # the second is inside the first
        [(_rect(shape, 10, 30, 10, 20), 0.7), (_rect(shape, 10, 30, 20, 30), 0.6)],
    ]
    parts = paint_parts(masks, scores, objects)
    assert sorted(parts.quality) == [0.6, 0.7, 0.8]  # the nested object is left out
    label_map = assemble_label_map(masks, scores)
    for p, quality in enumerate(parts.quality):
        owner = 0 if quality == 0.8 else 1
        assert (label_map[parts.map == p + 1] == owner + 1).all()
    found = split_instances(label_map, scores, parts=parts)
    assert found.labels == (1, 2, 2) and found.scores == pytest.approx((0.4 * 0.8, 0.9 * 0.7, 0.9 * 0.6))
    nothing = paint_parts(masks, scores, [None, None])
    assert nothing.quality == () and not nothing.map.any()


# ---- the engine's objects ----


@pytest.fixture(scope="module")
def colour_models():
    return colour_clip(PROPOSAL_NEUTRAL), colour_clip(CLASSIFIER_NEUTRAL)


def segmenter(models, **kwargs) -> Segmenter:
    config = EngineConfig(device="cpu", proposals=kwargs.pop("proposals", "car"))
    return Segmenter(config, proposal_model=models[0], classifier_model=models[1], **kwargs)


def test_without_sam_three_red_objects_are_three_instances(colour_models):
    image, truth, objects = objects_scene()
    result = segmenter(colour_models).segment(image, VOCABULARY, preset="coco")
    assert result.parts is None and result.kept == ["red", "blue"]
    found = split_instances(result.label_map, result.scores)
    assert found.labels == (1, 1, 1, 2)
    for j, obj in enumerate(objects):
        assert (found.mask(j) == obj).mean() > 0.99
    assert found.scores == tuple(float(result.scores[v - 1]) for v in found.labels)


def test_automatic_sam_masks_matched_to_a_label_are_its_instances(colour_models):
    image, truth, objects = objects_scene(touching=True)  # the first two red squares touch
    blue = truth == 2
    qualities = [0.95, 0.9, 0.85]
    generated = [*zip(objects, qualities, strict=True), (objects[0] & _rect(truth.shape, 0, 128, 0, 20), 0.99),
                 (blue, 0.8), (_rect(truth.shape, 118, 128, 0, 128), 0.97)]  # a piece, blue, background
    refiner = SamRefiner("unused", "vit_b", "cpu", generate=lambda rgb: generated)
    result = segmenter(colour_models, sam_refiner=refiner).segment(image, VOCABULARY, preset="coco")
    assert result.parts is not None and result.parts.map.shape == truth.shape
    plain = split_instances(result.label_map, result.scores)
    assert plain.labels == (1, 1, 2)  # connected parts: the touching squares are one
    found = split_instances(result.label_map, result.scores, parts=result.parts)
    assert found.labels == (1, 1, 1, 2)
    red, blue_score = float(result.scores[0]), float(result.scores[1])
    assert found.scores == pytest.approx((red * 0.95, red * 0.9, red * 0.85, blue_score * 0.8))
    for j, obj in enumerate(objects):
        assert np.array_equal(found.mask(j), obj)


class BoxAnswers:
    """A SAM predictor whose answer to each prompt is the prompt's box, with a predicted IoU of its own."""

    def __init__(self, shape):
        self.shape = shape
        self.calls = []

    def set_image(self, rgb):
        pass

    def predict(self, point_coords, point_labels, box, multimask_output):
        self.calls.append((box, point_coords, point_labels))
        x0, y0, x1, y1 = (int(v) for v in box)
        answer = _rect(self.shape, y0, y1 + 1, x0, x1 + 1)
        return answer[None], np.array([0.5 + 0.1 * len(self.calls)]), np.zeros((1, *self.shape))


def prompted(models, spy) -> Segmenter:
    sam = SamModel("vit_b", "unused", build=lambda: None)
    sam._predictor = spy
    return segmenter(models, sam_refiner=SamRefiner("unused", "vit_b", "cpu", mode="prompted", sam=sam))


def test_prompted_sam_asked_for_instances_prompts_once_per_part(colour_models):
    image, truth, objects = objects_scene()
    spy = BoxAnswers(truth.shape)
    result = prompted(colour_models, spy).segment(image, VOCABULARY, preset="coco", instances=True)
    assert len(spy.calls) == 4  # three red parts and the blue one
    found = split_instances(result.label_map, result.scores, parts=result.parts)
    assert found.labels == (1, 1, 1, 2)
    assert sorted(found.scores) == pytest.approx(sorted(float(result.scores[v - 1]) * (0.5 + 0.1 * (i + 1))
                                                        for i, v in enumerate(found.labels)))
    for j, obj in enumerate(objects):
        assert (found.mask(j) == obj).mean() > 0.99
    box, points, labels = spy.calls[0]
    assert (labels == 0).sum() == 3  # every other part is a negative point
    spy = BoxAnswers(truth.shape)
    semantic = prompted(colour_models, spy).segment(image, VOCABULARY, preset="coco")
    assert len(spy.calls) == 2 and semantic.parts is None  # one prompt per label, no objects


def test_two_stage_masks_are_instances(colour_models, monkeypatch):
    monkeypatch.setattr(two_stage, "mean_colour", lambda classifier: (128, 128, 128))  # see test_two_stage
    image, truth, objects = objects_scene(touching=True)
    generated = [*zip(objects, (0.9, 0.8, 0.7), strict=True), (truth == 2, 0.6)]
    refiner = SamRefiner("unused", "vit_b", "cpu", generate=lambda rgb: generated)
    result = segmenter(colour_models, sam_refiner=refiner, proposals="sam").segment(image, VOCABULARY, preset="coco")
    found = split_instances(result.label_map, result.scores, parts=result.parts)
    assert found.labels == (1, 1, 1, 2)
    red, blue = float(result.scores[0]), float(result.scores[1])
    assert found.scores == pytest.approx((red * 0.9, red * 0.8, red * 0.7, blue * 0.6))
