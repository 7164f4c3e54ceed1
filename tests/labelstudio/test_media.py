import base64
import io
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

from car_backend.labelstudio.client import LabelStudioAPI, LabelStudioError, jwt_claims
from car_backend.labelstudio.media import MediaError, MediaFetcher, decode_image
from car_backend.settings import Settings
from tests.support.fake_label_studio import PAT, FakeLabelStudio, Reply, query

UPLOAD = "/data/upload/1/abc-photo.png"


def png(width=12, height=8, color=(200, 30, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def settings(ls: FakeLabelStudio | None, key: str = PAT, **overrides) -> Settings:
    return Settings(label_studio_url=ls.url if ls else "", label_studio_api_key=key, **overrides)


@pytest.fixture
def ls():
    with FakeLabelStudio() as server:
        server.routes[UPLOAD] = Reply(body=png(), headers={"Content-Type": "image/png"})
        server.protected.add(UPLOAD)
        yield server


def fetch_error(fetcher: MediaFetcher, ref: str, task_id=None) -> MediaError:
    with pytest.raises(MediaError) as info:
        fetcher.fetch(ref, task_id)
    return info.value


def assert_no_secret(text: str, ls: FakeLabelStudio) -> None:
    assert PAT not in text and PAT.split(".")[2] not in text
    if ls.access_token:
        assert ls.access_token.split(".")[2] not in text


# ---- Label Studio paths and the personal access token ----


def test_upload_path_is_fetched_with_an_exchanged_access_token_once(ls):
    fetcher = MediaFetcher(settings(ls))
    image = fetcher.fetch(UPLOAD)
    assert image.mode == "RGB" and image.size == (12, 8)
    assert image.getpixel((0, 0)) == (200, 30, 40)
    fetcher.fetch(UPLOAD)
    MediaFetcher(settings(ls)).fetch("upload/1/abc-photo.png")  # another fetcher shares the access token
    assert ls.refreshes == 1
    media = ls.seen_paths("/data/")
    assert [s.path for s in media] == [UPLOAD] * 3
    assert all(s.authorization == f"Bearer {ls.access_token}" for s in media)
    refresh = ls.seen_paths("/api/token/refresh/")[0]
    assert refresh.method == "POST" and refresh.authorization is None


def test_401_gets_a_fresh_access_token_and_one_retry(ls):
    fetcher = MediaFetcher(settings(ls))
    fetcher.fetch(UPLOAD)
    first = ls.access_token
    ls.revoke_access()
    assert fetcher.fetch(UPLOAD).size == (12, 8)
    assert ls.refreshes == 2 and ls.access_token != first
    assert [s.authorization for s in ls.seen_paths("/data/")][-2:] == [
        f"Bearer {first}",
        f"Bearer {ls.access_token}",
    ]


def test_access_token_is_renewed_before_it_expires():
    with FakeLabelStudio(access_lifetime=0.6) as ls:
        ls.routes[UPLOAD] = Reply(body=png())
        ls.protected.add(UPLOAD)
        fetcher = MediaFetcher(settings(ls))
        fetcher.fetch(UPLOAD)
        fetcher.fetch(UPLOAD)
        assert ls.refreshes == 1
        time.sleep(0.4)  # past half the lifetime: renewed before use, no 401 round trip
        fetcher.fetch(UPLOAD)
        assert ls.refreshes == 2
        assert all(s.authorization == f"Bearer {ls.access_token}" for s in ls.seen_paths("/data/")[-1:])
        assert len(ls.seen_paths("/data/")) == 3


def test_concurrent_fetches_exchange_the_token_once(ls):
    fetcher = MediaFetcher(settings(ls))
    errors = []

    def work():
        try:
            fetcher.fetch(UPLOAD)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and ls.refreshes == 1 and len(ls.seen_paths("/data/")) == 8


def test_legacy_token_is_sent_as_token_without_exchange():
    with FakeLabelStudio(legacy_token="legacy0123456789") as ls:
        ls.routes[UPLOAD] = Reply(body=png())
        ls.protected.add(UPLOAD)
        assert MediaFetcher(settings(ls, key="legacy0123456789")).fetch(UPLOAD).size == (12, 8)
        assert ls.refreshes == 0
        assert ls.seen_paths("/data/")[0].authorization == "Token legacy0123456789"


def test_rejected_pat_is_a_transient_error_that_names_the_setting_not_the_token(ls, caplog):
    ls.reject_pat = True
    caplog.set_level(logging.DEBUG)
    err = fetch_error(MediaFetcher(settings(ls)), UPLOAD)
    assert err.retryable is True
    assert "LABEL_STUDIO_API_KEY" in str(err) and "401" in str(err)
    assert_no_secret(str(err), ls)
    assert_no_secret(caplog.text, ls)


def test_missing_key_or_url_is_a_transient_configuration_error(ls):
    err = fetch_error(MediaFetcher(settings(ls, key="")), UPLOAD)
    assert err.retryable is True and "set LABEL_STUDIO_API_KEY" in str(err)
    assert ls.seen_paths("/data/")[0].authorization is None
    err = fetch_error(MediaFetcher(settings(None)), UPLOAD)
    assert err.retryable is True and "LABEL_STUDIO_URL" in str(err)


def test_local_files_path_keeps_its_query(ls):
    path = "/data/local-files/?d=images/a%20b.png"
    ls.routes[path] = Reply(body=png(5, 5))
    ls.protected.add(path)
    assert MediaFetcher(settings(ls)).fetch(path).size == (5, 5)
    ls.routes[path] = Reply(404)  # a storage or document-root mistake: fixed by a setting, so not permanent
    err = fetch_error(MediaFetcher(settings(ls)), path)
    assert err.retryable is True and "d=images/a%20b.png" in str(err) and "not given by Label Studio" in str(err)
    # which of Label Studio's objects exist is not told to the caller (its port may hold "404": left out)
    assert "404" not in str(err).replace(ls.url, "")


def test_label_studio_under_a_path_prefix():
    with FakeLabelStudio() as ls:
        ls.routes["/ls" + UPLOAD] = Reply(body=png())
        s = Settings(label_studio_url=ls.url + "/ls/", label_studio_api_key="legacy-key")
        assert MediaFetcher(s).fetch(UPLOAD).size == (12, 8)


# ---- cloud URIs ----


def test_cloud_uri_is_presigned_by_label_studio_and_the_token_stays_home(ls):
    signed = "/bucket/photo.png?X-Amz-Signature=supersecret"
    uri = "s3://bucket/photo.png"
    presign = f"/tasks/7/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    other_host = f"http://localhost:{ls.port}"  # another origin on the same server: not Label Studio
    ls.routes[presign] = Reply(302, headers={"Location": other_host + signed})
    ls.protected.add(presign)
    ls.routes[signed] = Reply(body=png(3, 4))
    # localhost is a loopback address: listed, as a private object store would be (public ones need nothing)
    image = MediaFetcher(settings(ls, allowed_hosts=("localhost",))).fetch(uri, task_id=7)
    assert image.size == (3, 4)
    hops = ls.seen_paths("/tasks/") + ls.seen_paths("/bucket/")
    assert hops[0].authorization == f"Bearer {ls.access_token}"
    assert hops[1].authorization is None  # the key never leaves Label Studio
    assert base64.urlsafe_b64decode(query(hops[0].path)["fileuri"][0]).decode() == uri


@pytest.mark.parametrize("status", [403, 404])
def test_a_storage_refusal_after_the_presign_redirect_is_not_permanent(ls, status):
    """A bucket policy, expired storage credentials or a wrong prefix: an operator fixes it, then it works."""
    uri = "s3://bucket/gone.png"
    presign = f"/tasks/8/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    ls.routes[presign] = Reply(302, headers={"Location": f"http://localhost:{ls.port}/bucket/gone.png?sig=s"})
    ls.routes["/bucket/gone.png?sig=s"] = Reply(status)
    fetcher = MediaFetcher(settings(ls, allowed_hosts=("localhost",)))
    err = fetch_error(fetcher, uri, task_id=8)
    assert err.retryable is True and f"HTTP {status}" in str(err) and "storage" in str(err)
    ls.routes["/bucket/gone.png?sig=s"] = Reply(body=png(4, 4))
    assert fetcher.fetch(uri, task_id=8).size == (4, 4)


def test_cloud_uri_needs_a_task_id(ls):
    err = fetch_error(MediaFetcher(settings(ls)), "gs://bucket/a.jpg")
    assert err.retryable is False and "task id" in str(err)


# ---- other hosts ----


def test_foreign_hosts_need_to_be_allowed_and_never_get_the_key(ls):
    foreign = f"http://localhost:{ls.port}/img.png?token=abc"
    ls.routes["/img.png?token=abc"] = Reply(body=png(2, 2))
    err = fetch_error(MediaFetcher(settings(ls)), foreign)
    assert err.retryable is True and "CAR_ALLOWED_HOSTS" in str(err) and "token=abc" not in str(err)
    assert ls.seen_paths("/img.png") == []
    for allowed in ("localhost", f"localhost:{ls.port}", "LocalHost"):
        assert MediaFetcher(settings(ls, allowed_hosts=(allowed,))).fetch(foreign).size == (2, 2)
    # `*` admits public hosts only: a loopback one must be named
    err = fetch_error(MediaFetcher(settings(ls, allowed_hosts=("*",))), foreign)
    # a setting decides it (naming the host admits it): pending, not a permanent empty prediction
    assert err.retryable is True and "loopback or private" in str(err) and "CAR_ALLOWED_HOSTS" in str(err)
    assert all(s.authorization is None for s in ls.seen_paths("/img.png"))
    fetch_error(MediaFetcher(settings(ls, allowed_hosts=("localhost:1",))), foreign)
    fetch_error(MediaFetcher(settings(ls, allowed_hosts=("*.example.com",))), foreign)


def test_allowed_host_cannot_redirect_to_a_forbidden_one_or_borrow_the_key(ls):
    ls.routes["/hop"] = Reply(302, headers={"Location": f"http://127.0.0.2:{ls.port}/x.png"})
    fetcher = MediaFetcher(settings(ls, allowed_hosts=("localhost",)))
    err = fetch_error(fetcher, f"http://localhost:{ls.port}/hop")
    assert err.retryable is True and "127.0.0.2" in str(err)
    ls.routes["/hop2"] = Reply(302, headers={"Location": ls.url + UPLOAD})  # to Label Studio: no key sent
    err = fetch_error(fetcher, f"http://localhost:{ls.port}/hop2")
    assert ls.seen_paths("/data/")[-1].authorization is None


def test_too_many_redirects(ls):
    ls.routes["/loop"] = Reply(302, headers={"Location": "/loop"})
    err = fetch_error(MediaFetcher(settings(ls)), ls.url + "/loop")
    assert err.retryable is False and "redirects" in str(err)


def test_local_paths_only_when_allowed(tmp_path):
    file = tmp_path / "a.png"
    file.write_bytes(png(6, 7))
    strict = MediaFetcher(settings(None))
    assert fetch_error(strict, str(file)).retryable is False
    assert fetch_error(strict, file.as_uri()).retryable is False
    offline = MediaFetcher(settings(None), allow_local_files=True)
    assert offline.fetch(str(file)).size == (6, 7)
    assert offline.fetch(file.as_uri()).size == (6, 7)
    assert fetch_error(offline, str(tmp_path / "missing.png")).retryable is False
    big = MediaFetcher(settings(None, max_download_bytes=10), allow_local_files=True)
    assert "CAR_MAX_DOWNLOAD_BYTES" in str(fetch_error(big, str(file)))


# ---- failures: permanent or not ----


@pytest.mark.parametrize(
    ("reply", "permanent", "text"),
    [
        # every HTTP status: a setting or an outage, never the image itself; Label Studio's own answers are
        # not told to the caller (which of its objects exist)
        (Reply(404), False, "not given by Label Studio"),
        (Reply(410), False, "not given by Label Studio"),
        (Reply(403), False, "not given by Label Studio"),
        (Reply(400), False, "HTTP 400"),
        (Reply(500), False, "HTTP 500"),
        (Reply(503), False, "HTTP 503"),
        (Reply(429), False, "HTTP 429"),
        (Reply(200, b"<html>login</html>", {"Content-Type": "text/html; charset=utf-8"}), False, "HTML page"),
        (Reply(200, b"\x89PNG\r\n\x1a\n this is not really a png"), True, "cannot decode"),
        (Reply(200, b""), True, "empty"),
    ],
)
def test_failure_kinds(ls, reply, permanent, text, caplog):
    caplog.set_level(logging.DEBUG)
    ls.routes[UPLOAD] = reply
    err = fetch_error(MediaFetcher(settings(ls)), UPLOAD)
    assert err.retryable is not permanent and text in str(err)
    assert_no_secret(str(err) + caplog.text, ls)


def test_network_errors_and_timeouts_are_transient(ls):
    ls.routes["/slow.png"] = Reply(body=png(), delay=1.0)
    fetcher = MediaFetcher(settings(ls), timeout=(1.0, 0.2))
    err = fetch_error(fetcher, ls.url + "/slow.png")
    assert err.retryable is True and "network error" in str(err)
    with FakeLabelStudio() as gone:
        url = gone.url
    err = fetch_error(MediaFetcher(Settings(label_studio_url=url)), url + UPLOAD)
    assert err.retryable is True


def test_download_size_limit_by_header_and_while_streaming(ls):
    body = png(200, 200, color=7, mode="L") + b"\0" * 5000
    ls.routes["/big.png"] = Reply(body=body)
    ls.routes["/big-chunked.png"] = Reply(body=body * 50, chunked=True)
    fetcher = MediaFetcher(settings(ls, max_download_bytes=4000))
    for path in ("/big.png", "/big-chunked.png"):
        err = fetch_error(fetcher, ls.url + path)
        assert err.retryable is True and "CAR_MAX_DOWNLOAD_BYTES=4000" in str(err)


def test_pixel_limit(ls):
    ls.routes[UPLOAD] = Reply(body=png(100, 60))
    err = fetch_error(MediaFetcher(settings(ls, max_image_pixels=5000)), UPLOAD)
    assert (
        err.retryable is True
        and "100x60 = 6000 pixels" in str(err)
        and "CAR_MAX_IMAGE_PIXELS=5000" in str(err)
    )


# ---- decoding ----


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif, quality=95)
    image = decode_image(buf.getvalue(), 10_000)
    assert image.size == (20, 40)
    top = np.asarray(image)[2, 10]  # the left band is now on top
    assert top[0] > 200 and top[2] < 60


@pytest.mark.parametrize(
    ("mode", "color"),
    [
        ("RGBA", (10, 20, 30, 0)),
        ("L", 128),
        ("P", 3),
        ("I;16", 65535),
        ("LA", (0, 0)),
        ("1", 1),
        ("CMYK", (0, 0, 0, 0)),
    ],
)
def test_every_mode_becomes_rgb(mode, color):
    buf = io.BytesIO()
    Image.new(mode, (4, 3), color).save(buf, format="TIFF")
    image = decode_image(buf.getvalue(), 100)
    assert image.mode == "RGB" and image.size == (4, 3)
    if mode in ("RGBA", "LA"):  # fully transparent shows as white, not black
        assert image.getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":
        assert image.getpixel((0, 0)) == (255, 255, 255)


# ---- the API helper ----


def test_label_studio_api_retries_once_after_401(ls):
    ls.routes["/api/projects/"] = Reply(body=b'{"results": []}', headers={"Content-Type": "application/json"})
    ls.protected.add("/api/projects/")
    api = LabelStudioAPI(settings(ls))
    assert api.request("GET", "/api/projects/").json() == {"results": []}
    ls.revoke_access()
    assert api.request("GET", "/api/projects/").status_code == 200
    assert ls.refreshes == 2
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioAPI(settings(ls, key=""))


def test_jwt_claims():
    assert jwt_claims(PAT)["token_type"] == "refresh"
    assert jwt_claims("legacy-token") is None
    assert jwt_claims("a.b.c") is None


# ---- the token only for Label Studio's media paths ----

@pytest.mark.parametrize("path", ["/api/projects/1/next/", "/data/../api/projects/1/next/",
                                  "/data/%2e%2e/api/projects/1/next/", "/data/%2E%2E/api/tasks/1/",
                                  "/data/upload%2f..%2f..%2fapi/projects/", "/API/projects/1/", "/api"])
def test_label_studio_s_api_is_never_fetched_nor_given_the_token(ls, path):
    """Whoever sent the task: API paths of Label Studio's origin (also behind dot segments, percent-encoded
    dots or slashes) are refused with a clear error before any request is made."""
    for ref in (path, ls.url + path):
        before = len(ls.seen)
        err = fetch_error(MediaFetcher(settings(ls)), ref)
        assert err.retryable is False and ("media paths" in str(err) or not ref.startswith(("/data/", "http")))
        assert [s for s in ls.seen[before:] if not s.path.startswith("/api/token/")] == []
    assert all(s.authorization is None for s in ls.seen if "next" in s.path or "projects" in s.path)


def test_the_token_goes_to_media_paths_only_and_other_paths_are_fetched_without_it(ls):
    ls.routes["/elsewhere/a.png"] = Reply(body=png(), headers={"Content-Type": "image/png"})
    assert MediaFetcher(settings(ls)).fetch(ls.url + "/elsewhere/a.png").size == (12, 8)
    assert [s.authorization for s in ls.seen_paths("/elsewhere/")] == [None]
    assert MediaFetcher(settings(ls)).fetch(UPLOAD).size == (12, 8)
    assert ls.seen_paths(UPLOAD)[-1].authorization == f"Bearer {ls.access_token}"


def test_a_redirect_from_a_media_path_to_the_api_is_refused(ls):
    ls.routes["/data/upload/1/hop.png"] = Reply(302, headers={"Location": "/api/projects/1/next/"})
    ls.protected.add("/data/upload/1/hop.png")
    err = fetch_error(MediaFetcher(settings(ls)), "/data/upload/1/hop.png")
    assert "media paths" in str(err) and ls.seen_paths("/api/projects/") == []


def test_credentials_in_a_task_url_are_redacted_from_errors(ls):
    url = f"http://user:hunter2@127.0.0.2:{ls.port}/x.png?X-Amz-Signature=s3cr3t&sig=azsig"
    text = str(fetch_error(MediaFetcher(settings(ls)), url))
    assert "hunter2" not in text and "s3cr3t" not in text and "azsig" not in text
