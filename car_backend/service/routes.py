"""The protocol's routes, one blueprint; each parses its body (service.parsing) and acts on `Service`."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from redis import RedisError

from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from car_backend.labelstudio.config import RESULT_TYPES, LabelConfigError
from car_backend.pipeline.planning import output_targets
from car_backend.queue.jobqueue import JobName
from car_backend.review.triggers import queue_fit
from car_backend.review.webhook import REVIEWED_ACTIONS, annotation_event, parse_event
from car_backend.service.backend import Backend
from car_backend.service.metrics import Metrics
from car_backend.service.parsing import RequestError, predict_request, setup_request, webhook_body
from car_backend.service.predictor import Predictor
from car_backend.service.projects import Projects
from car_backend.service.status import project_status
from car_backend.settings import Settings

log = logging.getLogger(__name__)

EXTENSION = "car_backend"

blueprint = Blueprint("protocol", __name__)


@dataclass
class Service:
    """What the routes use, built once per app by create_app: `app.extensions["car_backend"]`."""

    settings: Settings
    backend: Backend
    metrics: Metrics
    projects: Projects
    predictor: Predictor
    default_version: str
    warnings: list[str] = field(default_factory=list)  # risks of this deployment, in /health (create_app)

    def close(self) -> None:
        self.backend.close()


def _service() -> Service:
    return current_app.extensions[EXTENSION]


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _json_body() -> Any:
    """The request body as parsed JSON, None when it is not JSON; RequestError when it nests too deeply for
    the JSON reader (a RecursionError, which must not become a 500)."""
    try:
        return request.get_json(force=True, silent=True)
    except RecursionError:
        raise RequestError("the body's JSON nests too deeply") from None


def unauthorized() -> Response:
    """HTTP 401 asking for basic auth (what Label Studio reports as wrong credentials)."""
    return json_response({"error": "authentication required"}, 401,
                         headers={"WWW-Authenticate": 'Basic realm="car-backend"'})


@blueprint.get("/")
@blueprint.get("/health")
def health() -> Response:
    """A constant number of Redis calls (Backend.health); always 200 with JSON, which Label Studio accepts:
    "UP", or "DEGRADED" with `warnings` (no live worker, Redis down) so it stays connected and recovers.
    A caller without credentials while basic auth is on (create_app) gets the status alone."""
    service = _service()
    body: dict[str, Any] = {"status": "UP", "model_class": "CaR", "model_version": service.default_version,
                            "mode": service.backend.mode, "warnings": list(service.warnings)}
    try:
        state = service.backend.health()
    except RedisError as exc:
        # Still 200: Label Studio disconnects on a failed /health, and /predict answers every task with a
        # pending entry until Redis is back, so the backend recovers without anyone reconnecting it.
        detail = f"the job queue's Redis is unavailable: {exc}"
        body.update(status="DEGRADED", redis="down", detail=detail)
        body["warnings"].append(detail)
    else:
        body.update(redis="ok", queue={"name": service.settings.queue, **asdict(state.depth)},
                    workers=state.workers, overdue_outboxes=state.overdue_outboxes, lanes=state.lanes)
        body["warnings"].extend(state.warnings)
        if state.warnings:
            body["status"] = "DEGRADED"
    body["pending_failures"] = asdict(service.predictor.pending_failures.snapshot())  # answered pending: a setting or outage
    if not g.trusted:  # versions, warnings and failures name tasks, hosts and files: not for anyone
        return json_response({"status": body["status"]})
    return json_response(body)


@blueprint.post("/setup")
def setup() -> Response:
    service = _service()
    parsed = setup_request(_json_body())
    project = service.projects.setup(parsed.project, parsed.label_config, parsed.extra_params)
    config = project.config
    return json_response({
        "model_version": project.version,
        "targets": [{
            "from_name": t.from_name, "to_name": t.to_name, "image": t.data_key,
            "type": RESULT_TYPES[t.kind],
            "labels": [label.value for label in t.labels],
            "dynamic_labels": t.dynamic_key, "referring": t.referring_key,
            "preset": t.preset or config.preset or service.settings.preset,
        } for t in output_targets(config, service.settings)],
        "skipped": list(config.skipped),
    })


@blueprint.post("/predict")
def predict() -> Response:
    service = _service()
    parsed = predict_request(_json_body(), service.settings.task_limit)
    project = service.projects.for_predict(parsed.project, parsed.label_config)
    entries = service.predictor.predict(parsed.tasks, project, context=parsed.context)
    kinds = [("result" in e) for e in entries]
    log.info("/predict: %d tasks, %d answered, %d pending, %.2f s", len(parsed.tasks), sum(kinds),
             len(kinds) - sum(kinds), time.monotonic() - g.started)
    return json_response({"results": entries, "model_version": project.version})


@blueprint.post("/webhook")
def webhook() -> Response:
    service = _service()
    body = webhook_body(_json_body())
    action = body.get("action")
    if action == TRAINING_ACTION:
        if not g.trusted:  # Label Studio sends it through its ML API, with the connection's credentials
            return unauthorized()
        return _start_training(service, body)
    if action not in REVIEWED_ACTIONS:
        log.debug("/webhook: %s (ignored)", action)
        return json_response({"status": "ignored", "action": action,
                              "detail": "only annotation events and START_TRAINING are used"})
    try:
        ids = parse_event(body, service.settings)
        if isinstance(ids, str):
            return json_response({"status": "ignored", "action": action, "detail": ids})
        project = service.projects.for_project(service.projects.identify_api(ids.project), ids.label_config)
        event = annotation_event(ids, project, service.settings)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    except LabelConfigError as exc:
        raise RequestError(f"the project's label config cannot be used: {exc}") from exc
    job = service.backend.queue.submit_call(JobName.REVIEW, (event.to_dict(),),
                                            description=f"review task {event.task} of project {event.project}")
    return json_response({"status": "queued", "action": action, "job": job})


TRAINING_ACTION = "START_TRAINING"
MAX_ID_DIGITS = 12  # project ids and creation stamps; a longer "id" would key Redis state and metrics labels
_WIRE_PROJECT = re.compile(rf"[0-9]{{1,{MAX_ID_DIGITS}}}(\.[0-9]{{1,{MAX_ID_DIGITS}}})?")


def _valid_project(project: Any) -> bool:
    """A START_TRAINING `project`: Label Studio's project object with an integer id, or a wire id
    ("<id>" or "<id>.<created>", digits only, each part at most MAX_ID_DIGITS long)."""
    if isinstance(project, dict):
        pid, created = project.get("id"), project.get("created_at")
        return (isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < 10 ** MAX_ID_DIGITS
                and (created is None or (isinstance(created, str) and len(created) <= 64)))
    if isinstance(project, int) and not isinstance(project, bool):
        return 0 <= project < 10 ** MAX_ID_DIGITS
    return isinstance(project, str) and _WIRE_PROJECT.fullmatch(project) is not None


def _start_training(service: Service, body: dict) -> Response:
    """"Start Training" (or N annotations): queue a training of the project's mask head from the corrected
    tasks the review store already holds (nothing is read from the payload but the project id)."""
    project = body.get("project")
    if not _valid_project(project):
        raise RequestError("START_TRAINING needs a 'project' object with an integer 'id' (or a project id of at "
                           f"most {MAX_ID_DIGITS} digits)")
    project_id = project.get("id") if isinstance(project, dict) else int(str(project).split(".")[0])
    confirmed = _confirmed_project(service.settings, project_id)
    if isinstance(confirmed, Response):
        return confirmed
    pid = service.projects.identify_api(confirmed)  # Label Studio's id and creation stamp, not the payload's
    if pid is None:
        raise RequestError("START_TRAINING needs a 'project' object with an 'id'")
    job = queue_fit(service.backend.queue, service.backend.review, pid, "webhook", service.settings)
    status = "queued" if job is not None else "already training"
    log.info("/webhook: START_TRAINING for project %s: %s", pid, status)
    # not "job": Label Studio would record a TrainJob it never follows
    return json_response({"status": status, "action": TRAINING_ACTION, "project": str(pid), "fit_job": job})


def _confirmed_project(settings: Settings, project_id: int) -> dict | Response:
    """Label Studio's own object of project `project_id` (a training acts only for a project Label Studio
    confirms), or the answer to give: 404 when Label Studio has no such project, 503 when it cannot say now,
    400 without LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY. The answers name no detail of Label Studio's."""
    try:
        found = LabelStudioClient(settings, settings.ls_timeout).project(project_id)
    except LabelStudioAPIError as exc:
        if exc.status is None and not exc.retryable:
            raise RequestError("START_TRAINING needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the project is "
                               "confirmed with Label Studio before a training is queued") from None
        if exc.retryable:
            log.warning("/webhook: START_TRAINING for project %s: Label Studio cannot confirm it now: %s",
                        project_id, exc)
            return json_response({"error": "Label Studio cannot confirm the project now; try again"}, 503)
        return json_response({"error": f"Label Studio has no project {project_id}"}, 404)
    if not isinstance(found, dict) or found.get("id") != project_id:
        return json_response({"error": f"Label Studio has no project {project_id}"}, 404)
    return found


@blueprint.get("/versions")
def versions() -> Response:
    return json_response({"versions": [_service().default_version]})


@blueprint.get("/metrics")
def metrics_text() -> Response:
    return Response(_service().metrics.render(), mimetype="text/plain; version=0.0.4")


@blueprint.get("/status")
def status() -> Response:
    """A project's progress (`?project=ID`), or one task's (`&task=ID`): see service.status."""
    service = _service()
    try:
        project = int(request.args.get("project", ""))
        task = int(request.args["task"]) if "task" in request.args else None
    except ValueError:
        raise RequestError("/status needs ?project=<Label Studio project id> (and optionally &task=<id>)") from None
    backend = service.backend
    progress = project_status(backend.state, backend.queue, backend.review, service.projects.by_id(project), task)
    return json_response(progress.to_dict())
