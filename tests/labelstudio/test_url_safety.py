"""The trust boundary of media downloads: hostile URL forms, redirects into them, pinned DNS, the deadline.

Label Studio is the fake on 127.0.0.1; the attacker records every connection on 127.0.0.2. A URL form
passes when the fetch fails with a clear, permanent error, nothing connected to the attacker, and no
Authorization header went anywhere but Label Studio.
"""

from __future__ import annotations

import ipaddress
import time

import pytest

from car_backend.labelstudio.media import MediaError, MediaFetcher
from car_backend.labelstudio.urlsafety import UnsafeURL, address_risk, ls_media_path, parse_url, redact
from car_backend.settings import Settings
from car_backend.testing.attacker import AttackerServer
from tests.support.fake_label_studio import PAT, FakeLabelStudio, Reply
from tests.support.urls import RESOLVED_FORMS, hostile_forms

UPLOAD = "/data/upload/1/photo.png"


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio() as server:
        yield server


@pytest.fixture(scope="module")
def attacker():
    with AttackerServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_records(ls, attacker):
    ls.seen.clear()
    with attacker.lock:
        attacker.seen.clear()
        attacker.connections = 0
    yield


NAMES = {"attacker.test": ["127.0.0.2"], "metadata.test": ["169.254.169.254"], "mapped.test": ["::ffff:127.0.0.2"],
         "mixed.test": ["127.0.0.1", "169.254.169.254"]}
assert set(RESOLVED_FORMS.values()) <= set(NAMES)


def resolver(host: str, port: int) -> list[str]:
    """Names for the tests; everything else as the system resolves it (localhost)."""
    if host in NAMES:
        return NAMES[host]
    if host == "localhost":
        return ["127.0.0.1"]
    raise OSError(f"unknown test name {host}")


def fetcher(ls: FakeLabelStudio, **overrides) -> MediaFetcher:
    values = {"label_studio_url": ls.url, "label_studio_api_key": PAT, **overrides}
    return MediaFetcher(Settings(**values), resolver=resolver)


def _cases():
    # Ports are filled in by the test (the servers start in fixtures); keyed by name for readable ids.
    return list(hostile_forms(1, 2))


def assert_nothing_leaked(ls: FakeLabelStudio, attacker: AttackerServer) -> None:
    assert attacker.connections == 0, attacker.seen
    assert attacker.authorizations() == []


@pytest.mark.parametrize("form", _cases())
def test_hostile_url_is_refused_without_a_connection(ls, attacker, form):
    url = hostile_forms(ls.port, attacker.port)[form]
    with pytest.raises(MediaError) as info:
        fetcher(ls).fetch(url, task_id=1)
    # Permanent, except where only CAR_ALLOWED_HOSTS refuses it (the operator naming the host changes it)
    assert info.value.retryable is ("CAR_ALLOWED_HOSTS" in str(info.value) and "never" not in str(info.value))
    assert str(info.value) and PAT not in str(info.value)
    assert_nothing_leaked(ls, attacker)


@pytest.mark.parametrize("form", _cases())
def test_label_studio_redirect_into_a_hostile_url_is_refused(ls, attacker, form):
    """Label Studio answers its own (authorized) path with a redirect into the form."""
    location = hostile_forms(ls.port, attacker.port)[form]
    path = f"/data/upload/9/redirect-{abs(hash(form))}.png"
    ls.routes[path] = Reply(302, headers={"Location": location.replace("\n", "%0A")})
    ls.protected.add(path)
    with pytest.raises(MediaError) as info:
        fetcher(ls).fetch(path, task_id=1)
    assert PAT not in str(info.value)
    assert_nothing_leaked(ls, attacker)
    hops = ls.seen_paths(path)
    assert hops and hops[0].authorization == f"Bearer {ls.access_token}"  # Label Studio itself got the key


