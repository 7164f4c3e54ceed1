"""An "attacker" HTTP server on another loopback address (127.0.0.2 by default, never off loopback).

    with AttackerServer() as evil:
        url = f"{evil.url}/x.png"
        ...
        assert evil.connections == 0 and evil.authorizations() == []

It records every TCP connection it accepts (`connections`) and every request with its Authorization header
(`seen`). Any GET is answered with a small PNG, so a fetch that reaches it succeeds (and a test sees that it
should not have). `/drip/<bytes>` announces `<bytes>` of body and sends one byte every `drip_interval`
seconds: a source that never quite stalls.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from car_backend.testing.fake_label_studio import Seen, image_bytes

ATTACKER_HOST = "127.0.0.2"
MAX_DRIP_BYTES = 100_000  # a drip is bounded even if nobody hangs up


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    attacker: AttackerServer

    def verify_request(self, request, client_address) -> bool:  # called once per accepted connection
        with self.attacker.lock:
            self.attacker.connections += 1
        return True


class AttackerServer:
    def __init__(self, host: str = ATTACKER_HOST, drip_interval: float = 0.2):
        if not host.startswith("127."):
            raise ValueError(f"the attacker server listens on loopback only, not {host!r}")
        self.host = host
        self.drip_interval = drip_interval
        self.connections = 0
        self.seen: list[Seen] = []
        self.drip_bytes_sent = 0
        self.lock = threading.Lock()
        self._server = _Server((host, 0), self._handler())
        self._server.attacker = self
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> AttackerServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="attacker")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> AttackerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def authorizations(self) -> list[str]:
        """Every Authorization header received (there should be none)."""
        with self.lock:
            return [s.authorization for s in self.seen if s.authorization is not None]

    def _handler(self):
        attacker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with attacker.lock:
                    attacker.seen.append(Seen("GET", self.path, self.headers.get("Authorization")))
                parts = self.path.strip("/").split("/")
                try:
                    if len(parts) == 2 and parts[0] == "drip" and parts[1].isdigit():
                        self._drip(min(int(parts[1]), MAX_DRIP_BYTES))
                        return
                    body = image_bytes("stolen")
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _drip(self, size: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(size))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.flush()
                for _ in range(size):
                    time.sleep(attacker.drip_interval)
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    with attacker.lock:
                        attacker.drip_bytes_sent += 1

        return Handler
