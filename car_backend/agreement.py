"""How well predictions agree with annotations, per task and over a project, and a threshold search.

Both sides are Label Studio results: lists of brush (RLE) and polygon regions. `label_masks` turns one
into a bool mask per label name, `compare` scores one task (IoU per label; a label on one side only
scores 0), `ProjectAgreement` sums tasks into totals that can live in a Redis hash, and `search` tunes
parameters (thresholds) by bounded coordinate ascent on any score.

Polygons are read the way `car_backend.labelstudio.results` writes them: points run along pixel corners,
so a pixel belongs to a polygon when its centre is inside (cv2.fillPoly would add the pixels the outline
touches, a one-pixel band along the right and bottom edges).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from car_backend.evaluation.masks import polygons_mask

REGION_TYPES = ("brushlabels", "polygonlabels")  # each keeps its label names under value[type]
SHRINK_MAX_SIDE = 256  # callers that store masks shrink them to this many pixels on the longer side
GRID_DIGITS = 10  # grid values are rounded so 0.1 * 3 and 0.3 are the same parameter value


# ---- masks from regions ----


def label_masks(regions: Iterable[dict], size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The union (H, W) bool mask of each label over the brush and polygon regions of one result.

    Other region types and regions without a label are skipped; a region with several labels counts for
    each. `size` (H, W) sets the output size (brush masks drawn at another size are resized, nearest);
    without it every region's original_height/original_width must agree, and a ValueError says which
    region does not, or that there is no region to take the size from.
    """
    regions = [r for r in regions if _labels(r)]
    if size is None:
        size = _common_size(regions)
    height, width = size
    masks: dict[str, np.ndarray] = {}
    for region in regions:
        if region["type"] == "brushlabels":
            mask = _resize(_brush_mask(region, _region_size(region) or size), size)
        else:
            points = np.asarray(region["value"]["points"], np.float64).reshape(-1, 2)
            mask = polygons_mask([points * [width / 100.0, height / 100.0]], height, width)
        for label in _labels(region):
            add_mask(masks, label, mask)
    return masks


def add_mask(masks: dict[str, np.ndarray], label: str, mask: np.ndarray) -> None:
    """OR `mask` into `masks[label]` (set it when the label has none yet)."""
    masks[label] = masks[label] | mask if label in masks else mask


def shrink(masks: Mapping[str, np.ndarray], max_side: int = SHRINK_MAX_SIDE) -> dict[str, np.ndarray]:
    """The masks resized (nearest) so the longer side is at most `max_side`; smaller ones are kept."""
    out = {}
    for label, mask in masks.items():
        height, width = mask.shape
        scale = max_side / max(height, width)
        if scale < 1:
            mask = _resize(mask, (max(1, round(height * scale)), max(1, round(width * scale))))
        out[label] = mask
    return out


def _labels(region: dict) -> list[str]:
    kind = region.get("type")
    return list(region.get("value", {}).get(kind) or []) if kind in REGION_TYPES else []


def _region_size(region: dict) -> tuple[int, int] | None:
    height, width = region.get("original_height"), region.get("original_width")
    return (int(height), int(width)) if height and width else None


def _common_size(regions: Sequence[dict]) -> tuple[int, int]:
    if not regions:
        raise ValueError("no brush or polygon region to take the image size from; pass size=(H, W)")
    size = None
    for region in regions:
        this = _region_size(region)
        if this is None:
            raise ValueError(f"region {region.get('id', '?')} has no original_height/original_width")
        if size is not None and this != size:
            raise ValueError(
                f"region {region.get('id', '?')} is {this[0]}x{this[1]} (H x W) but an earlier region "
                f"is {size[0]}x{size[1]}; pass size=(H, W) to compare them at one size"
            )
        size = this
    return size


def _brush_mask(region: dict, size: tuple[int, int]) -> np.ndarray:
    value = region["value"]
    if value.get("format", "rle") != "rle":
        raise ValueError(f"region {region.get('id', '?')}: brush format {value['format']!r} is not 'rle'")
    rgba = decode_rle(value["rle"])
    height, width = size
    if rgba.size != height * width * 4:
        raise ValueError(
            f"region {region.get('id', '?')}: RLE holds {rgba.size // 4} pixels, not {height}x{width}"
        )
    return rgba.reshape(height, width, 4)[:, :, 3] > 0


