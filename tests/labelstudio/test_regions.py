"""Label Studio regions read back one instance each: brush, polygon and rectangle masks, choices as tags, and
sizes checked before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest

from car_backend.labelstudio.regions import (
    RegionSizeError,
    rectangle_corners,
    region_instances,
    result_choices,
)

H, W = 50, 80


def rectangle(x, y, width, height, rotation=0.0, label="box", **extra) -> dict:
    return {"id": f"r{x}", "type": "rectanglelabels", "original_width": W, "original_height": H,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation,
                      "rectanglelabels": [label]}, **extra}


def test_a_rectangle_is_its_filled_box():
    (found,) = list(region_instances([rectangle(25, 10, 50, 40, score=0.7)], (H, W)))
    want = np.zeros((H, W), bool)
    want[5:25, 20:60] = True  # y 10%..50% of 50, x 25%..75% of 80
    assert (found.mask == want).all()
    assert found.kind == "rectanglelabels" and found.labels == ("box",) and found.score == 0.7 and found.id == "r25"


def test_a_rotated_rectangle_turns_about_its_top_left_corner():
    corners = rectangle_corners({"x": 50, "y": 20, "width": 25, "height": 20, "rotation": 90}, H, W)
    # 20 px wide, 10 px high from (40, 10), turned a quarter clockwise on screen: it now hangs down-left
    assert corners.round(6).tolist() == [[40, 10], [40, 30], [30, 30], [30, 10]]
    (found,) = list(region_instances([rectangle(50, 20, 25, 20, rotation=90)], (H, W)))
    ys, xs = np.nonzero(found.mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (30, 39, 10, 29)


def test_each_region_is_one_instance_in_order_and_unlabelled_ones_are_skipped():
    poly = {"id": "p", "type": "polygonlabels", "original_width": W, "original_height": H,
            "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["cat"]}}
    unlabelled = {"id": "u", "type": "rectanglelabels", "value": {"x": 0, "y": 0, "width": 5, "height": 5}}
    found = list(region_instances([poly, rectangle(60, 60, 10, 10, label="dog"), unlabelled,
                                   {"type": "choices", "value": {"choices": ["x"]}}], (H, W)))
    assert [(f.id, f.labels) for f in found] == [("p", ("cat",)), ("r60", ("dog",))]
    assert found[0].mask[:25, :40].all() and not found[0].mask[25:, :].any() and found[0].score is None


def test_choices_are_the_image_tags_once_each():
    result = [{"type": "choices", "value": {"choices": ["indoor", "night"]}},
              {"type": "choices", "value": {"choices": ["night", 3, "blurry"]}},
              {"type": "choices", "value": "not a dict"}, rectangle(0, 0, 5, 5)]
    assert result_choices(result) == ["indoor", "night", "blurry"]


def test_sizes_are_checked_before_any_mask_is_made():
    huge = rectangle(0, 0, 10, 10, original_width=100_000, original_height=100_000)
    with pytest.raises(RegionSizeError, match="100000x100000"):
        region_instances([huge], (H, W), max_pixels=50_000_000)
    with pytest.raises(RegionSizeError, match="the output"):
        region_instances([rectangle(0, 0, 10, 10)], (100_000, 100_000), max_pixels=50_000_000)
    with pytest.raises(ValueError, match="not numbers"):
        list(region_instances([rectangle("a", 0, 10, 10)], (H, W), max_pixels=50_000_000))
