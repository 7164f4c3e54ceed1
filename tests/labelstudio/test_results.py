import math
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from car_backend.engine.result import Segmentation
from car_backend.labelstudio.config import LabelSpec, Target, parse_label_config
from car_backend.labelstudio.results import (
    failed_entry,
    pending_entry,
    prediction_entry,
    segmentation_to_regions,
    trace_polygons,
)

CONFIGS = Path(__file__).resolve().parents[2] / "label_config"
BRUSH = Target("tag", "image", "image", "brush", ())
POLYGON = Target("tag", "image", "image", "polygon", ())


def labels(*names: str) -> list[LabelSpec]:
    return [LabelSpec(n, n) for n in names]


def segmentation(label_map: np.ndarray, queries: list[str], scores=None, mode="semantic") -> Segmentation:
    label_map = label_map.astype(np.int32)
    masks = np.stack([label_map == i + 1 for i in range(len(queries))])
    if scores is None:
        scores = [0.5 + 0.1 * i if (label_map == i + 1).any() else 0.0 for i in range(len(queries))]
    return Segmentation(
        queries=queries,
        label_map=label_map,
        masks=masks,
        scores=np.asarray(scores, dtype=np.float32),
        steps=1,
        mode=mode,
    )


def wavy_map(height=60, width=90, seed=0) -> np.ndarray:
    """Three classes filling the image, with ragged boundaries, a diagonal staircase and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    lm = np.where(x + 6 * np.sin(y / 4.0) < width / 3, 1, 2)
    lm = np.where(y > 0.8 * x - 10 + 5 * np.cos(x / 3.0), lm, 3)
    noise = rng.random((height, width)) < 0.03
    lm[noise] = rng.integers(1, 4, noise.sum())
    return lm.astype(np.int32)


def inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised; half-open edges, so a shared edge belongs to exactly one side."""
    px, py = points[:, 0][:, None], points[:, 1][:, None]
    x0, y0 = polygon[:, 0][None, :], polygon[:, 1][None, :]
    x1, y1 = np.roll(polygon[:, 0], -1)[None, :], np.roll(polygon[:, 1], -1)[None, :]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return ((crosses & (px < x_at)).sum(axis=1) % 2) == 1


def polygons_from_regions(regions, width, height):
    out = []
    for r in regions:
        pts = np.asarray(r["value"]["points"], dtype=np.float64)
        out.append((r["value"]["polygonlabels"][0], pts * [width / 100.0, height / 100.0]))
    return out


def subpixel_samples(height, width, n=4):
    offsets = (np.arange(n) + 0.5) / n
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pts = [np.stack([(xs + ox).ravel(), (ys + oy).ravel()], 1) for oy in offsets for ox in offsets]
    return np.concatenate(pts)


# ---- brush ----


def test_brush_rle_round_trips_through_the_sdk_decoder_at_the_image_size():
    lm = np.zeros((30, 50), np.int32)  # not square: a swapped width/height would not decode right
    lm[2:10, 5:40] = 1
    lm[15:29, 1:3] = 3
    seg = segmentation(lm, ["cat", "dog", "tree"])
    regions = segmentation_to_regions(seg, BRUSH, labels("Cat", "Dog", "Tree"))
    assert [r["value"]["brushlabels"] for r in regions] == [["Cat"], ["Tree"]]  # dog has no pixels
    for region, k in zip(regions, (1, 3), strict=True):
        assert (region["original_width"], region["original_height"]) == (50, 30)
        assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
        decoded = decode_rle(region["value"]["rle"]).reshape(30, 50, 4)[:, :, 3]
        np.testing.assert_array_equal(decoded, np.where(lm == k, 255, 0))
        assert region["from_name"] == "tag" and region["to_name"] == "image"
        assert region["image_rotation"] == 0 and region["readonly"] is False
        assert isinstance(region["id"], str) and region["id"]
    assert regions[0]["score"] == pytest.approx(0.5) and regions[1]["score"] == pytest.approx(0.7)
    assert len({r["id"] for r in regions}) == 2


def test_nothing_found_gives_no_regions():
    seg = segmentation(np.zeros((8, 8)), ["a", "b"], scores=[0, 0])
    assert segmentation_to_regions(seg, BRUSH, labels("a", "b")) == []
    assert segmentation_to_regions(seg, POLYGON, labels("a", "b")) == []


