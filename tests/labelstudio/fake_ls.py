"""A tiny stand-in for Label Studio's media and token endpoints, served on 127.0.0.1 in a thread."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PAT = (
    "eyJhbGciOiJIUzI1NiJ9."
    + base64.urlsafe_b64encode(
        json.dumps({"token_type": "refresh", "exp": 4102444800, "iat": 1700000000, "jti": "pat-1"}).encode()
    )
    .decode()
    .rstrip("=")
    + ".c2lnbmF0dXJlLW9mLXRoZS1wYXQ"
)


def make_access_token(serial: int, lifetime: float) -> str:
    now = time.time()
    claims = {"token_type": "access", "iat": now, "exp": now + lifetime, "jti": f"access-{serial}"}
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2VjcmV0LWFjY2Vzcy1zaWduYXR1cmU{serial}"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the body is sent
    chunked: bool = False  # no Content-Length; the body goes out in pieces


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


class FakeLabelStudio:
    """Routes are exact paths (with query) -> Reply or a callable(handler) -> Reply.

    Paths under `protected` need `Authorization: Bearer <current access token>` (or `Token <legacy>`),
    like Label Studio's /data/upload/. /api/token/refresh/ exchanges PAT for a fresh access token.
    """

    def __init__(self, access_lifetime: float = 300.0, legacy_token: str | None = None):
        self.routes: dict[str, Reply | Callable[[], Reply]] = {}
        self.protected: set[str] = set()
        self.seen: list[Seen] = []
        self.refreshes = 0
        self.access_lifetime = access_lifetime
        self.access_token: str | None = None
        self.legacy_token = legacy_token
        self.reject_pat = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeLabelStudio:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def revoke_access(self) -> None:
        """Forget the current access token, as an expired one would be: the next use gets 401."""
        with self._lock:
            self.access_token = None

    def authorized(self, header: str | None) -> bool:
        with self._lock:
            if self.legacy_token and header == f"Token {self.legacy_token}":
                return True
            return bool(self.access_token) and header == f"Bearer {self.access_token}"

    def seen_paths(self, prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(prefix)]

    def _refresh(self, body: bytes) -> Reply:
        with self._lock:
            self.refreshes += 1
            try:
                refresh = json.loads(body).get("refresh")
            except ValueError:
                refresh = None
            if self.reject_pat or refresh != PAT:
                return Reply(
                    401, b'{"detail": "Token is invalid or expired"}', {"Content-Type": "application/json"}
                )
            self.access_token = make_access_token(self.refreshes, self.access_lifetime)
            return Reply(
                200, json.dumps({"access": self.access_token}).encode(), {"Content-Type": "application/json"}
            )

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.seen.append(Seen("POST", self.path, self.headers.get("Authorization")))
                if urlsplit(self.path).path == "/api/token/refresh/":
                    self._send(fake._refresh(body))
                else:
                    self._send(Reply(404))

            def do_GET(self):
                fake.seen.append(Seen("GET", self.path, self.headers.get("Authorization")))
                route = fake.routes.get(self.path)
                if route is None:
                    self._send(Reply(404, b"not found"))
                elif self.path in fake.protected and not fake.authorized(self.headers.get("Authorization")):
                    self._send(Reply(401, b'{"detail": "Authentication credentials were not provided."}'))
                else:
                    self._send(route() if callable(route) else route)

            def _send(self, reply: Reply) -> None:
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    if reply.chunked:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        time.sleep(reply.delay)
                        for i in range(0, len(reply.body), 4096):
                            self.wfile.write(reply.body[i : i + 4096])
                        return
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    time.sleep(reply.delay)
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def query(path: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(path).query)
