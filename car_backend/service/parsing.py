"""Request parsing: a /setup, /predict or /webhook body -> a typed request, or a RequestError (HTTP 400;
RequestTooLarge, HTTP 413, for more tasks than CAR_MAX_TASKS).

Nothing here touches Redis, the queue or the engine; the routes act on what these functions return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from car_backend.engine.errors import CarError


class RequestError(CarError):
    """The request body cannot be used; answered 400 with this message."""


class RequestTooLarge(RequestError):
    """The request asks for more than a limit allows; answered 413 with this message (it names the setting)."""


@dataclass(frozen=True)
class SetupRequest:
    project: Any  # Label Studio's "<id>.<created timestamp>", or None
    label_config: str
    extra_params: Any


@dataclass(frozen=True)
class PredictRequest:
    project: Any
    label_config: str
    tasks: list[dict]
    context: dict | None  # params.context of an interactive call (None for a batch), see interactive_context


def json_object(body: Any) -> dict:
    """`body` (parsed JSON, None when it was not JSON) as a dict; RequestError otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def setup_request(body: Any) -> SetupRequest:
    body = json_object(body)
    schema = body.get("schema") or body.get("label_config")
    if not isinstance(schema, str) or not schema.strip():
        raise RequestError("the body needs the label config under 'schema'")
    return SetupRequest(body.get("project"), schema, body.get("extra_params"))


def predict_request(body: Any, max_tasks: int | None = None) -> PredictRequest:
    """RequestError for a body that is not a /predict request; RequestTooLarge for more than `max_tasks`."""
    body = json_object(body)
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise RequestError("the body needs a 'tasks' list")
    if max_tasks is not None and len(tasks) > max_tasks:
        raise RequestTooLarge(f"the request carries {len(tasks)} tasks, more than CAR_MAX_TASKS={max_tasks}; "
                              "select fewer tasks, or pre-label the project with `car-backend prelabel --project`")
    if not all(isinstance(task, dict) for task in tasks):
        raise RequestError("every item of 'tasks' must be a JSON object")
    label_config = body.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        raise RequestError("the body needs the project's 'label_config'")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    return PredictRequest(body.get("project"), label_config, tasks, interactive_context(params.get("context")))


def interactive_context(context: Any) -> dict | None:
    """An interactive call's `params.context` in the shape Label Studio sends, whatever arrived: a dict whose
    `result` (when present) lists only region objects with an object `value`; anything else is ignored
    (None: a batch call, or a region dropped), so no odd shape reaches the planners."""
    if not isinstance(context, dict) or not context:
        return None
    regions = context.get("result")
    if regions is None:
        return context
    kept = [region for region in regions if isinstance(region, dict) and isinstance(region.get("value"), dict)] \
        if isinstance(regions, list) else []
    return {**context, "result": kept}


def webhook_body(body: Any) -> dict:
    """A webhook's JSON object; RequestError when it is not JSON or not an object."""
    if body is None:
        raise RequestError("the body is not JSON")
    return json_object(body)