def test_labels_must_pair_with_queries():
    seg = segmentation(np.zeros((4, 4)), ["a", "b"])
    with pytest.raises(ValueError, match="pair up"):
        segmentation_to_regions(seg, BRUSH, labels("a"))
    with pytest.raises(ValueError, match="kind"):
        segmentation_to_regions(seg, BRUSH, labels("a", "b"), kind="keypoint")


def test_referring_mode_gives_one_region_named_by_the_first_label():
    lm = np.zeros((20, 24), np.int32)
    lm[4:12, 6:18] = 1
    seg = segmentation(lm, ["the red car", "a car on the left"], scores=[0.2, 0.6], mode="referring")
    (brush,) = segmentation_to_regions(seg, BRUSH, labels("object", "other"))
    assert brush["value"]["brushlabels"] == ["object"] and brush["score"] == pytest.approx(0.6)
    decoded = decode_rle(brush["value"]["rle"]).reshape(20, 24, 4)[:, :, 3]
    np.testing.assert_array_equal(decoded, np.where(lm == 1, 255, 0))
    (poly,) = segmentation_to_regions(seg, BRUSH, labels("object"), kind="polygon", polygon_tolerance=0)
    assert poly["type"] == "polygonlabels" and poly["value"]["polygonlabels"] == ["object"]
    assert sorted(map(tuple, poly["value"]["points"])) == sorted(
        [(25.0, 20.0), (25.0, 60.0), (75.0, 60.0), (75.0, 20.0)]
    )


# ---- polygons ----


def test_exact_polygons_reproduce_the_label_map():
    lm = np.zeros((40, 50), np.int32)
    lm[5:30, 3:20] = 1
    lm[10:35, 20:45] = 2  # shares an edge with class 1
    lm[30:38, 10:20] = 2
    for i in range(12):  # a diagonal staircase boundary
        lm[i, 30 + i :] = 3
    seg = segmentation(lm, ["a", "b", "c"])
    regions = segmentation_to_regions(seg, POLYGON, labels("a", "b", "c"), polygon_tolerance=0)
    centres = subpixel_samples(40, 50, n=1)
    expected = lm[centres[:, 1].astype(int), centres[:, 0].astype(int)]
    covered = {k: np.zeros(len(centres), bool) for k in (1, 2, 3)}
    for name, poly in polygons_from_regions(regions, 50, 40):
        covered[" abc".index(name)] |= inside(centres, poly)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(covered[k], expected == k, err_msg=f"class {k}")


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5])
def test_adjacent_classes_leave_no_gap_after_simplification(tolerance):
    height, width = 60, 90
    lm = wavy_map(height, width)
    seg = segmentation(lm, ["a", "b", "c"])
    regions = segmentation_to_regions(seg, POLYGON, labels("a", "b", "c"), polygon_tolerance=tolerance)
    polys = polygons_from_regions(regions, width, height)
    samples = subpixel_samples(height, width)
    covered = np.zeros(len(samples), bool)
    for _, poly in polys:
        covered |= inside(samples, poly)
    missing = samples[~covered]
    assert not len(missing), f"{len(missing)} uncovered points, e.g. {missing[:5].tolist()}"
    if tolerance:
        exact = segmentation_to_regions(seg, POLYGON, labels("a", "b", "c"), polygon_tolerance=0)
        assert sum(len(r["value"]["points"]) for r in regions) < 0.6 * sum(
            len(r["value"]["points"]) for r in exact
        )


def test_polygon_regions_are_well_formed():
    lm = wavy_map(37, 53, seed=3)
    seg = segmentation(lm, ["a", "b", "c"])
    regions = segmentation_to_regions(seg, POLYGON, labels("a", "b", "c"))
    assert regions
    for r in regions:
        assert r["type"] == "polygonlabels" and r["value"]["closed"] is True
        assert (r["original_width"], r["original_height"]) == (53, 37)
        points = r["value"]["points"]
        assert len(points) >= 3 and len({tuple(p) for p in points}) >= 3
        assert all(0.0 <= c <= 100.0 for p in points for c in p)
        assert all(isinstance(c, float) for p in points for c in p)
    assert {0.0, 100.0} <= {c for r in regions for p in r["value"]["points"] for c in p}  # reaches the border
    assert len({r["id"] for r in regions}) == len(regions)


