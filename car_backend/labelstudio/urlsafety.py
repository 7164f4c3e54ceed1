"""URL safety for media downloads: what a URL is, where it may go, and a connection pinned to the checked address.

The media fetcher never hands a task's URL to an HTTP library to interpret. `parse_url` reads it strictly and
refuses every form that two parsers could read differently (backslashes, whitespace, control characters,
userinfo, percent-encoded or non-ASCII hosts, non-canonical IP spellings such as `2130706433`, `0x7f.1`,
`0177.0.0.1`, `127.1` or `[::ffff:127.0.0.1]`). What it returns (`Target`) is exactly what is sent: the
connection goes to one of the addresses `resolve` found and `check_target` accepted, the request line is
`Target.request_target`, the Host header `Target.host_header`, and TLS checks the certificate against
`Target.host` (SNI too), so the name that was judged is the name that is spoken to, and DNS is asked once
per hop (no rebinding between check and connect).

Address policy (`address_risk`): link-local (169.254/16, fe80::/10, which hold cloud metadata services),
known metadata addresses, multicast, unspecified, reserved and broadcast addresses are never fetched;
loopback, private (RFC 1918, fc00::/7, 100.64/10, fec0::/10) only when the host is Label Studio's own or
listed by name in CAR_ALLOWED_HOSTS; public addresses of any host are fetched (without Label Studio's token).

Label Studio's token goes only to its media paths (`ls_media_path`: uploads, local files, storage data,
task presign/resolve), judged after percent-decoding; `ls_refused_path` names the paths of Label Studio's
origin that are never fetched at all (its API, dot segments, encoded slashes).

`redact` is the one function that makes a URL (or a message holding URLs) fit to show or store for
display: userinfo and the values of credential query parameters (signatures, tokens) become `***`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import urllib3
from requests.utils import requote_uri
from urllib3.util import parse_url as urllib3_parse_url

from car_backend.engine.errors import CarError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings, in connection order

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Cloud metadata services outside the link-local range (AWS IPv6, Alibaba); the link-local ones are refused
# with their whole range.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not public
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)(?:#.*)?$")
_AUTHORITY = re.compile(r"^(\[[^\]]*\]|[^:\[\]]*)(?::([0-9]*))?$")
# Anywhere: control characters, backslashes and whitespace other than a plain space; a space only in the path
# or query (where it is percent-encoded), never before it.
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]|[^\S ]")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^([0-9]+|0x[0-9a-f]*)$")  # what inet_aton would read as a number
_DOTTED_QUAD = re.compile(r"^(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}$")


class UnsafeURL(CarError):
    """A URL that is refused for what it is or where it points. The message quotes the URL without its query
    and never holds a token. `retryable` is true only where a setting decides it (a host not named in
    CAR_ALLOWED_HOSTS): the operator listing the host fixes it; the URL's form or a forbidden address never."""

    def __init__(self, message: str, *, by_setting: bool = False):
        super().__init__(redact(message), retryable=by_setting)


@dataclass(frozen=True)
class Target:
    """One URL as it is sent: `host` is a lower-case name or a canonical IP address (IPv6 without brackets)."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    request_target: str  # path and query, percent-encoded, as on the request line
    literal: IPAddress | None  # the address when `host` is an IP address

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.literal, ipaddress.IPv6Address) else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.request_target}"

    def shown(self, with_query: bool = False) -> str:
        """The URL for a message: without its query (presigned signatures) unless `with_query`; redacted."""
        target = self.request_target if with_query else self.request_target.split("?", 1)[0]
        return redact(f"{self.scheme}://{self.host_header}{target}")[:300]


def shown_raw(url: str) -> str:
    """An unparsed (possibly hostile) URL for a message: query dropped, userinfo redacted, escapes visible,
    bounded."""
    return ascii(redact(url.split("?", 1)[0][:200]))


# Userinfo (`//user:password@`) and credential query parameters: AWS/GCS/Azure/CloudFront signatures,
# tokens, keys, passwords.
_USERINFO = re.compile(r"(//)[^/?#\s@]*@")
_SECRET_PARAM = re.compile(
    r"([?&;])((?:[^=&#\s]*(?:signature|token|secret|password|credential|passwd)[^=&#\s]*"
    r"|sig|key|api_?key|auth|policy|key-pair-id|googleaccessid|pass|pwd)=)([^&#\s]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` (a URL, or a message holding URLs) with the userinfo of every URL and the values of credential
    query parameters (X-Amz-Signature, Signature, sig, token, key, ...) replaced by `***`; what is shown or
    stored for display (messages, logs, /status, pending reasons in Redis) goes through it."""
    return _SECRET_PARAM.sub(r"\1\2***", _USERINFO.sub(r"\1***@", text))


