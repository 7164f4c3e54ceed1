"""How well predictions agree with annotations, per task and over a project, and a threshold search.

Both sides are Label Studio results, turned into one bool mask per label by
`car_backend.labelstudio.regions.label_masks`. `compare` scores one task (IoU per label; a label on one side
only scores 0), `ProjectAgreement` sums tasks into totals that can live in a Redis hash, and `search` tunes
parameters (thresholds) by bounded coordinate ascent on any score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from car_backend.labelstudio.regions import resize_mask

GRID_DIGITS = 10  # grid values are rounded so 0.1 * 3 and 0.3 are the same parameter value

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
        pred = resize_mask(predicted[label], shape) if label in predicted else None
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
