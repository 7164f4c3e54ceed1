"""Writers of an export: `ls` (a Label Studio import file), `coco` (instances JSON with compressed RLE),
`png` (VOC-style palette label maps) and `yolo` (segmentation polygons).

Every writer takes the `ExportSpec`, the finished items (`Items`, decoded one at a time in name order) and
the `Failure`s, and writes the whole export again from them (atomically, file by file), so a resumed run
ends with the same files as an uninterrupted one. Where each format puts its files is `Layout`.

- ls: `OUT` is the JSON import file; one task per image (`data.image` = `url_prefix` + name, else the
  absolute path), with a prediction unless the image failed.
- coco: `OUT/annotations.json`; categories 1..N from the labels in order; one annotation per label present
  in an image (its pixels, which may be several parts) with `segmentation` a compressed RLE, `area`,
  `bbox`, `iscrowd` 0 and `score` (the label's classifier score).
- png: `OUT/SegmentationClass/<stem>.png` (palette PNG, pixel = label index, 0 = background, VOC colours),
  `OUT/labels.json` (index, name, colour), `OUT/palette.txt`, `OUT/ImageSets/Segmentation/default.txt`.
- yolo: `OUT/labels/<stem>.txt` (a line `class x1 y1 x2 y2 ...` per outer outline, coordinates / width and
  height, class = label index from 0), `OUT/images/` (links to the local images), `OUT/data.yaml`.
  Polygons are traced as for Label Studio (labelstudio.results.trace_polygons): no holes (a hole's pixels
  count for the outline), and parts under MIN_AREA_PX pixels go to their neighbours first.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from car_backend.engine.result import Segmentation
from car_backend.exports import rle
from car_backend.exports.records import ExportItem, Failure, Items, write_atomic
from car_backend.labelstudio.config import LabelSpec, Target
from car_backend.labelstudio.results import prediction_entry, segmentation_to_regions, trace_polygons

FORMATS = ("ls", "coco", "png", "yolo")
MAX_PNG_LABELS = 254  # 0 is the background and 255 VOC's "void"
JOURNAL_DIR = ".car-export"


@dataclass(frozen=True)
class ExportSpec:
    """What to write. `labels`: the label names, label map value i + 1 = labels[i]; `model_version`: what
    made the masks; `polygon_tolerance`: pixels of simplification for polygons (ls polygon, yolo);
    ls only: `target` (the control the regions are for), `region_kind` ("brush" | "polygon"), `url_prefix`.
    """

    format: str
    labels: tuple[str, ...]
    model_version: str
    polygon_tolerance: float = 1.0
    target: Target | None = None
    region_kind: str = "brush"
    url_prefix: str = ""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "png" and len(self.labels) > MAX_PNG_LABELS:
            raise ValueError(f"png label maps hold at most {MAX_PNG_LABELS} labels, got {len(self.labels)}")
        if self.format == "ls" and self.target is None:
            raise ValueError("an ls export needs the target control its regions are for")


@dataclass(frozen=True)
class Layout:
    """Where an export's files go. `out`: the file (ls) or folder written; `side`: the folder of failed.txt,
    the gallery and the journal (the export's folder; for ls, `<stem>-export/` beside the file)."""

    out: Path
    side: Path

    @classmethod
    def of(cls, format: str, out: Path) -> Layout:
        return cls(out, out.with_name(f"{out.stem}-export") if format == "ls" else out)

    @property
    def journal(self) -> Path:
        return self.side / JOURNAL_DIR / "journal.jsonl"

    @property
    def failed(self) -> Path:
        return self.side / "failed.txt"

    @property
    def gallery(self) -> Path:
        return self.side / "gallery"


def write_export(spec: ExportSpec, layout: Layout, items: Items | Iterable[ExportItem],
                 failures: Sequence[Failure]) -> Path:
    """Write the export in `spec.format`; returns the main file written. Items are written in name order."""
    return WRITERS[spec.format](spec, layout.out, items if isinstance(items, Items) else Items.of(items), failures)


# ---- ls ----

def write_ls(spec: ExportSpec, out: Path, items: Items, failures: Sequence[Failure]) -> Path:
    tasks = {i.name: {"data": {"image": _reference(spec, i.name, i.source)},
                      "predictions": [prediction_entry(item_regions(spec, i), spec.model_version, i.score)]}
             for i in items}  # the import file is one JSON document: its tasks are held until it is written
    tasks.update({f.name: {"data": {"image": _reference(spec, f.name, f.source)}} for f in failures})
    write_atomic(out, json.dumps([tasks[name] for name in sorted(tasks)]))
    return out


def item_regions(spec: ExportSpec, item: ExportItem) -> list[dict]:
    """The item's Label Studio regions for `spec.target`, as `prelabel` writes them."""
    n = len(spec.labels)
    scores = np.array([item.scores.get(label, 0.0) for label in spec.labels], np.float32)
    masks = np.stack([item.label_map == k + 1 for k in range(n)]) if n else np.zeros((0, *item.label_map.shape), bool)
    seg = Segmentation(queries=list(spec.labels), label_map=item.label_map, masks=masks, scores=scores, steps=0)
    labels = [LabelSpec(label, label) for label in spec.labels]
    return segmentation_to_regions(seg, spec.target, labels, kind=spec.region_kind,
                                   polygon_tolerance=spec.polygon_tolerance)


def _reference(spec: ExportSpec, name: str, source: str) -> str:
    return spec.url_prefix + name if spec.url_prefix else source


# ---- coco ----

def write_coco(spec: ExportSpec, out: Path, items: Items, failures: Sequence[Failure]) -> Path:
    images, annotations = [], []
    for image_id, item in enumerate(items, start=1):
        image = {"id": image_id, "file_name": item.name, "width": item.width, "height": item.height,
                 "car_uncertainty": item.uncertainty}
        if item.task is not None:
            image["ls_task"] = item.task
        images.append(image)
        for k in item.present(spec.labels):
            mask = item.label_map == k + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": k + 1,
                "segmentation": rle.encode(mask), "area": int(mask.sum()), "bbox": mask_bbox(mask),
                "iscrowd": 0, "score": round(float(item.scores.get(spec.labels[k], 0.0)), 6),
            })
    document = {
        "info": {"description": "car-backend export", "version": spec.model_version},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": label, "supercategory": ""} for k, label in enumerate(spec.labels)],
    }
    path = out / "annotations.json"
    write_atomic(path, json.dumps(document))
    return path


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the mask's pixels (COCO's bbox); zeros for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