# Label Studio 1.23.2's media paths (protocol spec section 4), under its URL prefix: uploads, local files,
# storage data, and the task/project presign and resolve proxies.
_LS_MEDIA = re.compile(r"^/(data/upload/.|data/local-files/?$|storage-data/.|(tasks|projects)/[0-9]+/(presign|resolve)/?$)")


def _decoded_path(request_target: str, base_path: str) -> str | None:
    """The path of `request_target` relative to Label Studio's URL prefix `base_path`, percent-decoded until
    stable; None when it has dot segments or encoded slashes (read differently by different servers) or lies
    outside the prefix."""
    raw = request_target.split("?", 1)[0]
    if re.search(r"%(25)*2f|%(25)*5c", raw, re.IGNORECASE):
        return None
    path = raw
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    if any(segment in (".", "..") for segment in path.split("/")):
        return None
    prefix = base_path.rstrip("/")
    if prefix and not (path == prefix or path.startswith(prefix + "/")):
        return None
    return path[len(prefix):] or "/"


def ls_media_path(request_target: str, base_path: str = "") -> bool:
    """Whether `request_target` (path and query, as sent to Label Studio's origin) is one of Label Studio's
    media paths under its URL prefix `base_path`: the only requests that carry its Authorization."""
    path = _decoded_path(request_target, base_path)
    return path is not None and bool(_LS_MEDIA.match(path))


def ls_refused_path(request_target: str, base_path: str = "") -> bool:
    """Whether a request to Label Studio's origin must not be made at all: its API (`/api/`, any case), or a
    path with dot segments, encoded slashes or outside its prefix, whose meaning a server may read otherwise."""
    path = _decoded_path(request_target, base_path)
    return path is None or path.lower().startswith("/api/") or path.lower() == "/api"


def check_characters(url: str) -> None:
    """UnsafeURL when `url` holds a backslash, a control character or whitespace other than a space."""
    bad = _FORBIDDEN_CHARS.search(url)
    if bad:
        raise UnsafeURL(f"{shown_raw(url)}: the URL holds {ascii(bad.group())}, which is never accepted "
                        "(backslashes, whitespace and control characters are read differently by different parsers)")


def parse_url(url: str) -> Target:
    """`url` read strictly into the Target that is sent; UnsafeURL for anything else (see the module doc)."""
    check_characters(url)
    match = _URL.match(url)
    if not match:
        raise UnsafeURL(f"{shown_raw(url)}: not an absolute http(s) URL")
    scheme, authority, target = match.group(1).lower(), match.group(2), match.group(3)
    if " " in authority:
        raise UnsafeURL(f"{shown_raw(url)}: the host part holds a space, which is never accepted")
    if scheme not in SCHEMES:
        raise UnsafeURL(f"{shown_raw(url)}: only http(s) URLs are fetched")
    if "@" in authority:
        raise UnsafeURL(f"{shown_raw(url)}: URLs with user info (user@host) are not fetched")
    parts = _AUTHORITY.match(authority)
    if not parts or not parts.group(1):
        raise UnsafeURL(f"{shown_raw(url)}: cannot read the host and port")
    host_text, port_text = parts.group(1), parts.group(2)
    if port_text is not None and not (port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536):
        raise UnsafeURL(f"{shown_raw(url)}: the port must be a number from 1 to 65535")
    port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    host, literal = _host(host_text, url)
    request_target = requote_uri(target if target.startswith("/") else "/" + target) if target else "/"
    parsed = Target(scheme, host, port, request_target, literal)
    again = urllib3_parse_url(parsed.url)  # belt and braces: the HTTP stack reads the same host and port
    if (again.host or "").strip("[]").lower() != host or (again.port or DEFAULT_PORTS[scheme]) != port:
        raise UnsafeURL(f"{shown_raw(url)}: the HTTP client would read another host than {host!r}")
    return parsed


