"""Learning from corrections: train a project's mask head (engine.head) and adopt it only when it is better.

`fit_project` is the training job (batch queue, queued by `review.triggers.queue_fit` from START_TRAINING at
/webhook, from CAR_FIT_AFTER corrected tasks, or from `car-backend fit --project ID`):

1. The project's corrected tasks are split by a hash of their task id: about one in HELD_OUT_EVERY is held
   out, always the same ones, and never trained on.
2. The training tasks' images are fetched one at a time, most recently annotated first, and only what the
   head trains on is kept of each: the proposal CLIP's dense patch features (`Segmenter.dense_features`,
   ~24 MB at 1024 x 1024 with ViT-B/16), not the attention maps and the affinity a prepared image holds
   (~1 GB). They are kept until CAR_FIT_MEMORY_MB would be exceeded: the older tasks are left out
   (`FitStatus.left_out`). Each run of a task's specs gives examples: those features, the text embeddings
   of the run's queries (raw and in CaR's CAM template, the two forms the recurrence prompts with) and the
   annotation's masks at patch resolution (absent labels are zeros).
3. `train_head` runs at most CAR_FIT_EPOCHS epochs and CAR_FIT_SECONDS seconds, storing a checkpoint after
   each epoch; a training that ran out of time leaves it for the next one to resume. The features are let go.
4. The held-out tasks are prepared one at a time (streamed) and predicted with the model in use (its head,
   if any, and its thresholds) and with the trained head. Only a head whose mean agreement is higher by more
   than MIN_GAIN is adopted: it becomes fit generation g + 1, stored under the digest of its bytes
   (`car:review:head:<sha256>`), the project's model_version gets `-fit<g+1>`, and a calibration is queued
   (CAR_CALIBRATE_AFTER > 0) to re-choose the thresholds on top of it.

A training that runs out of memory all the same (MemoryError, CUDA or CPU allocator failure) is recorded as
FAILED with the reason in the project's FitStatus (/status) and ends normally: RQ does not retry it into the
same wall, and the worker goes on with its next job.

`judge_head` (steps 3-4 on items in memory) is what tests and benchmarks call on generated scenes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from car_backend.engine.head import (
    HeadConfig,
    HeadError,
    HeadExample,
    MaskHead,
    TrainingState,
    dense_features,
    head_to_bytes,
    patch_targets,
    start_training,
    state_from_bytes,
    state_to_bytes,
    train_head,
)
from car_backend.engine.memory import is_out_of_memory, nbytes, release_memory
from car_backend.engine.presets import CAM_TEMPLATE
from car_backend.engine.proposals import DenseFeatures
from car_backend.labelstudio.media import MediaError
from car_backend.labelstudio.regions import add_mask, shrink
from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.spec import Run
from car_backend.review.agreement import ProjectAgreement, compare
from car_backend.review.calibration import prepared_corrections, task_masks
from car_backend.review.runtime import ReviewRuntime
from car_backend.review.store import Correction, FitState, FitStatus, ReviewStore
from car_backend.review.triggers import queue_calibration

if TYPE_CHECKING:
    from car_backend.engine.segmenter import PreparedImage, Segmenter

log = logging.getLogger(__name__)

HELD_OUT_EVERY = 5  # one corrected task in five (by a hash of its id) is held out
MIN_TRAIN_TASKS = 4
MIN_HELD_OUT_TASKS = 1
MIN_GAIN = 0.01  # mean agreement a head must add on the held-out tasks to be adopted


def held_out(task: int) -> bool:
    """Whether a corrected task belongs to the held-out split (the same answer forever)."""
    return hashlib.sha256(str(task).encode()).digest()[0] % HELD_OUT_EVERY == 0


@dataclass
class FitItem:
    """One corrected task, ready for training or judging: the annotation's masks (label value -> bool mask,
    any size) and its images, each with the runs that predict it. Training reads an image's dense features
    (a PreparedImage holds them too); judging needs PreparedImages."""

    task: int
    masks: dict[str, np.ndarray]
    images: list[tuple[tuple[Run, ...], PreparedImage | DenseFeatures]]


@dataclass
class Judgement:
    """A trained head and how the held-out tasks agree with it and with the model in use."""

    state: TrainingState
    before: ProjectAgreement
    after: ProjectAgreement
    seconds_per_epoch: float

    @property
    def adopt(self) -> bool:
        return (self.after.mean_score or 0.0) > (self.before.mean_score or 0.0) + MIN_GAIN


def examples_of(segmenter: Segmenter, items: Sequence[FitItem]) -> list[HeadExample]:
    """Training examples of the items (see the module docstring, step 2)."""
    clip = segmenter.proposal_clip
    examples = []
    for item in items:
        for runs, image in item.images:
            if isinstance(image, DenseFeatures):
                features, grid = image.features, image.grid
            else:
                features, grid = dense_features(clip, image.proposal), image.proposal.grid
            for run in runs:
                if run.mode == "referring":  # each sentence describes the output's one label
                    label = run.outputs[0].labels[0].value
                    for sentence in run.queries:
                        targets = patch_targets([item.masks.get(label)], grid)
                        examples.append(HeadExample(features, clip.embed_texts([sentence]), targets, grid))
                    continue
                masks: dict[str, np.ndarray] = {}
                for out in run.outputs:
                    for label in out.labels:
                        if label.value in item.masks:
                            add_mask(masks, label.prompt, item.masks[label.value])
                targets = patch_targets([masks.get(query) for query in run.queries], grid)
                for texts in (list(run.queries), [CAM_TEMPLATE.format(q) for q in run.queries]):
                    examples.append(HeadExample(features, clip.embed_texts(texts), targets, grid))
    return examples


def agreement_of(segmenter: Segmenter, items: Iterable[FitItem], thresholds: dict[str, float],
                 head: MaskHead | None) -> ProjectAgreement:
    """How the items' annotations agree with what the engine predicts (with these thresholds and head)."""
    return agreements_of(segmenter, items, thresholds, [head])[0]


