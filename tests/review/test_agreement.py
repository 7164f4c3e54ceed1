import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from car_backend.engine.result import Segmentation
from car_backend.labelstudio.config import LabelSpec, Target
from car_backend.labelstudio.regions import label_masks, shrink
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.review.agreement import (
    Bounds,
    LabelAgreement,
    LabelTotals,
    ProjectAgreement,
    compare,
    search,
)

H, W = 60, 90  # not square, and 100 / W is not a round number


def brush_region(mask: np.ndarray, *labels: str) -> dict:
    height, width = mask.shape
    value = {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": list(labels)}
    return {"type": "brushlabels", "original_width": width, "original_height": height, "value": value}


def polygon_region(corners, *labels: str, size=(H, W)) -> dict:
    """A polygon through pixel-corner points (x, y), written in percent as Label Studio stores it."""
    height, width = size
    points = [[x * 100.0 / width, y * 100.0 / height] for x, y in corners]
    value = {"points": points, "closed": True, "polygonlabels": list(labels)}
    return {"type": "polygonlabels", "original_width": width, "original_height": height, "value": value}


def rectangle(x0, y0, x1, y1):
    """Pixel corners of the pixels [x0, x1) x [y0, y1)."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def box_mask(x0, y0, x1, y1, size=(H, W)) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def blobs(rng, size=(H, W), count=3) -> np.ndarray:
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    mask = np.zeros(size, bool)
    for _ in range(count):
        cy, cx, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(3, 15)
        mask |= (y - cy) ** 2 + (x - cx) ** 2 < r * r
    return mask


# ---- label_masks ----


def test_brush_regions_decode_to_the_masks_that_were_encoded():
    rng = np.random.default_rng(1)
    cat, dog = blobs(rng), blobs(rng)
    masks = label_masks([brush_region(cat, "cat"), brush_region(dog, "dog")])
    assert sorted(masks) == ["cat", "dog"]
    np.testing.assert_array_equal(masks["cat"], cat)
    np.testing.assert_array_equal(masks["dog"], dog)
    assert masks["cat"].dtype == bool


def test_polygon_points_in_percent_fill_the_pixels_they_enclose():
    l_shape = [(10, 5), (40, 5), (40, 20), (25, 20), (25, 50), (10, 50)]  # concave
    masks = label_masks([polygon_region(rectangle(3, 7, 50, 31), "box"), polygon_region(l_shape, "ell")])
    np.testing.assert_array_equal(masks["box"], box_mask(3, 7, 50, 31))
    np.testing.assert_array_equal(masks["ell"], box_mask(10, 5, 40, 20) | box_mask(10, 20, 25, 50))


def test_regions_from_our_encoder_round_trip():
    label_map = np.zeros((H, W), np.int32)
    label_map[5:40, 3:30] = 1
    label_map[10:50, 30:80] = 2  # shares an edge with class 1
    for i in range(15):  # a staircase boundary
        label_map[45 + i // 2, 10 + i :] = 3
    queries = ["cat", "dog", "sky"]
    seg = Segmentation(
        queries=queries,
        label_map=label_map,
        masks=np.stack([label_map == k for k in (1, 2, 3)]),
        scores=np.full(3, 0.5, np.float32),
        steps=1,
    )
    specs = [LabelSpec(q, q) for q in queries]
    for kind in ("brush", "polygon"):
        target = Target("tag", "image", "image", kind, ())
        regions = segmentation_to_regions(seg, target, specs, polygon_tolerance=0, min_area=1)
        masks = label_masks(regions)
        assert sorted(masks) == queries, kind
        for k, label in enumerate(queries, start=1):
            np.testing.assert_array_equal(masks[label], label_map == k, err_msg=f"{kind} {label}")


def test_regions_of_one_label_are_or_ed_and_other_regions_ignored():
    first, second = box_mask(0, 0, 10, 10), box_mask(5, 5, 20, 30)
    regions = [
        brush_region(first, "cat"),
        brush_region(second, "cat", "pet"),  # a region with two labels counts for both
        polygon_region(rectangle(60, 40, 70, 50), "cat"),
        polygon_region(rectangle(0, 0, 90, 60)),  # no label
        {"type": "choices", "value": {"choices": ["cat"]}},
        {"type": "rectanglelabels", "original_width": W, "original_height": H,
         "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["cat"]}},
    ]  # fmt: skip
    masks = label_masks(regions)
    assert sorted(masks) == ["cat", "pet"]
    np.testing.assert_array_equal(masks["cat"], first | second | box_mask(60, 40, 70, 50))
    np.testing.assert_array_equal(masks["pet"], second)


def test_sizes_must_agree_unless_a_size_is_given():
    small = np.zeros((H // 2, W // 2), bool)
    small[3:10, 4:12] = True
    regions = [brush_region(box_mask(0, 0, 5, 5), "cat"), brush_region(small, "dog")]
    with pytest.raises(ValueError, match=r"30x45 .* 60x90"):
        label_masks(regions)
    with pytest.raises(ValueError, match="size"):
        label_masks([])
    assert label_masks([], size=(H, W)) == {}

    masks = label_masks(regions, size=(H, W))  # the half-size brush is resized, nearest
    np.testing.assert_array_equal(masks["dog"], small.repeat(2, axis=0).repeat(2, axis=1))
    masks = label_masks([polygon_region(rectangle(20, 10, 40, 30), "box")], size=(H * 2, W * 2))
    np.testing.assert_array_equal(masks["box"], box_mask(40, 20, 80, 60, size=(H * 2, W * 2)))


def test_shrink_keeps_the_longer_side_within_the_limit():
    mask = np.zeros((600, 300), bool)
    mask[:300, :150] = True
    (shrunk,) = shrink({"a": mask}, max_side=256).values()
    assert shrunk.shape == (256, 128) and shrunk.dtype == bool
    assert shrunk[:128, :64].all() and not shrunk[128:].any() and not shrunk[:, 64:].any()
    small = np.ones((20, 10), bool)
    assert shrink({"a": small})["a"] is small


# ---- compare ----


def test_compare_gives_exact_iou_and_missed_and_added_labels():
    empty = np.zeros((8, 8), bool)
    predicted = {
        "cat": box_mask(0, 0, 4, 4, size=(8, 8)),  # 16 px
        "dog": box_mask(1, 1, 7, 3, size=(8, 8)),
        "fish": box_mask(6, 6, 8, 8, size=(8, 8)),  # not annotated
        "bird": empty,  # predicted with an empty mask
        "ghost": empty,
    }
    annotated = {
        "cat": box_mask(2, 2, 6, 6, size=(8, 8)),  # 16 px, 4 shared with the prediction
        "dog": box_mask(1, 1, 7, 3, size=(8, 8)),
        "bird": box_mask(0, 7, 3, 8, size=(8, 8)),
        "tree": box_mask(0, 0, 1, 1, size=(8, 8)),  # not predicted
    }
    task = compare(predicted, annotated)
    assert sorted(task.labels) == ["bird", "cat", "dog", "fish", "tree"]  # ghost is on neither side
    assert task.labels["cat"] == LabelAgreement(intersection=4, union=28, predicted=True, annotated=True)
    assert task.iou("cat") == pytest.approx(4 / 28)
    assert task.iou("dog") == 1.0
    assert task.labels["fish"] == LabelAgreement(0, 4, predicted=True, annotated=False)
    assert task.missed == ("bird", "tree") and task.added == ("fish",)
    assert task.score == pytest.approx((4 / 28 + 1) / 5)


def test_empty_against_empty_scores_one():
    assert compare({}, {}).score == 1.0
    task = compare({"cat": np.zeros((4, 4), bool)}, {"cat": np.zeros((4, 4), bool)})
    assert task.labels == {} and task.score == 1.0
    assert compare({"cat": np.ones((4, 4), bool)}, {}).score == 0.0


def test_a_half_resolution_prediction_is_resized_to_the_annotation():
    rng = np.random.default_rng(3)
    coarse_truth, coarse_pred = blobs(rng, size=(30, 45)), blobs(rng, size=(30, 45))
    truth = coarse_truth.repeat(2, axis=0).repeat(2, axis=1)
    task = compare({"cat": coarse_truth, "dog": coarse_pred}, {"cat": truth, "dog": truth})
    assert task.iou("cat") == 1.0
    assert task.labels["cat"].intersection == truth.sum()
    pred = coarse_pred.repeat(2, axis=0).repeat(2, axis=1)
    assert task.labels["dog"].intersection == (pred & truth).sum()
    assert task.labels["dog"].union == (pred | truth).sum()


# ---- ProjectAgreement ----


def random_tasks(count=15, seed=5):
    """(predicted, annotated) label masks; each label is on each side with probability 0.7."""
    rng = np.random.default_rng(seed)

    def side():
        return {label: blobs(rng, (24, 32), 2) for label in ("cat", "dog", "sky") if rng.random() < 0.7}

    return [(side(), side()) for _ in range(count)]


def test_project_totals_equal_an_independent_count():
    project = ProjectAgreement()
    expected = {}
    scores = []
    for predicted, annotated in random_tasks():
        project.add(compare(predicted, annotated))
        ious = []
        for label in predicted.keys() | annotated.keys():
            pred = predicted.get(label, np.zeros((24, 32), bool))
            true = annotated.get(label, np.zeros((24, 32), bool))
            inter, union = int((pred & true).sum()), int((pred | true).sum())
            if union == 0:
                continue
            ious.append(inter / union)
            totals = expected.setdefault(label, [0, 0, 0, 0, 0])
            flags = (pred.any() and true.any(), true.any() and not pred.any(), pred.any() and not true.any())
            for i, value in enumerate((inter, union, *flags)):
                totals[i] += int(value)
        scores.append(np.mean(ious) if ious else 1.0)

    assert project.tasks == 15
    assert project.mean_score == pytest.approx(np.mean(scores))
    assert {label: LabelTotals(*v) for label, v in expected.items()} == project.labels
    for label, (inter, union, tp, fn, fp) in expected.items():
        assert project.label_iou(label) == pytest.approx(inter / union)
        assert project.labels[label].tasks == tp + fn + fp
    assert [row["label"] for row in project.summary()] == sorted(expected)
    cat = next(row for row in project.summary() if row["label"] == "cat")
    assert cat == {
        "label": "cat",
        "iou": pytest.approx(expected["cat"][0] / expected["cat"][1]),
        "tasks": sum(expected["cat"][2:]),
        "missed": expected["cat"][3],
        "added": expected["cat"][4],
    }


def test_no_tasks_has_no_mean_score():
    assert ProjectAgreement().mean_score is None
    assert ProjectAgreement().summary() == []


def test_fields_round_trip_as_given_and_as_redis_returns_them():
    project = ProjectAgreement()
    for predicted, annotated in random_tasks(count=6):
        project.add(compare(predicted, {f"a:b {k}": v for k, v in annotated.items()}))  # colons in names
    fields = project.to_fields()
    assert fields["tasks"] == 6.0 and all(isinstance(v, float) for v in fields.values())
    assert "label:a:b cat:intersection" in fields
    assert ProjectAgreement.from_fields(fields) == project
    as_redis = {name.encode(): repr(value).encode() for name, value in fields.items()}
    assert ProjectAgreement.from_fields(as_redis) == project
    assert ProjectAgreement.from_fields({b"tasks": b"6", b"score_sum": b"2.5"}).mean_score == 2.5 / 6
    with pytest.raises(ValueError, match="unknown agreement field"):
        ProjectAgreement.from_fields({"label:cat:volume": 1.0})
    with pytest.raises(ValueError, match="unknown agreement field"):
        ProjectAgreement.from_fields({"colour": 1.0})


# ---- search ----

LABELS = ("cat", "dog", "sky")
TRUTH = {"keep": 0.35, "mask": 0.6}


def soft_tasks(count=20, seed=7):
    """Per task and label: a confidence and a soft score map (a Gaussian bump peaking at 1)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    tasks = []
    for _ in range(count):
        task = {}
        for label in LABELS:
            cy, cx, r = rng.uniform(4, 28), rng.uniform(4, 28), rng.uniform(3, 10)
            task[label] = (rng.uniform(0, 1), np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)))
        tasks.append(task)
    return tasks