def _host(text: str, url: str) -> tuple[str, IPAddress | None]:
    if text.startswith("["):
        inner = text[1:-1]
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise UnsafeURL(f"{shown_raw(url)}: {ascii(text)} is not an IPv6 address (zone ids are not accepted)"
                            ) from None
        if address.ipv4_mapped is not None:
            raise UnsafeURL(f"{shown_raw(url)}: IPv4-mapped IPv6 addresses are not accepted; "
                            f"write {address.ipv4_mapped} instead")
        return str(address), address
    if not text.isascii():
        raise UnsafeURL(f"{shown_raw(url)}: non-ASCII host names are not accepted; write the IDNA (xn--) form")
    host = text.lower()
    if host.endswith("."):
        raise UnsafeURL(f"{shown_raw(url)}: host names ending in a dot are not accepted")
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        if not _DOTTED_QUAD.match(host):
            raise UnsafeURL(f"{shown_raw(url)}: {ascii(text)} is not an IPv4 address in dotted-decimal form "
                            "(decimal, octal, hex and short spellings are not accepted)")
        return host, ipaddress.IPv4Address(host)
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise UnsafeURL(f"{shown_raw(url)}: {ascii(text)} is not a valid host name")
    return host, None


def address_risk(address: IPAddress) -> str | None:
    """Why `address` is never fetched ("link-local", ...), "private" for loopback and private addresses,
    None for a public one. IPv4-mapped and 6to4 addresses are judged by the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return address_risk(embedded)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local (cloud metadata lives there)"
    if address.is_multicast:
        return "multicast"
    if address.is_loopback:
        return "private"
    if isinstance(address, ipaddress.IPv4Address) and (
            address in THIS_NETWORK or address == ipaddress.IPv4Address("255.255.255.255")):
        return "reserved"
    if address.is_reserved:
        return "reserved"
    if address.is_private or address in SHARED_ADDRESS_SPACE or getattr(address, "is_site_local", False):
        return "private"
    return None


def host_listed(host: str, port: int, patterns: Sequence[str]) -> bool:
    """Whether CAR_ALLOWED_HOSTS names this host by name: `host`, `host:port` or `*.suffix` (not `*`)."""
    for pattern in patterns:
        if pattern in (host, f"{host}:{port}", f"[{host}]:{port}"):
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def normalize_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """CAR_ALLOWED_HOSTS entries as `host_listed` compares them: lower case, stripped, IPv6 unbracketed."""
    out = []
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern.startswith("[") and pattern.endswith("]"):
            pattern = pattern[1:-1]
        if pattern:
            out.append(pattern)
    return tuple(out)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system resolver, in its order, each once; OSError when none."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in found))


@dataclass(frozen=True)
class Verdict:
    """What `check_target` decided: the addresses that may be connected to, in order."""

    addresses: tuple[IPAddress, ...]


def check_target(target: Target, *, trusted: bool, wildcard: bool, resolver: Resolver) -> Verdict:
    """The checked addresses for `target`, or UnsafeURL (OSError from `resolver` passes through).

    trusted: the host is Label Studio's own or listed by name in CAR_ALLOWED_HOSTS (loopback and private
    addresses allowed). wildcard: the host may be fetched although not listed, at public addresses only (the
    media fetcher always passes True: public image hosts need no listing; False refuses every unlisted host).
    Every address the name resolves to must pass.
    """
    if target.literal is not None and address_risk(target.literal) not in (None, "private"):
        raise UnsafeURL(f"{target.shown()}: {target.host} is a {address_risk(target.literal)} address, "
                        "which is never fetched")
    if not (trusted or wildcard):
        raise UnsafeURL(f"{target.shown()}: host {target.host_header!r} is not allowed; add it to CAR_ALLOWED_HOSTS",
                        by_setting=True)
    if target.literal is not None:
        addresses: list[IPAddress] = [target.literal]
    else:
        addresses = []
        for text in resolver(target.host, target.port):
            try:
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError:
                raise UnsafeURL(f"{target.shown()}: the resolver gave {text!r}, not an address") from None
        if not addresses:
            raise OSError(f"no address for {target.host}")
    for address in addresses:
        risk = address_risk(address)
        if risk == "private" and not trusted:
            raise UnsafeURL(f"{target.shown()}: {target.host} is at a loopback or private address ({address}); "
                            "only Label Studio's own host and hosts named in CAR_ALLOWED_HOSTS may be", by_setting=True)
        if risk not in (None, "private"):
            raise UnsafeURL(f"{target.shown()}: {target.host} is at a {risk} address ({address}), "
                            "which is never fetched")
    return Verdict(tuple(addresses))


class Deadline:
    """A point in time (monotonic) that a whole download, its redirects and retries included, must end by."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def bound(self, timeout: float) -> float:
        """`timeout` shortened to the time left (at least 1 ms, so a socket never blocks unbounded)."""
        return max(min(timeout, self.remaining()), 0.001)

    @property
    def passed(self) -> bool:
        return self.remaining() <= 0