# ---- png ----

def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the PASCAL VOC colour of each index (bits of the index spread over R, G, B)."""
    colours = np.zeros((n, 3), np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def label_map_png(label_map: np.ndarray) -> bytes:
    """A palette PNG of an (H, W) label map with values 0..255."""
    image = Image.fromarray(np.asarray(label_map, np.uint8), mode="P")
    image.putpalette(voc_palette().ravel().tolist())
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_png(spec: ExportSpec, out: Path, items: Items, failures: Sequence[Failure]) -> Path:
    stems = file_stems(items.names)
    folder = out / "SegmentationClass"
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        target = folder / f"{stems[item.name]}.png"
        data = label_map_png(item.label_map)
        if not target.exists() or target.read_bytes() != data:
            write_atomic(target, data)
    palette = voc_palette(len(spec.labels) + 1)
    entries = [{"index": k, "name": name, "color": palette[k].tolist()}
               for k, name in enumerate(["background", *spec.labels])]
    files = {name: f"SegmentationClass/{stems[name]}.png" for name in items.names}
    write_atomic(out / "labels.json", json.dumps({"labels": entries, "ignore_index": 255, "files": files,
                                                  "model_version": spec.model_version}, indent=1))
    write_atomic(out / "palette.txt", "".join(f"{r} {g} {b}\n" for r, g, b in palette.tolist()))
    write_atomic(out / "ImageSets" / "Segmentation" / "default.txt", "".join(f"{stems[name]}\n" for name in items.names))
    return out / "labels.json"


# ---- yolo ----

def yolo_lines(spec: ExportSpec, item: ExportItem) -> list[str]:
    """One `class x1 y1 ...` line per outer outline of each label present (coordinates in 0..1)."""
    classes = [k + 1 for k in item.present(spec.labels)]
    lines = []
    for value, rings in trace_polygons(item.label_map, classes, spec.polygon_tolerance).items():
        for ring in rings:
            points = np.clip(ring / [item.width, item.height], 0.0, 1.0)
            lines.append(" ".join([str(value - 1), *(f"{v:.6f}" for v in points.ravel())]))
    return lines


def write_yolo(spec: ExportSpec, out: Path, items: Items, failures: Sequence[Failure]) -> Path:
    stems = file_stems(items.names)
    for item in items:
        write_atomic(out / "labels" / f"{stems[item.name]}.txt", "".join(f"{line}\n" for line in yolo_lines(spec, item)))
        source = Path(item.source)
        if source.is_absolute() and source.is_file():
            link = out / "images" / f"{stems[item.name]}{source.suffix.lower()}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(source, link)
    names = "\n".join(f"  {k}: {json.dumps(label)}" for k, label in enumerate(spec.labels))
    yaml = (f"# car-backend export, model_version {spec.model_version}\n"
            f"path: {json.dumps(str(out.resolve()))}\ntrain: images\nval: images\n"
            f"nc: {len(spec.labels)}\nnames:\n{names}\n")
    write_atomic(out / "data.yaml", yaml)
    return out / "data.yaml"


# ---- names ----

def file_stems(names: Sequence[str]) -> dict[str, str]:
    """A file-name stem for each name, unique among them: the name without its suffix, characters other
    than letters, digits, '.', '_' and '-' replaced by '_', and '-2', '-3', ... on a collision."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", str(Path(name).with_suffix(""))).strip(".") or "image"
        stem, n = base, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        stems[name] = stem
    return stems


WRITERS: dict[str, Callable[[ExportSpec, Path, Items, Sequence[Failure]], Path]] = {
    "ls": write_ls, "coco": write_coco, "png": write_png, "yolo": write_yolo,
}