def _resize(mask: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if shape is None or mask.shape == tuple(shape):
        return mask
    height, width = shape
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


# ---- one task ----


@dataclass(frozen=True)
class LabelAgreement:
    """One label in one task: pixel counts, and whether each side has the label (a non-empty mask)."""

    intersection: int
    union: int
    predicted: bool
    annotated: bool

    @property
    def iou(self) -> float:
        """Intersection over union; 0 when only one side has the label, 1 when neither has."""
        return self.intersection / self.union if self.union else 1.0


@dataclass(frozen=True)
class TaskAgreement:
    """Agreement of one task's prediction with its annotation, for each label either side has."""

    labels: Mapping[str, LabelAgreement]

    def iou(self, label: str) -> float:
        return self.labels[label].iou

    @property
    def missed(self) -> tuple[str, ...]:
        """Labels annotated but not predicted (or predicted with an empty mask)."""
        return tuple(sorted(k for k, e in self.labels.items() if e.annotated and not e.predicted))

    @property
    def added(self) -> tuple[str, ...]:
        """Labels predicted but not annotated."""
        return tuple(sorted(k for k, e in self.labels.items() if e.predicted and not e.annotated))

    @property
    def score(self) -> float:
        """Mean IoU over the labels; 1.0 when neither side has any label."""
        if not self.labels:
            return 1.0
        return sum(e.iou for e in self.labels.values()) / len(self.labels)


def compare(predicted: Mapping[str, np.ndarray], annotated: Mapping[str, np.ndarray]) -> TaskAgreement:
    """Compare label masks (as from `label_masks`); predictions are resized (nearest) to the annotation's
    shape. Labels with an empty mask on both sides are left out."""
    shapes = {np.shape(m) for m in annotated.values()}
    if len(shapes) > 1:
        raise ValueError(f"annotation masks differ in shape: {sorted(shapes)}")
    shape = shapes.pop() if shapes else None
    entries = {}
    for label in sorted(predicted.keys() | annotated.keys()):
        pred = _resize(predicted[label], shape) if label in predicted else None
        true = np.asarray(annotated[label], bool) if label in annotated else None
        has_pred = pred is not None and bool(pred.any())
        has_true = true is not None and bool(true.any())
        if has_pred and has_true:
            intersection, union = np.count_nonzero(pred & true), np.count_nonzero(pred | true)
        elif has_pred or has_true:
            intersection, union = 0, np.count_nonzero(pred if has_pred else true)
        else:
            continue
        entries[label] = LabelAgreement(int(intersection), int(union), has_pred, has_true)
    return TaskAgreement(entries)


# ---- a project ----


@dataclass
class LabelTotals:
    """Sums over a project's tasks for one label: pixel counts, and tasks where both sides had the label
    (tp), only the annotation had it (fn: missed) or only the prediction had it (fp: added)."""

    intersection: int = 0
    union: int = 0
    tp: int = 0
    fn: int = 0
    fp: int = 0

    @property
    def tasks(self) -> int:
        return self.tp + self.fn + self.fp

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 1.0


LABEL_STATS = tuple(f.name for f in dataclasses.fields(LabelTotals))


@dataclass
class ProjectAgreement:
    """Running totals of `TaskAgreement`s.

    `to_fields` gives a flat {name: number} map for a Redis hash: `tasks`, `score_sum` and
    `label:<name>:<stat>` for each stat in LABEL_STATS. Every field is a sum, so one task's fields can also
    be added to a stored hash with HINCRBYFLOAT.
    """

    labels: dict[str, LabelTotals] = field(default_factory=dict)
    tasks: int = 0
    score_sum: float = 0.0

    def add(self, task: TaskAgreement) -> None:
        self.tasks += 1
        self.score_sum += task.score
        for label, entry in task.labels.items():
            totals = self.labels.setdefault(label, LabelTotals())
            totals.intersection += entry.intersection
            totals.union += entry.union
            totals.tp += entry.predicted and entry.annotated
            totals.fn += entry.annotated and not entry.predicted
            totals.fp += entry.predicted and not entry.annotated

    def label_iou(self, label: str) -> float:
        """Pixel IoU of a label over all tasks: summed intersections over summed unions."""
        return self.labels[label].iou

    @property
    def mean_score(self) -> float | None:
        """Mean of the tasks' scores; None before any task."""
        return self.score_sum / self.tasks if self.tasks else None

    def summary(self) -> list[dict]:
        """One row per label, by label: label, iou, tasks, missed, added."""
        return [
            {"label": label, "iou": t.iou, "tasks": t.tasks, "missed": t.fn, "added": t.fp}
            for label, t in sorted(self.labels.items())
        ]

    def to_fields(self) -> dict[str, float]:
        fields = {"tasks": float(self.tasks), "score_sum": float(self.score_sum)}
        for label, totals in self.labels.items():
            for stat in LABEL_STATS:
                fields[f"label:{label}:{stat}"] = float(getattr(totals, stat))
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str | float]) -> ProjectAgreement:
        """Read `to_fields`' map back, as given or as Redis returns it (bytes names and values)."""
        out = cls()
        for raw_name, raw_value in fields.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            value = float(raw_value.decode() if isinstance(raw_value, bytes) else raw_value)
            if name == "tasks":
                out.tasks = int(value)
            elif name == "score_sum":
                out.score_sum = value
            else:
                label, _, stat = name.removeprefix("label:").rpartition(":")
                if not name.startswith("label:") or not label or stat not in LABEL_STATS:
                    raise ValueError(f"unknown agreement field {name!r}")
                setattr(out.labels.setdefault(label, LabelTotals()), stat, int(value))
        return out


