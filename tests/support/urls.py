"""Hostile image URLs: every form that must never reach the attacker server (car_backend.testing.attacker)."""

from __future__ import annotations

# Forms that need a resolver knowing the name (tests give the media fetcher their own): form -> name.
RESOLVED_FORMS = {"name resolving to loopback, not allowed": "attacker.test",
                  "name resolving to metadata": "metadata.test",
                  "name resolving to IPv4-mapped loopback": "mapped.test"}


def hostile_forms(ls_port: int, port: int) -> dict[str, str]:
    """Name -> a URL that must never reach the attacker at 127.0.0.2:`port` (Label Studio at 127.0.0.1)."""
    return {
        "plain loopback, not allowed": f"http://127.0.0.2:{port}/x.png",
        "backslash before @ (urllib.parse reads Label Studio)": f"http://127.0.0.2:{port}\\@127.0.0.1:{ls_port}/x.png",
        "backslash as a path separator": f"http://127.0.0.2:{port}\\.127.0.0.1:{ls_port}/x.png",
        "userinfo that looks like Label Studio": f"http://127.0.0.1:{ls_port}@127.0.0.2:{port}/x.png",
        "user and password": f"http://user:pass@127.0.0.2:{port}/x.png",
        "space before @": f"http://127.0.0.2:{port} @127.0.0.1:{ls_port}/x.png",
        "tab in the authority": f"http://127.0.0.2:{port}\t@127.0.0.1:{ls_port}/x.png",
        "newline in the authority": f"http://127.0.0.1:{ls_port}\n@127.0.0.2:{port}/x.png",
        "NUL byte": f"http://127.0.0.2:{port}\x00.127.0.0.1/x.png",
        "DEL character": f"http://127.0.0.2\x7f:{port}/x.png",
        "non-breaking space": f"http://127.0.0.2:{port}\u00a0/x.png",
        "decimal IPv4": f"http://2130706434:{port}/x.png",
        "octal IPv4": f"http://0177.0.0.2:{port}/x.png",
        "hex IPv4": f"http://0x7f000002:{port}/x.png",
        "dotted hex IPv4": f"http://0x7f.0x0.0x0.0x2:{port}/x.png",
        "two-part short IPv4": f"http://127.2:{port}/x.png",
        "three-part short IPv4": f"http://127.0.2:{port}/x.png",
        "leading-zero IPv4": f"http://127.000.000.002:{port}/x.png",
        "IPv4 with a trailing dot": f"http://127.0.0.2.:{port}/x.png",
        "percent-encoded host": f"http://127.0.0.%32:{port}/x.png",
        "full-width digits": f"http://\uff11\uff12\uff17.0.0.2:{port}/x.png",
        "IPv4-mapped IPv6": f"http://[::ffff:127.0.0.2]:{port}/x.png",
        "IPv4-mapped IPv6, hex": f"http://[::ffff:7f00:2]:{port}/x.png",
        "IPv4-compatible IPv6": f"http://[::127.0.0.2]:{port}/x.png",
        "IPv6 zone id": f"http://[fe80::1%25lo]:{port}/x.png",
        "link-local metadata": "http://169.254.169.254/latest/meta-data/",
        "link-local IPv6": f"http://[fe80::1]:{port}/x.png",
        "multicast": f"http://224.0.0.1:{port}/x.png",
        "IPv6 multicast": f"http://[ff02::1]:{port}/x.png",
        "unspecified IPv4": f"http://0.0.0.0:{port}/x.png",
        "unspecified IPv6": f"http://[::]:{port}/x.png",
        "broadcast": f"http://255.255.255.255:{port}/x.png",
        "name resolving to loopback, not allowed": f"http://attacker.test:{port}/x.png",
        "name resolving to metadata": f"http://metadata.test:{port}/x.png",
        "name resolving to IPv4-mapped loopback": f"http://mapped.test:{port}/x.png",
        "two ports": f"http://127.0.0.1:{ls_port}:{port}/x.png",
        "port out of range": f"http://127.0.0.2:{port + 65536}/x.png",
        "not http": f"ftp://127.0.0.2:{port}/x.png",
        "scheme-relative": f"//127.0.0.2:{port}/x.png",
    }