def test_one_polygon_per_connected_part_and_specks_are_absorbed():
    lm = np.zeros((30, 30), np.int32)
    lm[2:10, 2:10] = 1
    lm[15:25, 15:25] = 1
    lm[5, 20] = 1  # a one-pixel speck of class 1 in the background: dropped
    lm[18, 18] = 2  # a one-pixel speck of class 2 inside class 1: absorbed by class 1
    rings = trace_polygons(lm, [1, 2], tolerance=0)
    assert set(rings) == {1}
    assert sorted(len(r) for r in rings[1]) == [4, 4]
    assert len(trace_polygons(lm, [1, 2], tolerance=0, min_area=1)[2]) == 1


def test_outer_outline_covers_an_enclosed_hole():
    lm = np.ones((20, 20), np.int32)
    lm[5:15, 5:15] = 2
    rings = trace_polygons(lm, [1, 2], tolerance=0)
    assert [r.tolist() for r in rings[1]] == [[[0, 0], [0, 20], [20, 20], [20, 0]]]
    assert sorted(map(tuple, rings[2][0].tolist())) == [(5, 5), (5, 15), (15, 5), (15, 15)]


def test_diagonal_touching_pixels_make_a_polygon_through_the_shared_corner():
    lm = np.zeros((4, 4), np.int32)
    lm[0:2, 0:2] = 1
    lm[2:4, 2:4] = 1
    (ring,) = trace_polygons(lm, [1], tolerance=0, min_area=1)[1]
    assert ring.tolist().count([2, 2]) == 2  # the outline passes the pinch point twice


# ---- entries and validation against the SDK ----


def test_regions_validate_against_the_label_config_with_the_sdk():
    interface = LabelInterface((CONFIGS / "brush_polygon.xml").read_text())
    config = parse_label_config((CONFIGS / "brush_polygon.xml").read_text())
    stuff, objects = config.targets
    lm = wavy_map(24, 32)
    seg = segmentation(lm, ["sky", "grass", "road"])
    regions = segmentation_to_regions(seg, stuff, list(stuff.labels))
    seg2 = segmentation(lm, ["person", "car", "bicycle"])
    regions += segmentation_to_regions(seg2, objects, list(objects.labels))
    entry = prediction_entry(regions, "car-test")
    assert interface.validate_prediction(entry, return_errors=True) in (True, [])


def test_prediction_entry_scores():
    regions = [{"score": 0.2}, {"score": 0.6}, {"score": float("nan")}]
    entry = prediction_entry(regions, "v1")
    assert entry == {"result": regions, "score": pytest.approx(0.4), "model_version": "v1"}
    assert prediction_entry([], "v1") == {"result": [], "score": 0.0, "model_version": "v1"}
    assert prediction_entry([], "v1", score=np.float32(0.25))["score"] == 0.25
    assert type(prediction_entry([], "v1", score=np.float32(0.25))["score"]) is float
    assert prediction_entry([], "v1", score=float("nan"))["score"] == 0.0
    assert not math.isnan(prediction_entry([{"score": float("inf")}], "v")["score"])


def test_pending_and_failed_entries():
    pending = pending_entry("v1", "queued")
    assert "result" not in pending and pending["model_version"] == "v1"
    failed = failed_entry("v1", "cannot decode the image")
    assert failed == {"result": [], "score": 0.0, "model_version": "v1", "error": "cannot decode the image"}


# ---- instances, boxes and tags ----

RECTANGLE = Target("box", "image", "image", "rectangle", ())
CHOICES = Target("tags", "image", "image", "choices", ())


def three_and_one() -> np.ndarray:
    lm = np.zeros((40, 80), np.int32)
    lm[2:12, 4:14] = 1
    lm[20:30, 30:50] = 1
    lm[5:35, 60:75] = 1
    lm[30:38, 2:20] = 2
    return lm