@pytest.mark.parametrize("form", _cases())
def test_allowed_host_redirect_into_a_hostile_url_is_refused(ls, attacker, form):
    """An allowed host (localhost, served by the same fake) redirects into the form."""
    location = hostile_forms(ls.port, attacker.port)[form]
    path = f"/allowed/redirect-{abs(hash(form))}.png"
    ls.routes[path] = Reply(302, headers={"Location": location.replace("\n", "%0A")})
    with pytest.raises(MediaError):
        fetcher(ls, allowed_hosts=("localhost",)).fetch(f"http://localhost:{ls.port}{path}")
    assert_nothing_leaked(ls, attacker)
    assert all(s.authorization is None for s in ls.seen_paths(path))  # localhost is not Label Studio's origin


def test_the_errors_say_what_is_wrong(ls, attacker):
    forms = hostile_forms(ls.port, attacker.port)
    expected = {
        "backslash before @ (urllib.parse reads Label Studio)": "'\\\\'",
        "userinfo that looks like Label Studio": "user info",
        "decimal IPv4": "dotted-decimal",
        "IPv4-mapped IPv6": "IPv4-mapped",
        "link-local metadata": "link-local",
        "plain loopback, not allowed": "CAR_ALLOWED_HOSTS",
        "space before @": "space",
        "multicast": "multicast",
        "unspecified IPv4": "unspecified",
    }
    for form, text in expected.items():
        with pytest.raises(MediaError) as info:
            fetcher(ls).fetch(forms[form])
        assert text in str(info.value), (form, str(info.value))


def test_a_wildcard_admits_no_loopback_and_nothing_admits_metadata(ls, attacker):
    with pytest.raises(MediaError, match="loopback or private"):
        fetcher(ls, allowed_hosts=("*",)).fetch(f"http://attacker.test:{attacker.port}/x.png")
    with pytest.raises(MediaError, match="link-local"):
        fetcher(ls, allowed_hosts=("metadata.test", "*")).fetch(f"http://metadata.test:{attacker.port}/x.png")
    with pytest.raises(MediaError, match="link-local"):  # every address of a name must pass
        fetcher(ls, allowed_hosts=("mixed.test",)).fetch(f"http://mixed.test:{ls.port}/img/a")
    assert_nothing_leaked(ls, attacker)


def test_named_hosts_are_fetched_and_never_get_the_key(ls, attacker):
    """The control: listed hosts on loopback are reached, and the key still stays with Label Studio."""
    path = "/data/upload/9/to-listed.png"
    ls.routes[path] = Reply(302, headers={"Location": f"http://attacker.test:{attacker.port}/ok.png"})
    ls.protected.add(path)
    image = fetcher(ls, allowed_hosts=("attacker.test",)).fetch(path)
    assert image.size == (96, 64)
    assert attacker.connections == 1 and [s.path for s in attacker.seen] == ["/ok.png"]
    assert attacker.authorizations() == []
    assert fetcher(ls, allowed_hosts=(f"127.0.0.2:{attacker.port}",)).fetch(f"{attacker.url}/direct.png")
    assert attacker.authorizations() == []


def test_authorization_only_to_label_studio_s_exact_origin(ls, attacker):
    ls.routes["/img-on-other-name.png"] = Reply(body=b"x", headers={"Content-Type": "image/png"})
    other_name = f"http://localhost:{ls.port}/img-on-other-name.png"  # same server, another origin
    with pytest.raises(MediaError):
        fetcher(ls, allowed_hosts=("localhost",)).fetch(other_name)  # bytes are no image; the key is the point
    assert ls.seen_paths("/img-on-other-name.png")[0].authorization is None


def test_a_name_is_resolved_once_and_the_checked_address_is_connected(ls, attacker):
    answers = [["127.0.0.1"], ["127.0.0.2"]]  # a rebinding DNS: the second answer would be the attacker
    calls = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), 2) - 1]

    settings = Settings(label_studio_url=ls.url, label_studio_api_key=PAT, allowed_hosts=("rebind.test",))
    image = MediaFetcher(settings, resolver=rebinding).fetch(f"http://rebind.test:{ls.port}/img/pinned")
    assert image.size == (96, 64) and calls == ["rebind.test"]
    assert ls.seen_paths("/img/pinned")[0].authorization is None
    assert_nothing_leaked(ls, attacker)


