import numpy as np
import pytest

from car_backend.evaluation.metrics import (
    ConfusionTally,
    ReferringTally,
    confusion_matrix,
    semantic_scores,
)


def slow_confusion(target, prediction, n):
    matrix = np.zeros((n, n), np.int64)
    for t, p in zip(target.ravel().tolist(), prediction.ravel().tolist(), strict=True):
        if 0 <= t < n:
            matrix[t, p] += 1
    return matrix


def slow_miou(targets, predictions, n):
    """IoU per class straight from pixel sets, averaged over the classes that occur in the targets."""
    ious = []
    for c in range(n):
        inter = union = in_target = 0
        for t, p in zip(targets, predictions, strict=True):
            valid = t != 255
            inter += np.count_nonzero((t == c) & (p == c) & valid)
            union += np.count_nonzero(((t == c) | (p == c)) & valid)
            in_target += np.count_nonzero(t == c)
        if in_target:
            ious.append(inter / union)
    return float(np.mean(ious))


def random_pair(rng, n, shape=(13, 17)):
    target = rng.integers(0, n, shape)
    target[rng.random(shape) < 0.1] = 255
    prediction = np.where(rng.random(shape) < 0.6, np.where(target == 255, 0, target), rng.integers(0, n, shape))
    return target, prediction


@pytest.mark.parametrize("seed", range(4))
def test_confusion_matches_pixel_loop(seed):
    rng = np.random.default_rng(seed)
    target, prediction = random_pair(rng, 21)
    assert np.array_equal(confusion_matrix(target, prediction, 21), slow_confusion(target, prediction, 21))


def test_miou_over_a_split_matches_pixel_sets():
    rng = np.random.default_rng(7)
    n = 6
    pairs = [random_pair(rng, n) for _ in range(5)]
    # One class never occurs in the targets but is predicted: it must not count.
    pairs = [(np.where(t == 5, 0, t), p) for t, p in pairs]
    tally = ConfusionTally(n)
    for target, prediction in pairs:
        tally.add(target, prediction)
    scores = tally.scores()
    assert scores.miou == pytest.approx(slow_miou(*zip(*pairs, strict=True), n))
    assert np.isnan(scores.class_iou[5])
    assert not np.isnan(scores.class_iou[:5]).any()


def test_scores_of_a_known_matrix():
    confusion = np.array([[3, 1], [2, 4]])
    scores = semantic_scores(confusion)
    assert scores.class_iou.tolist() == pytest.approx([3 / 6, 4 / 7])
    assert scores.miou == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert scores.pixel_accuracy == pytest.approx(0.7)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 3), 3)


def test_referring_tally():
    tally = ReferringTally()
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    assert tally.add(a, b) == pytest.approx(4 / 12)
    assert tally.add(a, a) == 1.0
    assert tally.add(np.zeros((4, 4)), np.zeros((4, 4))) == 0.0  # empty vs empty counts as 0, as in the paper's code
    scores = tally.scores()
    assert scores.count == 3
    assert scores.miou == pytest.approx((4 / 12 + 1) / 3)
    assert scores.oiou == pytest.approx((4 + 8) / (12 + 8))
    assert scores.precision[0.5] == pytest.approx(1 / 3)
    assert scores.precision[0.9] == pytest.approx(1 / 3)
