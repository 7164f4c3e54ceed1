"""A real Label Studio 1.23.2 for end-to-end tests: install, migrate once, start, log in, talk to it.

- Installed with pip into its own virtual environment under <repo>/.cache/ (Label Studio pins its own SDK
  and Django, which must not meet ours). The first run installs (a couple of minutes); later runs reuse it.
- Migrated once into a template sqlite database (`label-studio version` migrates and exits), copied into a
  fresh data directory for every server, so a start takes seconds instead of a minute.
- Started on a free loopback port with an environment that reaches no outside host, never sees the
  caller's LABEL_STUDIO_* / USERNAME / PASSWORD / HOST / PORT variables, and lets it call ML backends on
  127.0.0.1 (protocol spec §10). The port is read from Label Studio's own output, because it silently
  moves to another port when the requested one is busy.
- Logged in with a session, which creates the personal access token (PAT) the backend under test uses.

Everything Label Studio prints goes to `<repo>/.cache/e2e/label-studio.log`.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.redis import free_port

VERSION = "1.23.2"
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
VENV = CACHE / "label-studio-venv"
TEMPLATE_DB = CACHE / f"label-studio-{VERSION}-template.sqlite3"
LOG_DIR = CACHE / "e2e"
USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-1"  # noqa: S105 - a throwaway user of a throwaway server

START_TIMEOUT_S = 240.0
_READY_LINE = re.compile(r"Starting development server at (http://[0-9.]+:\d+)/")
_CALLER_VARS = ("USERNAME", "PASSWORD", "USER_TOKEN", "HOST", "PORT", "DATABASE_NAME", "BASE_DATA_DIR")


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or used; the message points at the log."""


def ensure_installed(log) -> Path:
    """Install label-studio==VERSION into VENV unless a finished install is there; return its executable."""
    marker = VENV / f".installed-{VERSION}"
    exe = VENV / "bin" / "label-studio"
    if marker.exists() and exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, stdout=log, stderr=log)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, stdout=log, stderr=log)
    subprocess.run([*pip, f"label-studio=={VERSION}"], check=True, stdout=log, stderr=log)
    marker.write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    return exe


def label_studio_env(data_dir: Path) -> dict[str, str]:
    """The environment Label Studio runs with: offline, local ML backends allowed, no caller settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO_", "HEARTEX_")) and k not in _CALLER_VARS
    }
    env.update(
        DJANGO_DB="sqlite",
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


def ensure_template_db(exe: Path, log) -> Path:
    """A migrated database with no users, made once per Label Studio version."""
    if TEMPLATE_DB.exists():
        return TEMPLATE_DB
    with tempfile.TemporaryDirectory(prefix="ls-migrate-") as tmp:
        data_dir = Path(tmp)
        subprocess.run(
            [str(exe), "version", f"--data-dir={data_dir}"],
            check=True,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=label_studio_env(data_dir),
            cwd=tmp,
            timeout=900,
        )
        partial = TEMPLATE_DB.with_suffix(".partial")
        shutil.copyfile(data_dir / "label_studio.sqlite3", partial)
        partial.replace(TEMPLATE_DB)
    return TEMPLATE_DB


@dataclass
class LabelStudioServer:
    """A running Label Studio; `url`, the admin's `pat` (personal access token) and a logged-in `client`."""

    url: str
    pat: str
    client: LabelStudioClient
    data_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        _stop(self.process)


def _stop(process: subprocess.Popen) -> None:
    """End the server's own process group (it was started in a new session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def start_label_studio(data_dir: Path) -> LabelStudioServer:
    """Install (first time), migrate (first time), start, log in and create a PAT. Caller must `stop()`."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with open(CACHE / "label-studio.lock", "w") as lock, open(LOG_DIR / "install.log", "a") as install_log:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions at once must not install into one venv
        t0 = time.monotonic()
        exe = ensure_installed(install_log)
        timings["install_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        template = ensure_template_db(exe, install_log)
        timings["migrate_s"] = time.monotonic() - t1

    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, data_dir / "label_studio.sqlite3")
    log_path = LOG_DIR / "label-studio.log"
    t2 = time.monotonic()
    cmd = [
        str(exe),
        "start",
        "--no-browser",
        "--internal-host=127.0.0.1",
        f"--port={free_port()}",
        f"--data-dir={data_dir}",
        f"--username={USERNAME}",
        f"--password={PASSWORD}",
    ]
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=label_studio_env(data_dir),
        cwd=data_dir,
        start_new_session=True,
    )
    found: dict[str, str] = {}
    ready = threading.Event()
    threading.Thread(target=_pump, args=(process, log_path, found, ready), daemon=True).start()
    try:
        url = _wait_for_url(process, found, ready, log_path)
        _wait_until_healthy(url, process, log_path)
        timings["start_s"] = time.monotonic() - t2
        session = login(url)
        pat = create_pat(url, session)
    except BaseException:
        _stop(process)
        raise
    return LabelStudioServer(
        url=url,
        pat=pat,
        client=LabelStudioClient(url, session),
        data_dir=data_dir,
        log_path=log_path,
        process=process,
        timings=timings,
    )


def _pump(process: subprocess.Popen, log_path: Path, found: dict[str, str], ready: threading.Event) -> None:
    with open(log_path, "w") as log:
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            log.write(line)
            log.flush()
            match = _READY_LINE.search(line)
            if match and not ready.is_set():
                found["url"] = match.group(1)
                ready.set()
    ready.set()  # the process ended


def _fail(message: str, log_path: Path) -> LabelStudioError:
    tail = log_path.read_text(errors="replace").splitlines()[-30:] if log_path.exists() else []
    return LabelStudioError(f"{message} (log: {log_path})\n" + "\n".join(tail))


