import numpy as np
import pytest

from car_backend.evaluation.masks import annotation_mask, polygons_mask, rle_counts_from_string, rle_decode
from tests.evaluation.fake_datasets import rle_counts


def rle_string(counts: list[int]) -> str:
    """COCO's compressed form, written from the format's description (the inverse of the reader)."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        while True:
            group = x & 0x1F
            x >>= 5
            more = x != -1 if group & 0x10 else x != 0
            out.append(chr(48 + (group | 0x20 if more else group)))
            if not more:
                break
    return "".join(out)


def test_compressed_counts_hand_example():
    # 0 | 40 (two groups) | 5 | 20 stored as 20 - 40 = -20 (two groups, negative)
    assert rle_counts_from_string("0X15\\O") == [0, 40, 5, 20]
    assert rle_string([0, 40, 5, 20]) == "0X15\\O"


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) < rng.uniform(0.05, 0.95)
    mask[:, :10] = seed % 2 == 0  # long runs, so multi-group counts and negative deltas occur
    counts = rle_counts(mask)
    assert np.array_equal(rle_decode({"size": [37, 53], "counts": counts}), mask)
    assert np.array_equal(rle_decode({"size": [37, 53], "counts": rle_string(counts)}), mask)
    assert np.array_equal(rle_decode({"size": [37, 53], "counts": rle_string(counts).encode()}), mask)


def test_rle_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected"):
        rle_decode({"size": [4, 4], "counts": [3, 4]})


def test_axis_aligned_polygon_covers_exactly_its_pixels():
    mask = polygons_mask([[5, 10, 25, 10, 25, 30, 5, 30]], 48, 64)
    expected = np.zeros((48, 64), bool)
    expected[10:30, 5:25] = True
    assert np.array_equal(mask, expected)


def test_polygons_union_and_degenerate_ones():
    mask = annotation_mask([[0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 14, 10, 14, 14, 10, 14], [1, 1, 2, 2]], 20, 20)
    assert mask.sum() == 32
    assert mask[:4, :4].all() and mask[10:14, 10:14].all()


def test_triangle_area_is_close_to_geometry():
    mask = polygons_mask([[0, 0, 40, 0, 0, 40]], 50, 50)
    assert int(mask.sum()) == 780  # centres (c + .5, r + .5) with c + r + 1 < 40


def test_unsupported_segmentation():
    with pytest.raises(ValueError):
        annotation_mask(42, 4, 4)


def point_in_polygon(x, y, points):
    inside = False
    for (xa, ya), (xb, yb) in zip(points, points[1:] + points[:1], strict=True):
        if (ya <= y) != (yb <= y) and x < xa + (y - ya) * (xb - xa) / (yb - ya):
            inside = not inside
    return inside


@pytest.mark.parametrize("seed", range(3))
def test_random_polygon_matches_per_pixel_ray_casting(seed):
    rng = np.random.default_rng(seed)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = rng.uniform(4, 14, 9)
    points = [(16 + r * np.cos(a), 12 + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]
    mask = polygons_mask([[v for p in points for v in p]], 24, 32)
    expected = np.array([[point_in_polygon(c + 0.5, r + 0.5, points) for c in range(32)] for r in range(24)])
    assert np.array_equal(mask, expected)
