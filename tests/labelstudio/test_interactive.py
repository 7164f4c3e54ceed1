import numpy as np

from car_backend.labelstudio.config import LabelSpec
from car_backend.labelstudio.interactive import Point, label_named_by, narrow_mask, parse_context


def keypoint(x, y, positive=True, label="person"):
    region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 200,
              "original_height": 100, "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}
    if positive is not None:
        region["is_positive"] = positive
    return region


def test_context_with_text_keypoints_and_rectangles():
    context = {"result": [
        {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["  the man in red  ", ""]}},
        keypoint(10, 20),
        keypoint(50, 60, positive=False),
        keypoint(70, 80, positive=None),  # no is_positive key: a plain keypoint counts as positive
        {"type": "rectanglelabels", "value": {"x": 5, "y": 5, "width": 50, "height": 40, "rectanglelabels": ["car"]}},
        {"type": "keypointlabels", "value": {"x": "bad"}},  # malformed: ignored
        "not a region",
    ]}
    request = parse_context(context)
    assert request.texts == ("the man in red",)
    assert request.label == "person"
    assert request.points == (Point(10, 20, True, "person"), Point(50, 60, False, "person"),
                              Point(70, 80, True, "person"))
    assert request.boxes == ((5.0, 5.0, 50.0, 40.0),)


def test_no_usable_context_means_batch_prediction():
    assert parse_context(None) is None
    assert parse_context({}) is None
    assert parse_context({"result": []}) is None
    assert parse_context({"result": [{"type": "textarea", "value": {"text": ["   "]}}]}) is None


def test_text_naming_a_label_by_value_prompt_or_synonym():
    labels = (LabelSpec("car", "car"), LabelSpec("person", "person with clothes,people,human"))
    assert label_named_by("Car", labels) == labels[0]
    assert label_named_by("people", labels) == labels[1]
    assert label_named_by("person with clothes,people,human", labels) == labels[1]
    assert label_named_by("the man in red", labels) is None


def two_blobs():
    mask = np.zeros((100, 200), bool)
    mask[10:30, 10:50] = True  # left blob: x 5%..25%, y 10%..30%
    mask[60:90, 120:180] = True  # right blob: x 60%..90%, y 60%..90%
    return mask


def test_positive_point_keeps_only_its_connected_part():
    out = narrow_mask(two_blobs(), [Point(15, 20, True)])
    assert out[20, 30] and not out[75, 150]
    assert out.sum() == 20 * 40


def test_negative_point_removes_its_part():
    out = narrow_mask(two_blobs(), [Point(75, 75, False)])
    assert out[20, 30] and not out[75, 150]
    both = narrow_mask(two_blobs(), [Point(15, 20, True), Point(16, 21, False)])
    assert not both.any()  # the only positive part also holds a negative point


def test_points_outside_the_mask_and_boxes():
    assert narrow_mask(two_blobs(), [Point(99, 1, True)]).sum() == 0  # positive point on background: nothing
    boxed = narrow_mask(two_blobs(), [], boxes=[(55, 55, 40, 40)])
    assert boxed.sum() == 30 * 60 and boxed[75, 150]


def test_interactive_config_reads_smart_keypoints_and_rectangles_as_prompts_not_targets():
    from pathlib import Path

    from car_backend.labelstudio.config import parse_label_config

    xml = (Path(__file__).resolve().parents[2] / "label_config" / "interactive.xml").read_text()
    config = parse_label_config(xml)
    assert [t.from_name for t in config.targets] == ["tag"]
    assert config.prompt_from_name == "prompt"
    assert config.interactive_controls == ("points", "box")
    assert config.skipped == ()
    plain = xml.replace('smart="true"', "")
    assert "points: KeyPointLabels is not predicted" in "\n".join(parse_label_config(plain).skipped)


def test_focus_narrows_each_label_of_a_semantic_segmentation_and_the_referring_object():
    from car_backend.engine.result import Segmentation
    from car_backend.labelstudio.interactive import Focus

    label_map = two_blobs().astype(np.int32)  # label 1 = both blobs
    label_map[0:5, 0:5] = 2  # label 2: a corner square
    masks = np.stack([label_map == 1, label_map == 2])
    seg = Segmentation(queries=["person", "car"], label_map=label_map, masks=masks,
                       scores=np.array([0.9, 0.8], np.float32), steps=1, mode="semantic")
    narrowed = Focus(points=(Point(15, 20, True),)).apply(seg)
    assert narrowed.label_map[20, 30] == 1 and narrowed.label_map[75, 150] == 0
    assert not (narrowed.label_map == 2).any()  # the point is on no part of label 2: nothing of it is kept
    assert (narrowed.masks[0] == (narrowed.label_map == 1)).all() and not narrowed.masks[1].any()
    referring = Segmentation(queries=["the man"], label_map=two_blobs().astype(np.int32), masks=two_blobs()[None],
                             scores=np.array([1.0], np.float32), steps=1, mode="referring")
    boxed = Focus(boxes=((55, 55, 40, 40),)).apply(referring)
    assert boxed.label_map.sum() == 30 * 60 and boxed.label_map[75, 150] == 1


def test_focus_narrows_to_the_object_touched_not_the_whole_label():
    from car_backend.engine.instances import Parts
    from car_backend.engine.result import Segmentation
    from car_backend.labelstudio.interactive import Focus

    label_map = np.zeros((100, 200), np.int32)
    label_map[10:50, 10:110] = 1  # one connected part of label 1 ...
    part_map = np.zeros_like(label_map)
    part_map[10:50, 10:60] = 1  # ... that SAM saw as two objects
    part_map[10:50, 60:110] = 2
    label_map[60:90, 120:180] = 2
    seg = Segmentation(queries=["cat", "dog"], label_map=label_map, masks=np.stack([label_map == 1, label_map == 2]),
                       scores=np.array([0.9, 0.8], np.float32), steps=1, parts=Parts(part_map, (0.9, 0.8)))
    clicked = Focus(points=(Point(20, 30, True),)).apply(seg)  # x 40 px: the left object
    assert np.array_equal(clicked.label_map == 1, part_map == 1) and not (clicked.label_map == 2).any()
    assert np.array_equal(np.asarray(clicked.masks[0]), part_map == 1)
    without_sam = Focus(points=(Point(20, 30, True),)).apply(Segmentation(
        queries=seg.queries, label_map=label_map, masks=seg.masks, scores=seg.scores, steps=1))
    assert (without_sam.label_map == 1).sum() == 40 * 100  # connected parts: the whole blob
    # a box holding most of an object keeps all of it; a box on a corner of one keeps that corner
    boxed = Focus(boxes=((32, 12, 20, 34),)).apply(seg)  # x 64..104, y 12..46: inside the right object
    assert np.array_equal(boxed.label_map == 1, part_map == 2) and not (boxed.label_map == 2).any()
    corner = Focus(boxes=((5, 10, 10, 10),)).apply(seg)  # x 10..30, y 10..20: a corner of the left object
    assert (corner.label_map == 1).sum() == 21 * 11 and (corner.label_map[10:21, 10:31] == 1).all()
