"""A stand-in for Label Studio on 127.0.0.1: its API, images that misbehave on request, and exact routes.

    with FakeLabelStudio() as ls:              # or: ls = FakeLabelStudio().start() ... ls.stop()
        ls.routes["/data/upload/1/a.png"] = Reply(body=png, headers={"Content-Type": "image/png"})
        ls.protected.add("/data/upload/1/a.png")
        ...

Authentication, as Label Studio's: POST /api/token/refresh/ exchanges the personal access token (`api_key`,
PAT by default) for an access token; requests then send `Authorization: Bearer <access token>` (or
`Token <legacy_token>` when one is set). `revoke_access()` forgets every access token given out, as expiry
would; `reject_pat` makes the exchange answer 401.

Routes, in this order:

1. `routes`: exact paths (with their query) -> a Reply, or a callable() -> Reply, for any method. Paths in
   `protected` need authorization (else 401), as Label Studio's /data/upload/ does.
2. The recorded API (always authorized): POST /api/predictions/ (recorded in `predictions`),
   GET /api/projects/<id>/, GET /api/annotations/<id>/ (`add_annotation`), GET /api/ml/?project=, GET /api/tasks/?project=&page=&page_size= (paginated,
   with the recorded predictions; with `query={"selectedItems": {"all": false, "included": [ids]}}` the
   project's tasks of those ids among those added with `add_project`/`add_tasks`, as the Data Manager's list
   does, each selected id counted in `task_list_reads`). `add_project` sets a project's label config, tasks and extra params.
   Delivery (in `_delivery_api`): GET /api/tasks/<id>/ (a task added with `add_project`/`add_tasks`, with
   its recorded predictions; like Label Studio, for a task without any prediction it first calls the ML
   backend's /predict at `backend_url`, when set, waits for the answer (`predict_timeout`) and stores what
   it returns; counted in `backend_predicts`), POST /api/projects/<id>/import/predictions (a list of predictions; 404 while
   `bulk_missing`); `prediction_counts()` counts stored predictions per (task, model_version).
   Faults: `go_down(seconds, mode)` makes every /api/ request answer 503 (mode "503") or drop the
   connection (mode "refuse") for a while; `slow_first_writes = seconds` stores each task's first write,
   then answers it that late (after the client's timeout); `faults_served` counts requests that met one.
3. Images, unauthenticated (same origin, but not a media path: the media fetcher sends no key): /img/<name> (a picture derived
   from the name), /slow/<seconds>/<name> (answers late), /flaky/<n>/<name> (HTTP 503 the first n times),
   /bad/<name> (bytes that are no image). `hits` counts requests per "img/<name>", "slow/<name>", ...
4. Anything else: 404.

Every request is recorded in `seen` (method, path with query, Authorization header).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import requests
from PIL import Image

HOST = "127.0.0.1"  # loopback only
DOWN_ARMED_S = 3600.0  # how long an outage armed to start with the next request waits for it


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


PAT = (
    "eyJhbGciOiJIUzI1NiJ9."
    + _b64({"token_type": "refresh", "exp": 4102444800, "iat": 1700000000, "jti": "pat-1"})
    + ".c2lnbmF0dXJlLW9mLXRoZS1wYXQ"
)


def make_access_token(serial: int, lifetime: float) -> str:
    """A JWT-shaped access token, valid for `lifetime` seconds from now by its claims; unique per `serial`."""
    now = time.time()
    claims = {"token_type": "access", "iat": now, "exp": now + lifetime, "jti": f"access-{serial}"}
    return f"eyJhbGciOiJIUzI1NiJ9.{_b64(claims)}.c2VjcmV0LWFjY2Vzcy1zaWduYXR1cmU{serial}"


def image_bytes(name: str, size: tuple[int, int] = (96, 64)) -> bytes:
    """PNG bytes of a `size` (W, H) picture derived from `name`: two flat colour halves."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = rng.integers(0, 255, 3)
    pixels[:, w // 2:] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def query(path: str) -> dict[str, list[str]]:
    """The query of a recorded path, parsed."""
    return parse_qs(urlsplit(path).query)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the body is sent
    chunked: bool = False  # no Content-Length; the body goes out in pieces, then the connection closes
    drop: bool = False  # close the connection without answering (a refused or reset connection)


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


def _json(status: int, obj) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})


