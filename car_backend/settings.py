"""One typed settings object, read from the environment and validated at start, and the config objects
made from it.

Nothing else reads `os.environ` for car-backend's own settings (Label Studio's SDK reads a few of its own
variables, see labelstudio/media.py). The layers take what they need:
- the engine takes an `EngineConfig` (`Settings.engine_config()`), never `Settings`;
- `labelstudio` takes any object with the Label Studio access fields (`labelstudio.access.Access`, which
  `Settings` satisfies);
- pipeline, queue, review, service and worker take `Settings` itself.

This module imports only the engine (its config, presets and errors): it is on floor 1 of the layers, beside
labelstudio (see tests/test_layers.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from car_backend.engine.config import (
    COMPAT_MODES,
    DEVICES,
    PRECISIONS,
    PROPOSAL_MODES,
    REGION_MODES,
    SAM_MODEL_TYPES,
    SAM_MODES,
    EngineConfig,
)
from car_backend.engine.errors import CarError
from car_backend.engine.presets import PRESETS as _PRESETS


class SettingsError(CarError, ValueError):
    """A setting has a value we cannot use; the message names the variable and the allowed values."""


PRESETS = tuple(_PRESETS)
OUTPUTS = ("brush", "polygon", "auto")  # "auto": whatever control the label config has
SCORES = ("confidence", "uncertainty")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Fewer bytes than the smallest task Label Studio sends to /predict (TaskSimpleSerializer's 20 fields with
# empty data: 410 bytes as compact JSON), so CAR_MAX_TASKS=0 admits every task a body within the limit holds.
LS_TASK_MIN_BYTES = 400
LANE_MODES = ("auto", "on", "off")  # CAR_INTERACTIVE_LANE


@dataclass(frozen=True)
class Setting:
    """How one environment variable maps to one field."""

    env: str
    help: str
    choices: tuple[str, ...] | None = None
    secret: bool = False


def _meta(env: str, help: str, choices: tuple[str, ...] | None = None, secret: bool = False) -> dict:
    return {"setting": Setting(env=env, help=help, choices=choices, secret=secret)}


@dataclass(frozen=True)
class Settings:
    """Every setting of car-backend, one field per environment variable (see the field metadata).

    `Settings.from_env()` reads and validates them; constructing one directly (tests, `dataclasses.replace`)
    validates too. Raises SettingsError naming the variable and the allowed values. `engine_config()` is the
    engine's part; `redacted()` and `repr` mask secrets (the only forms that may be logged).
    """

    # Engine
    proposal_model: str = field(
        default="ViT-B-16:openai",
        metadata=_meta("CAR_PROPOSAL_MODEL", "Mask-proposal CLIP, `NAME:WEIGHTS` (open_clip name or config JSON; "
                       "pretrained tag, local checkpoint path, or `random`)."),
    )
    classifier_model: str = field(
        default="ViT-L-14:openai",
        metadata=_meta("CAR_CLASSIFIER_MODEL", "Mask-classifier CLIP, same form as CAR_PROPOSAL_MODEL."),
    )
    device: str = field(default="auto", metadata=_meta("CAR_DEVICE", "Where the models run.", DEVICES))
    precision: str = field(
        default="auto",
        metadata=_meta("CAR_PRECISION", "Model precision; auto = fp16 on CUDA; on a CPU with native bf16 "
                       "(avx512_bf16 or amx_bf16) the classifier in bf16 and the proposal model in fp32 (README "
                       "\"Precision\"); fp32 on other CPUs and with CAR_COMPAT=official.", PRECISIONS),
    )
    preset: str = field(
        default="coco",
        metadata=_meta("CAR_PRESET", "Thresholds and visual prompts (paper's per-dataset values).", PRESETS),
    )
    max_steps: int = field(
        default=10, metadata=_meta("CAR_MAX_STEPS", "Cap on recurrent steps (the official code has none).")
    )
    sam_checkpoint: str = field(
        default="",
        metadata=_meta("CAR_SAM_CHECKPOINT", "Path to a Segment Anything checkpoint of CAR_SAM_MODEL_TYPE; set to "
                       "refine masks with SAM (`random`: random weights, tests and benchmarks only)."),
    )
    sam_model_type: str = field(
        default="vit_h",
        metadata=_meta("CAR_SAM_MODEL_TYPE", "Segment Anything family and model of the checkpoint: vit_* = SAM "
                       "(extra `sam`), hq_vit_* = HQ-SAM (`sam-hq`, the paper's), sam2*_hiera_* = SAM 2 / 2.1 "
                       "(`sam2`).", SAM_MODEL_TYPES),
    )
    weights_dir: str = field(
        default="",
        metadata=_meta("CAR_WEIGHTS_DIR", "Cache folder for downloaded weights (open_clip's default when empty)."),
    )
    compat: str = field(
        default="fixed",
        metadata=_meta("CAR_COMPAT", "fixed = the project's fixes of the official code (README Deviations); "
                       "official = its outputs, quirks included.", COMPAT_MODES),
    )
    sam_mode: str = field(
        default="automatic",
        metadata=_meta("CAR_SAM_MODE", "How SAM refines CaR's masks: automatic = the paper's automatic masks "
                       "matched by IoM; prompted = each kept label's mask prompts SAM (box and points).",
                       SAM_MODES),
    )
    proposals: str = field(
        default="car",
        metadata=_meta("CAR_PROPOSALS", "car = CaR's masks; sam = two-stage (OVSeg-style): SAM's masks "
                       "classified over the labels CaR kept (needs CAR_SAM_CHECKPOINT). A control's "
                       "`car_proposals` overrides it.", PROPOSAL_MODES),
    )
    # Label Studio results
    output: str = field(
        default="auto",
        metadata=_meta("CAR_OUTPUT", "Region type; auto = whatever control the label config has.", OUTPUTS),
    )
    regions: str = field(
        default="semantic",
        metadata=_meta("CAR_REGIONS", "Brush and polygon regions: semantic = one per label (polygons: one per "
                       "connected part); instances = one per object (connected part, or Segment Anything's "
                       "object), each with its own score. A control's `car_regions` overrides it; rectangles "
                       "are one per object unless their control says semantic.", REGION_MODES),
    )
    polygon_tolerance: float = field(
        default=1.0,
        metadata=_meta("CAR_POLYGON_TOLERANCE", "Polygon simplification tolerance in pixels (0 keeps every vertex)."),
    )
    score: str = field(
        default="confidence",
        metadata=_meta("CAR_SCORE", "Task-level prediction score used to order review.", SCORES),
    )
    calibrate_after: int = field(
        default=20,
        metadata=_meta("CAR_CALIBRATE_AFTER", "Corrected tasks (annotations submitted on our predictions) after "
                       "which a project's thresholds are re-chosen, and again after each further as many "
                       "(0 = never)."),
    )
    fit_after: int = field(
        default=30,
        metadata=_meta("CAR_FIT_AFTER", "Corrected tasks after which a project's mask head is trained (and "
                       "again after each further as many; 0 = only on Start Training or `car-backend fit`)."),
    )
    fit_epochs: int = field(
        default=40, metadata=_meta("CAR_FIT_EPOCHS", "Most epochs one mask-head training runs."),
    )
    fit_seconds: float = field(
        default=900.0,
        metadata=_meta("CAR_FIT_SECONDS", "Time budget of one mask-head training in seconds; an unfinished "
                       "one keeps a checkpoint that the next training resumes."),
    )
    head_width: int = field(
        default=192, metadata=_meta("CAR_HEAD_WIDTH", "Channels of the mask head (a multiple of 4)."),
    )
    head_depth: int = field(
        default=2, metadata=_meta("CAR_HEAD_DEPTH", "Decoder layers of the mask head."),
    )
    fit_seed: int = field(
        default=0, metadata=_meta("CAR_FIT_SEED", "Seed of the mask head's initialisation and example order."),
    )
    fit_memory_mb: int = field(
        default=1024,
        metadata=_meta("CAR_FIT_MEMORY_MB", "Memory in MB a mask-head training or a calibration may hold for its "
                       "corrected images: a training keeps the most recently corrected tasks' features that fit "
                       "(~24 MB each at 1024x1024), a calibration prepares the images beyond it again for each "
                       "threshold set it tries."),
    )
    task_labels_key: str = field(
        default="",
        metadata=_meta("CAR_TASK_LABELS_KEY", "Task-data key listing the labels to look for in that task (optional)."),
    )
    # Queue
    redis_url: str = field(
        default="",
        metadata=_meta("REDIS_URL", "Redis for the job queue; empty = embedded worker process and Redis. "
                       "`redis://:PASSWORD@host:6379/0` for a password (`requirepass`), `rediss://` for TLS."),
    )
    queue: str = field(default="car", metadata=_meta("CAR_QUEUE", "RQ queue name for batch jobs."))
    predict_wait: float = field(
        default=60.0,
        metadata=_meta("CAR_PREDICT_WAIT", "Seconds /predict waits for jobs (keep under Label Studio's 100 s)."),
    )
    job_retries: int = field(default=2, metadata=_meta("CAR_JOB_RETRIES", "Retries of a failing job before it fails."))
    job_timeout: int = field(default=600, metadata=_meta("CAR_JOB_TIMEOUT", "Seconds one job may run."))
    result_ttl: int = field(
        default=7 * 24 * 3600, metadata=_meta("CAR_RESULT_TTL", "Seconds finished results stay in the cache.")
    )
    text_cache_ttl: int = field(
        default=30 * 24 * 3600,
        metadata=_meta("CAR_TEXT_CACHE_TTL", "Seconds text embeddings stay in Redis, shared by all workers (0 = off)."),
    )
    threads: int = field(
        default=0,
        metadata=_meta("CAR_THREADS", "torch CPU threads per worker (0 = torch's default: every core). Set "
                       "cores / workers when several CPU workers share a host."),
    )
    interactive_lane: str = field(
        default="auto",
        metadata=_meta("CAR_INTERACTIVE_LANE", "A second process beside each `car-backend worker` (and the embedded "
                       "one) that serves only interactive jobs, so an annotator never waits for the batch job running. "
                       "It costs memory: 0.5 GB idle, 2.8 GB once it has run a job with the default models on CPU (on "
                       "CUDA the models' fp16 copy, about 1.2 GB, and a CUDA context go to the GPU); the batch worker "
                       "beside it runs at a lower CPU priority. auto = on where the host has at least 8 GiB of "
                       "memory.", LANE_MODES),
    )
    # Delivery (issue 14): pending failures, late records, writes into Label Studio, embedded Redis data
    pending_ttl: int = field(
        default=60,
        metadata=_meta("CAR_PENDING_TTL", "Seconds (1-60) a failure that a setting or an outage can change (host "
                       "not allowed, size limit, HTTP 401/403/5xx, timeout) is cached and answered pending."),
    )
    late_ttl: int = field(
        default=7 * 24 * 3600,
        metadata=_meta("CAR_LATE_TTL", "Seconds a late task (to be written through the API when its job finishes) "
                       "is kept without news; renewed whenever its job is submitted, starts or retries a write."),
    )
    delivery_window: int = field(
        default=1800,
        metadata=_meta("CAR_DELIVERY_WINDOW", "Seconds a failed write into Label Studio is retried (exponential "
                       "backoff with jitter) before it is given up; the results stay cached."),
    )
    delivery_retry_max: float = field(
        default=60.0,
        metadata=_meta("CAR_DELIVERY_RETRY_MAX", "Longest wait in seconds between two tries of a failed write."),
    )
    delivery_batch: int = field(
        default=200,
        metadata=_meta("CAR_DELIVERY_BATCH", "Predictions of one project written per request (bulk import)."),
    )
    ls_timeout: float = field(
        default=60.0,
        metadata=_meta("CAR_LS_TIMEOUT", "Seconds a Label Studio API call may take to answer; a write that "
                       "times out is checked (its task read back) before it is sent again."),
    )
    data_dir: str = field(
        default="",
        metadata=_meta("CAR_DATA_DIR", "Folder of the embedded Redis's data (append-only), used when REDIS_URL is "
                       "unset; empty = ~/.cache/car-backend (XDG_CACHE_HOME is honoured)."),
    )
    # Label Studio access
    label_studio_url: str = field(
        default="",
        metadata=_meta("LABEL_STUDIO_URL", "Label Studio's address, for media downloads and writing predictions."),
    )
    label_studio_api_key: str = field(
        default="",
        metadata=_meta("LABEL_STUDIO_API_KEY", "Personal access token (or legacy token) of a Label Studio user.",
                       secret=True),
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata=_meta("CAR_ALLOWED_HOSTS", "Comma-separated hosts at loopback or private addresses (besides "
                                            "Label Studio's) that images may come from; public hosts are fetched "
                                            "without being listed, never with Label Studio's token."),
    )
    local_files_document_root: str = field(
        default="",
        metadata=_meta("LOCAL_FILES_DOCUMENT_ROOT", "Label Studio's local-files folder (as Label Studio's own "
                       "setting): `export --format yolo` links images under it into images/, never other paths; "
                       "empty = no links."),
    )
    max_image_pixels: int = field(
        default=50_000_000, metadata=_meta("CAR_MAX_IMAGE_PIXELS", "Largest image accepted, in pixels.")
    )
    max_download_bytes: int = field(
        default=64 * 1024 * 1024, metadata=_meta("CAR_MAX_DOWNLOAD_BYTES", "Largest image download, in bytes.")
    )
    download_timeout: float = field(
        default=120.0,
        metadata=_meta("CAR_DOWNLOAD_TIMEOUT", "Seconds one image download may take in all (redirects and retries "
                       "included); enforced on the socket, so a source that drips bytes is abandoned."),
    )
    max_labels: int = field(
        default=200,
        metadata=_meta("CAR_MAX_LABELS", "Most distinct labels (queries) one task may ask for; a task with more "
                       "is answered pending with the reason (no empty prediction: raising the limit predicts it)."),
    )
    max_label_length: int = field(
        default=256,
        metadata=_meta("CAR_MAX_LABEL_LENGTH", "Longest label, prompt or referring sentence, in characters; a "
                       "task with a longer one is answered pending with the reason (no empty prediction: raising the limit predicts it)."),
    )
    # HTTP server
    max_request_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata=_meta("CAR_MAX_REQUEST_BYTES", "Largest request body, in bytes; larger ones are answered 413 "
                       "before the body is read."),
    )
    max_label_config_bytes: int = field(
        default=256 * 1024,
        metadata=_meta("CAR_MAX_LABEL_CONFIG_BYTES", "Largest label config accepted, in bytes (UTF-8); a larger one is "
                       "refused (413) before it is parsed."),
    )
    max_tasks: int = field(
        default=0,
        metadata=_meta("CAR_MAX_TASKS", "Most tasks one /predict may carry (413 above it: select fewer tasks, or "
                       "use `car-backend prelabel --project`); 0: every task a body within CAR_MAX_REQUEST_BYTES "
                       "can hold (one per 400 bytes, less than Label Studio sends for a task)."),
    )
    basic_auth_user: str = field(
        default="",
        metadata=_meta("BASIC_AUTH_USER", "Require HTTP basic auth with this user (and BASIC_AUTH_PASS) on every route "
                       "but the bare /health probe and annotation webhooks; `serve` needs it on a non-loopback HOST."),
    )
    basic_auth_pass: str = field(
        default="", metadata=_meta("BASIC_AUTH_PASS", "Password for basic auth.", secret=True)
    )
    insecure_no_auth: bool = field(
        default=False,
        metadata=_meta("CAR_INSECURE_NO_AUTH", "`true` lets `car-backend serve` run on a non-loopback HOST without "
                       "BASIC_AUTH_USER/PASS: anyone who reaches the port can then use every route (README Security)."),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=_meta("HOST", "Address `car-backend serve` binds to; a non-loopback one needs BASIC_AUTH_USER/PASS "
                       "(or CAR_INSECURE_NO_AUTH=true). The Docker image sets 0.0.0.0."),
    )
    port: int = field(default=9090, metadata=_meta("PORT", "Port `car-backend serve` listens on."))
    http_threads: int = field(
        default=32,
        metadata=_meta("CAR_HTTP_THREADS", "Threads running HTTP requests (waitress; at least 8; models never load "
                       "there). Requests are read asynchronously, so slow clients hold no thread."),
    )
    predict_waiters: int = field(
        default=0,
        metadata=_meta("CAR_PREDICT_WAITERS", "Most /predict calls waiting for jobs at once (0 = half of "
                       "CAR_HTTP_THREADS); the others answer pending at once, so /health always has a thread."),
    )
    request_timeout: float = field(
        default=30.0,
        metadata=_meta("CAR_REQUEST_TIMEOUT", "Seconds a client may take to send one request, headers and body "
                       "(from its first byte); slower ones get 408 and are disconnected."),
    )
    log_level: str = field(default="INFO", metadata=_meta("LOG_LEVEL", "Logging level.", LOG_LEVELS))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from `environ` (default: os.environ); `overrides` win over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            setting: Setting = f.metadata["setting"]
            raw = environ.get(setting.env)
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f, setting, raw.strip())
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setting: Setting = f.metadata["setting"]
            value = getattr(self, f.name)
            if setting.choices and value not in setting.choices:
                raise SettingsError(
                    f"{setting.env}={value!r} is not allowed; use one of: {', '.join(setting.choices)}"
                )
        for name in ("max_steps", "job_timeout", "max_image_pixels", "max_download_bytes", "port", "http_threads",
                     "download_timeout", "max_labels", "max_label_length", "max_request_bytes",
                     "max_label_config_bytes", "fit_epochs", "fit_seconds", "head_width", "head_depth",
                     "fit_memory_mb"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env(name)} must be a positive number, got {getattr(self, name)!r}")
        for name in ("predict_wait", "polygon_tolerance", "job_retries", "result_ttl", "text_cache_ttl", "threads",
                     "calibrate_after", "fit_after", "fit_seed", "max_tasks"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{_env(name)} must not be negative, got {getattr(self, name)!r}")
        for name in ("late_ttl", "delivery_window", "delivery_retry_max", "delivery_batch", "ls_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env(name)} must be a positive number, got {getattr(self, name)!r}")
        if not 1 <= self.pending_ttl <= 60:
            raise SettingsError(f"CAR_PENDING_TTL must be between 1 and 60 seconds, got {self.pending_ttl!r}")
        if self.request_timeout <= 0:
            raise SettingsError(f"CAR_REQUEST_TIMEOUT must be a positive number, got {self.request_timeout!r}")
        if self.predict_waiters < 0:
            raise SettingsError(f"CAR_PREDICT_WAITERS must not be negative, got {self.predict_waiters!r}")
        if self.head_width % 4:
            raise SettingsError(f"CAR_HEAD_WIDTH must be a multiple of 4 (attention heads), got {self.head_width}")
        if self.proposals == "sam" and not self.sam_checkpoint:
            raise SettingsError("CAR_PROPOSALS=sam needs Segment Anything: set CAR_SAM_CHECKPOINT (and "
                                "CAR_SAM_MODEL_TYPE)")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise SettingsError(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}")

    def engine_config(self) -> EngineConfig:
        """The engine's part of these settings."""
        return EngineConfig(
            proposal_model=self.proposal_model, classifier_model=self.classifier_model, device=self.device,
            precision=self.precision, preset=self.preset, max_steps=self.max_steps,
            sam_checkpoint=self.sam_checkpoint, sam_model_type=self.sam_model_type, weights_dir=self.weights_dir,
            compat=self.compat, sam_mode=self.sam_mode, proposals=self.proposals)

    @property
    def task_limit(self) -> int:
        """Most tasks one /predict may carry: CAR_MAX_TASKS, else (0) as many as a body within
        CAR_MAX_REQUEST_BYTES can hold from Label Studio, whose every task is over LS_TASK_MIN_BYTES."""
        return self.max_tasks or max(1, self.max_request_bytes // LS_TASK_MIN_BYTES)

    @property
    def waiting_predicts(self) -> int:
        """How many /predict calls may wait for jobs at once (CAR_PREDICT_WAITERS, else half the threads)."""
        return self.predict_waiters or max(1, self.http_threads // 2)

    def to_env(self) -> dict[str, str]:
        """The environment variables that make `Settings.from_env()` equal these settings (for child
        processes such as the embedded worker; secrets included, so never log it)."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            env[f.metadata["setting"].env] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env

    @property
    def can_write_predictions(self) -> bool:
        """Whether predictions can be written into Label Studio (URL and key are both set)."""
        return bool(self.label_studio_url and self.label_studio_api_key)

    def redacted(self) -> dict[str, Any]:
        """All settings as a dict with secrets masked: the only form that may be logged."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata["setting"].secret and value else _without_password(value)
        return out

    def __repr__(self) -> str:  # dataclass repr would print secrets
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.redacted().items())})"