def agreements_of(segmenter: Segmenter, items: Iterable[FitItem], thresholds: dict[str, float],
                  heads: Sequence[MaskHead | None]) -> list[ProjectAgreement]:
    """`agreement_of` for each of `heads` (None: CaR alone) in one pass over `items`, whose images must be
    PreparedImages: an iterator that prepares them one at a time holds one at a time."""
    totals = [ProjectAgreement() for _ in heads]
    for item in items:
        for total, head in zip(totals, heads, strict=True):
            total.add(compare(shrink(task_masks(segmenter, item.images, thresholds, head)), shrink(item.masks)))
        del item  # let a streamed item go before the next one is prepared
    return totals


def mean_iou(agreement: ProjectAgreement) -> float | None:
    """Mean over labels of each label's pixel IoU summed over tasks; None without labels."""
    labels = [agreement.label_iou(label) for label in agreement.labels]
    return float(np.mean(labels)) if labels else None


def judge_head(segmenter: Segmenter, train: Sequence[FitItem], held: Iterable[FitItem], config: HeadConfig,
               epochs: int, seed: int, seconds: float | None = None, thresholds: dict[str, float] | None = None,
               current: MaskHead | None = None, state: TrainingState | None = None,
               on_epoch: Callable[[TrainingState], None] | None = None) -> Judgement:
    """Train a head on `train` (from `state` if given, else fresh from `seed`) and score it and the model in
    use (`current` head or none, `thresholds`) on `held`. Raises ValueError when `train` gives no example."""
    clip = segmenter.proposal_clip
    state = state or start_training(config, seed, clip.name)
    done = state.epochs
    started = time.monotonic()
    train_head(state, examples_of(segmenter, train), epochs, seed, seconds, device=clip.device, on_epoch=on_epoch)
    per_epoch = (time.monotonic() - started) / max(1, state.epochs - done)
    before, after = agreements_of(segmenter, held, thresholds or {}, [current, state.head])
    return Judgement(state, before, after, per_epoch)


