"""`car-backend serve`: the app under waitress (one process), and its options.

Waitress reads every request on its asynchronous loop (one thread polling all connections) and hands only
complete requests, headers and body, to its CAR_HTTP_THREADS threads. A client that drips its headers or
its body therefore holds a connection, never a thread: /health and /setup always find one (200 slow-header
clients from one address, tests/service/test_server_front.py). `DeadlineChannel` answers 408 and closes a
connection whose request has not fully arrived CAR_REQUEST_TIMEOUT seconds after its first byte; an idle
kept-alive connection is closed after the same time. Waiting /predict calls are capped (CAR_PREDICT_WAITERS,
service.predictor), so a thread is always left for the probes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import signal
import time

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server

from car_backend.pipeline.versions import model_version
from car_backend.service.app import create_app, serve_refusal
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# /predict waits for jobs on a request thread; /health must still answer, so a few threads are always there.
MIN_HTTP_THREADS = 8
# Open connections the loop serves at once (slow ones included); beyond it, new ones wait in the backlog.
CONNECTION_LIMIT = 2000
# How often (seconds) idle connections are looked for; requests' deadlines are checked on every loop turn.
CLEANUP_INTERVAL_S = 1.0

TOO_SLOW = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class DeadlineChannel(HTTPChannel):
    """waitress's connection with a deadline per request: `request_timeout` seconds (CAR_REQUEST_TIMEOUT)
    from the request's first byte until it has fully arrived; past it, 408 and the connection is closed.
    Everything runs on waitress's loop thread."""

    request_timeout = 30.0
    request_started: float | None = None  # monotonic time of the first byte of the request being read

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_started = time.monotonic()
        result = super().received(data)
        if self.request is None:  # nothing partial left: the next byte starts the next request's clock
            self.request_started = None
        return result

    def readable(self) -> bool:
        started = self.request_started
        if (started is not None and time.monotonic() - started > self.request_timeout and not self.requests
                and not (self.will_close or self.close_when_flushed)):
            self._too_slow()
            return False
        return super().readable()

    def _too_slow(self) -> None:
        log.info("dropped a request from %s: it did not arrive within %g s (CAR_REQUEST_TIMEOUT)",
                 self.addr[0] if self.addr else "?", self.request_timeout)
        with self.requests_lock:
            self.request, self.request_started = None, None
        with self.outbuf_lock:  # as waitress's own send_continue writes from the loop thread
            self.outbufs[-1].append(TOO_SLOW)
            self.current_outbuf_count += len(TOO_SLOW)
            self.total_outbufs_len += len(TOO_SLOW)
            self.close_when_flushed = True
            self._flush_some()


def waitress_options(settings: Settings, host: str, port: int) -> dict:
    """waitress's adjustments for these settings."""
    return {
        "host": host,
        "port": port,
        "threads": max(settings.http_threads, MIN_HTTP_THREADS),
        "connection_limit": CONNECTION_LIMIT,
        "asyncore_use_poll": True,  # select() stops at 1024 descriptors
        "channel_timeout": max(1, int(settings.request_timeout)),  # idle kept-alive connections
        "cleanup_interval": CLEANUP_INTERVAL_S,
        # waitress refuses (413) a larger declared body before reading it; one byte more than the limit gets
        # to the app, which answers it with the setting's name (create_app).
        "max_request_body_size": settings.max_request_bytes + 1,
        "ident": "car-backend",
        "expose_tracebacks": False,
    }


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit to %d (%s): fewer connections fit", target, exc)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT (exit 0); exit 2 at once, saying why, for a non-loopback HOST without
    credentials (service.app.serve_refusal)."""
    host = args.host or settings.host
    port = args.port or settings.port
    settings = dataclasses.replace(settings, host=host, port=port)  # the bind the app warns about
    refusal = serve_refusal(settings)
    if refusal:
        log.error("%s", refusal)
        return 2
    options = waitress_options(settings, host, port)
    if settings.http_threads < MIN_HTTP_THREADS:
        log.info("serving with %d HTTP threads (CAR_HTTP_THREADS=%d is below the minimum that keeps /health "
                 "answering while /predict waits)", options["threads"], settings.http_threads)
    _raise_open_files_limit(CONNECTION_LIMIT + 256)
    app = create_app(settings)  # starts the embedded Redis and worker without REDIS_URL
    try:
        sockets: dict = {}
        server = create_server(app, map=sockets, **options)
        channel = type("Channel", (DeadlineChannel,), {"request_timeout": settings.request_timeout})
        for listener in list(sockets.values()):
            if isinstance(listener, BaseWSGIServer):
                listener.channel_class = channel

        def stop(signum: int, frame: object) -> None:
            raise SystemExit(0)  # waitress's run() closes its sockets and threads on it

        signal.signal(signal.SIGTERM, stop)
        log.info("car-backend serving on http://%s:%d (model_version %s)", host, port, model_version(settings))
        server.run()
    finally:
        app.extensions["car_backend"].close()
    return 0