def _without_password(value: Any) -> Any:
    """A URL with its password masked (`redis://:***@host`); anything else as it is."""
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        userinfo, host = rest.split("@", 1)
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return value


def _env(name: str) -> str:
    return next(f.metadata["setting"].env for f in dataclasses.fields(Settings) if f.name == name)


def _parse(f: dataclasses.Field, setting: Setting, raw: str) -> Any:
    parsers: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "str": str,
        "tuple[str, ...]": lambda s: tuple(h.strip() for h in s.split(",") if h.strip()),
        "bool": _boolean,
    }
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        value = parsers[kind](raw)
    except ValueError:
        raise SettingsError(f"{setting.env}={raw!r} is not a valid {kind}") from None
    if setting.env in ("LOG_LEVEL",):
        value = value.upper()
    return value


def _boolean(raw: str) -> bool:
    """`true`/`false` (also 1/0, yes/no, on/off, any case); ValueError for anything else."""
    lowered = raw.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the README table and `--help` are made from this."""
    rows = []
    for f in dataclasses.fields(Settings):
        setting: Setting = f.metadata["setting"]
        default = f.default
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        meaning = setting.help + (f" One of: {', '.join(setting.choices)}." if setting.choices else "")
        rows.append((setting.env, shown, meaning))
    return rows


def settings_markdown() -> str:
    """The README's settings table."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    lines += [f"| `{env}` | {f'`{default}`' if default else '(unset)'} | {meaning} |"
              for env, default, meaning in settings_table()]
    return "\n".join(lines)
