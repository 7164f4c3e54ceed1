"""The paper's metrics: confusion-matrix mIoU for semantic sets; mIoU, oIoU and P@X for referring sets.

Semantic (GR: evaluate.py `semantic_iou`): one confusion matrix over the whole split, background included as
class 0 where the paper includes it; target pixels outside [0, num_classes) (255) are ignored. The mean runs
over the classes that occur in the targets, so a class that is only ever predicted does not count.
Referring (GR: evaluate.py `evaluate`): IoU per ref (0 when both masks are empty), mIoU = mean over refs,
oIoU = total intersection / total union, P@X = share of refs with IoU >= X.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def confusion_matrix(target: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class."""
    if target.shape != prediction.shape:
        raise ValueError(f"target {target.shape} and prediction {prediction.shape} differ in shape")
    target = target.astype(np.int64).ravel()
    prediction = prediction.astype(np.int64).ravel()
    valid = (target >= 0) & (target < num_classes)
    if np.any((prediction[valid] < 0) | (prediction[valid] >= num_classes)):
        raise ValueError(f"prediction has labels outside 0..{num_classes - 1}")
    cells = target[valid] * num_classes + prediction[valid]
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SemanticScores:
    miou: float
    class_iou: np.ndarray  # (num_classes,), NaN for classes absent from the targets
    pixel_accuracy: float


def semantic_scores(confusion: np.ndarray) -> SemanticScores:
    true_positive = np.diag(confusion).astype(np.float64)
    in_target = confusion.sum(axis=1)
    union = in_target + confusion.sum(axis=0) - true_positive
    present = in_target > 0
    class_iou = np.full(len(confusion), np.nan)
    class_iou[present] = true_positive[present] / union[present]
    total = confusion.sum()
    return SemanticScores(
        miou=float(class_iou[present].mean()) if present.any() else float("nan"),
        class_iou=class_iou,
        pixel_accuracy=float(true_positive.sum() / total) if total else float("nan"),
    )


@dataclass
class ConfusionTally:
    """Accumulates one confusion matrix over a split."""

    num_classes: int
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, target: np.ndarray, prediction: np.ndarray) -> None:
        self.matrix += confusion_matrix(target, prediction, self.num_classes)

    def scores(self) -> SemanticScores:
        return semantic_scores(self.matrix)


@dataclass(frozen=True)
class ReferringScores:
    miou: float
    oiou: float
    precision: dict[float, float]  # threshold -> share of refs with IoU >= threshold
    count: int


@dataclass
class ReferringTally:
    """Accumulates per-ref IoUs and the overall intersection and union."""

    count: int = 0
    iou_sum: float = 0.0
    intersection: int = 0
    union: int = 0
    hits: dict[float, int] = field(default_factory=lambda: dict.fromkeys(PRECISION_THRESHOLDS, 0))

    def add(self, target: np.ndarray, prediction: np.ndarray) -> float:
        """Count one ref; returns its IoU."""
        if target.shape != prediction.shape:
            raise ValueError(f"target {target.shape} and prediction {prediction.shape} differ in shape")
        target = target.astype(bool)
        prediction = prediction.astype(bool)
        intersection = int(np.count_nonzero(target & prediction))
        union = int(np.count_nonzero(target | prediction))
        iou = intersection / union if union else 0.0
        self.count += 1
        self.iou_sum += iou
        self.intersection += intersection
        self.union += union
        for threshold in self.hits:
            self.hits[threshold] += iou >= threshold
        return iou

    def scores(self) -> ReferringScores:
        n = self.count
        return ReferringScores(
            miou=self.iou_sum / n if n else float("nan"),
            oiou=self.intersection / self.union if self.union else float("nan"),
            precision={t: h / n if n else float("nan") for t, h in self.hits.items()},
            count=n,
        )