_UNAUTHORIZED = {"detail": "Authentication credentials were not provided."}
_PNG = {"Content-Type": "image/png"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many workers fetch at once in the service tests and benchmark


class FakeLabelStudio:
    def __init__(self, access_lifetime: float = 300.0, legacy_token: str | None = None, api_key: str = PAT):
        self.api_key = api_key
        self.access_lifetime = access_lifetime
        self.legacy_token = legacy_token
        self.reject_pat = False
        self.routes: dict[str, Reply | Callable[[], Reply]] = {}
        self.annotations: dict[int, dict] = {}  # GET /api/annotations/<id>/ (add_annotation)
        self.annotation_reads: Counter = Counter()  # id as requested -> reads
        self.task_list_reads: Counter = Counter()  # task id -> reads of the task list that selected it
        self.protected: set[str] = set()
        self.seen: list[Seen] = []
        self.refreshes = 0
        self.access_token: str | None = None  # the latest one given out
        self.predictions: list[dict] = []
        self.projects: dict[int, dict] = {}  # id -> {"label_config", "tasks", "extra_params"}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._access: set[str] = set()  # every access token given out and not revoked
        self._flaky: dict[str, int] = defaultdict(int)
        self._init_delivery_faults()
        self._server = _Server((HOST, 0), self._handler())
        self.port = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> FakeLabelStudio:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeLabelStudio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- for tests ----

    def add_project(self, project_id: int, label_config: str, tasks: list[dict], extra_params=None,
                    created: int | None = None) -> None:
        """`created`: the project's creation time (unix seconds), served as `created_at` when given."""
        with self.lock:
            self.projects[project_id] = {"label_config": label_config, "tasks": tasks, "extra_params": extra_params,
                                         "created": created}
        self.add_tasks(project_id, tasks)

    def predictions_for(self, task_id: int) -> list[dict]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == task_id]

    def wait_for_predictions(self, task_ids, timeout: float) -> dict[int, list[dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {t: self.predictions_for(t) for t in task_ids}
            if all(found.values()):
                return found
            time.sleep(0.1)
        return {t: self.predictions_for(t) for t in task_ids}

    def revoke_access(self) -> None:
        """Forget the access tokens given out, as expired ones would be: their next use gets 401."""
        with self.lock:
            self.access_token = None
            self._access.clear()

    def authorized(self, header: str | None) -> bool:
        with self.lock:
            if self.legacy_token and header == f"Token {self.legacy_token}":
                return True
            return bool(header) and header.startswith("Bearer ") and header[7:] in self._access

    def seen_paths(self, prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(prefix)]

    # ---- delivery: tasks read back, bulk import, faults, counts ----

    def _init_delivery_faults(self) -> None:
        self.tasks: dict[int, dict] = {}  # id -> {"project", "data"}
        self.backend_url: str | None = None  # the ML backend GET /api/tasks/<id>/ asks for predictions
        self.predict_timeout = 100.0  # Label Studio's ML_TIMEOUT_PREDICT
        self.backend_predicts: Counter = Counter()  # task id -> /predict calls its GET /api/tasks/<id>/ made
        self.bulk_missing = False
        self.bulk_requests = 0
        self.slow_first_writes = 0.0
        self._slowed: set[int] = set()
        self._down_until = 0.0
        self._down_for = 0.0
        self._down_mode = "503"
        self.faults_served = 0

    def add_tasks(self, project_id: int, tasks: list[dict]) -> None:
        """Make tasks ({"id", "data"}) of `project_id` readable at GET /api/tasks/<id>/."""
        with self.lock:
            for task in tasks:
                self.tasks[task["id"]] = {"project": project_id, "data": task.get("data", {})}

    def go_down(self, seconds: float, mode: str = "503", from_first_request: bool = False) -> None:
        """Every /api/ request answers 503 (mode "503") or has its connection dropped ("refuse") for `seconds`,
        from now or (`from_first_request`) from the next /api/ request on that is not a token exchange (so
        images fetched with the key before it still work)."""
        with self.lock:
            self._down_for = seconds if from_first_request else 0.0
            self._down_until = time.monotonic() + (DOWN_ARMED_S if from_first_request else seconds)
            self._down_mode = mode

    def prediction_counts(self) -> Counter:
        """Stored predictions per (task, model_version)."""
        with self.lock:
            return Counter((p["task"], p["model_version"]) for p in self.predictions)

    def _fault(self, path: str) -> Reply | None:
        if not path.startswith("/api/"):
            return None
        with self.lock:
            if time.monotonic() >= self._down_until:
                return None
            if self._down_for:  # armed: the outage starts with this request, unless it is a token exchange
                if path == "/api/token/refresh/":
                    return None
                self._down_until = time.monotonic() + self._down_for
                self._down_for = 0.0
            self.faults_served += 1
            mode = self._down_mode
        return Reply(drop=True) if mode == "refuse" else _json(503, {"detail": "Service Unavailable"})

    def _late_answer(self, task_ids: list[int], reply: Reply) -> Reply:
        """`reply`, sent `slow_first_writes` seconds late when it answers some task's first write."""
        with self.lock:
            first = [t for t in task_ids if t not in self._slowed]
            self._slowed.update(task_ids)
        if self.slow_first_writes and first:
            reply.delay = self.slow_first_writes
            with self.lock:
                self.faults_served += 1
        return reply

    def _delivery_api(self, method: str, parts: list[str], body: bytes) -> Reply | None:
        if method == "GET" and len(parts) == 3 and parts[1] == "tasks" and parts[2].isdigit():
            task_id = int(parts[2])
            with self.lock:
                task = self.tasks.get(task_id)
                if task is None:
                    return _json(404, {"detail": "Not found."})
                predictions = [p for p in self.predictions if p["task"] == task_id]
            if not predictions and self.backend_url:
                predictions = self._ask_backend(task_id, task)
            return _json(200, {"id": task_id, "project": task["project"], "data": task["data"],
                               "predictions": predictions})
        if method == "POST" and len(parts) == 5 and parts[1] == "projects" and parts[3:] == ["import", "predictions"]:
            with self.lock:
                self.bulk_requests += 1
            if self.bulk_missing:
                return _json(404, {"detail": "Not found."})
            try:
                items = json.loads(body)
            except ValueError:
                items = None
            if not isinstance(items, list) or not all(
                    isinstance(i, dict) and isinstance(i.get("task"), int) and isinstance(i.get("result"), list)
                    and isinstance(i.get("model_version"), str) for i in items):
                return _json(400, {"detail": "a list of predictions is expected"})
            with self.lock:
                now = time.time()
                for item in items:
                    self.predictions.append({**item, "id": len(self.predictions) + 1, "at": now})
            return self._late_answer([i["task"] for i in items], _json(201, {"created": len(items)}))
        return None

    def _ask_backend(self, task_id: int, task: dict) -> list[dict]:
        """What Label Studio's task GET does for a task without predictions: POST the ML backend's /predict
        with this one task and wait for it; the predictions then stored (an entry with a `result`)."""
        with self.lock:
            self.backend_predicts[task_id] += 1
            project = self.projects.get(task["project"], {})
        created = project.get("created")
        body = {"tasks": [{"id": task_id, "data": task["data"]}], "label_config": project.get("label_config", ""),
                "project": f"{task['project']}.{created}" if created is not None else str(task["project"])}
        try:
            resp = requests.post(f"{self.backend_url}/predict", json=body, timeout=self.predict_timeout)
            results = resp.json().get("results") if resp.ok else None
        except (requests.RequestException, ValueError):
            results = None
        entry = results[0] if isinstance(results, list) and len(results) == 1 else None
        if not isinstance(entry, dict) or not isinstance(entry.get("result"), list):
            return []
        record = {"task": task_id, "result": entry["result"], "score": entry.get("score"),
                  "model_version": entry.get("model_version", "")}
        with self.lock:
            record.update(id=len(self.predictions) + 1, at=time.time())
            self.predictions.append(record)
        return [record]

    # ---- answers ----

    def _answer(self, method: str, target: str, body: bytes, authorization: str | None) -> Reply:
        self.seen.append(Seen(method, target, authorization))
        route = self.routes.get(target)
        if route is not None:
            if target in self.protected and not self.authorized(authorization):
                return _json(401, _UNAUTHORIZED)
            return route() if callable(route) else route
        parts = urlsplit(target)
        path, args = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        fault = self._fault(path)
        if fault is not None:
            return fault
        if method == "POST" and path == "/api/token/refresh/":
            return self._refresh(body)
        if path.startswith("/api/"):
            if not self.authorized(authorization):
                return _json(401, _UNAUTHORIZED)
            return self._api(method, path, args, body)
        if method == "GET":
            return self._image(path.strip("/").split("/"))
        return _json(404, {"detail": "Not found."})

    def _refresh(self, body: bytes) -> Reply:
        with self.lock:
            self.refreshes += 1
            refresh = _object(body).get("refresh")
            if self.reject_pat or refresh != self.api_key:
                return _json(401, {"detail": "Token is invalid or expired"})
            self.access_token = make_access_token(self.refreshes, self.access_lifetime)
            self._access.add(self.access_token)
            return _json(200, {"access": self.access_token})

    def _api(self, method: str, path: str, args: dict[str, str], body: bytes) -> Reply:
        parts = path.strip("/").split("/")  # ["api", ...]
        delivery = self._delivery_api(method, parts, body)
        if delivery is not None:
            return delivery
        if method == "POST" and parts == ["api", "predictions"]:
            return self._create_prediction(_object(body))
        if method != "GET":
            return _json(405, {"detail": f'Method "{method}" not allowed.'})
        if len(parts) == 3 and parts[1] == "annotations":
            return self._annotation(parts[2])
        if len(parts) == 3 and parts[1] == "projects" and parts[2].isdigit():
            project_id = int(parts[2])
            if project_id not in self.projects:
                return _json(404, {"detail": "Not found."})
            project = self.projects[project_id]
            body = {"id": project_id, "label_config": project["label_config"]}
            if project.get("created") is not None:
                body["created_at"] = datetime.fromtimestamp(project["created"], timezone.utc).isoformat().replace(
                    "+00:00", "Z")
            return _json(200, body)
        if parts == ["api", "ml"]:
            found = self.projects.get(_int(args.get("project")))
            if not found or found["extra_params"] is None:
                return _json(200, [])
            return _json(200, [{"id": 1, "url": "http://backend", "extra_params": found["extra_params"]}])
        if parts == ["api", "tasks"]:
            return self._tasks(args)
        return _json(404, {"detail": "Not found."})

    def add_annotation(self, annotation_id: int, task_id: int, project_id: int, result: list[dict],
                       **fields) -> None:
        """Store an annotation as Label Studio would (GET /api/annotations/<id>/ returns it); `fields` adds
        or overrides keys (e.g. was_cancelled=True)."""
        with self.lock:
            self.annotations[annotation_id] = {"id": annotation_id, "task": task_id, "project": project_id,
                                               "result": result, "was_cancelled": False, **fields}

    def _annotation(self, annotation_id: str) -> Reply:
        with self.lock:
            self.annotation_reads[annotation_id] += 1
            found = self.annotations.get(int(annotation_id)) if annotation_id.isdigit() else None
        return _json(200, found) if found is not None else _json(404, {"detail": "Not found."})

    def _create_prediction(self, body: dict) -> Reply:
        if not isinstance(body.get("task"), int) or not isinstance(body.get("result"), list) \
                or not isinstance(body.get("model_version"), str):
            return _json(400, {"detail": "bad prediction"})
        with self.lock:
            record = {**body, "id": len(self.predictions) + 1, "at": time.time()}
            self.predictions.append(record)
        return self._late_answer([body["task"]], _json(201, record))

    def _tasks(self, args: dict[str, str]) -> Reply:
        project_id = _int(args.get("project"))
        if "query" in args:
            return self._selected_tasks(project_id, args)
        found = self.projects.get(project_id)
        if not found:
            return _json(404, {"detail": "Not found."})
        page, size = _int(args.get("page"), 1), _int(args.get("page_size"), 100)
        everything = found["tasks"]
        chunk = everything[(page - 1) * size: page * size]
        if page > 1 and not chunk:
            return _json(404, {"detail": "Invalid page."})
        with self.lock:
            chunk = [{**t, "predictions": [p for p in self.predictions if p["task"] == t["id"]]} for t in chunk]
        return _json(200, {"tasks": chunk, "total": len(everything)})

    def _selected_tasks(self, project_id: int | None, args: dict[str, str]) -> Reply:
        """The Data Manager's list for `query`'s selected ids: tasks of `project_id` only, with their
        predictions; it asks no ML backend for predictions."""
        try:
            selected = json.loads(args["query"])["selectedItems"]
            included = {int(i) for i in selected["included"]} if selected.get("all") is False else None
        except (ValueError, KeyError, TypeError):
            return _json(400, {"detail": "selectedItems must be dict"})
        with self.lock:
            if project_id not in self.projects and all(t["project"] != project_id for t in self.tasks.values()):
                return _json(404, {"detail": "Not found."})
            ids = sorted(i for i, t in self.tasks.items()
                         if t["project"] == project_id and (included is None or i in included))
            self.task_list_reads.update(included or ())
            size = _int(args.get("page_size"), 100)
            chunk = [{"id": i, "project": project_id, "data": self.tasks[i]["data"],
                      "predictions": [p for p in self.predictions if p["task"] == i]} for i in ids[:size]]
        return _json(200, {"tasks": chunk, "total": len(ids)})

    def _hit(self, key: str) -> None:
        with self.lock:
            self.hits[key] += 1

    def _image(self, parts: list[str]) -> Reply:
        kind, name = parts[0], parts[-1]
        if (kind, len(parts)) == ("img", 2):
            self._hit(f"img/{name}")
            return Reply(body=image_bytes(name), headers=_PNG)
        if (kind, len(parts)) == ("slow", 3) and _float(parts[1]) is not None:
            self._hit(f"slow/{name}")
            time.sleep(_float(parts[1]))
            return Reply(body=image_bytes(name), headers=_PNG)
        if (kind, len(parts)) == ("flaky", 3) and parts[1].isdigit():
            with self.lock:
                self._flaky[name] += 1
                attempt = self._flaky[name]
                self.hits[f"flaky/{name}"] += 1
            if attempt <= int(parts[1]):
                return Reply(503, b"busy", {"Content-Type": "text/plain"})
            return Reply(body=image_bytes(name), headers=_PNG)
        if (kind, len(parts)) == ("bad", 2):
            self._hit(f"bad/{name}")
            return Reply(body=b"these bytes are not an image", headers=_PNG)
        return Reply(404, b"not found")

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _dispatch(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(fake._answer(self.command, self.path, body, self.headers.get("Authorization")))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

            def _send(self, reply: Reply) -> None:
                if reply.drop:
                    self.close_connection = True
                    return
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    if reply.chunked:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        time.sleep(reply.delay)
                        for i in range(0, len(reply.body), 4096):
                            self.wfile.write(reply.body[i: i + 4096])
                        return
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    time.sleep(reply.delay)
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def _object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _int(text: str | None, default: int | None = None) -> int | None:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _float(text: str) -> float | None:
    """A finite number of seconds >= 0, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
