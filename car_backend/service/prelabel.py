"""`car-backend prelabel`: pre-label a whole Label Studio project, or an image folder offline.

--project ID: the tasks lacking a prediction for the current model_version are registered as late
deliveries and their jobs enqueued on the batch queue; finished tasks are written in batches through
Label Studio's bulk import (queue.delivery), by the workers as jobs finish and by this process for those
whose results were already cached. Every write goes through the task's delivery claim and a read-back of
the task, so a task is written once even while /predict serves the same project, and running again
resumes: tasks that got their prediction are no longer listed.

--images DIR: segments every image in this process (no Redis) and writes an export: a Label Studio import
file (`--export ls`, the default), COCO, VOC-style PNG label maps or YOLO polygons (car_backend.exports),
optionally with a review gallery (`--gallery`). Each finished image goes into the export's journal, so an
interrupted run continues where it stopped; unreadable images are listed in failed.txt and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
from tqdm import tqdm

from car_backend.engine.instances import split_instances
from car_backend.exports.gallery import Gallery
from car_backend.exports.records import ExportItem, Failure, Journal, write_failures
from car_backend.exports.writers import ExportSpec, Layout, write_export
from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient, prediction_versions
from car_backend.labelstudio.config import LabelConfigError, parse_label_config
from car_backend.labelstudio.media import MediaError, MediaFetcher
from car_backend.labelstudio.results import failed_entry
from car_backend.pipeline.compute import restrict, segment_run, task_score
from car_backend.pipeline.planning import TaskPlan, plan_task
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.queue.delivery import Deliverer
from car_backend.queue.ledger import CLAIMED, LateRecord, TaskState
from car_backend.queue.wait import JobWatch
from car_backend.service.backend import Backend
from car_backend.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
POLL_S = 0.5
NO_WORKER_WARNING_S = 30.0


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.project is not None:
        if getattr(args, "export", None) or getattr(args, "gallery", False):
            print("car-backend prelabel: --export and --gallery are for --images; to export a project's "
                  "predictions use car-backend export --project", file=sys.stderr)
            return 2
        return prelabel_project(args.project, settings)
    if not args.labels or not args.out:
        print("car-backend prelabel --images needs --labels and --out", file=sys.stderr)
        return 2
    labels = list(dict.fromkeys(label.strip() for label in args.labels.split(",") if label.strip()))
    return prelabel_images(Path(args.images), labels, Path(args.out), args.format, settings, args.url_prefix,
                           export=getattr(args, "export", None) or "ls", gallery=getattr(args, "gallery", False))


# -- a Label Studio project -----------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    delivered: int = 0  # a prediction is in Label Studio (written by anyone: workers, here, /predict)
    empty: int = 0  # of those, empty predictions for permanent failures (undecodable image, ...)
    failed: int = 0  # jobs that failed after their retries: not written, the next run tries again

    @property
    def finished(self) -> int:
        return self.delivered + self.failed


def prelabel_project(project_id: int, settings: Settings) -> int:
    if not settings.can_write_predictions:
        print("car-backend prelabel --project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    started = time.monotonic()
    client = LabelStudioClient(settings, settings.ls_timeout)
    try:
        info = client.project(project_id)
        label_config = info["label_config"]
        ml_backends = client.ml_backends(project_id)
        extra_params = ml_backends[0].get("extra_params") if ml_backends else None
        backend = Backend(settings)
    except (LabelStudioAPIError, KeyError) as exc:
        print(f"car-backend prelabel: cannot read project {project_id}: {exc}", file=sys.stderr)
        return 1
    try:
        project = backend.projects.setup_project(backend.projects.identify_api(info), label_config,
                                                 extra_params)
        tasks = list(client.tasks(project_id))
        todo = [t for t in tasks if project.version not in prediction_versions(t)]
        log.info("project %s: %d tasks, %d without a %s prediction", project_id, len(tasks), len(todo),
                 project.version)
        progress = ProjectRun(todo, project, settings, backend, client).run()
    except LabelConfigError as exc:
        print(f"car-backend prelabel: project {project_id}'s label config: {exc}", file=sys.stderr)
        return 1
    finally:
        if "backend" in locals():
            backend.close()
    print(f"project {project_id}: {len(tasks)} tasks, {len(tasks) - len(todo)} already had {project.version}; "
          f"wrote {progress.delivered} predictions ({progress.empty} empty: permanent failures), "
          f"{progress.failed} failed (run again to retry them), in {time.monotonic() - started:.1f} s")
    return 0 if progress.failed == 0 else 1


class ProjectRun:
    """The tasks of one `prelabel --project` run, followed until each is written or has failed.

    Finished tasks go through the project's outbox like every late write (queue.delivery: claims, read-back,
    bulk import, retries), written by this process as well as by the workers; where each task stands is read
    from the delivery ledger (one call per look, whatever the number of tasks).
    """

    def __init__(self, tasks: list[dict], project: Project, settings: Settings, backend: Backend,
                 client: LabelStudioClient):
        if project.project is None:
            raise ValueError("prelabel needs the project's identity")
        self.version = project.version
        self.project = project.project
        self.backend = backend
        self.state, self.queue, self.client = backend.state, backend.queue, client
        self.ledger = self.state.ledger
        self.owner = f"prelabel:{socket.gethostname()}:{os.getpid()}"
        self.deliverer = Deliverer(self.ledger, self.state.results, self.state.stats, client, settings,
                                   owner=self.owner)
        self.plans = [plan_task(task, project, settings) for task in tasks if isinstance(task.get("id"), int)]
        self.open = {p.task_id: p for p in self.plans if p.failure is None and p.pending is None}
        self.records = {tid: LateRecord(tid, self.version, tuple(p.keys), self.project,
                                        tuple(dict.fromkeys(s.image for s in p.specs)), config=project.label_hash,
                                        sources=tuple(p.sources))
                        for tid, p in self.open.items()}
        self.specs = {spec.key: spec for p in self.open.values() for spec in p.specs}
        self.watch = JobWatch(self.queue, self.state.results)
        self.progress = Progress()

    def run(self) -> Progress:
        # Tasks with nothing to compute (no image, no labels) get their empty prediction right away.
        for plan in self.plans:
            if plan.failure is not None and self._write_empty(plan):
                self.progress.delivered += 1
                self.progress.empty += 1
            elif plan.pending is not None:  # a setting refuses it: nothing is written, a later run predicts it
                log.warning("task %s: not predicted: %s", plan.task_id, plan.pending)
                self.progress.failed += 1
        self.ledger.register_late(list(self.records.values()))
        bar = tqdm(total=len(self.plans), initial=self.progress.finished, unit="task", desc="prelabel",
                   file=sys.stderr)
        heard_from_workers = time.monotonic()
        try:
            while self.open:
                self._look()
                bar.n = self.progress.finished
                bar.set_postfix(done=self.progress.delivered, failed=self.progress.failed, remaining=len(self.open))
                if not self.open:
                    break
                if self.backend.snapshot().workers > 0:
                    heard_from_workers = time.monotonic()
                elif time.monotonic() - heard_from_workers > NO_WORKER_WARNING_S:
                    tqdm.write("no live worker is serving the queue: start `car-backend worker`", file=sys.stderr)
                    heard_from_workers = time.monotonic()
                time.sleep(POLL_S)
        finally:
            bar.close()
        return self.progress

    def _write_empty(self, plan: TaskPlan) -> bool:
        """The empty prediction of a task that has nothing to predict, if this run wins its claim."""
        reason = plan.failure or ""
        if not self.ledger.answer(self.project, [(plan.task_id, self.version, (), TaskState.EMPTY, reason)],
                                  self.owner)[0]:
            return True  # delivered by someone else
        try:
            self.client.create_prediction(plan.task_id, failed_entry(self.version, reason))
        except LabelStudioAPIError as exc:
            self.ledger.settle(self.project, [(plan.task_id, self.version, (), TaskState.DROPPED,
                                               f"could not write its empty prediction: {exc}")], self.owner)
            log.warning("task %s: could not write its empty prediction: %s", plan.task_id, exc)
            self.progress.failed += 1
            return False
        return True

    def _look(self) -> None:
        """Count what got written, stage what is ready, submit what is missing, give up on dead jobs."""
        entries = self.ledger.state_of(self.project, list(self.open))
        keys = list(dict.fromkeys(k for p in self.open.values() for k in p.keys))
        results = dict(zip(keys, self.state.results.get_many(keys), strict=True))
        ready = []
        for task_id, plan in list(self.open.items()):
            entry = entries.get(task_id)
            found = [results[k] for k in plan.keys]
            finished = all(r is not None for r in found)
            state = entry.state if entry is not None and entry.version == self.version else None
            if state is not None and state.delivered:
                self.progress.delivered += 1
                self.progress.empty += finished and not any(r.ok for r in found)
                del self.open[task_id]
            elif state in (TaskState.DROPPED, TaskState.PENDING):
                log.warning("task %s: not written: %s", task_id, entry.reason)
                self.progress.failed += 1
                self.ledger.done([self.records[task_id]])
                del self.open[task_id]
            elif finished and state in (None, TaskState.LATE):
                # Cached before this run, or its job ended before the late record was there: stage it here.
                ready.append(self.records[task_id])
            elif not finished:
                for key, result in zip(plan.keys, found, strict=True):
                    if result is None and key not in self.watch.jobs:
                        self.watch.submit(self.specs[key])
        if ready:
            self.ledger.stage(ready, due=time.time())
        if ready or self.ledger.outbox_size(self.project):
            self.deliverer.deliver_due(projects=[self.project])
        self._drop_failed()

    def _drop_failed(self) -> None:
        dead = self.watch.poll(list(self.watch.jobs)).failed
        failed = [t for t, p in self.open.items() if dead.keys() & set(p.keys)]
        entries = self.ledger.state_of(self.project, failed)
        for task_id in failed:
            entry = entries.get(task_id)
            if entry is not None and entry.version == self.version and entry.state in CLAIMED:
                continue  # written meanwhile (a /predict computed it again); counted on the next look
            reasons = "; ".join(dead[k] for k in self.open[task_id].keys if k in dead)
            log.warning("task %s: its job failed: %s", task_id, reasons)
            self.progress.failed += 1
            self.ledger.done([self.records[task_id]])
            del self.open[task_id]


# -- an image folder ------------------------------------------------------------------------------------

def import_config(labels: list[str], kind: str) -> str:
    """The label config the import file is made for (printed, so the project can be created with it)."""
    tag = "BrushLabels" if kind == "brush" else "PolygonLabels"
    items = "\n".join(f"    <Label value={quoteattr(label)}/>" for label in labels)
    return f'<View>\n  <Image name="image" value="$image"/>\n  <{tag} name="tag" toName="image">\n{items}\n' \
           f"  </{tag}>\n</View>"


def prelabel_images(folder: Path, labels: list[str], out: Path, kind: str, settings: Settings,
                    url_prefix: str = "", export: str = "ls", gallery: bool = False) -> int:
    """Segment every image of `folder` into an export in `export` format at `out` (a file for ls, a folder
    for the others; see car_backend.exports.writers). ls tasks point at `url_prefix` + the file's path under
    the folder (its absolute path without a prefix), with a prediction where the segmentation succeeded;
    `kind` is their region type. Images finished by an earlier run with the same labels and settings are not
    segmented again. Returns the exit status: 0, 1 when the folder holds no image, 2 for bad arguments."""
    if not folder.is_dir():
        print(f"car-backend prelabel: {folder} is not a folder", file=sys.stderr)
        return 2
    if not labels:
        print("car-backend prelabel: --labels names no label", file=sys.stderr)
        return 2
    settings = dataclasses.replace(settings, output=kind)  # --format decides the region type here
    xml = import_config(labels, kind)
    config = parse_label_config(xml)
    project = Project(config=config, version=model_version(settings, config))
    try:
        spec = ExportSpec(export, tuple(labels), project.version, settings.polygon_tolerance, config.targets[0],
                          kind, url_prefix, image_root=folder)
    except ValueError as exc:
        print(f"car-backend prelabel: {exc}", file=sys.stderr)
        return 2
    layout = Layout.of(export, out)
    if export != "ls" and out.exists() and not out.is_dir():
        print(f"car-backend prelabel: --out {out} must be a folder for --export {export}", file=sys.stderr)
        return 2
    if export == "ls" and out.is_dir():
        print(f"car-backend prelabel: --out {out} is a folder; --export ls writes a file", file=sys.stderr)
        return 2
    from car_backend.engine import Segmenter  # torch is imported only by commands that run the engine

    fetcher = MediaFetcher(settings, allow_local_files=True)
    segmenter = Segmenter(settings.engine_config())
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    names = {path: path.relative_to(folder).as_posix() for path in files}
    album = Gallery(layout.gallery) if gallery else None
    failures: list[Failure] = []
    started = time.monotonic()
    with Journal(layout.journal, {"model_version": project.version, "labels": labels}) as journal:
        done = {name for name in names.values() if name in journal.items}
        if done:
            log.info("%d of %d images were finished by an earlier run: continuing", len(done), len(files))
        todo = [p for p in files if names[p] not in done]
        try:
            for path in tqdm(todo, total=len(files), initial=len(done), unit="image", desc="prelabel",
                             file=sys.stderr):
                try:
                    item, image = segment_image(path, names[path], project, segmenter, fetcher, settings)
                except MediaError as exc:
                    failures.append(Failure(names[path], str(path.resolve()), str(exc)))
                    log.warning("%s: skipped (%s)", names[path], exc)
                    continue
                journal.add(item)
                if album is not None:
                    album.add_thumbnail(item.name, image, item.label_map)
        except KeyboardInterrupt:
            print(f"interrupted after {len(journal.items)} of {len(files)} images: run the same command again to "
                  "continue", file=sys.stderr)
            return 130
        items = journal.items.only(names.values())  # not images removed from the folder since
    written = write_export(spec, layout, items, failures)
    write_failures(layout.failed, failures)
    seconds = time.monotonic() - started
    if export == "ls":
        print(f"wrote {len(items) + len(failures)} tasks to {written} ({len(items)} with predictions, "
              f"{len(failures)} without) in {seconds:.1f} s; model_version {project.version}")
        print(f"import it into a project with this label config:\n{xml}")
    else:
        print(f"wrote a {export} export of {len(items)} images to {written} in {seconds:.1f} s; "
              f"model_version {project.version}")
    if failures:
        print(f"{len(failures)} images could not be read: listed in {layout.failed}")
    if album is not None:
        for item in items:
            if not album.has_thumbnail(item.name):  # finished by a run without --gallery
                try:
                    album.add_thumbnail(item.name, fetcher.fetch(item.source), item.label_map)
                except MediaError as exc:
                    log.warning("%s: no thumbnail (%s)", item.name, exc)
        index = album.write(labels, items, failures, f"{folder.name}: {', '.join(labels)} ({project.version})")
        print(f"gallery: {index}")
    return 0 if files else 1


def segment_image(path: Path, name: str, project: Project, segmenter, fetcher: MediaFetcher,
                  settings: Settings) -> tuple[ExportItem, object]:
    """Segment one image file as `prelabel` plans it: the export item (label map over the project's one
    target's labels, kept scores, score and uncertainty) and the decoded image. Raises MediaError when the
    file cannot be read as an image."""
    source = str(path.resolve())
    plan = plan_task({"data": {"image": source}}, project, settings)
    if plan.failure is not None or len(plan.specs) != 1 or len(plan.specs[0].runs) != 1:
        raise MediaError(plan.failure or plan.pending or "the import config plans more than one run", retryable=False)
    spec = plan.specs[0]
    run = spec.runs[0]
    image = fetcher.fetch(spec.image, None)
    seg = segment_run(segmenter, image, run, dict(spec.thresholds))
    labels = run.outputs[0].labels
    own = restrict(seg, [label.prompt for label in labels])
    kept = [float(s) for s in seg.scores if s > 0]
    margins = [float(seg.margin)] if seg.margin is not None else []
    uncertainty = task_score(kept, "uncertainty", margins)
    item = ExportItem(
        name=name, source=source, label_map=np.asarray(own.label_map, np.int32),
        scores={label.value: float(s) for label, s in zip(labels, own.scores, strict=True) if s > 0},
        score=task_score(kept, spec.score, margins),
        uncertainty=1.0 if uncertainty is None else uncertainty,  # nothing kept: worth a look
        # Segment Anything's objects, where it ran, are the instances; else the export splits the label map
        instances=None if own.parts is None else split_instances(own.label_map, own.scores, parts=own.parts),
    )
    return item, image
