"""Writers of an export: `ls` (a Label Studio import file), `coco` (instances JSON with compressed RLE),
`png` (VOC-style palette label and instance maps), `yolo` (segmentation polygons) and `yolo-detect` (boxes).

Every writer takes the `ExportSpec`, the finished items (`Items`, decoded one at a time in name order) and
the `Failure`s, and writes the whole export again from them (atomically, file by file), so a resumed run
ends with the same files as an uninterrupted one. Where each format puts its files is `Layout`. Objects
are the items' instances (`ExportItem.instances_for`: given ones, else each connected part of a label).

- ls: `OUT` is the JSON import file; one task per image (`data.image` = `url_prefix` + name, else the
  absolute path), with a prediction unless the image failed.
- coco: `OUT/annotations.json`; categories 1..N from the labels in order; one annotation per instance with
  `segmentation` a compressed RLE of its pixels, `area`, `bbox` (its pixel bounds), `iscrowd` 0 and `score`
  (the instance's score); an image's tags (Label Studio `Choices`) are its `tags` list.
- png: `OUT/SegmentationClass/<stem>.png` (palette PNG, pixel = label index, 0 = background, VOC colours),
  `OUT/SegmentationObject/<stem>.png` (palette PNG, pixel = instance number 1..N, 0 = none; 16-bit
  greyscale when an image has more than 254 instances), `OUT/labels.json` (index, name, colour; per file
  its class and object maps, each object's label index and score, the image's tags), `OUT/palette.txt`,
  `OUT/ImageSets/Segmentation/default.txt`.
- yolo: `OUT/labels/<stem>.txt`, one line `class x1 y1 x2 y2 ...` per instance (class = label index from
  0, coordinates / width and height); `yolo-detect`: one line `class cx cy w h` per instance (its pixel
  bounds, normalised). Both: `OUT/images/` (links to image files under the allowed folder `image_root`,
  see `allowed_image`), `OUT/data.yaml`, and `OUT/tags.json` when an image has tags.
  A polygon runs through the centres of the instance's border pixels (OpenCV's contours), written a quarter
  pixel right and down of the centre, so readers that rasterise with cv2.fillPoly after truncating
  (ultralytics, supervision) or rounding the scaled coordinates land on the same pixels. Holes and further
  parts are joined to the outline by zero-width cuts (the shortest segment to what is joined so far, walked
  there and back, as ultralytics' `merge_multi_segment` joins segments), holes wound against their outline,
  so even-odd and nonzero fills leave the holes open.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import cv2
import numpy as np
from PIL import Image

from car_backend.engine.result import Segmentation
from car_backend.exports import rle
from car_backend.exports.records import ExportItem, Failure, Items, write_atomic
from car_backend.labelstudio.config import LabelSpec, Target
from car_backend.labelstudio.results import prediction_entry, segmentation_to_regions

FORMATS = ("ls", "coco", "png", "yolo", "yolo-detect")
MAX_PNG_LABELS = 254  # 0 is the background and 255 VOC's "void"
JOURNAL_DIR = ".car-export"
YOLO_OFFSET = 0.25  # pixels right and down of a border pixel's centre (see the module docstring)
LOCAL_FILES_PATH = "/data/local-files/"  # Label Studio's local-files URLs: ?d=<path under its document root>
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # what images/ may link

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSpec:
    """What to write. `labels`: the label names, label map value i + 1 = labels[i]; `model_version`: what
    made the masks; `polygon_tolerance`: pixels of simplification for polygons (ls polygon, yolo);
    ls only: `target` (the control the regions are for), `region_kind` ("brush" | "polygon"), `url_prefix`;
    yolo only: `image_root`, the folder whose image files `images/` may link to (an item's absolute path, or
    a Label Studio local-files reference `/data/local-files/?d=<path>` read under it; `allowed_image` says
    what is under it; None links nothing).
    """

    format: str
    labels: tuple[str, ...]
    model_version: str
    polygon_tolerance: float = 1.0
    target: Target | None = None
    region_kind: str = "brush"
    url_prefix: str = ""
    image_root: Path | None = None

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
        if item.tags:
            image["tags"] = list(item.tags)
        images.append(image)
        instances = item.instances_for(spec.labels)
        for j, value in enumerate(instances.labels):
            mask = instances.mask(j)
            if not mask.any():
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(value),
                "segmentation": rle.encode(mask), "area": int(mask.sum()), "bbox": mask_bbox(mask),
                "iscrowd": 0, "score": round(float(instances.scores[j]), 6),
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
    """A palette PNG of an (H, W) label map with values 0..254; a 16-bit greyscale PNG when a value is over
    254 (instance maps of images with more objects than a palette holds besides VOC's void, 255)."""
    if int(np.max(label_map, initial=0)) > MAX_PNG_LABELS:
        image = Image.fromarray(np.asarray(label_map, np.uint16))
    else:
        image = Image.fromarray(np.asarray(label_map, np.uint8), mode="P")
        image.putpalette(voc_palette().ravel().tolist())
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_png(spec: ExportSpec, out: Path, items: Items, failures: Sequence[Failure]) -> Path:
    stems = file_stems(items.names)
    objects, tags = {}, {}
    for item in items:
        instances = item.instances_for(spec.labels)
        _write_if_changed(out / "SegmentationClass" / f"{stems[item.name]}.png", label_map_png(item.label_map))
        _write_if_changed(out / "SegmentationObject" / f"{stems[item.name]}.png",
                          label_map_png(instances.instance_map))
        objects[item.name] = [{"id": j + 1, "label": int(v), "score": round(float(s), 6)}
                              for j, (v, s) in enumerate(zip(instances.labels, instances.scores, strict=True))]
        if item.tags:
            tags[item.name] = list(item.tags)
    palette = voc_palette(len(spec.labels) + 1)
    entries = [{"index": k, "name": name, "color": palette[k].tolist()}
               for k, name in enumerate(["background", *spec.labels])]
    files = {name: f"SegmentationClass/{stems[name]}.png" for name in items.names}
    object_files = {name: f"SegmentationObject/{stems[name]}.png" for name in items.names}
    write_atomic(out / "labels.json", json.dumps({"labels": entries, "ignore_index": 255, "files": files,
                                                  "object_files": object_files, "objects": objects,
                                                  "tags": tags, "model_version": spec.model_version}, indent=1))
    write_atomic(out / "palette.txt", "".join(f"{r} {g} {b}\n" for r, g, b in palette.tolist()))
    write_atomic(out / "ImageSets" / "Segmentation" / "default.txt", "".join(f"{stems[name]}\n" for name in items.names))
    return out / "labels.json"


def _write_if_changed(target: Path, data: bytes) -> None:
    if not target.exists() or target.read_bytes() != data:
        write_atomic(target, data)


# ---- yolo ----

def yolo_lines(spec: ExportSpec, item: ExportItem) -> list[str]:
    """One line per instance: `class x1 y1 ...` (polygon with its holes joined in) for yolo, `class cx cy w h`
    for yolo-detect; coordinates in 0..1."""
    instances = item.instances_for(spec.labels)
    lines = []
    for j, value in enumerate(instances.labels):
        mask = instances.mask(j)
        if not mask.any():
            continue
        if spec.format == "yolo-detect":
            x0, y0, x1, y1 = instances.box(j)
            box = [(x0 + x1) / 2 / item.width, (y0 + y1) / 2 / item.height, (x1 - x0) / item.width,
                   (y1 - y0) / item.height]
            lines.append(" ".join([str(value - 1), *(f"{v:.6f}" for v in box)]))
            continue
        points = (instance_polygon(mask, spec.polygon_tolerance) + YOLO_OFFSET) / [item.width, item.height]
        lines.append(" ".join([str(value - 1), *(f"{v:.6f}" for v in np.clip(points, 0.0, 1.0).ravel())]))
    return lines


def instance_polygon(mask: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """One closed polygon, (N, 2) float (x, y) at pixel centres (integer = a pixel's centre, as cv2.fillPoly
    reads it), covering an (H, W) bool mask: its rings (`instance_rings`) joined into the first outline by
    zero-width cuts; (0, 2) for an empty mask. Rings of one or two points (a pixel, a thin line) are repeated
    to three points."""
    rings = instance_rings(mask, tolerance)
    if not rings:
        return np.zeros((0, 2))
    merged = rings[0]
    for ring in rings[1:]:
        merged = _join(merged, ring)
    while len(merged) < 3:
        merged = np.concatenate([merged, merged[:1]])
    return merged


def instance_rings(mask: np.ndarray, tolerance: float = 0.0) -> list[np.ndarray]:
    """The outlines and holes of an (H, W) bool mask as (N, 2) float (x, y) rings through the centres of its
    border pixels (OpenCV contours, simplified with `tolerance` pixels): outlines first, outlines with a
    positive signed area and holes negative, so even-odd and nonzero fills agree."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outlines, holes = [], []
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0] if contours else (), strict=True):
        ring = contour.reshape(-1, 2)
        if tolerance > 0 and len(ring) > 3:
            simple = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2)
            ring = simple if len(simple) >= 3 else ring
        ring = ring.astype(np.float64)
        if (_signed_area(ring) < 0) != (parent >= 0):
            ring = ring[::-1]
        (holes if parent >= 0 else outlines).append(ring)
    return outlines + holes


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _join(merged: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """`merged` with `ring` spliced in: from the closest pair of points (a of merged, b of ring), go to b,
    once round the ring back to b, and return to a (the cut is walked both ways: zero width)."""
    best, a, b = np.inf, 0, 0
    for start in range(0, len(merged), 1024):  # bounded memory for long outlines
        d = ((merged[start:start + 1024, None, :] - ring[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        if d[i, j] < best:
            best, a, b = d[i, j], start + int(i), int(j)
    loop = np.concatenate([ring[b:], ring[:b + 1]])
    return np.concatenate([merged[:a + 1], loop, merged[a:]])


def write_yolo(spec: ExportSpec, out: Path, items: Items, failures: Sequence[Failure]) -> Path:
    stems = file_stems(items.names)
    tags = {}
    linked = 0
    for item in items:
        write_atomic(out / "labels" / f"{stems[item.name]}.txt", "".join(f"{line}\n" for line in yolo_lines(spec, item)))
        if item.tags:
            tags[item.name] = list(item.tags)
        source = allowed_image(item.source, spec.image_root)
        link = out / "images" / f"{stems[item.name]}{(source or Path(item.source)).suffix.lower()}"
        if link.is_symlink() or (source is not None and link.exists()):
            link.unlink()  # a link an earlier run made must not outlive a source no longer allowed
        if source is not None:
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, link)
            linked += 1
    if linked < len(items):
        log.info("%d of %d images are not linked into %s: only files under %s are", len(items) - linked,
                 len(items), out / "images", spec.image_root or "an allowed folder (none given)")
    names = "\n".join(f"  {k}: {json.dumps(label)}" for k, label in enumerate(spec.labels))
    yaml = (f"# car-backend export, model_version {spec.model_version}\n"
            f"path: {json.dumps(str(out.resolve()))}\ntrain: images\nval: images\n"
            f"nc: {len(spec.labels)}\nnames:\n{names}\n")
    write_atomic(out / "data.yaml", yaml)
    if tags:
        write_atomic(out / "tags.json", json.dumps(tags, indent=1))
    else:
        (out / "tags.json").unlink(missing_ok=True)
    return out / "data.yaml"


def allowed_image(source: str, root: Path | None) -> Path | None:
    """The path of the image file `source` names when it lies under `root`, else None.

    `source`: an absolute path, a file:// URL, or a Label Studio local-files reference (`/data/local-files/
    ?d=<path>`, also as a full URL) whose path is read under `root`. Under `root` means: the path with `..`
    worked out lies in `root` (a symlink the operator placed in the folder is followed, as Label Studio
    follows it), or the file's real path lies in `root`'s real path; and its name ends in an image suffix
    (`IMAGE_SUFFIXES`, any case). So /etc/passwd, `?d=../../secret`, an absolute path elsewhere or a
    credentials file inside the folder is never returned."""
    if root is None or not source:
        return None
    parts = urlsplit(source)
    if parts.path in (LOCAL_FILES_PATH, LOCAL_FILES_PATH.lstrip("/")):
        wanted = (parse_qs(parts.query).get("d") or [""])[0].lstrip("/")
        candidate = os.path.join(os.path.abspath(root), wanted) if wanted else None
    elif parts.scheme == "file":
        candidate = unquote(parts.path)
    elif not parts.scheme and os.path.isabs(source):
        candidate = source
    else:
        candidate = None
    if candidate is None or not os.path.isabs(candidate) or Path(candidate).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    path, base = Path(os.path.normpath(candidate)), Path(os.path.normpath(os.path.abspath(root)))
    try:
        inside = path.is_relative_to(base) or path.resolve(strict=True).is_relative_to(base.resolve(strict=True))
        return path if inside and path.is_file() else None
    except (OSError, RuntimeError):
        return None


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
    "ls": write_ls, "coco": write_coco, "png": write_png, "yolo": write_yolo, "yolo-detect": write_yolo,
}
