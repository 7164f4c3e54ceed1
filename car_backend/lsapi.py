"""The few Label Studio REST calls the service makes: write a prediction, read a project, list its tasks.

Authentication (personal access token exchange, 401 renewal) is `labelstudio.auth.LabelStudioAPI`'s;
this module only knows the endpoints and what their answers mean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from car_backend.labelstudio.auth import LabelStudioAPI, LabelStudioError
from car_backend.settings import Settings

log = logging.getLogger(__name__)

TASK_PAGE_SIZE = 100


class LabelStudioAPIError(Exception):
    """A Label Studio API call failed. `transient`: asking again later may succeed."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def configured(settings: Settings) -> bool:
    """Whether predictions can be written into Label Studio (URL and key are both set)."""
    return bool(settings.label_studio_url and settings.label_studio_api_key)


class LabelStudioClient:
    def __init__(self, settings: Settings):
        try:
            self._api = LabelStudioAPI(settings)
        except LabelStudioError as exc:
            raise LabelStudioAPIError(str(exc), transient=False) from None

    def create_prediction(self, task_id: int, entry: dict[str, Any]) -> dict:
        """POST /api/predictions for one task; `entry` is a /predict entry with a `result` list."""
        body = {
            "task": task_id,
            "result": entry["result"],
            "score": entry.get("score"),
            "model_version": entry["model_version"],
        }
        return self._json("POST", "/api/predictions/", json=body, expect=(200, 201))

    def project(self, project_id: int) -> dict:
        return self._json("GET", f"/api/projects/{project_id}/")

    def ml_backends(self, project_id: int) -> list[dict]:
        found = self._json("GET", "/api/ml/", params={"project": project_id})
        return found if isinstance(found, list) else []

    def tasks(self, project_id: int, page_size: int = TASK_PAGE_SIZE) -> Iterator[dict]:
        """Every task of the project with its predictions, page by page."""
        page, seen = 1, 0
        while True:
            resp = self._call("GET", "/api/tasks/", params={
                "project": project_id, "fields": "all", "page": page, "page_size": page_size})
            if resp.status_code == 404 and page > 1:  # past the last page
                return
            body = self._check(resp, "GET /api/tasks/", (200,))
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            seen += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if len(tasks) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def _json(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        return self._check(self._call(method, path, **kwargs), f"{method} {path}", expect)

    def _call(self, method: str, path: str, **kwargs: Any):
        try:
            return self._api.request(method, path, **kwargs)
        except LabelStudioError as exc:
            raise LabelStudioAPIError(str(exc), transient=True) from None

    @staticmethod
    def _check(resp, what: str, expect: tuple[int, ...]) -> Any:
        if resp.status_code not in expect:
            transient = resp.status_code in (401, 403, 408, 429) or resp.status_code >= 500
            raise LabelStudioAPIError(
                f"Label Studio answered {what} with HTTP {resp.status_code}: {resp.text[:200]}", transient)
        try:
            return resp.json()
        except ValueError:
            raise LabelStudioAPIError(f"Label Studio answered {what} with a body that is not JSON", True) from None


def prediction_versions(task: dict) -> set[str]:
    """The model versions of the predictions a task (from GET /api/tasks?fields=all) already has."""
    versions = {p.get("model_version") for p in task.get("predictions") or () if isinstance(p, dict)}
    listed = task.get("predictions_model_versions")
    if isinstance(listed, list):
        versions.update(listed)
    elif isinstance(listed, str):
        versions.update(v.strip() for v in listed.split(","))
    return {v for v in versions if isinstance(v, str) and v}