# ---- threshold search ----


@dataclass(frozen=True)
class Bounds:
    """A parameter searched over `steps` evenly spaced values from `low` to `high`."""

    name: str
    low: float
    high: float
    steps: int

    def __post_init__(self):
        if not self.low < self.high or self.steps < 2:
            raise ValueError(f"{self.name}: need low < high and steps >= 2, got {self}")

    def grid(self) -> tuple[float, ...]:
        return tuple(round(float(v), GRID_DIGITS) for v in np.linspace(self.low, self.high, self.steps))

    def clip(self, value: float) -> float:
        return min(max(float(value), self.low), self.high)


@dataclass(frozen=True)
class SearchResult:
    best: dict[str, float]
    score: float
    start_score: float
    evaluations: int  # distinct parameter sets evaluated


def search(
    evaluate: Callable[[dict[str, float]], float],
    bounds: Sequence[Bounds],
    start: Mapping[str, float],
    rounds: int = 3,
) -> SearchResult:
    """Maximise `evaluate` by coordinate ascent from `start` (clipped into `bounds`).

    Each round tries, for one parameter at a time, every grid value with the others fixed, and moves to
    the best only if it scores strictly higher than the current value (so a search that cannot improve
    returns the clipped start). Stops after `rounds` rounds or a round without a move. Each distinct
    parameter set is evaluated once. Parameters in `start` without bounds are passed through unchanged.
    """
    names = [b.name for b in bounds]
    if len(set(names)) != len(names):
        raise ValueError(f"parameters bounded twice: {names}")
    if missing := [n for n in names if n not in start]:
        raise ValueError(f"start has no value for {missing}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")

    scores: dict[tuple, float] = {}

    def score_of(params: dict[str, float]) -> float:
        key = tuple(sorted(params.items()))
        if key not in scores:
            scores[key] = float(evaluate(dict(params)))
        return scores[key]

    current = {**start, **{b.name: b.clip(start[b.name]) for b in bounds}}
    start_score = current_score = score_of(current)
    for _ in range(rounds):
        moved = False
        for b in bounds:
            best_value, best_score = current[b.name], current_score
            for value in b.grid():
                score = score_of({**current, b.name: value})
                if score > best_score:
                    best_value, best_score = value, score
            if best_value != current[b.name]:
                current, current_score, moved = {**current, b.name: best_value}, best_score, True
        if not moved:
            break
    return SearchResult(dict(current), current_score, start_score, len(scores))
