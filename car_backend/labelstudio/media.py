"""Fetch a task's image, whatever form Label Studio gives its reference in.

Task data is sent raw (protocol spec §4):
- `/data/upload/<pid>/<file>` (also `upload/...`), `/data/local-files/?d=...` and other Label Studio
  paths (`/storage-data/...`, `/tasks/...`): relative to LABEL_STUDIO_URL, fetched with LABEL_STUDIO_API_KEY;
- `s3://`, `gs://`, `azure-blob://` URIs: Label Studio presigns them at
  `/tasks/<task id>/presign/?fileuri=<urlsafe base64>` and redirects or proxies;
- `http(s)://` URLs: Label Studio's own origin (scheme, host, port) gets the key, and only for its media
  paths (`urlsafety.ls_media_path`, after percent-decoding); its API and paths with dot segments or encoded
  slashes are refused whoever sent the task (`urlsafety.ls_refused_path`); its other paths are fetched
  without the key. Other hosts: public addresses always, loopback and private ones only when listed in
  CAR_ALLOWED_HOSTS (`host`, `host:port`, `*.domain`), and never the key;
- local paths and `file://` URLs, only for a fetcher made with `allow_local_files=True` (offline prelabel).

Every URL, and every redirect hop, goes through `labelstudio.urlsafety`: read strictly (hostile spellings
refused), its host checked and resolved once, and the connection made to the checked address (see that
module for the address policy). Redirects are followed by hand, at most five: each hop is judged like a
task's URL (public hosts, or loopback and private ones that are listed; that is how presigned cloud URLs
arrive), and once a hop has left Label Studio the key is never sent again. The whole fetch ends by
CAR_DOWNLOAD_TIMEOUT, enforced on the socket before every read.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageOps

from car_backend.engine.errors import CarError
from car_backend.labelstudio.access import Access
from car_backend.labelstudio.client import LabelStudioError, shared_auth
from car_backend.labelstudio.urlsafety import (
    Deadline,
    PinnedConnections,
    Resolver,
    Target,
    UnsafeURL,
    Verdict,
    check_characters,
    check_target,
    host_listed,
    ls_media_path,
    ls_refused_path,
    normalize_patterns,
    parse_url,
    read_body,
    redact,
    shown_raw,
    system_resolver,
)

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LS_PATHS = ("/data/", "/storage-data/", "/tasks/", "/upload/", "upload/")  # relative to LABEL_STUDIO_URL
MAX_REDIRECTS = 5
CHUNK = 64 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "car-backend"


class MediaError(CarError):
    """An image could not be fetched or decoded.

    `retryable` is False only when asking again cannot help: a property of the image or of the task itself
    (corrupt or undecodable bytes, a decompression bomb, a reference that is no URL, a redirect loop); True
    whenever a setting or an outage may change the answer (network error, timeout, every HTTP error status:
    5xx, Label Studio's 401/403/404 for an upload or a local file, a cloud storage's 403/404 after Label
    Studio's presign redirect; missing credentials, a host not in CAR_ALLOWED_HOSTS, larger than
    CAR_MAX_DOWNLOAD_BYTES or CAR_MAX_IMAGE_PIXELS: fixing the configuration makes the retry succeed). The
    message never holds a token. `retryable` must be given: a non-retryable failure becomes a permanent empty
    prediction. URL credentials in the message (userinfo, signed query strings) are redacted
    (`urlsafety.redact`).
    """

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(redact(message), retryable=retryable)


class MediaFetcher:
    """Downloads and decodes task images; one instance is safe to share between threads.

    settings: any `Access`. timeout: (connect, read) seconds for each socket operation; the whole fetch,
    redirects and retries included, ends by `settings.download_timeout` (CAR_DOWNLOAD_TIMEOUT), enforced on
    the socket. resolver: (host, port) -> addresses (tests give their own; default the system's).
    """

    def __init__(
        self,
        settings: Access,
        *,
        allow_local_files: bool = False,
        timeout: tuple[float, float] = (5.0, 30.0),
        resolver: Resolver = system_resolver,
    ):
        self.settings = settings
        self.allow_local_files = allow_local_files
        self._timeout = timeout
        self._total_timeout = float(settings.download_timeout)
        self._resolver = resolver
        self._ls_url = settings.label_studio_url.rstrip("/")
        try:
            site = parse_url(self._ls_url) if self._ls_url else None
        except UnsafeURL as exc:
            raise MediaError(f"LABEL_STUDIO_URL cannot be used: {exc}", retryable=True) from None  # a setting
        self._ls_origin = site.origin if site is not None else None
        self._ls_prefix = site.request_target.split("?", 1)[0].rstrip("/") if site is not None else ""
        self._auth = (
            shared_auth(self._ls_url, settings.label_studio_api_key)
            if self._ls_url and settings.label_studio_api_key
            else None
        )
        self._allowed = normalize_patterns(settings.allowed_hosts)
        # requests' own variables for a private CA, honoured as requests did before downloads were pinned
        self._connections = PinnedConnections(os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"))

    def fetch(self, ref: str, task_id: int | None = None) -> Image.Image:
        """The image `ref` points at: RGB, EXIF orientation applied, within the size limits."""
        if not isinstance(ref, str) or not ref.strip():
            raise MediaError(
                f"no image reference in the task (got {type(ref).__name__} {str(ref)[:80]!r})", retryable=False
            )
        ref = ref.strip()
        started = time.monotonic()
        data = self._bytes(ref, task_id, Deadline(self._total_timeout))
        image = decode_image(data, self.settings.max_image_pixels)
        log.debug(
            "fetched %s: %dx%d, %d bytes in %.2f s",
            shown_raw(ref),
            *image.size,
            len(data),
            time.monotonic() - started,
        )
        return image

    def _bytes(self, ref: str, task_id: int | None, deadline: Deadline) -> bytes:
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return self._download(ref, deadline)
        if scheme in CLOUD_SCHEMES:
            return self._download(self._presign_url(ref, task_id), deadline)
        if scheme == "file" or (self.allow_local_files and Path(ref).is_absolute() and Path(ref).exists()):
            return self._read_local(unquote(urlsplit(ref).path) if scheme == "file" else ref)
        if ref.startswith(LS_PATHS):
            return self._download(self._ls_path_url(ref), deadline)
        if self.allow_local_files or Path(ref).is_absolute():
            return self._read_local(ref)
        raise MediaError(f"cannot fetch {shown_raw(ref)}: not a URL, a Label Studio path or a cloud URI",
                         retryable=False)

    def _ls_path_url(self, ref: str) -> str:
        if ref.startswith("upload/") or ref.startswith("/upload/"):
            ref = "/data/" + ref.lstrip("/")
        if not self._ls_url:
            raise MediaError(
                f"{shown_raw(ref)} is a Label Studio path: set LABEL_STUDIO_URL to fetch it", retryable=True
            )
        return self._ls_url + ref

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise MediaError(
                f"{shown_raw(uri)}: cloud URIs are presigned per task, and no task id was given", retryable=False
            )
        if not self._ls_url:
            raise MediaError(f"{shown_raw(uri)}: set LABEL_STUDIO_URL so Label Studio can presign it", retryable=True)
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"{self._ls_url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"

    def _read_local(self, path: str) -> bytes:
        if not self.allow_local_files:
            raise MediaError(f"{path[:200]!r}: local files are read only for offline pre-labeling", retryable=False)
        file = Path(path).expanduser()
        try:
            size = file.stat().st_size
            if size > self.settings.max_download_bytes:
                raise MediaError(self._too_big(path, size), retryable=True)
            return file.read_bytes()
        except FileNotFoundError:
            raise MediaError(f"{path!r}: no such file", retryable=False) from None
        except (IsADirectoryError, PermissionError) as exc:
            raise MediaError(f"{path!r}: cannot read ({type(exc).__name__})", retryable=False) from None

    def _download(self, url: str, deadline: Deadline) -> bytes:
        target = _parsed(url)
        trusted = self._is_ls(target)  # every hop so far was Label Studio's own
        for _ in range(MAX_REDIRECTS + 1):
            is_ls = self._is_ls(target)
            if is_ls and ls_refused_path(target.request_target, self._ls_prefix):
                raise MediaError(f"{target.shown()}: not one of Label Studio's media paths (uploads, local files, "
                                 "storage data, presign); its API and paths with dot segments or encoded slashes "
                                 "are never fetched", retryable=False)
            listed = is_ls or host_listed(target.host, target.port, self._allowed)
            verdict = self._check(target, listed)
            send_auth = is_ls and trusted and ls_media_path(target.request_target, self._ls_prefix)
            resp = self._get(target, verdict, send_auth, deadline)
            location = resp.headers.get("location")
            if resp.status in REDIRECT_STATUSES and location:
                _finish(resp, complete=False)
                trusted = trusted and is_ls
                target = _redirected(target, location)
                continue
            complete = False
            try:
                self._check_status(resp, target, send_auth)
                data = self._read(resp, target, deadline)
                complete = True
                return data
            finally:
                _finish(resp, complete)
        raise MediaError(f"{target.shown()}: more than {MAX_REDIRECTS} redirects", retryable=False)

    def _check(self, target: Target, listed: bool) -> Verdict:
        """Public addresses of any host pass; loopback and private ones only for `listed` hosts."""
        try:
            return check_target(target, trusted=listed, wildcard=True, resolver=self._resolver)
        except UnsafeURL as exc:
            raise MediaError(str(exc), retryable=exc.retryable) from None
        except OSError as exc:
            raise MediaError(f"{target.shown()}: cannot resolve {target.host} ({type(exc).__name__})",
                             retryable=True) from None

    def _get(self, target: Target, verdict: Verdict, send_auth: bool, deadline: Deadline
             ) -> urllib3.BaseHTTPResponse:
        header: dict[str, str] = {}
        try:
            if send_auth and self._auth is not None:
                header = self._auth.header()
            resp = self._request(target, verdict, header, deadline)
            if resp.status == 401 and header and self._auth is not None and self._auth.refreshable:
                _finish(resp, complete=False)
                self._auth.invalidate(header)
                resp = self._request(target, verdict, self._auth.header(), deadline)
            return resp
        except LabelStudioError as exc:
            raise MediaError(str(exc), retryable=True) from None

    def _request(self, target: Target, verdict: Verdict, headers: dict[str, str], deadline: Deadline
                 ) -> urllib3.BaseHTTPResponse:
        failure = "no address"
        for address in verdict.addresses:  # every one was checked; the next is tried when one refuses
            if deadline.passed:
                raise self._late(target)
            try:
                return self._connections.open(
                    target, address, {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers},
                    deadline.bound(self._timeout[0]), deadline.bound(self._timeout[1]))
            except urllib3.exceptions.HTTPError as exc:
                failure = type(exc).__name__
        if deadline.passed:
            raise self._late(target)
        raise MediaError(f"{target.shown()}: network error ({failure})", retryable=True)

    def _check_status(self, resp: urllib3.BaseHTTPResponse, target: Target, from_ls: bool) -> None:
        code = resp.status
        shown = target.shown(with_query=self._is_ls(target))
        if 200 <= code < 300:
            content_type = resp.headers.get("content-type", "").lower()
            if content_type.startswith("text/html"):
                hint = " (a login page? check LABEL_STUDIO_API_KEY)" if from_ls else ""
                raise MediaError(f"{shown}: got an HTML page, not an image{hint}", retryable=from_ls)
            return
        where = f"{shown}: HTTP {code}"
        if self._is_ls(target) and code in (401, 403, 404, 410):
            # The caller is told only that Label Studio did not give the file: which of its objects exist
            # (403 against 404) stays in the server's log.
            log.warning("Label Studio answered HTTP %s for %s", code, shown)
            if code == 401:
                hint = ("set LABEL_STUDIO_API_KEY" if self._auth is None
                        else "Label Studio refused LABEL_STUDIO_API_KEY")
                raise MediaError(f"{shown}: not given by Label Studio; {hint}", retryable=True)
            # Retryable: granting LABEL_STUDIO_API_KEY's user access, or fixing a storage or document-root
            # setting, makes the next request succeed.
            raise MediaError(f"{shown}: not given by Label Studio (no such file, or LABEL_STUDIO_API_KEY's user "
                             "may not read it; check the storage's settings)", retryable=True)
        if code in (408, 425, 429) or code >= 500:
            raise MediaError(f"{where} (temporary)", retryable=True)
        # A refused or missing file is a storage setting (credentials, presigning, LOCAL_FILES_DOCUMENT_ROOT,
        # a bucket or path), not a property of the image: asked again after the fix, it is fetched.
        what = "not found" if code in (404, 410) else "refused"
        raise MediaError(f"{where} ({what}: check the storage's settings and the task's URL)", retryable=True)

    def _read(self, resp: urllib3.BaseHTTPResponse, target: Target, deadline: Deadline) -> bytes:
        limit = self.settings.max_download_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(self._too_big(target.shown(), int(declared)), retryable=True)  # a setting: the limit
        try:
            data = read_body(resp, deadline, self._timeout[1], limit, CHUNK)
        except (TimeoutError, urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.passed:
                raise self._late(target) from None
            raise MediaError(
                f"{target.shown()}: network error while reading ({type(exc).__name__})", retryable=True
            ) from None
        if data is None:
            raise MediaError(self._too_big(target.shown(), None), retryable=True)  # the limit is a setting
        return data

    def _late(self, target: Target) -> MediaError:
        return MediaError(f"{target.shown()}: the download took longer than CAR_DOWNLOAD_TIMEOUT="
                          f"{self._total_timeout:g} s", retryable=True)

    def _too_big(self, what: str, size: int | None) -> str:
        got = f" ({size} bytes)" if size is not None else ""
        return f"{what}: larger than CAR_MAX_DOWNLOAD_BYTES={self.settings.max_download_bytes} bytes{got}"

    def _is_ls(self, target: Target) -> bool:
        return self._ls_origin is not None and target.origin == self._ls_origin


def _parsed(url: str) -> Target:
    try:
        return parse_url(url)
    except UnsafeURL as exc:
        raise MediaError(str(exc), retryable=exc.retryable) from None


def _redirected(current: Target, location: str) -> Target:
    """The next hop: the raw Location is checked before urljoin, which would drop tabs and newlines."""
    try:
        check_characters(location)
    except UnsafeURL as exc:
        raise MediaError(f"{current.shown()} redirects to a refused URL: {exc}", retryable=exc.retryable) from None
    return _parsed(urljoin(current.url, location))


def _finish(resp: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Give the connection back to its pool, closed unless the body was read to its end."""
    if not complete:
        resp.close()
    resp.release_conn()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an RGB image with its EXIF orientation applied; raise MediaError otherwise."""
    if not data:
        raise MediaError("the image is empty (0 bytes)", retryable=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"the image is {width}x{height} = {width * height} pixels, more than "
                    f"CAR_MAX_IMAGE_PIXELS={max_pixels}",
                    retryable=True,  # the limit is a setting; Pillow's own bomb limit below is permanent
                )
            image.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"the image is too large to decode safely: {exc}", retryable=False) from None
    except Exception as exc:  # Pillow raises many types for corrupt or unknown data
        raise MediaError(f"cannot decode the image ({type(exc).__name__}: {str(exc)[:200]})", retryable=False) from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # unreadable EXIF: show the pixels as stored, as browsers do
        log.debug("ignoring unreadable EXIF orientation (%s)", type(exc).__name__)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float32)
        if values.max(initial=0) > 255:  # 16-bit data: show it as a browser does, top 8 bits
            values = values / 257.0
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