def threshold(task, params):
    return {label: soft >= params["mask"] for label, (conf, soft) in task.items() if conf >= params["keep"]}


def test_search_recovers_known_thresholds_from_a_wrong_start():
    tasks = soft_tasks()
    annotations = [threshold(task, TRUTH) for task in tasks]

    def evaluate(params):
        pairs = zip(tasks, annotations, strict=True)
        return float(np.mean([compare(threshold(task, params), truth).score for task, truth in pairs]))

    bounds = [Bounds("keep", 0.0, 1.0, 11), Bounds("mask", 0.05, 0.95, 19)]  # 0.35 is off the keep grid
    result = search(evaluate, bounds, {"keep": 0.9, "mask": 0.15})
    assert abs(result.best["keep"] - TRUTH["keep"]) <= 0.1
    assert abs(result.best["mask"] - TRUTH["mask"]) <= 0.05
    assert result.score == pytest.approx(evaluate(result.best))
    assert result.start_score < 0.5 < 0.9 < result.score
    assert evaluate(TRUTH) == 1.0


def test_search_evaluates_each_parameter_set_once():
    calls = []

    def evaluate(params):
        calls.append(tuple(sorted(params.items())))
        return -((params["a"] - 0.5) ** 2) - (params["b"] - 0.25) ** 2

    bounds = [Bounds("a", 0, 1, 5), Bounds("b", 0, 1, 5)]
    result = search(evaluate, bounds, {"a": 0.0, "b": 0.0})
    assert result.best == {"a": 0.5, "b": 0.25} and result.score == 0.0
    # start, 4 new a's, 4 new b's; round 2: 4 new a's at b=0.25, no new b's; no move, so it stops
    assert len(calls) == len(set(calls)) == result.evaluations == 13