def test_instance_brushes_polygons_and_boxes_are_one_region_per_object():
    seg = segmentation(three_and_one(), ["cat", "dog"], scores=[0.75, 0.5])
    brushes = segmentation_to_regions(seg, BRUSH, labels("cat", "dog"), instances=True)
    assert [(r["value"]["brushlabels"], r["score"]) for r in brushes] == [
        (["cat"], 0.75), (["cat"], 0.75), (["cat"], 0.75), (["dog"], 0.5)]
    painted = [decode_rle(r["value"]["rle"]).reshape(40, 80, 4)[..., 3] == 255 for r in brushes]
    assert painted[2].sum() == 200 and painted[2][20:30, 30:50].all()  # numbered in raster order of first pixel
    assert not np.logical_and.reduce(painted[:2]).any()  # one object each
    assert len(segmentation_to_regions(seg, BRUSH, labels("cat", "dog"))) == 2  # semantic: one per label
    polygons = segmentation_to_regions(seg, POLYGON, labels("cat", "dog"), instances=True, polygon_tolerance=0)
    assert [r["value"]["polygonlabels"] for r in polygons] == [["cat"]] * 3 + [["dog"]]
    assert polygons[2]["value"]["points"] == [[37.5, 50.0], [37.5, 75.0], [62.5, 75.0], [62.5, 50.0]]
    boxes = segmentation_to_regions(seg, RECTANGLE, labels("cat", "dog"), instances=True)
    assert [r["value"] for r in boxes] == [
        {"x": 5.0, "y": 5.0, "width": 12.5, "height": 25.0, "rotation": 0, "rectanglelabels": ["cat"]},
        {"x": 75.0, "y": 12.5, "width": 18.75, "height": 75.0, "rotation": 0, "rectanglelabels": ["cat"]},
        {"x": 37.5, "y": 50.0, "width": 25.0, "height": 25.0, "rotation": 0, "rectanglelabels": ["cat"]},
        {"x": 2.5, "y": 75.0, "width": 22.5, "height": 20.0, "rotation": 0, "rectanglelabels": ["dog"]},
    ]
    assert {r["type"] for r in boxes} == {"rectanglelabels"} and boxes[0]["original_width"] == 80
    semantic = segmentation_to_regions(seg, RECTANGLE, labels("cat", "dog"))  # one box around each label
    assert [(r["value"]["x"], r["value"]["y"], r["value"]["width"], r["value"]["height"]) for r in semantic] == [
        (5.0, 5.0, 88.75, 82.5), (2.5, 75.0, 22.5, 20.0)]


def test_choices_name_the_labels_present_best_first():
    seg = segmentation(three_and_one(), ["cat", "dog", "cow"], scores=[0.5, 0.75, 0.9])  # cow has no pixel
    (single,) = segmentation_to_regions(seg, CHOICES, labels("cat", "dog", "cow"))
    assert single["type"] == "choices" and single["value"] == {"choices": ["dog"]} and single["score"] == 0.75
    many = Target("tags", "image", "image", "choices", (), multiple=True)
    (multiple,) = segmentation_to_regions(seg, many, labels("cat", "dog", "cow"))
    assert multiple["value"] == {"choices": ["dog", "cat"]} and multiple["score"] == pytest.approx(0.625)
    empty = segmentation(np.zeros((4, 4), np.int32), ["cat"])
    assert segmentation_to_regions(empty, many, labels("cat")) == []


def test_a_referring_object_is_one_box_whatever_its_pieces():
    lm = np.zeros((20, 20), np.int32)
    lm[2:5, 2:5] = 1
    lm[10:15, 12:18] = 1
    seg = segmentation(lm, ["the two cats"], scores=[0.8], mode="referring")
    (box,) = segmentation_to_regions(seg, RECTANGLE, labels("cat"), instances=True)
    assert (box["value"]["x"], box["value"]["y"], box["value"]["width"], box["value"]["height"]) == (
        10.0, 10.0, 80.0, 65.0)


def test_instance_and_box_regions_validate_against_the_shipped_configs():
    lm = np.zeros((30, 40), np.int32)
    lm[2:10, 2:10] = 1
    lm[15:25, 20:30] = 1
    lm[12:20, 32:38] = 2
    for name, kind in (("instances", "brush"), ("detection", "rectangle"), ("classification", "choices")):
        xml = (CONFIGS / f"{name}.xml").read_text()
        (target,) = parse_label_config(xml).targets
        seg = segmentation(lm, [label.prompt for label in target.labels[:2]])
        regions = segmentation_to_regions(seg, target, list(target.labels[:2]), instances=kind != "choices")
        assert {r["type"] for r in regions} == {f"{kind}labels" if kind != "choices" else "choices"}
        entry = prediction_entry(regions, "car-test")
        assert LabelInterface(xml).validate_prediction(entry, return_errors=True) in (True, []), name
