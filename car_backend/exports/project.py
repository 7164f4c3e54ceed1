"""`car-backend export --project ID --format coco|png|yolo|yolo-detect --out DIR [--gallery]`.

Reads every task of a Label Studio project through its API (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY) and
exports, per task, its latest annotation that was not cancelled, else its latest prediction. Each brush,
polygon and rectangle region is one object instance (labelstudio.regions.region_instances; a rectangle is
its filled box in the masks, and its bounds in yolo-detect); together they make the image's label map
(where labels overlap, the later label in the export's list wins; an instance keeps only the pixels where
the label map holds its label, later regions over earlier ones). `choices` regions are the image's tags.
Labels: the project's label config, then any other label the regions name, in the order met. Region sizes
are checked against CAR_MAX_IMAGE_PIXELS before anything is allocated. A task without regions has its
image fetched for its size, and with `--gallery` every image is fetched for its thumbnail; a task without
regions whose image cannot be read, one with neither annotation nor prediction, and one whose regions are
too large or of another shape, is listed in failed.txt with the reason and skipped. yolo links an image
into `images/` only when it is a file under LOCAL_FILES_DOCUMENT_ROOT (writers.allowed_image).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

import numpy as np
from tqdm import tqdm

from car_backend.engine.instances import Instances
from car_backend.exports.gallery import Gallery
from car_backend.exports.records import ExportItem, Failure, Items, write_failures
from car_backend.exports.writers import ExportSpec, Layout, write_export
from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from car_backend.labelstudio.config import LabelConfigError, parse_label_config
from car_backend.labelstudio.media import MediaError, MediaFetcher
from car_backend.labelstudio.regions import (
    INSTANCE_TYPES,
    RegionInstance,
    check_sizes,
    region_instances,
    region_size,
    result_choices,
)
from car_backend.settings import Settings

log = logging.getLogger(__name__)


def main(args: argparse.Namespace, settings: Settings) -> int:
    return export_project(args.project, args.format, Path(args.out), settings, gallery=args.gallery)


def export_project(project_id: int, format: str, out: Path, settings: Settings, gallery: bool = False) -> int:
    """Export the project into `out` (a folder) in `format`; returns the exit status: 0 done (failures are in
    failed.txt), 1 the project cannot be read, 2 bad arguments or settings."""
    if not settings.can_write_predictions:
        print("car-backend export --project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"car-backend export: --out {out} must be a folder", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        client = LabelStudioClient(settings)
        config = parse_label_config(client.project(project_id)["label_config"])
        tasks = list(client.tasks(project_id))
    except (LabelStudioAPIError, KeyError, TypeError) as exc:
        print(f"car-backend export: cannot read project {project_id}: {exc}", file=sys.stderr)
        return 1
    except LabelConfigError as exc:
        print(f"car-backend export: project {project_id}'s label config: {exc}", file=sys.stderr)
        return 1
    labels = list(dict.fromkeys(label.value for target in config.targets for label in target.labels))
    data_keys = list(dict.fromkeys(target.data_key for target in config.targets)) or ["image"]
    fetcher = MediaFetcher(settings)
    album = Gallery(Layout.of(format, out).gallery) if gallery else None
    items = Items()  # compact: one label map decoded at a time when written
    failures: list[Failure] = []
    names: set[str] = set()
    annotated = 0
    for task in tqdm(tasks, unit="task", desc="export", file=sys.stderr):
        task_id = task.get("id")
        ref = next((task.get("data", {}).get(k) for k in data_keys if task.get("data", {}).get(k)), None)
        name = _image_name(ref, task_id, names)
        try:
            item, image = task_item(task, name, ref, labels, fetcher, need_image=album is not None,
                                    max_pixels=settings.max_image_pixels)
        except (MediaError, ValueError) as exc:
            failures.append(Failure(name, str(ref or ""), f"task {task_id}: {exc}"))
            log.warning("task %s: skipped (%s)", task_id, exc)
            continue
        items.add(item)
        annotated += item.origin == "annotation"
        if album is not None and image is not None:
            album.add_thumbnail(item.name, image, item.label_map)
    root = Path(settings.local_files_document_root) if settings.local_files_document_root else None
    try:
        spec = ExportSpec(format, tuple(labels), f"label-studio-project-{project_id}", settings.polygon_tolerance,
                          image_root=root)
    except ValueError as exc:
        print(f"car-backend export: {exc}", file=sys.stderr)
        return 2
    layout = Layout.of(format, out)
    written = write_export(spec, layout, items, failures)
    write_failures(layout.failed, failures)
    print(f"project {project_id}: wrote a {format} export of {len(items)} tasks ({annotated} from annotations, "
          f"{len(items) - annotated} from predictions) to {written} in {time.monotonic() - started:.1f} s")
    if failures:
        print(f"{len(failures)} tasks skipped: listed in {layout.failed}")
    if album is not None:
        print(f"gallery: {album.write(labels, items, failures, f'Label Studio project {project_id}')}")
    return 0


def chosen_result(task: dict) -> tuple[str, dict] | None:
    """("annotation", the latest annotation not cancelled), else ("prediction", the latest prediction), else
    None. Latest: the greatest (updated_at or created_at, id)."""
    def latest(entries):
        entries = [e for e in entries or () if isinstance(e, dict) and isinstance(e.get("result"), list)]
        return max(entries, key=lambda e: (str(e.get("updated_at") or e.get("created_at") or ""),
                                           e.get("id") or 0), default=None)

    annotation = latest(a for a in task.get("annotations") or () if not a.get("was_cancelled"))
    if annotation is not None:
        return "annotation", annotation
    prediction = latest(task.get("predictions"))
    return ("prediction", prediction) if prediction is not None else None


def task_item(task: dict, name: str, ref, labels: list[str], fetcher: MediaFetcher,
              need_image: bool = False, max_pixels: int | None = None) -> tuple[ExportItem, object]:
    """The export item of one task and its image (fetched when `need_image`, None when that fails, or when the
    task has no region to take the size from; else None). `labels` is extended with region labels it does
    not hold yet. Raises ValueError (no annotation or prediction, regions of a bad shape; RegionSizeError,
    one, when a region claims more than `max_pixels`) or MediaError (no region and the image cannot be
    read)."""
    chosen = chosen_result(task)
    if chosen is None:
        raise ValueError("no annotation or prediction")
    origin, entry = chosen
    regions = [r for r in entry["result"] if isinstance(r, dict) and r.get("type") in INSTANCE_TYPES
               and isinstance(r.get("value"), dict) and r["value"].get(r["type"])]
    size = next((s for r in regions if (s := region_size(r)) is not None), None)
    if size is not None and max_pixels is not None:
        check_sizes(regions, size, max_pixels)  # before anything of that size is fetched or allocated
    image = None
    if size is None:
        image = fetcher.fetch(ref, task.get("id"))
        size = (image.size[1], image.size[0])
    elif need_image:
        try:
            image = fetcher.fetch(ref, task.get("id"))
        except MediaError as exc:  # the regions are exported all the same, without a thumbnail
            log.warning("task %s: no thumbnail (%s)", task.get("id"), exc)
    try:
        label_map, instances, scores = _paint(region_instances(regions, size, max_pixels), size, labels, origin)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a region of another shape ({exc})") from None
    present = set(np.unique(label_map).tolist())
    kept = {label: s for label, s in scores.items() if labels.index(label) + 1 in present}
    if origin == "annotation":
        uncertainty = 0.0
    else:
        uncertainty = 1.0 - float(np.mean(list(kept.values()))) if kept else 1.0
    item = ExportItem(name=name, source=str(ref or ""), label_map=label_map, scores=kept,
                      score=_number(entry.get("score"), None), uncertainty=uncertainty,
                      task=task.get("id"), origin=origin, instances=instances,
                      tags=tuple(result_choices(entry["result"])))
    return item, image


def _paint(found: Iterable[RegionInstance], size: tuple[int, int], labels: list[str], origin: str
           ) -> tuple[np.ndarray, Instances, dict[str, float]]:
    """The label map, instances and label scores of a result's regions, one region mask held at a time.

    Where labels overlap, the later label in `labels` wins (`labels` is extended with new ones as met); an
    instance is a region with its first label, on the pixels where the label map holds that label, later
    regions over earlier ones; regions left without pixels drop out. Scores: 1.0 for an annotation, else the
    region's score (0.0 without one); a label's score is the best of its regions'."""
    label_map = np.zeros(size, np.int32)
    instance_map = np.zeros(size, np.int32)
    values: list[int] = []
    instance_scores: list[float] = []
    scores: dict[str, float] = {}
    for region in found:
        score = 1.0 if origin == "annotation" else (region.score or 0.0)
        for label in region.labels:
            if label not in labels:
                labels.append(label)
            scores[label] = max(scores.get(label, 0.0), score)
            value = labels.index(label) + 1
            np.maximum(label_map, np.where(region.mask, value, 0), out=label_map)
        value = labels.index(region.labels[0]) + 1
        instance_map[region.mask & (label_map == value)] = len(values) + 1
        values.append(value)
        instance_scores.append(score)
    # a pixel a later region gave a higher label, through a label other than its first, leaves the instance
    instance_map[np.asarray([0, *values], np.int32)[instance_map] != label_map] = 0
    present = np.zeros(len(values) + 1, bool)
    present[np.unique(instance_map)] = True
    present[0] = False
    renumber = np.cumsum(present) * present  # 0 stays 0; the instances left numbered 1..M in order
    kept = [j for j in range(len(values)) if present[j + 1]]
    instances = Instances(renumber[instance_map].astype(np.int32), tuple(values[j] for j in kept),
                          tuple(instance_scores[j] for j in kept))
    return label_map, instances, scores


def _image_name(ref, task_id, taken: set[str]) -> str:
    """A name for the task's image, unique among `taken` (which it joins): the file name of the reference
    (of its `d` parameter for Label Studio's local-files URLs), else `task-<id>`; `<id>-` in front on a clash."""
    name = ""
    if isinstance(ref, str) and ref:
        parts = urlsplit(ref)
        path = (parse_qs(parts.query).get("d") or [parts.path])[0]
        name = PurePosixPath(path).name
    name = name or f"task-{task_id}"
    if name in taken:
        name = f"{task_id}-{name}"
    taken.add(name)
    return name


def _number(value, default):
    return float(value) if isinstance(value, int | float) and np.isfinite(value) else default
