"""`car-backend serve` as a process, seen from the network: slow clients hold no thread, a non-loopback bind
needs credentials, and the probe tells an anonymous caller only UP/DEGRADED."""

from __future__ import annotations

import select
import socket
import statistics
import subprocess
import time

import pytest
import requests

from tests.support.processes import serve
from tests.support.redis import free_port

BRUSH = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
         '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')
AUTH = ("operator", "s3cret:pass")
SLOW_CLIENTS = 200


def _stop(server: subprocess.Popen) -> str:
    server.terminate()
    output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output
    return output


@pytest.mark.integration
def test_200_slow_header_clients_do_not_starve_health_and_setup(service_settings):
    """200 connections from one address, each sending one header line every 2 s and never finishing: /health
    and /setup (with basic auth, as Label Studio calls them) answer within 200 ms all along."""
    settings = service_settings(port=free_port(), host="127.0.0.1", request_timeout=60.0, log_level="WARNING",
                                basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    server, base = serve(settings)
    slow: list[socket.socket] = []
    health_s, setup_s = [], []
    try:
        for _ in range(SLOW_CLIENTS):
            conn = socket.create_connection(("127.0.0.1", settings.port), timeout=5)
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(conn)
        with requests.Session() as session:
            session.auth = AUTH
            for line in range(4):  # 8 s: each slow client sends 4 more header lines
                round_started = time.monotonic()
                for conn in slow:
                    conn.sendall(f"X-Slow-{line}: {'a' * 20}\r\n".encode())
                for _ in range(3):
                    started = time.monotonic()
                    health = session.get(f"{base}/health", timeout=1)
                    health_s.append(time.monotonic() - started)
                    started = time.monotonic()
                    setup = session.post(f"{base}/setup", json={"project": "1.1", "schema": BRUSH}, timeout=3)
                    setup_s.append(time.monotonic() - started)
                    assert health.status_code == 200 and health.json()["status"] in ("UP", "DEGRADED")
                    assert setup.status_code == 200, setup.text
                time.sleep(max(0.0, 2.0 - (time.monotonic() - round_started)))
        # the slow clients are all still connected, none answered (their requests never finished)
        for conn in slow:
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
    finally:
        for conn in slow:
            conn.close()
        output = _stop(server)
    print(f"{SLOW_CLIENTS} slow clients: /health median {statistics.median(health_s) * 1000:.1f} ms, "
          f"max {max(health_s) * 1000:.1f} ms; /setup median {statistics.median(setup_s) * 1000:.1f} ms, "
          f"max {max(setup_s) * 1000:.1f} ms")
    assert max(health_s) < 0.2 and max(setup_s) < 0.2, (health_s, setup_s, output)


def _huge_config(index: int, size: int) -> str:
    """A brush config of at most `size` bytes, its labels (33 bytes each) unique to `index`."""
    labels = "".join(f'<Label value="c{index:08d}-{j:06d}"/>' for j in range((size - 150) // 33))
    return f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}' \
           '</BrushLabels></View>'


@pytest.mark.integration
def test_parallel_parses_of_huge_configs_do_not_stall_health(service_settings):
    """Three clients keep sending /setup with label configs just under CAR_MAX_LABEL_CONFIG_BYTES (each new, so
    each is parsed) and one over it (413 before parsing): /health keeps answering within Label Studio's 1 s."""
    import threading

    settings = service_settings(port=free_port(), host="127.0.0.1", log_level="WARNING")
    limit = settings.max_label_config_bytes
    server, base = serve(settings)
    stop = threading.Event()
    statuses: list[int] = []

    def parse_forever(client: int) -> None:
        for round_ in range(1000):
            if stop.is_set():
                return
            config = _huge_config(client * 1000 + round_, limit - 100)
            statuses.append(requests.post(f"{base}/setup", json={"project": "1.1", "schema": config},
                                          timeout=30).status_code)

    try:
        over = requests.post(f"{base}/setup", json={"project": "1.1", "schema": " " * (limit + 1) + BRUSH},
                             timeout=10)
        assert over.status_code == 413 and "CAR_MAX_LABEL_CONFIG_BYTES" in over.json()["error"]
        threads = [threading.Thread(target=parse_forever, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        health_s = []
        time.sleep(0.5)
        for _ in range(15):
            started = time.monotonic()
            assert requests.get(f"{base}/health", timeout=1).status_code == 200
            health_s.append(time.monotonic() - started)
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        stop.set()
        output = _stop(server)
    print(f"3 parallel parses of {limit - 100}-byte configs ({len(statuses)} done): /health median "
          f"{statistics.median(health_s) * 1000:.1f} ms, max {max(health_s) * 1000:.1f} ms")
    assert statuses and set(statuses) == {200}, (statuses, output)
    assert max(health_s) < 1.0, health_s


@pytest.mark.integration
def test_a_request_still_arriving_after_the_request_timeout_gets_408_and_an_idle_one_is_closed(service_settings):
    settings = service_settings(port=free_port(), host="127.0.0.1", request_timeout=2.0, log_level="WARNING")
    server, _ = serve(settings)
    try:
        dripping = socket.create_connection(("127.0.0.1", settings.port), timeout=10)
        idle = socket.create_connection(("127.0.0.1", settings.port), timeout=10)
        started = time.monotonic()
        dripping.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        reply = b""
        for line in range(20):  # a header line every 0.5 s, never the blank line that ends them
            dripping.sendall(f"X-Slow-{line}: a\r\n".encode())
            if select.select([dripping], [], [], 0.5)[0]:  # the server spoke: stop sending, read it
                reply = dripping.recv(4096)
                break
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert time.monotonic() - started < 8
        assert idle.recv(1) == b""  # closed without a byte after CAR_REQUEST_TIMEOUT of silence
        dripping.close()
        idle.close()
    finally:
        _stop(server)
