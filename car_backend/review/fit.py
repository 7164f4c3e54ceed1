"""Learning from corrections: train a project's mask head (engine.head) and adopt it only when it is better.

`fit_project` is the training job (batch queue, queued by `review.triggers.queue_fit` from START_TRAINING at
/webhook, from CAR_FIT_AFTER corrected tasks, or from `car-backend fit --project ID`):

1. The project's corrected tasks are split by a hash of their task id: about one in HELD_OUT_EVERY is held
   out, always the same ones, and never trained on.
2. Each image is fetched and prepared once; each run of its specs gives examples: the proposal CLIP's dense
   patch features, the text embeddings of the run's queries (raw and in CaR's CAM template, the two forms
   the recurrence prompts with) and the annotation's masks at patch resolution (absent labels are zeros).
3. `train_head` runs at most CAR_FIT_EPOCHS epochs and CAR_FIT_SECONDS seconds, storing a checkpoint after
   each epoch; a training that ran out of time leaves it for the next one to resume.
4. The held-out tasks are predicted with the model in use (its head, if any, and its thresholds) and with the
   trained head. Only a head whose mean agreement is higher by more than MIN_GAIN is adopted: it becomes fit
   generation g + 1, stored under the digest of its bytes (`car:review:head:<sha256>`), the project's
   model_version gets `-fit<g+1>`, and a calibration is queued (CAR_CALIBRATE_AFTER > 0) to re-choose the
   thresholds on top of it.

`judge_head` (steps 3-4 on prepared items) is what the job runs and what tests call on generated scenes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
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
from car_backend.engine.presets import CAM_TEMPLATE
from car_backend.labelstudio.regions import add_mask, shrink
from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.spec import Run
from car_backend.review.agreement import ProjectAgreement, compare
from car_backend.review.calibration import predicted_masks, prepared_corrections
from car_backend.review.runtime import ReviewRuntime
from car_backend.review.store import FitState, FitStatus, ReviewStore
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
    any size) and its images, each with the runs that predict it."""

    task: int
    masks: dict[str, np.ndarray]
    images: list[tuple[tuple[Run, ...], PreparedImage]]


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
        for runs, prepared in item.images:
            features = dense_features(clip, prepared.proposal)
            grid = prepared.proposal.grid
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


def agreement_of(segmenter: Segmenter, items: Sequence[FitItem], thresholds: dict[str, float],
                 head: MaskHead | None) -> ProjectAgreement:
    """How the items' annotations agree with what the engine predicts (with these thresholds and head)."""
    total = ProjectAgreement()
    for item in items:
        predicted: dict[str, np.ndarray] = {}
        for runs, prepared in item.images:
            for label, mask in predicted_masks(segmenter, runs, prepared, thresholds, head).items():
                add_mask(predicted, label, mask)
        total.add(compare(shrink(predicted), shrink(item.masks)))
    return total


def mean_iou(agreement: ProjectAgreement) -> float | None:
    """Mean over labels of each label's pixel IoU summed over tasks; None without labels."""
    labels = [agreement.label_iou(label) for label in agreement.labels]
    return float(np.mean(labels)) if labels else None


def judge_head(segmenter: Segmenter, train: Sequence[FitItem], held: Sequence[FitItem], config: HeadConfig,
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
    thresholds = thresholds or {}
    return Judgement(state, agreement_of(segmenter, held, thresholds, current),
                     agreement_of(segmenter, held, thresholds, state.head), per_epoch)


# ------------------------------------------------------------------------------------------------ the job
def fit_project(project: ProjectId, rt: ReviewRuntime) -> FitStatus:
    """The training job (see the module docstring); the project's FitStatus after it. A failure is recorded
    in the status and raised; the project's training lock is released either way."""
    review = rt.review
    try:
        return _fit(rt, project)
    except Exception as exc:
        status = review.fit_status(project) or FitStatus()
        status.state, status.reason, status.updated = FitState.FAILED, f"{type(exc).__name__}: {exc}"[:300], time.time()
        review.put_fit_status(project, status)
        raise
    finally:
        review.unlock_fit(project)


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
    if len(train) < MIN_TRAIN_TASKS or len(held) < MIN_HELD_OUT_TASKS:
        return _finish(review, project, status,
                       f"needs {MIN_TRAIN_TASKS} training and {MIN_HELD_OUT_TASKS} held-out corrected tasks, has "
                       f"{len(train)} and {len(held)}")
    status.state, status.reason, status.updated = FitState.TRAINING, "", time.time()
    status.epochs_planned = settings.fit_epochs
    review.put_fit_status(project, status)

    def items(corrections: list) -> list[FitItem]:
        return [FitItem(c.task, c.masks, [(spec.runs, image) for spec, image in prepared])
                for c, prepared in prepared_corrections(rt, project, corrections, "mask-head training")]

    train_items, held_items = items(train), items(held)
    segmenter = rt.segmenter()
    clip = segmenter.proposal_clip
    config = HeadConfig.for_clip(clip, width=settings.head_width, depth=settings.head_depth)
    calibration = review.calibration(project)
    thresholds = dict(calibration.thresholds) if calibration and calibration.generation > 0 else {}

    def checkpoint(state: TrainingState) -> None:
        review.put_checkpoint(project, state_to_bytes(state))
        status.epochs, status.losses = state.epochs, [round(v, 6) for v in state.losses]
        status.updated = time.time()
        review.put_fit_status(project, status)

    try:
        judgement = judge_head(segmenter, train_items, held_items, config, settings.fit_epochs, settings.fit_seed,
                               settings.fit_seconds, thresholds, rt.head(status.head),
                               _resumed(review, project, clip.name, config), checkpoint)
    except ValueError as exc:  # no example: every image failed to load
        return _finish(review, project, status, str(exc))
    state = judgement.state
    if state.epochs >= settings.fit_epochs:
        review.drop_checkpoint(project)
    status.epochs, status.losses = state.epochs, [round(v, 6) for v in state.losses]
    status.seconds_per_epoch = round(judgement.seconds_per_epoch, 4)
    status.seconds = round(time.monotonic() - started, 3)
    status.before, status.after = (_round(judgement.before.mean_score), _round(judgement.after.mean_score))
    status.miou_before, status.miou_after = _round(mean_iou(judgement.before)), _round(mean_iou(judgement.after))
    if not judgement.adopt:
        return _finish(review, project, status,
                       f"the trained head does not beat the model in use on {len(held_items)} held-out tasks "
                       f"({status.before} -> {status.after}; needs +{MIN_GAIN})")
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
