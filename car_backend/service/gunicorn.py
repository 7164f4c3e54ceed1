"""`car-backend serve`: the app under gunicorn (one process, gthread workers), and its options."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from flask import Flask

from car_backend.pipeline.versions import model_version
from car_backend.service.app import create_app
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# /predict waits for jobs on a request thread; /health must still answer, so a few threads are always there.
MIN_HTTP_THREADS = 4


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
    settings = dataclasses.replace(settings, host=host, port=port)  # the bind the app warns about
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
