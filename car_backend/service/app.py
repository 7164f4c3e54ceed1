"""The HTTP side of the Label Studio ML backend protocol: the Flask app (`create_app`).

    GET  /, /health  {"status": "UP"|"DEGRADED", "model_version", "mode", "redis", "queue", "workers",
                      "warnings", "pending_failures"}
    POST /setup      {"model_version", "targets": [...], "skipped": [...]}      (parses the config only)
    POST /predict    {"results": [one entry per task, in order], "model_version"}
    POST /webhook    {"status": "queued"|"ignored"|"already training", ...}  annotation events queue a review
                     (review.corrections), START_TRAINING a mask-head training (review.triggers.queue_fit)
    GET  /status     ?project=ID[&task=ID]: where a project's tasks are (service.status)
    GET  /versions   {"versions": [...]}
    GET  /metrics    Prometheus text

The routes are one blueprint (service.routes); request bodies are parsed in service.parsing. No route
loads model weights: jobs run in workers (or the embedded worker process), so /health and /setup stay fast
while inference runs.

With BASIC_AUTH_USER/PASS set (required by `serve` on a non-loopback HOST unless CAR_INSECURE_NO_AUTH), every
route requires them except two that Label Studio calls without them or that must answer a bare probe:
`/health` without an Authorization header answers only {"status": "UP"|"DEGRADED"}, and `/webhook` accepts
annotation events (Label Studio's project webhook carries no credentials; they are believed only for their
ids) but not START_TRAINING. Wrong credentials are answered 401 on every route, /health included, so
Label Studio's Connect Model says the credentials are wrong. Without credentials configured, every caller is
trusted: that is why only a loopback bind or the explicit insecure setting allows it (`serve_refusal`).
"""

from __future__ import annotations

import hmac
import ipaddress
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
from car_backend.service.parsing import RequestError, RequestTooLarge
from car_backend.service.predictor import Predictor
from car_backend.service.routes import EXTENSION, Service, blueprint, json_response, unauthorized
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
        projects=backend.projects,
        predictor=Predictor(settings, backend.queue, backend.state, metrics,
                            owner=f"predict:{socket.gethostname()}:{os.getpid()}",
                            workers_available=backend.workers_available),
        default_version=model_version(settings))

    service.warnings.extend(exposure_warnings(settings))
    for warning in service.warnings:
        log.warning("%s", warning)
    app = Flask("car_backend")
    app.extensions[EXTENSION] = service
    # Werkzeug stops reading a body without Content-Length (chunked) one byte past the limit, so a body that
    # reaches that byte is known to be too large (`authenticate` reads it, bounded, and answers 413).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1

    @app.before_request
    def authenticate() -> Any:
        g.started = time.monotonic()
        g.trusted = not settings.basic_auth_user or _authorized(settings)
        anonymous = "Authorization" not in request.headers and request.endpoint in OPEN_ENDPOINTS
        if not g.trusted and not anonymous:
            return unauthorized()
        if (request.content_length or 0) > settings.max_request_bytes:  # refused before the body is read
            return json_response({"error": _too_large(settings, request.content_length)}, 413,
                                 headers={"Connection": "close"})
        if request.content_length is None and request.method in ("POST", "PUT", "PATCH"):
            if len(request.get_data(cache=True)) > settings.max_request_bytes:  # read at most limit + 1 bytes
                return json_response({"error": _too_large(settings, None)}, 413, headers={"Connection": "close"})
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

    @app.errorhandler(RequestTooLarge)
    def too_much(exc: RequestTooLarge) -> Response:
        return json_response({"error": str(exc)}, 413)

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


# Routes a caller without an Authorization header may reach while basic auth is on: the bare probe and
# Label Studio's webhook events (the routes themselves refuse the rest: full /health, START_TRAINING).
OPEN_ENDPOINTS = frozenset({"protocol.health", "protocol.webhook"})

HOW_TO_AUTHENTICATE = (
    "Set BASIC_AUTH_USER and BASIC_AUTH_PASS in car-backend's environment, and enter the same user and password "
    "in Label Studio: project Settings > Model > Connect Model (or Edit), turn on \"Use basic auth\" and fill "
    "in \"Basic auth user\" and \"Basic auth password\".")


def serve_refusal(settings: Settings) -> str | None:
    """Why `serve` must not start with these settings, or None: a non-loopback HOST without basic auth
    credentials and without the explicit opt-out CAR_INSECURE_NO_AUTH=true."""
    if settings.basic_auth_user or settings.insecure_no_auth or _is_loopback(settings.host):
        return None
    return (f"refusing to serve on {settings.host} (not loopback) without authentication: anyone who can reach "
            f"this port could make the backend act with Label Studio's token. {HOW_TO_AUTHENTICATE} Or bind "
            "HOST=127.0.0.1 (one machine), or accept an open server with CAR_INSECURE_NO_AUTH=true.")


def exposure_warnings(settings: Settings) -> list[str]:
    """What is risky in how this server is exposed (shown at start and in /health): serving a non-loopback
    address (HOST) without basic auth (only possible with CAR_INSECURE_NO_AUTH=true)."""
    if settings.basic_auth_user or _is_loopback(settings.host):
        return []
    return [f"serving on {settings.host} (not loopback) without basic auth (CAR_INSECURE_NO_AUTH=true): anyone "
            "who can reach this port can use every route: read /status, start trainings and, with "
            f"LABEL_STUDIO_API_KEY, make the backend act with Label Studio's token. {HOW_TO_AUTHENTICATE} Or bind "
            "HOST=127.0.0.1."]


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _too_large(settings: Settings, size: int | None) -> str:
    got = f" ({size} bytes)" if size is not None else ""
    return f"the request body is larger than CAR_MAX_REQUEST_BYTES={settings.max_request_bytes} bytes{got}"


def _authorized(settings: Settings) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    return user_ok and pass_ok
