"""Fetch a task's image, whatever form Label Studio gives its reference in.

Task data is sent raw (protocol spec §4):
- `/data/upload/<pid>/<file>` (also `upload/...`), `/data/local-files/?d=...` and other Label Studio
  paths (`/storage-data/...`, `/tasks/...`): relative to LABEL_STUDIO_URL, fetched with LABEL_STUDIO_API_KEY;
- `s3://`, `gs://`, `azure-blob://` URIs: Label Studio presigns them at
  `/tasks/<task id>/presign/?fileuri=<urlsafe base64>` and redirects or proxies;
- `http(s)://` URLs: Label Studio's own origin gets the key; other hosts only when listed in
  CAR_ALLOWED_HOSTS (`host`, `host:port`, `*.domain` or `*`), and never the key;
- local paths and `file://` URLs, only for a fetcher made with `allow_local_files=True` (offline prelabel).

Redirects are followed by hand, at most five: a hop from Label Studio may go anywhere (that is how
presigned cloud URLs arrive), any other hop only to an allowed host, and once a hop has left Label Studio
the key is never sent again.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from car_backend.engine.errors import CarError
from car_backend.labelstudio.access import Access
from car_backend.labelstudio.client import LabelStudioError, shared_auth

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LS_PATHS = ("/data/", "/storage-data/", "/tasks/", "/upload/", "upload/")  # relative to LABEL_STUDIO_URL
MAX_REDIRECTS = 5
CHUNK = 64 * 1024


class MediaError(CarError):
    """An image could not be fetched or decoded.

    `retryable` is False when asking again cannot help (corrupt or undecodable bytes, a decompression bomb,
    not found, a reference that is no URL) and True when it may (network error, timeout, 5xx, Label Studio
    refusing or missing credentials, a host not in CAR_ALLOWED_HOSTS, larger than CAR_MAX_DOWNLOAD_BYTES or
    CAR_MAX_IMAGE_PIXELS: fixing the configuration makes the retry succeed). The message never holds a token.
    `retryable` must be given: a non-retryable failure becomes a permanent empty prediction.
    """

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message, retryable=retryable)


class MediaFetcher:
    """Downloads and decodes task images; one instance is safe to share between threads."""

    def __init__(
        self,
        settings: Access,
        *,
        allow_local_files: bool = False,
        timeout: tuple[float, float] = (5.0, 30.0),
        total_timeout: float = 120.0,
    ):
        self.settings = settings
        self.allow_local_files = allow_local_files
        self._timeout = timeout
        self._total_timeout = total_timeout
        self._ls_url = settings.label_studio_url.rstrip("/")
        self._ls_origin = _origin(self._ls_url) if self._ls_url else None
        self._auth = (
            shared_auth(self._ls_url, settings.label_studio_api_key)
            if self._ls_url and settings.label_studio_api_key
            else None
        )
        self._allowed = tuple(h.strip().lower().strip("[]") for h in settings.allowed_hosts if h.strip())
        self._local = threading.local()

    def fetch(self, ref: str, task_id: int | None = None) -> Image.Image:
        """The image `ref` points at: RGB, EXIF orientation applied, within the size limits."""
        if not isinstance(ref, str) or not ref.strip():
            raise MediaError(
                f"no image reference in the task (got {type(ref).__name__} {str(ref)[:80]!r})", retryable=False
            )
        ref = ref.strip()
        started = time.monotonic()
        data = self._bytes(ref, task_id)
        image = decode_image(data, self.settings.max_image_pixels)
        log.debug(
            "fetched %s: %dx%d, %d bytes in %.2f s",
            self._safe(ref),
            *image.size,
            len(data),
            time.monotonic() - started,
        )
        return image

    def _bytes(self, ref: str, task_id: int | None) -> bytes:
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return self._download(ref)
        if scheme in CLOUD_SCHEMES:
            return self._download(self._presign_url(ref, task_id))
        if scheme == "file" or (self.allow_local_files and Path(ref).is_absolute() and Path(ref).exists()):
            return self._read_local(unquote(urlsplit(ref).path) if scheme == "file" else ref)
        if ref.startswith(LS_PATHS):
            return self._download(self._ls_path_url(ref))
        if self.allow_local_files or Path(ref).is_absolute():
            return self._read_local(ref)
        raise MediaError(f"cannot fetch {ref[:200]!r}: not a URL, a Label Studio path or a cloud URI", retryable=False)

    def _ls_path_url(self, ref: str) -> str:
        if ref.startswith("upload/") or ref.startswith("/upload/"):
            ref = "/data/" + ref.lstrip("/")
        if not self._ls_url:
            raise MediaError(
                f"{self._safe(ref)} is a Label Studio path: set LABEL_STUDIO_URL to fetch it", retryable=True
            )
        return self._ls_url + ref

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise MediaError(
                f"{self._safe(uri)}: cloud URIs are presigned per task, and no task id was given", retryable=False
            )
        if not self._ls_url:
            raise MediaError(f"{self._safe(uri)}: set LABEL_STUDIO_URL so Label Studio can presign it", retryable=True)
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

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self._total_timeout
        trusted = self._is_ls(url)  # every hop so far was Label Studio's own
        vouched = False  # the previous hop was Label Studio, which may redirect anywhere
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise MediaError(f"{self._safe(url)}: only http(s) URLs are fetched", retryable=False)
            is_ls = self._is_ls(url)
            if not (is_ls or vouched or self._host_allowed(url)):
                raise MediaError(
                    f"{self._safe(url)}: host {urlsplit(url).netloc.split('@')[-1]!r} is not allowed; "
                    "add it to CAR_ALLOWED_HOSTS",
                    retryable=True,  # a setting decides it: the operator allowing the host fixes it
                )
            send_auth = is_ls and trusted
            resp = self._get(url, send_auth)
            if resp.is_redirect:
                location = resp.headers["location"]
                resp.close()
                vouched = send_auth
                trusted = trusted and is_ls
                url = urljoin(url, location)
                continue
            try:
                self._check_status(resp, url, send_auth)
                return self._read(resp, url, deadline)
            finally:
                resp.close()
        raise MediaError(f"{self._safe(url)}: more than {MAX_REDIRECTS} redirects", retryable=False)

    def _get(self, url: str, send_auth: bool) -> requests.Response:
        header: dict[str, str] = {}
        try:
            if send_auth and self._auth is not None:
                header = self._auth.header()
            resp = self._request(url, header)
            if resp.status_code == 401 and header and self._auth is not None and self._auth.refreshable:
                resp.close()
                self._auth.invalidate(header)
                resp = self._request(url, self._auth.header())
            return resp
        except LabelStudioError as exc:
            raise MediaError(str(exc), retryable=True) from None

    def _request(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self._session().get(
                url, headers=headers, timeout=self._timeout, stream=True, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise MediaError(f"{self._safe(url)}: network error ({type(exc).__name__})", retryable=True) from None

    def _check_status(self, resp: requests.Response, url: str, from_ls: bool) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            content_type = resp.headers.get("content-type", "").lower()
            if content_type.startswith("text/html"):
                hint = " (a login page? check LABEL_STUDIO_API_KEY)" if from_ls else ""
                raise MediaError(f"{self._safe(url)}: got an HTML page, not an image{hint}", retryable=from_ls)
            return
        where = f"{self._safe(url)}: HTTP {code}"
        if code in (401, 403) and self._is_ls(url):
            hint = (
                "set LABEL_STUDIO_API_KEY"
                if self._auth is None
                else "Label Studio refused LABEL_STUDIO_API_KEY or its user may not read this file"
            )
            raise MediaError(f"{where}; {hint}", retryable=True)
        if code in (408, 425, 429) or code >= 500:
            raise MediaError(f"{where} (temporary)", retryable=True)
        raise MediaError(f"{where}{' (not found)' if code in (404, 410) else ''}", retryable=False)

    def _read(self, resp: requests.Response, url: str, deadline: float) -> bytes:
        limit = self.settings.max_download_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(self._too_big(self._safe(url), int(declared)), retryable=True)  # the limit is a setting
        buf = bytearray()
        try:
            for chunk in resp.iter_content(CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise MediaError(self._too_big(self._safe(url), None), retryable=True)
                if time.monotonic() > deadline:
                    raise MediaError(
                        f"{self._safe(url)}: download took longer than {self._total_timeout:.0f} s", retryable=True
                    )
        except requests.RequestException as exc:
            raise MediaError(
                f"{self._safe(url)}: network error while reading ({type(exc).__name__})", retryable=True
            ) from None
        return bytes(buf)

    def _too_big(self, what: str, size: int | None) -> str:
        got = f" ({size} bytes)" if size is not None else ""
        return f"{what}: larger than CAR_MAX_DOWNLOAD_BYTES={self.settings.max_download_bytes} bytes{got}"

    def _is_ls(self, url: str) -> bool:
        return self._ls_origin is not None and _origin(url) == self._ls_origin

    def _host_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        try:
            host_port = f"{host}:{parts.port or _default_port(parts.scheme)}"
        except ValueError:
            return False
        if self._ls_origin is not None and host_port == self._ls_origin[1]:
            return True
        for allowed in self._allowed:
            if allowed == "*" or allowed in (host, host_port):
                return True
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return True
        return False

    def _safe(self, url: str) -> str:
        """`url` fit for a message: no user info, and no query (presigned signatures) off Label Studio."""
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            return url[:300]
        netloc = parts.netloc.split("@")[-1]
        query = parts.query if self._is_ls(url) else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))[:300]

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session


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


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def _origin(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _default_port(parts.scheme)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.scheme.lower(), f"{parts.hostname.lower()}:{port}"