def test_a_flat_objective_returns_the_start_unchanged():
    calls = []

    def flat(params):
        calls.append(params)
        return 0.5

    result = search(flat, [Bounds("a", 0, 1, 5), Bounds("b", 0, 1, 5)], {"a": 0.3, "b": 0.6}, rounds=5)
    assert result.best == {"a": 0.3, "b": 0.6} and result.score == result.start_score == 0.5
    assert result.evaluations == len(calls) == 11  # one round: the start and five values each


def test_ties_never_move_the_search():
    result = search(lambda p: float(p["a"] >= 0.5), [Bounds("a", 0, 1, 5)], {"a": 0.8})
    assert result.best == {"a": 0.8}


def test_an_out_of_bounds_start_is_clipped_and_other_parameters_pass_through():
    seen = []

    def evaluate(params):
        seen.append(params)
        return params["a"] - params["b"]

    bounds = [Bounds("a", 0, 1, 5), Bounds("b", 0.2, 1, 5)]
    result = search(evaluate, bounds, {"a": 5.0, "b": -1.0, "size": 512})
    assert seen[0] == {"a": 1.0, "b": 0.2, "size": 512}
    assert result.start_score == pytest.approx(0.8) == result.score
    assert result.best == seen[0]
    assert all(p["size"] == 512 for p in seen)


def test_bounds_give_exact_grid_values_and_reject_empty_ranges():
    assert Bounds("keep", 0, 1, 11).grid()[3] == 0.3
    assert Bounds("keep", 0.2, 0.4, 3).grid() == (0.2, 0.3, 0.4)
    with pytest.raises(ValueError):
        Bounds("keep", 1, 0, 5)
    with pytest.raises(ValueError):
        Bounds("keep", 0, 1, 1)
    with pytest.raises(ValueError, match="start has no value"):
        search(lambda p: 0.0, [Bounds("keep", 0, 1, 3)], {})
