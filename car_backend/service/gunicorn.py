"""`car-backend serve`: the app under gunicorn (one process, gthread workers), and its options.

Slow clients cannot hold threads for long: `CarThreadWorker` gives each request CAR_REQUEST_TIMEOUT
seconds from its first byte to arrive, headers and body (`DeadlineSocket` bounds every recv by what is
left); a request that misses it is answered 408 and its thread is free. Waiting /predict calls are capped
(CAR_PREDICT_WAITERS, service.predictor), so /health and /setup always find a thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import time

from flask import Flask
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import RequestTimeout

from car_backend.pipeline.versions import model_version
from car_backend.service.app import create_app
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# /predict waits for jobs on a request thread; /health must still answer, so a few threads are always there.
MIN_HTTP_THREADS = 8


class RequestTooSlow(RequestTimeout):
    """The client did not send its request within CAR_REQUEST_TIMEOUT (HTTP 408)."""


class DeadlineSocket:
    """A client socket whose reads share one deadline (`deadline`, monotonic; None = no limit).

    Each recv waits at most the time left, so a client dripping one byte at a time cannot stretch a request
    past it; past it, recv raises RequestTooSlow. Everything else is the wrapped socket's.
    """

    def __init__(self, sock: socket.socket, seconds: float):
        self._sock = sock
        self.seconds = seconds
        self.deadline: float | None = None
        self.expired = False  # a read missed the deadline: the connection is not reused

    def recv(self, size: int, *flags: int) -> bytes:
        if self.deadline is None:
            return self._sock.recv(size, *flags)
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise RequestTooSlow(f"the request did not arrive within {self.seconds:g} s (CAR_REQUEST_TIMEOUT)")
        previous = self._sock.gettimeout()
        self._sock.settimeout(left)
        try:
            return self._sock.recv(size, *flags)
        except TimeoutError:
            self.expired = True
            raise RequestTooSlow(f"the request did not arrive within {self.seconds:g} s "
                                 "(CAR_REQUEST_TIMEOUT)") from None
        finally:
            self._sock.settimeout(previous)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class CarThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with a deadline per request (see the module docstring); `request_timeout`
    is set from CAR_REQUEST_TIMEOUT before gunicorn starts."""

    request_timeout = 30.0

    def handle(self, conn):
        if not isinstance(conn.sock, DeadlineSocket):
            conn.sock = DeadlineSocket(conn.sock, self.request_timeout)
        conn.sock.deadline = time.monotonic() + self.request_timeout
        try:
            return super().handle(conn)
        finally:
            conn.sock.deadline = None  # kept-alive, the connection waits in the poller without a thread

    def _keepalive_after(self, conn, keepalive):
        # After a 408 the rest of the body may still be on its way: close instead of draining it.
        return not conn.sock.expired and super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn, fs):
        # Runs on the main loop: a graceful close would linger there up to 2 s per connection, reading what a
        # slow client still sends, and stall every other connection meanwhile.
        if isinstance(conn.sock, DeadlineSocket) and conn.sock.expired:
            self.nr_conns -= 1
            conn.close()
            return
        super().finish_request(conn, fs)

    def handle_error(self, req, client, addr, exc):
        if not isinstance(exc, RequestTooSlow):
            return super().handle_error(req, client, addr, exc)
        log.info("dropped a request from %s: %s", addr, exc.description)
        try:
            client.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass  # the client is gone


def gunicorn_options(settings: Settings, host: str, port: int) -> dict:
    return {
        "bind": f"{host}:{port}",
        "workers": 1,  # one process: the config cache and the metrics live in it (jobs run in workers)
        "worker_class": CarThreadWorker,
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
    CarThreadWorker.request_timeout = settings.request_timeout
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
            # Runs in the gunicorn worker process, after the fork: the embedded Redis and worker start here.
            state["app"] = create_app(settings)
            return state["app"]

    log.info("car-backend serving on http://%s:%d (model_version %s)", host, port, model_version(settings))
    Server().run()
    return 0