def test_parse_url_is_what_is_sent():
    target = parse_url("HTTP://Label-Studio:8080/data/upload/1/a b.png?x=1#frag")
    assert (target.scheme, target.host, target.port) == ("http", "label-studio", 8080)
    assert target.request_target == "/data/upload/1/a%20b.png?x=1" and target.host_header == "label-studio:8080"
    assert parse_url("https://[2001:db8::1]/a").host_header == "[2001:db8::1]"
    assert parse_url("https://example.com").request_target == "/"
    with pytest.raises(UnsafeURL):
        parse_url("http://a_b.example.com\\@x/")


@pytest.mark.parametrize(("address", "risk"), [
    ("8.8.8.8", None), ("127.0.0.1", "private"), ("10.1.2.3", "private"), ("100.64.0.1", "private"),
    ("fd12::1", "private"), ("::1", "private"), ("169.254.1.1", "link-local (cloud metadata lives there)"),
    ("fd00:ec2::254", "a cloud metadata address"), ("::ffff:169.254.169.254", "link-local (cloud metadata lives there)"),
    ("2002:a9fe:a9fe::1", "link-local (cloud metadata lives there)"), ("0.1.2.3", "reserved"),
    ("240.0.0.1", "reserved"), ("2001:4860:4860::8888", None),
])
def test_address_risk(address, risk):
    assert address_risk(ipaddress.ip_address(address)) == risk


# ---- the total download deadline ----