def _wait_for_url(process, found, ready, log_path) -> str:
    if not ready.wait(START_TIMEOUT_S) or "url" not in found:
        code = process.poll()
        raise _fail(
            f"Label Studio did not start ({'exit code ' + str(code) if code is not None else 'timeout'})",
            log_path,
        )
    return found["url"]


def _wait_until_healthy(url: str, process, log_path: Path) -> None:
    if not wait_for_http(url + "/health", process=process, timeout=60):
        code = process.poll()
        raise _fail(
            f"Label Studio exited with code {code}"
            if code is not None
            else f"{url}/health did not answer 200 within 60 s",
            log_path,
        )


def wait_for_http(url: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> bool:
    """Poll GET `url` until it answers 200 (True), `process` exits or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False


def login(url: str, email: str = USERNAME, password: str = PASSWORD) -> requests.Session:
    """A requests session logged in to Label Studio, sending the CSRF header Django wants on writes."""
    session = requests.Session()
    session.get(url + "/user/login/", timeout=30).raise_for_status()
    csrf = session.cookies.get("csrftoken")
    resp = session.post(
        url + "/user/login/",
        data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
        headers={"Referer": url + "/user/login/"},
        timeout=30,
        allow_redirects=False,
    )
    if resp.status_code != 302 or "sessionid" not in session.cookies:
        raise LabelStudioError(f"login as {email} failed: HTTP {resp.status_code}")
    session.headers.update({"X-CSRFToken": session.cookies.get("csrftoken"), "Referer": url + "/"})
    return session


def create_pat(url: str, session: requests.Session) -> str:
    """Create the user's personal access token (only possible once: LS never shows it again)."""
    resp = session.post(url + "/api/token/", timeout=30)
    if resp.status_code != 201 and resp.status_code != 200:
        raise LabelStudioError(f"POST /api/token/ answered HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json()["token"]


class LabelStudioClient:
    """The few Label Studio API calls the end-to-end tests make, through a logged-in session.

    Every method raises LabelStudioError with the response body when Label Studio answers an error.
    """

    def __init__(self, url: str, session: requests.Session):
        self.url = url
        self.session = session

    def api(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201, 204), **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 300)
        resp = self.session.request(method, self.url + path, **kwargs)
        if resp.status_code not in expect:
            raise LabelStudioError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:1000]}")
        return resp.json() if resp.content else None

    def create_project(self, label_config: str, title: str = "car-backend e2e", **fields: Any) -> dict:
        return self.api(
            "POST", "/api/projects/", json={"title": title, "label_config": label_config, **fields}
        )

    def update_project(self, project_id: int, **fields: Any) -> dict:
        """E.g. `model_version="car-..."` to show stored predictions of that version ("static" mode)."""
        return self.api("PATCH", f"/api/projects/{project_id}/", json=fields)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import task dicts (`{"data": {...}}` or plain data dicts); returns the new task ids in order."""
        out = self.api("POST", f"/api/projects/{project_id}/import?return_task_ids=true", json=tasks)
        return out["task_ids"]

    def upload_images(self, project_id: int, paths: list[Path]) -> list[int]:
        """Upload image files, one task each (`/data/upload/<pid>/<hex>-<name>`); returns task ids."""
        # Label Studio reads one file per form field, so each file needs a field name of its own.
        files = [(f"file{i}", (Path(p).name, Path(p).read_bytes())) for i, p in enumerate(paths)]
        out = self.api("POST", f"/api/projects/{project_id}/import?return_task_ids=true", files=files)
        return out["task_ids"]

    def connect_ml_backend(
        self,
        project_id: int,
        url: str,
        title: str = "car-backend",
        is_interactive: bool = False,
        extra_params: dict | str | None = None,
        **fields: Any,
    ) -> dict:
        """POST /api/ml; Label Studio calls the backend's /health and /setup before answering."""
        body = {"project": project_id, "url": url, "title": title, "is_interactive": is_interactive, **fields}
        if extra_params is not None:
            body["extra_params"] = extra_params
        return self.api("POST", "/api/ml", json=body)

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> dict:
        """The Data Manager action "Retrieve Predictions" (synchronous: one /predict for all tasks).

        It answers 200 "Retrieved N predictions" even when nothing was stored: read predictions back.
        """
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.api(
            "POST",
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
            json={"selectedItems": selected},
        )

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project, with its predictions and annotations."""
        out = self.api("GET", f"/api/tasks?project={project_id}&fields=all&page_size=1000")
        return out["tasks"] if isinstance(out, dict) else out

    def task(self, task_id: int) -> dict:
        """GET /api/tasks/<id>; note that LS asks the ML backend for a task with no prediction at all."""
        return self.api("GET", f"/api/tasks/{task_id}")

    def predictions(self, task_id: int) -> list[dict]:
        return self.api("GET", f"/api/predictions/?task={task_id}")

    def create_annotation(self, task_id: int, result: list[dict]) -> dict:
        """Submit an annotation as an annotator would; Label Studio then sends ANNOTATION_CREATED webhooks."""
        return self.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})

    def ml_backends(self, project_id: int) -> list[dict]:
        return self.api("GET", f"/api/ml?project={project_id}")

    def interactive_annotating(self, ml_backend_id: int, task_id: int, context: dict | None = None) -> dict:
        """What the labeling UI sends after a region is drawn.

        Label Studio answers `{"data": <the backend's first result>}` or `{"errors": [...]}`."""
        return self.api(
            "POST",
            f"/api/ml/{ml_backend_id}/interactive-annotating",
            json={"task": task_id, "context": context or {}},
        )
