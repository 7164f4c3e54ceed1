"""Annotation events from Label Studio's webhooks: what is believed of them, and reading them back.

Label Studio's webhooks carry no credentials, so anyone can send one. `parse_event` takes only ids and the
label config from a payload (nothing of the size it claims is allocated); the review job reads the
annotation, the project's config and the task back from Label Studio by their ids (`read_back`) before
anything is used: the images a correction is stored with are those Label Studio's task holds under the keys
its config names, never the payload's `task.data`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from car_backend.pipeline.identity import MAX_ID, ProjectId, created_stamp
from car_backend.pipeline.plain import from_plain, to_plain
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobSpec, Project
from car_backend.settings import Settings

REVIEWED_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


class WebhookOutcome(str, Enum):
    """How a review job ended, counted in car:stats as `webhook:<value>` (car_webhook_annotations)."""

    REVIEWED = "reviewed"  # read back from Label Studio and used
    UNKNOWN = "unknown"  # Label Studio has no such annotation or project
    MISMATCH = "mismatch"  # it belongs to another task or project
    CANCELLED = "cancelled"
    CONFIG_CHANGED = "config_changed"  # the project's label config is not the event's
    TOO_LARGE = "too_large"  # a region claims more than CAR_MAX_IMAGE_PIXELS
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class EventIds:
    """What is taken from an annotation event's payload: ids, the project (identity resolved by the caller),
    the task (planned, never fetched from its data) and the label config."""

    annotation: int
    task: dict
    project: dict
    label_config: str


@dataclass(frozen=True)
class AnnotationEvent:
    """The review job's input: which annotation of which task to read back from Label Studio, and how this
    backend predicts the task. The webhook's regions are not part of it: they are never believed. Travels as
    JSON (`to_dict`/`from_dict`)."""

    project: ProjectId
    task: int
    annotation: int  # the annotation's id in Label Studio
    label_config_sha: str  # sha256 of the label config the specs were planned with (checked against LS's)
    specs: tuple[JobSpec, ...]  # how this backend predicts the task now
    sources: tuple[tuple[str, str], ...] = ()  # (task-data key, image) of each spec: checked against LS's task

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> AnnotationEvent:
        return from_plain(cls, data)


def parse_event(body: dict, settings: Settings) -> EventIds | str:
    """The ids of an ANNOTATION_CREATED/UPDATED payload, or why there is nothing to review. Raises ValueError
    for a payload that is not a Label Studio annotation event."""
    annotation, task, project = (body.get(k) for k in ("annotation", "task", "project"))
    if not isinstance(annotation, dict) or not _is_id(annotation.get("id")):
        raise ValueError("an annotation event needs an 'annotation' object with an integer 'id'")
    if annotation.get("was_cancelled"):
        return "the annotation was skipped (cancelled)"
    if not isinstance(task, dict) or not _is_id(task.get("id")) or not isinstance(task.get("data"), dict):
        raise ValueError("an annotation event needs a 'task' object with an integer 'id' and a 'data' object")
    if not isinstance(project, dict) or not _is_id(project.get("id")):
        raise ValueError("an annotation event needs a 'project' object with an integer 'id'")
    if not settings.can_write_predictions:
        return ("annotation events are used only with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set: each "
                "annotation is read back from Label Studio before it is believed")
    label_config = project.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        return "the event carries no label config"
    return EventIds(annotation["id"], task, project, label_config)


def annotation_event(ids: EventIds, project: Project, settings: Settings) -> AnnotationEvent:
    """The review job's input: the task planned with `project` (the label config of `ids`, resolved by the
    caller with its identity set)."""
    if project.project is None:
        raise ValueError("an annotation event needs the project's identity")
    plan = plan_task(ids.task, project, settings)
    return AnnotationEvent(project=project.project, task=ids.task["id"], annotation=ids.annotation,
                           label_config_sha=_sha(ids.label_config), specs=tuple(plan.specs),
                           sources=tuple(plan.sources))


def read_back(client: LabelStudioClient, event: AnnotationEvent) -> list[dict] | tuple[WebhookOutcome, str]:
    """The annotation's result as Label Studio stores it, or (outcome, why) when the event is not believed:
    Label Studio does not know the annotation or the project, the annotation belongs to another task or
    project, was cancelled, the project's label config is not the one the event was planned with, or the
    task's data in Label Studio does not hold each planned image under the key the config names (the payload's
    `task.data` is never believed). The task is read through the project's task list
    (`LabelStudioClient.project_task`), not GET /api/tasks/<id>/, which asks this backend's /predict for a
    task without predictions (that call would wait on the worker running this job).
    Raises LabelStudioAPIError (retryable: RQ retries) when Label Studio cannot answer now."""
    pid = event.project.id
    stored = client.annotation(event.annotation)
    if stored is None:
        return WebhookOutcome.UNKNOWN, f"Label Studio has no annotation {event.annotation}"
    if stored.get("task") != event.task or stored.get("project", pid) != pid:
        return WebhookOutcome.MISMATCH, (f"annotation {event.annotation} belongs to task {stored.get('task')!r} "
                                         f"of project {stored.get('project')!r}, not task {event.task} of "
                                         f"project {pid}")
    if stored.get("was_cancelled"):
        return WebhookOutcome.CANCELLED, f"annotation {event.annotation} was skipped (cancelled)"
    if not isinstance(stored.get("result"), list):
        return WebhookOutcome.UNREADABLE, f"annotation {event.annotation} has no result list"
    try:
        info = client.project(pid)
    except LabelStudioAPIError as exc:
        if exc.retryable:
            raise
        return WebhookOutcome.UNKNOWN, f"project {pid} cannot be read: {exc}"
    created = created_stamp(info.get("created_at"))
    if None not in (created, event.project.created) and created != event.project.created:
        return WebhookOutcome.MISMATCH, (f"project {pid} in Label Studio is not the one the event named (another "
                                         "creation time: a reset or another Label Studio)")
    config = info.get("label_config")
    if not isinstance(config, str) or _sha(config) != event.label_config_sha:
        return WebhookOutcome.CONFIG_CHANGED, f"project {pid}'s label config is not the one the event carried"
    if event.specs:
        task = client.project_task(pid, event.task)
        if task is None:
            return WebhookOutcome.UNKNOWN, f"project {pid} in Label Studio has no task {event.task}"
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        if len(event.sources) != len(event.specs) or any(
                spec.image != image or not isinstance(data.get(key), str) or data[key].strip() != image
                for spec, (key, image) in zip(event.specs, event.sources, strict=False)):
            return WebhookOutcome.MISMATCH, (f"task {event.task}'s data in Label Studio does not hold the images "
                                             "the event named")
    return stored["result"]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
