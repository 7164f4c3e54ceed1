"""What one exported image is, and the journal that makes an export run resumable.

An `ExportItem` is an image's label map (0 background, i + 1 = the export's `labels[i]`) with the scores of
its kept labels, its object instances (`engine.instances.Instances`; split from the label map, one per
connected part, when the item brings none) and its image-level tags; every writer works from these. A
`Journal` is a JSON-lines file: a first line with the run's identity (labels, model version, ...) and the
journal's own format (`JOURNAL_FORMAT`), then one line per finished image with its label map as COCO RLE per
label and its instances as COCO RLE each. A run appends a line as each image finishes; the next run with the
same identity and format reads them back and skips those images (a line cut by an interruption is ignored
and its image done again; a journal of another format, e.g. one written before instances, starts over).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from car_backend.engine.instances import Instances, split_instances
from car_backend.exports import rle

log = logging.getLogger(__name__)

JOURNAL_FORMAT = 2  # 2: items carry instances and tags


@dataclass
class ExportItem:
    """One image of an export.

    `name`: the image's path under the input folder (or a name made from a task's image reference), unique
    in the export; `source`: where its pixels are read (an absolute path or a URL), for thumbnails and the
    `ls` tasks; `label_map`: (H, W) int32 at the image's size; `scores`: kept label -> classifier score (1.0
    for an annotator's label); `score`: the prediction-level score (`CAR_SCORE`); `uncertainty`: 0 (sure)
    to 1, the gallery's order; `task`: the Label Studio task id when it came from a project; `origin`:
    "prediction" or "annotation"; `instances`: the objects (instance map at the label map's size, each
    instance's label map value and score), None to split them from the label map (`instances_for`); `tags`:
    image-level labels (Label Studio `Choices`), written beside the masks.
    """

    name: str
    source: str
    label_map: np.ndarray
    scores: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    uncertainty: float = 1.0
    task: int | None = None
    origin: str = "prediction"
    instances: Instances | None = None
    tags: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return int(self.label_map.shape[1])

    @property
    def height(self) -> int:
        return int(self.label_map.shape[0])

    def present(self, labels: Sequence[str]) -> list[int]:
        """0-based indices of the labels with pixels in the label map."""
        values = set(np.unique(self.label_map).tolist())
        return [i for i in range(len(labels)) if i + 1 in values]

    def instances_for(self, labels: Sequence[str]) -> Instances:
        """The item's instances; without given ones, each connected part of each label present (parts under
        `engine.instances.MIN_AREA_PX` pixels go to their neighbours), scored with its label's score.
        `labels`: the export's labels (label map value i + 1 = labels[i])."""
        if self.instances is not None:
            return self.instances
        scores = [float(self.scores.get(label, 0.0)) for label in labels]
        return split_instances(self.label_map, scores, [k + 1 for k in self.present(labels)])

    def to_plain(self) -> dict:
        masks = {str(k): rle.encode(self.label_map == k)["counts"]
                 for k in np.unique(self.label_map).tolist() if k > 0}
        plain = {"name": self.name, "source": self.source, "size": [self.height, self.width], "masks": masks,
                 "scores": self.scores, "score": self.score, "uncertainty": self.uncertainty, "task": self.task,
                 "origin": self.origin, "tags": list(self.tags)}
        if self.instances is not None:
            plain["instances"] = [[int(v), float(s), rle.encode(self.instances.mask(j))["counts"]]
                                  for j, (v, s) in enumerate(zip(self.instances.labels, self.instances.scores,
                                                                 strict=True))]
        return plain

    @classmethod
    def from_plain(cls, data: dict) -> ExportItem:
        """Raises KeyError/TypeError/ValueError on data of another shape."""
        height, width = (int(v) for v in data["size"])
        label_map = np.zeros((height, width), np.int32)
        for value, counts in data["masks"].items():
            label_map[rle.decode({"size": [height, width], "counts": counts})] = int(value)
        instances = None
        if data.get("instances") is not None:
            instance_map = np.zeros((height, width), np.int32)
            for j, (_, _, counts) in enumerate(data["instances"]):
                instance_map[rle.decode({"size": [height, width], "counts": counts})] = j + 1
            instances = Instances(instance_map, tuple(int(v) for v, _, _ in data["instances"]),
                                  tuple(float(s) for _, s, _ in data["instances"]))
        return cls(name=str(data["name"]), source=str(data["source"]), label_map=label_map,
                   scores={str(k): float(v) for k, v in data["scores"].items()},
                   score=None if data["score"] is None else float(data["score"]),
                   uncertainty=float(data["uncertainty"]), task=data.get("task"),
                   origin=str(data.get("origin", "prediction")), instances=instances,
                   tags=tuple(str(t) for t in data.get("tags") or ()))


