"""The HTTP side of the Label Studio ML backend protocol, served by gunicorn.

    GET  /, /health  {"status": "UP"|"DEGRADED", "model_version", "mode", "redis", "queue", "workers"}
    POST /setup      {"model_version", "targets": [...], "skipped": [...]}      (parses the config only)
    POST /predict    {"results": [one entry per task, in order], "model_version"}
    POST /webhook    {"status": "queued"|"ignored", ...}  annotation events queue a review (car_backend.feedback)
    GET  /versions   {"versions": [...]}
    GET  /metrics    Prometheus text

No route loads model weights: jobs run in workers (or the embedded worker thread), so /health and /setup
stay fast while inference runs. With BASIC_AUTH_USER/PASS set, every route requires them.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import socket
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from redis import RedisError
from werkzeug.exceptions import HTTPException

from car_backend.feedback import REVIEWED_ACTIONS, annotation_event, review_annotation
from car_backend.labelstudio.config import LabelConfigError
from car_backend.metrics import Metrics
from car_backend.predictor import Predictor, output_targets
from car_backend.projects import Projects, model_version
from car_backend.service import Backend
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# /predict waits for jobs on a request thread; /health must still answer, so a few threads are always there.
MIN_HTTP_THREADS = 4


class RequestError(Exception):
    pass


def create_app(settings: Settings, backend: Backend | None = None) -> Flask:
    backend = backend or Backend(settings)
    metrics = Metrics()
    metrics.watch(backend.snapshot)
    projects = Projects(settings, backend.store)
    predictor = Predictor(settings, backend.queue, backend.store, metrics,
                          owner=f"predict:{socket.gethostname()}:{os.getpid()}")
    default_version = model_version(settings)

    app = Flask("car_backend")
    app.extensions["car_backend"] = backend

    @app.before_request
    def authenticate() -> Any:
        g.started = time.monotonic()
        if settings.basic_auth_user and not _authorized(settings):
            return _json({"error": "authentication required"}, 401,
                         headers={"WWW-Authenticate": 'Basic realm="car-backend"'})
        return None

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unknown"
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.request_seconds.labels(endpoint=endpoint).observe(time.monotonic() - g.get("started", 0.0))
        return response

    @app.errorhandler(RequestError)
    def bad_request(exc: RequestError) -> Response:
        return _json({"error": str(exc)}, 400)

    @app.errorhandler(LabelConfigError)
    def bad_config(exc: LabelConfigError) -> Response:
        return _json({"error": f"label config: {exc}"}, 400)

    @app.errorhandler(RedisError)
    def redis_down(exc: RedisError) -> Response:
        log.error("%s %s: Redis is unavailable (%s)", request.method, request.path, exc)
        return _json({"error": f"the job queue's Redis is unavailable ({exc}); try again later"}, 503)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _json({"error": exc.description}, exc.code or 500)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.path)
        return _json({"error": f"internal error ({type(exc).__name__})"}, 500)

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        body: dict[str, Any] = {"status": "UP", "model_class": "CaR", "model_version": default_version,
                                "mode": backend.mode}
        try:
            snap = backend.snapshot()
        except RedisError as exc:
            # Still 200: Label Studio disconnects on a failed /health, and /predict answers every task with a
            # pending entry until Redis is back, so the backend recovers without anyone reconnecting it.
            body.update(status="DEGRADED", redis="down", detail=f"the job queue's Redis is unavailable: {exc}")
        else:
            body.update(redis="ok", queue={"name": settings.queue, **snap["depth"]}, workers=snap["workers"])
        return _json(body)

    @app.post("/setup")
    def setup() -> Response:
        body = _body()
        schema = body.get("schema") or body.get("label_config")
        if not isinstance(schema, str) or not schema.strip():
            raise RequestError("the body needs the label config under 'schema'")
        project = projects.setup(body.get("project"), schema, body.get("extra_params"))
        config = project.config
        return _json({
            "model_version": project.version,
            "targets": [{
                "from_name": t.from_name, "to_name": t.to_name, "image": t.data_key,
                "type": f"{t.kind}labels",
                "labels": [label.value for label in t.labels],
                "dynamic_labels": t.dynamic_key, "referring": t.referring_key,
                "preset": t.preset or config.preset or settings.preset,
            } for t in output_targets(config, settings)],
            "skipped": list(config.skipped),
        })

    @app.post("/predict")
    def predict() -> Response:
        body = _body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RequestError("the body needs a 'tasks' list")
        if not all(isinstance(task, dict) for task in tasks):
            raise RequestError("every item of 'tasks' must be a JSON object")
        label_config = body.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise RequestError("the body needs the project's 'label_config'")
        project = projects.for_predict(body.get("project"), label_config)
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        entries = predictor.predict(tasks, project, context=params.get("context"))
        kinds = [("result" in e) for e in entries]
        log.info("/predict: %d tasks, %d answered, %d pending, %.2f s", len(tasks), sum(kinds),
                 len(kinds) - sum(kinds), time.monotonic() - g.started)
        return _json({"results": entries, "model_version": project.version})

    @app.post("/webhook")
    def webhook() -> Response:
        body = request.get_json(force=True, silent=True)
        if body is None:
            raise RequestError("the body is not JSON")
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        action = body.get("action")
        if action not in REVIEWED_ACTIONS:
            log.debug("/webhook: %s (ignored)", action)
            return _json({"status": "ignored", "action": action,
                          "detail": "CaR needs no training; only annotation events are used (to calibrate)"})
        try:
            event = annotation_event(body, projects, settings)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        except LabelConfigError as exc:
            raise RequestError(f"the project's label config cannot be used: {exc}") from exc
        if isinstance(event, str):
            return _json({"status": "ignored", "action": action, "detail": event})
        job = backend.queue.submit_call(review_annotation, (event,),
                                        description=f"review task {event.task} of project {event.project}")
        return _json({"status": "queued", "action": action, "job": job})

    @app.get("/versions")
    def versions() -> Response:
        return _json({"versions": [default_version]})

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    return app


def _body() -> dict:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def _authorized(settings: Settings) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    return user_ok and pass_ok


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def gunicorn_options(settings: Settings, host: str, port: int) -> dict:
    return {
        "bind": f"{host}:{port}",
        "workers": 1,  # one process: the embedded worker, the config cache and the metrics live in it
        "worker_class": "gthread",
        "threads": max(settings.http_threads, MIN_HTTP_THREADS),
        "timeout": 0,  # /predict may wait CAR_PREDICT_WAIT seconds; never kill the worker for that
        "graceful_timeout": int(settings.predict_wait) + 5,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "control_socket_disable": True,  # one fixed path per user: several servers on a host would collide
    }


def main(args: argparse.Namespace, settings: Settings) -> int:
    from gunicorn.app.base import BaseApplication

    host = args.host or settings.host
    port = args.port or settings.port
    options = gunicorn_options(settings, host, port)
    if settings.http_threads < MIN_HTTP_THREADS:
        log.info("serving with %d HTTP threads (CAR_HTTP_THREADS=%d is below the minimum that keeps /health "
                 "answering while /predict waits)", options["threads"], settings.http_threads)
    state: dict[str, Flask] = {}

    def worker_exit(server, worker) -> None:
        app = state.get("app")
        if app is not None:
            app.extensions["car_backend"].close()

    class Server(BaseApplication):
        def load_config(self) -> None:
            for name, value in {**options, "worker_exit": worker_exit}.items():
                self.cfg.set(name, value)

        def load(self) -> Flask:
            # Runs in the gunicorn worker process, after the fork: threads and the embedded Redis start here.
            state["app"] = create_app(settings)
            return state["app"]

    log.info("car-backend serving on http://%s:%d (model_version %s)", host, port, model_version(settings))
    Server().run()
    return 0