class PinnedConnections:
    """HTTP(S) connections to checked addresses, pooled per (scheme, address, port, TLS name); thread-safe.

    `open` sends one GET to `address` with Host `target.host_header`; for https, SNI and the certificate
    check use `target.host`. Nothing is read from the environment (no proxies): the checked address is
    the one connected to.
    """

    def __init__(self, ca_certs: str | None = None, num_pools: int = 32):
        import certifi

        self._manager = urllib3.PoolManager(num_pools=num_pools, cert_reqs="CERT_REQUIRED",
                                            ca_certs=ca_certs or certifi.where())

    def open(self, target: Target, address: IPAddress, headers: dict[str, str], connect_timeout: float,
             read_timeout: float) -> urllib3.BaseHTTPResponse:
        """The response (body not read, status any); urllib3 errors pass through."""
        pool_kwargs = {"server_hostname": target.host, "assert_hostname": target.host} \
            if target.scheme == "https" else None
        pool = self._manager.connection_from_host(str(address), target.port, target.scheme, pool_kwargs=pool_kwargs)
        return pool.urlopen(
            "GET", target.request_target, headers={"Host": target.host_header, **headers}, redirect=False,
            retries=False, preload_content=False, decode_content=False, assert_same_host=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), release_conn=False)

    def close(self) -> None:
        self._manager.clear()


def read_body(response: urllib3.BaseHTTPResponse, deadline: Deadline, read_timeout: float, limit: int,
              chunk: int = 64 * 1024) -> bytes | None:
    """The body, read while the deadline holds: before each read the socket's timeout is set to the time
    left (at most `read_timeout`), so a source that drips bytes is abandoned at the deadline. Returns None
    when the body grows past `limit` bytes; raises TimeoutError when the deadline passes and urllib3 or
    socket errors as they come."""
    sock = getattr(response.connection, "sock", None) if response.connection is not None else None
    buf = bytearray()
    while True:
        if deadline.passed:
            raise TimeoutError("the download deadline passed")
        if sock is not None:
            sock.settimeout(deadline.bound(read_timeout))
        data = response.read1(chunk)
        if not data:
            return bytes(buf)
        buf += data
        if len(buf) > limit:
            return None