@dataclass(frozen=True)
class Failure:
    """An image that gave no item: its name, where it was read from, and why (listed in failed.txt)."""

    name: str
    source: str
    reason: str


def write_failures(path: Path, failures: Iterable[Failure]) -> int:
    """failed.txt: one `name<TAB>reason` line per failure (reasons on one line); removed when there is none.
    Returns how many were written."""
    lines = [f"{f.name}\t{' '.join(f.reason.split())}\n" for f in failures]
    if lines:
        write_atomic(path, "".join(lines))
    else:
        path.unlink(missing_ok=True)
    return len(lines)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


class Items:
    """Export items kept compact (label maps as COCO RLE strings, which grow with the masks' outlines, not
    their areas) and decoded one at a time: iterating yields `ExportItem`s in name order, so a writer holds
    one label map at a time however many images there are."""

    def __init__(self, plain: dict[str, dict] | None = None):
        self._plain: dict[str, dict] = dict(plain or {})

    @classmethod
    def of(cls, items: Iterable[ExportItem]) -> Items:
        found = cls()
        for item in items:
            found.add(item)
        return found

    def add(self, item: ExportItem) -> None:
        self._plain[item.name] = item.to_plain()

    def plain(self, name: str) -> dict:
        return self._plain[name]

    def get(self, name: str) -> ExportItem:
        return ExportItem.from_plain(self._plain[name])

    def only(self, names: Iterable[str]) -> Items:
        """The items among `names` (names without an item are left out)."""
        return Items({n: self._plain[n] for n in names if n in self._plain})

    @property
    def names(self) -> list[str]:
        return sorted(self._plain)

    def __contains__(self, name: str) -> bool:
        return name in self._plain

    def __len__(self) -> int:
        return len(self._plain)

    def __iter__(self) -> Iterator[ExportItem]:
        for name in self.names:
            yield self.get(name)


class Journal:
    """The finished images of a run, on disk (see the module docstring); `items` holds them.

    `open` reads what a previous run with the same identity left (anything else is discarded, with a log
    line) and keeps the file open for `add`.
    """

    def __init__(self, path: Path, identity: dict):
        self.path = path
        self.identity = identity
        self.items = Items()
        self._file = None

    def open(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        header = _json_line(lines[0]) if lines else None
        if lines and (not isinstance(header, dict) or header.get("identity") != self.identity
                      or header.get("format") != JOURNAL_FORMAT):
            log.warning("%s was written for other labels or settings, or by an older car-backend: starting the "
                        "export over", self.path)
            lines = []
        for number, line in enumerate(lines[1:], start=2):
            data = _json_line(line)
            try:
                self.items.add(ExportItem.from_plain(data))  # decoded once: a damaged line is caught here
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("%s line %d is not a finished image (cut by an interruption?): redone", self.path,
                            number)
        # rewrite what was readable, so a cut line never sits in the middle of the file
        body = [json.dumps(self.items.plain(name)) for name in self.items.names]
        header = {"identity": self.identity, "format": JOURNAL_FORMAT}
        write_atomic(self.path, "\n".join([json.dumps(header), *body]) + "\n")
        self._file = self.path.open("a")
        return self

    def add(self, item: ExportItem) -> None:
        self.items.add(item)
        self._file.write(json.dumps(self.items.plain(item.name)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _json_line(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None
