"""The image's HEALTHCHECK, for both kinds of container it runs.

- A worker container (`car-backend worker ...` is process 1) is healthy while its heartbeat in Redis is
  recent: `car-backend worker --check` (with the same `--name` when one was given).
- A server container is healthy when GET /health answers 200 on 127.0.0.1:$PORT (9090, or the `--port`
  given), sending BASIC_AUTH_USER/BASIC_AUTH_PASS when they are set (without them /health would answer only
  UP/DEGRADED; wrong ones get 401, so a container with mismatched credentials shows unhealthy).

Exit 0 when healthy, 1 otherwise, with one line saying why (never a password).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request


def option(cmdline: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in `cmdline`."""
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(cmdline: list[str], environ: dict[str, str]) -> int:
    if "worker" in cmdline:
        check = [sys.executable, "-m", "car_backend.cli", "worker", "--check"]
        name = option(cmdline, "--name")
        return subprocess.call(check + (["--name", name] if name else []), env=environ, timeout=20)
    port = option(cmdline, "--port") or environ.get("PORT") or "9090"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    user = environ.get("BASIC_AUTH_USER")
    if user:
        token = base64.b64encode(f"{user}:{environ.get('BASIC_AUTH_PASS', '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"/health answered HTTP {exc.code}")
    except OSError as exc:
        print(f"/health did not answer ({type(exc).__name__})")
    return 1


def process_one_cmdline() -> list[str]:
    with open("/proc/1/cmdline", "rb") as f:
        return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]


if __name__ == "__main__":
    sys.exit(main(process_one_cmdline(), dict(os.environ)))
