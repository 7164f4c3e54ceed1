"""A small stand-in for Label Studio's API, and an image server whose images misbehave on request.

API: POST /api/token/refresh/ (personal access token -> access token), POST /api/predictions/ (recorded),
GET /api/projects/<id>/, GET /api/ml/?project=, GET /api/tasks/?project=&page=&page_size= (paginated, with
the recorded predictions). Every API call needs `Authorization: Bearer <access token>`.

Images (same origin, so the media fetcher sends the key): /img/<name>.png (a picture derived from the
name), /slow/<seconds>/<name>.png (answers late), /flaky/<n>/<name>.png (HTTP 503 the first n times),
/bad/<name>.png (bytes that are no image).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections import Counter, defaultdict

import numpy as np
from flask import Flask, Response, abort, jsonify, request
from PIL import Image
from werkzeug.serving import make_server


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def make_jwt(token_type: str, lifetime: int = 300) -> str:
    now = int(time.time())
    claims = {"token_type": token_type, "iat": now, "exp": now + lifetime, "jti": hashlib.md5(
        str(time.monotonic_ns()).encode()).hexdigest()}
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}.c2lnbmF0dXJl"


def image_bytes(name: str, size: tuple[int, int] = (96, 64)) -> bytes:
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = rng.integers(0, 255, 3)
    pixels[:, w // 2:] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


class FakeLabelStudio:
    def __init__(self) -> None:
        self.api_key = make_jwt("refresh", lifetime=30 * 24 * 3600)
        self.lock = threading.Lock()
        self.predictions: list[dict] = []
        self.projects: dict[int, dict] = {}  # id -> {"label_config", "tasks", "extra_params"}
        self.hits: Counter[str] = Counter()
        self._access: set[str] = set()
        self._flaky: dict[str, int] = defaultdict(int)
        self.app = self._build()
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeLabelStudio:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    # helpers for tests
    def add_project(self, project_id: int, label_config: str, tasks: list[dict], extra_params=None) -> None:
        with self.lock:
            self.projects[project_id] = {"label_config": label_config, "tasks": tasks, "extra_params": extra_params}

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

    def _build(self) -> Flask:
        app = Flask("fake_label_studio")

        def authorized() -> bool:
            header = request.headers.get("Authorization", "")
            return header.startswith("Bearer ") and header[7:] in self._access

        @app.post("/api/token/refresh/")
        def refresh():
            if (request.get_json(silent=True) or {}).get("refresh") != self.api_key:
                return jsonify({"detail": "Token is invalid or expired"}), 401
            access = make_jwt("access")
            self._access.add(access)
            return jsonify({"access": access})

        @app.post("/api/predictions/")
        def create_prediction():
            if not authorized():
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            body = request.get_json(silent=True) or {}
            if not isinstance(body.get("task"), int) or not isinstance(body.get("result"), list) \
                    or not isinstance(body.get("model_version"), str):
                return jsonify({"detail": "bad prediction"}), 400
            with self.lock:
                record = {**body, "id": len(self.predictions) + 1, "at": time.time()}
                self.predictions.append(record)
            return jsonify(record), 201

        @app.get("/api/projects/<int:project_id>/")
        def project(project_id: int):
            if not authorized():
                abort(401)
            if project_id not in self.projects:
                abort(404)
            return jsonify({"id": project_id, "label_config": self.projects[project_id]["label_config"]})

        @app.get("/api/ml/")
        def ml_backends():
            if not authorized():
                abort(401)
            found = self.projects.get(request.args.get("project", type=int))
            if not found or found["extra_params"] is None:
                return jsonify([])
            return jsonify([{"id": 1, "url": "http://backend", "extra_params": found["extra_params"]}])

        @app.get("/api/tasks/")
        def tasks():
            if not authorized():
                abort(401)
            found = self.projects.get(request.args.get("project", type=int))
            if not found:
                abort(404)
            page, size = request.args.get("page", 1, type=int), request.args.get("page_size", 100, type=int)
            everything = found["tasks"]
            chunk = everything[(page - 1) * size: page * size]
            if page > 1 and not chunk:
                return jsonify({"detail": "Invalid page."}), 404
            with self.lock:
                chunk = [{**t, "predictions": [p for p in self.predictions if p["task"] == t["id"]]} for t in chunk]
            return jsonify({"tasks": chunk, "total": len(everything)})

        @app.get("/img/<name>")
        def image(name: str):
            self.hits[f"img/{name}"] += 1
            return Response(image_bytes(name), mimetype="image/png")

        @app.get("/slow/<float:seconds>/<name>")
        def slow(seconds: float, name: str):
            self.hits[f"slow/{name}"] += 1
            time.sleep(seconds)
            return Response(image_bytes(name), mimetype="image/png")

        @app.get("/flaky/<int:failures>/<name>")
        def flaky(failures: int, name: str):
            with self.lock:
                self._flaky[name] += 1
                attempt = self._flaky[name]
            self.hits[f"flaky/{name}"] += 1
            if attempt <= failures:
                return Response("busy", status=503)
            return Response(image_bytes(name), mimetype="image/png")

        @app.get("/bad/<name>")
        def bad(name: str):
            return Response(b"these bytes are not an image", mimetype="image/png")

        return app