def test_a_dripping_source_is_abandoned_at_the_deadline(ls):
    with AttackerServer(drip_interval=0.2) as drip:
        settings = Settings(label_studio_url=ls.url, allowed_hosts=(f"127.0.0.2:{drip.port}",),
                            download_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(MediaError) as info:
            # 200 bytes at 5 bytes a second would take 40 s; each byte comes well within the read timeout
            MediaFetcher(settings, timeout=(5.0, 30.0)).fetch(f"{drip.url}/drip/200")
        elapsed = time.monotonic() - started
    assert info.value.retryable is True and "CAR_DOWNLOAD_TIMEOUT=1 s" in str(info.value)
    assert elapsed < 3.0  # abandoned at the deadline (1 s), not after the 40 s the body would take
    assert 0 < drip.drip_bytes_sent < 200


def test_the_deadline_covers_redirects_and_waiting_for_headers(ls):
    ls.routes["/late-headers.png"] = lambda: (time.sleep(2.5), Reply(body=b"x"))[1]
    ls.routes["/to-late"] = Reply(302, headers={"Location": "/late-headers.png"})
    settings = Settings(label_studio_url=ls.url, download_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(MediaError, match="CAR_DOWNLOAD_TIMEOUT"):
        MediaFetcher(settings, timeout=(5.0, 30.0)).fetch(ls.url + "/to-late")
    assert time.monotonic() - started < 2.4


# ---- TLS to a pinned address ----


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for `pinned.test`; records SNI and Host."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    from tests.support.fake_label_studio import image_bytes

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=pinned.test", "-addext", "subjectAltName=DNS:pinned.test"],
                   check=True, capture_output=True, timeout=60)
    seen = {"sni": [], "host": []}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen["sni"].append(name)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen["host"].append(self.headers.get("Host"))
            body = image_bytes("tls")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert, seen
    server.shutdown()
    server.server_close()


def test_tls_checks_the_name_while_connecting_to_the_pinned_address(tls_server, monkeypatch):
    port, cert, seen = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    names = {"pinned.test": ["127.0.0.1"], "impostor.test": ["127.0.0.1"]}
    settings = Settings(allowed_hosts=("pinned.test", "impostor.test"))
    fetcher = MediaFetcher(settings, resolver=lambda host, _: names[host])
    assert fetcher.fetch(f"https://pinned.test:{port}/a.png").size == (96, 64)
    assert seen["sni"] == ["pinned.test"] and seen["host"] == [f"pinned.test:{port}"]
    with pytest.raises(MediaError) as info:  # same address, but the certificate is not for this name
        fetcher.fetch(f"https://impostor.test:{port}/a.png")
    assert info.value.retryable is True and "network error" in str(info.value)
    assert seen["host"] == [f"pinned.test:{port}"]  # nothing was requested over the refused connection


# ---- public hosts by default, credentials redacted ----

def _resolving(address: str):
    return lambda host, port: [address]


@pytest.mark.parametrize(("address", "fetched"), [("93.184.216.34", True), ("2606:2800:220:1::248", True),
                                                  ("127.0.0.1", False), ("10.1.2.3", False),
                                                  ("169.254.169.254", False), ("fe80::1", False)])
def test_public_hosts_are_fetched_by_default_private_ones_only_when_listed(ls, address, fetched):
    """The decision on resolved addresses (tests cannot reach a public address): public ones pass without
    CAR_ALLOWED_HOSTS; loopback and private ones only for a listed host; link-local never."""
    target = parse_url("https://images.example.org/cat.png")
    plain = MediaFetcher(Settings(label_studio_url=ls.url, label_studio_api_key=PAT), resolver=_resolving(address))
    if fetched:
        assert [str(a) for a in plain._check(target, listed=False).addresses] == [address]
    else:
        with pytest.raises(MediaError):
            plain._check(target, listed=False)
    listed = MediaFetcher(Settings(label_studio_url=ls.url, label_studio_api_key=PAT,
                                   allowed_hosts=("images.example.org",)), resolver=_resolving(address))
    if address_risk(ipaddress.ip_address(address)) in (None, "private"):
        assert listed._check(target, listed=True).addresses
    else:
        with pytest.raises(MediaError):
            listed._check(target, listed=True)


def test_loopback_is_refused_end_to_end_without_the_host_listed(ls, attacker):
    with pytest.raises(MediaError, match="CAR_ALLOWED_HOSTS"):
        fetcher(ls).fetch(f"{attacker.url}/x.png")
    assert attacker.connections == 0


@pytest.mark.parametrize(("url", "secrets"), [
    ("https://user:pa55@host.example/x.png", ["pa55", "user"]),
    ("https://b.s3.amazonaws.com/x.png?X-Amz-Algorithm=A&X-Amz-Credential=AKIA1&X-Amz-Signature=abc123&"
     "X-Amz-Security-Token=tok9", ["AKIA1", "abc123", "tok9"]),
    ("https://a.blob.core.windows.net/c/x.png?sv=2020&sig=azSIG%3D&se=2030", ["azSIG"]),
    ("https://d.cloudfront.net/x.png?Expires=1&Signature=cfSIG&Key-Pair-Id=KP1", ["cfSIG", "KP1"]),
    ("https://storage.googleapis.com/b/x.png?X-Goog-Signature=gSIG&token=t0k&api_key=k3y", ["gSIG", "t0k", "k3y"]),
    ("failed: http://u:p4ss@h:8/x.png?access_token=AT1 (HTTP 500)", ["p4ss", "AT1"]),
])
def test_redact_hides_userinfo_and_signed_query_strings(url, secrets):
    shown = redact(url)
    assert all(secret not in shown for secret in secrets), shown
    assert "***" in shown and shown.split("//", 1)[0] == url.split("//", 1)[0]


def test_label_studio_media_paths():
    for path in ("/data/upload/1/a.png", "/data/local-files/?d=x/y.png", "/storage-data/uploaded/?filepath=a",
                 "/tasks/12/presign/?fileuri=eA==", "/projects/3/presign/?fileuri=eA=="):
        assert ls_media_path(path), path
        assert ls_media_path("/ls" + path, "/ls") and not ls_media_path(path, "/ls")
    for path in ("/api/projects/1/next/", "/data/../api/x", "/data/%2e%2e/api/x", "/data/upload/%2e%2e/%2e%2e/api/",
                 "/data/upload%2f..%2fapi", "/tasks/1/", "/img/a.png", "/data/", "/"):
        assert not ls_media_path(path), path
