"""Label Studio's REST API: authentication with LABEL_STUDIO_API_KEY, and the calls the service makes.

Label Studio 1.23 takes three kinds of key:
- a personal access token (a JWT *refresh* token): exchanged at `POST /api/token/refresh/` for an access
  token that lives about 300 s, sent as `Bearer <access>`, and exchanged again when it expires or LS
  answers 401;
- an access token (a JWT access token) pasted directly: sent as `Bearer`, cannot be renewed;
- a legacy token: sent as `Token <key>` (works only where the organisation still allows legacy tokens).

One `LabelStudioAuth` per (process, Label Studio, key) is shared by every caller (`shared_auth`), so a
process does one exchange per access-token lifetime. Keys and tokens never reach a log line or an
exception message.

`LabelStudioAPI` is the authenticated transport (personal access token exchange, 401 renewal);
`LabelStudioClient` knows the endpoints (write one prediction or many, read a project, read tasks back
through its task list, list its tasks) and what their answers mean. Both raise CarError subclasses whose `retryable` says whether asking again may help.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import requests

from car_backend.engine.errors import CarError
from car_backend.labelstudio.access import Access

log = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
EXPIRY_MARGIN_S = 30.0  # renew this long before the access token expires
DEFAULT_ACCESS_LIFETIME_S = 300.0


class LabelStudioError(CarError):
    """Label Studio cannot be reached or refuses the key (or none is configured). Never holds a token.

    Retryable: Label Studio coming back, or the operator fixing the key, makes the same call succeed."""

    retryable = True


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT (unverified), or None when `token` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """The Authorization header for one Label Studio and one key; thread-safe."""

    def __init__(self, url: str, api_key: str, timeout: tuple[float, float] = (5.0, 30.0)):
        self.url = url.rstrip("/")
        self._key = api_key
        self._timeout = timeout
        claims = jwt_claims(api_key) or {}
        self.kind = {"refresh": "pat", "access": "access"}.get(claims.get("token_type"), "legacy")
        self._lock = threading.Lock()
        self._access: str | None = None
        self._renew_at = 0.0

    def __repr__(self) -> str:
        return f"LabelStudioAuth(url={self.url!r}, kind={self.kind!r})"

    @property
    def refreshable(self) -> bool:
        return self.kind == "pat"

    def header(self) -> dict[str, str]:
        """{"Authorization": ...}, exchanging the personal access token first when needed."""
        if self.kind == "legacy":
            return {"Authorization": f"Token {self._key}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self._key}"}
        with self._lock:
            if self._access is None or time.monotonic() >= self._renew_at:
                self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self, header: dict[str, str]) -> None:
        """Forget the access token in `header` (Label Studio answered 401 to it); a newer one is kept."""
        with self._lock:
            if self._access is not None and header.get("Authorization") == f"Bearer {self._access}":
                self._access = None

    def _exchange(self) -> None:
        started = time.monotonic()
        try:
            resp = requests.post(self.url + REFRESH_PATH, json={"refresh": self._key}, timeout=self._timeout)
        except requests.RequestException as exc:
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url} to exchange the personal access token: "
                f"{type(exc).__name__}"
            ) from None
        if resp.status_code != 200:
            detail = (
                "the personal access token is invalid, expired or revoked"
                if resp.status_code in (400, 401)
                else "unexpected answer"
            )
            raise LabelStudioError(
                f"Label Studio at {self.url} refused LABEL_STUDIO_API_KEY at {REFRESH_PATH} "
                f"(HTTP {resp.status_code}): {detail}"
            )
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise LabelStudioError(
                f"Label Studio at {self.url} sent no access token from {REFRESH_PATH}"
            ) from None
        claims = jwt_claims(access) or {}
        lifetime = DEFAULT_ACCESS_LIFETIME_S
        if isinstance(claims.get("exp"), int | float) and isinstance(claims.get("iat"), int | float):
            lifetime = float(claims["exp"] - claims["iat"])  # immune to clock skew between the two machines
        self._access = access
        self._renew_at = started + max(lifetime - EXPIRY_MARGIN_S, lifetime / 2)
        log.debug("exchanged the personal access token at %s (access token lives %.0f s)", self.url, lifetime)


_shared: dict[tuple[int, str, str], LabelStudioAuth] = {}
_shared_lock = threading.Lock()


def shared_auth(url: str, api_key: str) -> LabelStudioAuth:
    """The process-wide LabelStudioAuth for this Label Studio and key."""
    key = (os.getpid(), url.rstrip("/"), hashlib.sha256(api_key.encode()).hexdigest())
    with _shared_lock:
        auth = _shared.get(key)
        if auth is None:
            auth = _shared[key] = LabelStudioAuth(url, api_key)
        return auth


class LabelStudioAPI:
    """Minimal authenticated access to Label Studio's REST API (writing predictions, listing tasks).

    `request` adds the Authorization header and, for a personal access token, retries once with a fresh
    access token after a 401. It returns the response whatever its status; the caller checks it.
    """

    def __init__(self, settings: Access, timeout: tuple[float, float] = (5.0, 60.0)):
        if not settings.label_studio_url:
            raise LabelStudioError("LABEL_STUDIO_URL is not set")
        if not settings.label_studio_api_key:
            raise LabelStudioError("LABEL_STUDIO_API_KEY is not set")
        self.url = settings.label_studio_url.rstrip("/")
        self.auth = shared_auth(self.url, settings.label_studio_api_key)
        self._timeout = timeout
        self._local = threading.local()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """`path` is relative to LABEL_STUDIO_URL (e.g. "/api/predictions/"); kwargs go to requests."""
        kwargs.setdefault("timeout", self._timeout)
        extra_headers = kwargs.pop("headers", None) or {}
        header = self.auth.header()
        resp = self._send(method, path, {**extra_headers, **header}, kwargs)
        if resp.status_code == 401 and self.auth.refreshable:
            self.auth.invalidate(header)
            resp = self._send(method, path, {**extra_headers, **self.auth.header()}, kwargs)
        return resp

    def _send(
        self, method: str, path: str, headers: dict[str, str], kwargs: dict[str, Any]
    ) -> requests.Response:
        try:
            return self._session().request(method, self.url + path, headers=headers, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url}{path}: {type(exc).__name__}"
            ) from None

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session


TASK_PAGE_SIZE = 100
READ_BACK_CHUNK = 100  # task ids per read-back request (project_tasks): a query string of about 1 KB


class LabelStudioAPIError(CarError):
    """A Label Studio API call failed. `retryable`: asking again later may succeed; `status`: the HTTP status
    Label Studio answered (None when there was no answer: a transport error or timeout, whose request may or
    may not have been acted on)."""

    def __init__(self, message: str, retryable: bool | None = None, status: int | None = None):
        super().__init__(message, retryable=retryable)
        self.status = status


class LabelStudioClient:
    """The endpoints the service calls, over one `LabelStudioAPI`. Every method raises LabelStudioAPIError
    (retryable for transport errors, 401/403/408/429 and 5xx) when the call fails; built without URL or key,
    the constructor raises it (not retryable)."""

    def __init__(self, settings: Access, read_timeout: float = 60.0):
        try:
            self._api = LabelStudioAPI(settings, timeout=(min(5.0, read_timeout), read_timeout))
        except LabelStudioError as exc:
            raise LabelStudioAPIError(str(exc), retryable=False) from None

    def create_prediction(self, task_id: int, entry: dict[str, Any]) -> dict:
        """POST /api/predictions for one task; `entry` is a /predict entry with a `result` list."""
        body = {
            "task": task_id,
            "result": entry["result"],
            "score": entry.get("score"),
            "model_version": entry["model_version"],
        }
        return self._json("POST", "/api/predictions/", json=body, expect=(200, 201))

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> Any:
        """POST /api/projects/<id>/import/predictions: many predictions of one project in one request (what
        label-studio-sdk's `projects.import_predictions` sends). Each item: `task`, `result`, `score`,
        `model_version`. Where Label Studio lacks the endpoint the error's `status` is 404 or 405."""
        return self._json("POST", f"/api/projects/{int(project_id)}/import/predictions", json=predictions,
                          expect=(200, 201))

    def project_tasks(self, project_id: int, task_ids: Sequence[int]) -> dict[int, dict]:
        """The tasks `task_ids` of project `project_id` as Label Studio stores them (`data`, `project`,
        `predictions`), by id; a task missing from the answer is not in that project (another project's, or
        deleted). GET /api/tasks/?project=&fields=all&query={"selectedItems": {"all": false, "included": ids}}
        (READ_BACK_CHUNK ids a request): the Data Manager's task list, which asks no ML backend for predictions
        (only with the deprecated `evaluate_predictions_automatically` project option). Not GET
        /api/tasks/<id>/: for a task without any prediction, it calls this backend's /predict and waits for
        the answer, which may wait on the very worker reading the task back."""
        ids = list(dict.fromkeys(int(t) for t in task_ids))
        found: dict[int, dict] = {}
        for start in range(0, len(ids), READ_BACK_CHUNK):
            chunk = ids[start:start + READ_BACK_CHUNK]
            selected = {"selectedItems": {"all": False, "included": chunk}}
            body = self._json("GET", "/api/tasks/", params={
                "project": int(project_id), "fields": "all", "page": 1, "page_size": len(chunk),
                "query": json.dumps(selected, separators=(",", ":"))})
            tasks = body.get("tasks") if isinstance(body, dict) else body
            if not isinstance(tasks, list):
                raise LabelStudioAPIError("Label Studio answered GET /api/tasks/ with no task list", retryable=True)
            wanted = set(chunk)
            found.update((t["id"], t) for t in tasks if isinstance(t, dict) and t.get("id") in wanted)
        return found

    def project(self, project_id: int) -> dict:
        return self._json("GET", f"/api/projects/{project_id}/")

    def annotation(self, annotation_id: int) -> dict | None:
        """GET /api/annotations/<id>/: the annotation as Label Studio stores it (`result`, `task`, `project`,
        `was_cancelled`), or None when Label Studio has no such annotation (404)."""
        path = f"/api/annotations/{int(annotation_id)}/"
        resp = self._call("GET", path)
        if resp.status_code == 404:
            return None
        found = self._check(resp, f"GET {path}", (200,))
        if not isinstance(found, dict):
            raise LabelStudioAPIError(f"Label Studio answered GET {path} with no annotation object", retryable=False)
        return found

    def project_task(self, project_id: int, task_id: int) -> dict | None:
        """Task `task_id` as project `project_id` holds it, or None when the project has no such task; read
        through the project's task list (`project_tasks`), never GET /api/tasks/<id>/."""
        return self.project_tasks(project_id, [task_id]).get(int(task_id))

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
            raise LabelStudioAPIError(str(exc), retryable=True) from None

    @staticmethod
    def _check(resp, what: str, expect: tuple[int, ...]) -> Any:
        if resp.status_code not in expect:
            retryable = resp.status_code in (401, 403, 408, 429) or resp.status_code >= 500
            raise LabelStudioAPIError(
                f"Label Studio answered {what} with HTTP {resp.status_code}: {resp.text[:200]}", retryable,
                status=resp.status_code)
        try:
            return resp.json()
        except ValueError:
            raise LabelStudioAPIError(f"Label Studio answered {what} with a body that is not JSON", retryable=True) from None


def prediction_versions(task: dict) -> set[str]:
    """The model versions of the predictions a task (from GET /api/tasks?fields=all) already has."""
    versions = {p.get("model_version") for p in task.get("predictions") or () if isinstance(p, dict)}
    listed = task.get("predictions_model_versions")
    if isinstance(listed, list):
        versions.update(listed)
    elif isinstance(listed, str):
        versions.update(v.strip() for v in listed.split(","))
    return {v for v in versions if isinstance(v, str) and v}