# ------------------------------------------------------------------------------------------------ the job
def fit_project(project: ProjectId, rt: ReviewRuntime) -> FitStatus:
    """The training job (see the module docstring); the project's FitStatus after it. A failure is recorded
    in the status; one for memory is returned (FAILED), any other raised. The project's training lock is
    released either way."""
    review = rt.review
    try:
        return _fit(rt, project)
    except Exception as exc:
        status = review.fit_status(project) or FitStatus()
        status.state, status.updated = FitState.FAILED, time.time()
        if not is_out_of_memory(exc):
            status.reason = f"{type(exc).__name__}: {exc}"[:300]
            review.put_fit_status(project, status)
            raise
        status.reason = (f"out of memory ({type(exc).__name__}: {str(exc)[:160]}); CAR_FIT_MEMORY_MB="
                         f"{rt.settings.fit_memory_mb} bounds the corrected images a training holds")
        review.put_fit_status(project, status)
        log.error("project %s: the mask-head training ran out of memory: %s", project, status.reason)
    finally:
        review.unlock_fit(project)
    release_memory()  # after the except clause: its traceback held the failed training's tensors
    return status


def _fit(rt: ReviewRuntime, project: ProjectId) -> FitStatus:
    started = time.monotonic()
    review = rt.review
    settings = rt.settings
    status = review.fit_status(project) or FitStatus()
    corrections = review.corrections(project)
    status.corrected_tasks = len(corrections)
    train = [c for c in corrections if not held_out(c.task)]
    held = [c for c in corrections if held_out(c.task)]
    status.train_tasks, status.held_out_tasks, status.adopted = len(train), len(held), False
    status.left_out, status.features_mb = 0, 0.0
    if len(train) < MIN_TRAIN_TASKS or len(held) < MIN_HELD_OUT_TASKS:
        return _finish(review, project, status,
                       f"needs {MIN_TRAIN_TASKS} training and {MIN_HELD_OUT_TASKS} held-out corrected tasks, has "
                       f"{len(train)} and {len(held)}")
    status.state, status.reason, status.updated = FitState.TRAINING, "", time.time()
    status.epochs_planned = settings.fit_epochs
    review.put_fit_status(project, status)

    segmenter = rt.segmenter()
    clip = segmenter.proposal_clip
    train_items, held_bytes, left_out = training_items(rt, project, train, settings.fit_memory_mb * 2 ** 20)
    status.train_tasks, status.left_out = len(train_items), left_out
    status.features_mb = round(held_bytes / 2 ** 20, 3)
    if len(train_items) < MIN_TRAIN_TASKS:
        why = (f"CAR_FIT_MEMORY_MB={settings.fit_memory_mb} holds the features of {len(train_items)} of the "
               f"{len(train)} training tasks" if left_out else f"{len(train_items)} training tasks could be read")
        return _finish(review, project, status, f"needs {MIN_TRAIN_TASKS} training tasks: {why}")
    config = HeadConfig.for_clip(clip, width=settings.head_width, depth=settings.head_depth)
    calibration = review.calibration(project)
    thresholds = dict(calibration.thresholds) if calibration and calibration.generation > 0 else {}

    def checkpoint(state: TrainingState) -> None:
        review.put_checkpoint(project, state_to_bytes(state))
        status.epochs, status.losses = state.epochs, [round(v, 6) for v in state.losses]
        status.updated = time.time()
        review.put_fit_status(project, status)

    state = _resumed(review, project, clip.name, config) or start_training(config, settings.fit_seed, clip.name)
    done = state.epochs
    examples = examples_of(segmenter, train_items)
    del train_items  # the examples hold the features now
    trained = time.monotonic()
    train_head(state, examples, settings.fit_epochs, settings.fit_seed, settings.fit_seconds, device=clip.device,
               on_epoch=checkpoint)
    per_epoch = (time.monotonic() - trained) / max(1, state.epochs - done)
    del examples  # judging prepares the held-out images: the training's features are let go first
    release_memory()
    before, after = agreements_of(segmenter, _streamed(rt, project, held), thresholds,
                                  [rt.head(status.head), state.head])
    judgement = Judgement(state, before, after, per_epoch)
    if state.epochs >= settings.fit_epochs:
        review.drop_checkpoint(project)
    status.epochs, status.losses = state.epochs, [round(v, 6) for v in state.losses]
    status.seconds_per_epoch = round(judgement.seconds_per_epoch, 4)
    status.seconds = round(time.monotonic() - started, 3)
    status.before, status.after = (_round(judgement.before.mean_score), _round(judgement.after.mean_score))
    status.miou_before, status.miou_after = _round(mean_iou(judgement.before)), _round(mean_iou(judgement.after))
    if not judgement.adopt:
        return _finish(review, project, status,
                       f"the trained head does not beat the model in use on {judgement.before.tasks} held-out "
                       f"tasks ({status.before} -> {status.after}; needs +{MIN_GAIN})")
    head = state.head.cpu()
    head.generation = status.generation + 1
    status.head = review.put_head(status, head_to_bytes(head))
    status.generation, status.adopted = head.generation, True
    _finish(review, project, status, "")
    log.info("project %s: mask head generation %d adopted (held-out agreement %s -> %s, %d epochs)",
             project, head.generation, status.before, status.after, state.epochs)
    if settings.calibrate_after:
        queue_calibration(rt.queue, review, project, rt.name, settings)
    return status


