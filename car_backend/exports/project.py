"""`car-backend export --project ID --format coco|png|yolo --out DIR [--gallery]`.

Reads every task of a Label Studio project through its API (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY) and
exports, per task, its latest annotation that was not cancelled, else its latest prediction. Brush and
polygon regions become one label map per image (labelstudio.regions.label_masks; where labels overlap, the
later label in the export's list wins). Labels: the project's label config, then any other label the
regions name, in the order met. A task without regions has its image fetched for its size, and with
`--gallery` every image is fetched for its thumbnail; a task without regions whose image cannot be read, or
one with neither annotation nor prediction, is listed in failed.txt and skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

import numpy as np
from tqdm import tqdm

from car_backend.exports.gallery import Gallery
from car_backend.exports.records import ExportItem, Failure, Items, write_failures
from car_backend.exports.writers import ExportSpec, Layout, write_export
from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from car_backend.labelstudio.config import LabelConfigError, parse_label_config
from car_backend.labelstudio.media import MediaError, MediaFetcher
from car_backend.labelstudio.regions import REGION_TYPES, label_masks
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
            item, image = task_item(task, name, ref, labels, fetcher, need_image=album is not None)
        except (MediaError, ValueError) as exc:
            failures.append(Failure(name, str(ref or ""), f"task {task_id}: {exc}"))
            log.warning("task %s: skipped (%s)", task_id, exc)
            continue
        items.add(item)
        annotated += item.origin == "annotation"
        if album is not None and image is not None:
            album.add_thumbnail(item.name, image, item.label_map)
    try:
        spec = ExportSpec(format, tuple(labels), f"label-studio-project-{project_id}")
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
              need_image: bool = False) -> tuple[ExportItem, object]:
    """The export item of one task and its image (fetched when `need_image`, None when that fails, or when the
    task has no region to take the size from; else None). `labels` is extended with region labels it does
    not hold yet. Raises ValueError (no annotation or prediction, regions of a bad shape) or MediaError (no
    region and the image cannot be read)."""
    chosen = chosen_result(task)
    if chosen is None:
        raise ValueError("no annotation or prediction")
    origin, entry = chosen
    regions = [r for r in entry["result"] if isinstance(r, dict) and r.get("type") in REGION_TYPES
               and r.get("value", {}).get(r["type"])]
    size = next(((int(r["original_height"]), int(r["original_width"])) for r in regions
                 if r.get("original_height") and r.get("original_width")), None)
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
        masks = label_masks(regions, size) if regions else {}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a region of another shape ({exc})") from None
    scores: dict[str, float] = {}
    for region in regions:
        for label in region["value"][region["type"]]:
            if label not in labels:
                labels.append(label)
            score = 1.0 if origin == "annotation" else _number(region.get("score"), 0.0)
            scores[label] = max(scores.get(label, 0.0), score)
    label_map = np.zeros(size, np.int32)
    for k, label in enumerate(labels):
        if label in masks:
            label_map[masks[label]] = k + 1
    kept = {label: s for label, s in scores.items() if label in masks and masks[label].any()}
    if origin == "annotation":
        uncertainty = 0.0
    else:
        uncertainty = 1.0 - float(np.mean(list(kept.values()))) if kept else 1.0
    item = ExportItem(name=name, source=str(ref or ""), label_map=label_map, scores=kept,
                      score=_number(entry.get("score"), None), uncertainty=uncertainty,
                      task=task.get("id"), origin=origin)
    return item, image


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
