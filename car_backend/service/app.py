"""The HTTP side of the Label Studio ML backend protocol: the Flask app (`create_app`).

    GET  /, /health  {"status": "UP"|"DEGRADED", "model_version", "mode", "redis", "queue", "workers", "warnings"}
    POST /setup      {"model_version", "targets": [...], "skipped": [...]}      (parses the config only)
    POST /predict    {"results": [one entry per task, in order], "model_version"}
    POST /webhook    {"status": "queued"|"ignored", ...}  annotation events queue a review (review.jobs)
    GET  /versions   {"versions": [...]}
    GET  /metrics    Prometheus text

The routes are one blueprint (service.routes); request bodies are parsed in service.parsing. No route
loads model weights: jobs run in workers (or the embedded worker process), so /health and /setup stay fast
while inference runs. With BASIC_AUTH_USER/PASS set, every route requires them.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import time
from typing import Any

from flask import Flask, Response, g, request
from redis import RedisError
from werkzeug.exceptions import HTTPException

from car_backend.labelstudio.config import LabelConfigError
from car_backend.pipeline.versions import model_version
from car_backend.service.backend import Backend
from car_backend.service.metrics import Metrics
from car_backend.service.parsing import RequestError
from car_backend.service.predictor import Predictor
from car_backend.service.projects import Projects
from car_backend.service.routes import EXTENSION, Service, blueprint, json_response
from car_backend.settings import Settings

log = logging.getLogger(__name__)

def create_app(settings: Settings, backend: Backend | None = None) -> Flask:
    """The Flask app serving the protocol. `backend` defaults to a new Backend (which, without REDIS_URL,
    starts the embedded Redis and worker); `app.extensions["car_backend"].close()` stops it."""
    backend = backend or Backend(settings)
    metrics = Metrics()
    metrics.watch(backend.snapshot, backend.review_reports)
    service = Service(
        settings=settings, backend=backend, metrics=metrics,
        projects=Projects(settings, backend.store, backend.review),
        predictor=Predictor(settings, backend.queue, backend.store, metrics,
                            owner=f"predict:{socket.gethostname()}:{os.getpid()}",
                            workers_available=backend.workers_available),
        default_version=model_version(settings))

    app = Flask("car_backend")
    app.extensions[EXTENSION] = service

    @app.before_request
    def authenticate() -> Any:
        g.started = time.monotonic()
        if settings.basic_auth_user and not _authorized(settings):
            return json_response({"error": "authentication required"}, 401,
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
        return json_response({"error": str(exc)}, 400)

    @app.errorhandler(LabelConfigError)
    def bad_config(exc: LabelConfigError) -> Response:
        return json_response({"error": f"label config: {exc}"}, 400)

    @app.errorhandler(RedisError)
    def redis_down(exc: RedisError) -> Response:
        log.error("%s %s: Redis is unavailable (%s)", request.method, request.path, exc)
        return json_response({"error": f"the job queue's Redis is unavailable ({exc}); try again later"}, 503)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return json_response({"error": exc.description}, exc.code or 500)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.path)
        return json_response({"error": f"internal error ({type(exc).__name__})"}, 500)

    app.register_blueprint(blueprint)
    return app


def _authorized(settings: Settings) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    return user_ok and pass_ok