def training_items(rt: ReviewRuntime, project: ProjectId, corrections: Sequence[Correction], budget: int
                   ) -> tuple[list[FitItem], int, int]:
    """(items, bytes of their features, tasks left out): the corrected tasks' images as dense features, most
    recently annotated first (`corrections` are oldest first), as long as their features fit in `budget`
    bytes; the items in task order. A task whose image cannot be fetched is skipped with a warning (not
    counted as left out); the first that does not fit ends the reading (it and all older ones are left out)."""
    segmenter = rt.segmenter()
    items: list[FitItem] = []
    held = 0
    newest_first = list(reversed(corrections))
    for index, correction in enumerate(newest_first):
        try:
            images = [(spec.runs, segmenter.dense_features(rt.fetcher.fetch(spec.image, spec.task_id)))
                      for spec in correction.specs]
        except MediaError as exc:
            log.warning("mask-head training of project %s skips task %s: %s", project, correction.task, exc)
            continue
        size = nbytes(features.features for _, features in images)
        if held + size > budget:
            left_out = len(newest_first) - index
            log.warning("project %s: CAR_FIT_MEMORY_MB=%d holds the features of the %d most recently corrected "
                        "training tasks (%.1f MB); the %d older ones are left out", project, budget // 2 ** 20,
                        len(items), held / 2 ** 20, left_out)
            return sorted(items, key=lambda item: item.task), held, left_out
        held += size
        items.append(FitItem(correction.task, correction.masks, images))
    return sorted(items, key=lambda item: item.task), held, 0


def _streamed(rt: ReviewRuntime, project: ProjectId, corrections: Sequence[Correction]) -> Iterator[FitItem]:
    """The corrections as FitItems of prepared images, prepared one at a time (uncached), in task order."""
    for correction in sorted(corrections, key=lambda c: c.task):
        for found, prepared in prepared_corrections(rt, project, [correction], "mask-head judging"):
            item = FitItem(found.task, found.masks, [(spec.runs, image) for spec, image in prepared])
            del prepared
            yield item
            del item


def _resumed(review: ReviewStore, project: ProjectId, identity: str, config: HeadConfig) -> TrainingState | None:
    """The stored checkpoint, if it is one for this CLIP and head shape (else it is ignored, with a log line)."""
    blob = review.checkpoint(project)
    if blob is None:
        return None
    try:
        state = state_from_bytes(blob, identity)
    except HeadError as exc:
        log.warning("project %s: the training checkpoint is ignored: %s", project, exc)
        return None
    if state.head.config != config:
        log.info("project %s: the training checkpoint has another head shape; starting afresh", project)
        return None
    log.info("project %s: resuming the mask-head training after epoch %d", project, state.epochs)
    return state


def _finish(review: ReviewStore, project: ProjectId, status: FitStatus, reason: str) -> FitStatus:
    status.state, status.reason, status.updated = FitState.DONE, reason, time.time()
    review.put_fit_status(project, status)
    if reason:
        log.info("project %s: mask head not adopted: %s", project, reason)
    return status


def _round(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None
