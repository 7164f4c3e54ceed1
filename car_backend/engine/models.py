"""Load CLIP models from model-spec strings, once per process, and cache their text embeddings.

A model spec is `NAME:WEIGHTS`:
- NAME: an open_clip model name (`ViT-B-16`) or a path to an open_clip model-config JSON (registered with
  open_clip under the file's stem);
- WEIGHTS: an open_clip pretrained tag (`openai`), a local checkpoint path, or `random` (random
  initialisation, for tests and benchmarks only).

Pretrained tags are resolved to a file before open_clip sees them: first in the local cache (CAR_WEIGHTS_DIR
or huggingface_hub's default), then from the network if it answers within seconds. Without network and
without a cached file the error names the file and the settings that supply it, instead of open_clip's
retry loop (about a minute) and its generic message.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from car_backend.engine.errors import CarError

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
# Checkpoints that hold a CLIP under a prefix: the key prefix -> what open_clip calls it. OVSeg's full model
# (e.g. ovseg_swinbase_vitL14_ft_mpt.pth) keeps its mask-adapted CLIP under `clip_adapter.clip_model.`; its
# released CLIP alone (ovseg_clip_l_9a1909.pth) already has open_clip's (OpenAI's) names.
CHECKPOINT_KEY_PREFIXES = {"clip_adapter.clip_model.": ""}
TEXT_CACHE_SIZE = 50_000
_TEXT_BATCH = 256
# Texts are encoded in blocks of exactly this many rows (the last block padded with copies of a row), so that
# every matrix product has the same shape whatever else is being encoded: see ClipModel._encode.
_TEXT_BLOCK = 16
_TEXT_ENCODING = f"block{_TEXT_BLOCK}"
_NETWORK_PROBE_TIMEOUT_S = 3.0


class ModelSpecError(CarError, ValueError):
    """A model spec string is malformed or names an unknown model."""


class ModelLoadError(CarError, RuntimeError):
    """Weights could not be loaded; the message names what is missing and which setting supplies it."""


class SharedTextCache(Protocol):
    """Text embeddings shared between processes (the worker plugs in a Redis one); the engine never needs it.

    Both methods may fail silently (return misses, drop writes): the model then encodes the texts itself.
    """

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]: ...

    def put_many(self, model: str, embeddings: dict[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class ModelSpec:
    name: str  # open_clip model name, or path to a model-config JSON
    weights: str  # pretrained tag, checkpoint path, or "random"

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Split `NAME:WEIGHTS`; a config-JSON path may itself contain ':' only before `.json`."""
        spec = spec.strip()
        if ".json:" in spec:
            name, weights = spec.split(".json:", 1)
            name += ".json"
        elif ":" in spec:
            name, weights = spec.split(":", 1)
        else:
            raise ModelSpecError(
                f"model spec {spec!r} has no weights part; write NAME:WEIGHTS, e.g. 'ViT-B-16:openai' "
                f"or 'ViT-B-16:{RANDOM_WEIGHTS}'"
            )
        name, weights = name.strip(), weights.strip()
        if not name or not weights:
            raise ModelSpecError(f"model spec {spec!r} must be NAME:WEIGHTS with both parts non-empty")
        return cls(name=name, weights=weights)

    @property
    def is_config_path(self) -> bool:
        return self.name.endswith(".json")

    @property
    def architecture(self) -> str:
        """The open_clip model name (the config file's stem for a JSON path)."""
        return Path(self.name).stem if self.is_config_path else self.name

    def __str__(self) -> str:
        return f"{self.name}:{self.weights}"


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CAR_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 on CPU (CPU half-precision matmuls are slow or unsupported).

    The engine resolves `auto` per model first (`resolve_precision`); this is the plain rule for a model
    loaded on its own.
    """
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_precision(precision: str, device: torch.device, role: str, compat: str = "fixed") -> str:
    """The precision (`fp32` | `fp16` | `bf16`) the engine loads one model in; `precision` is CAR_PRECISION.

    `role`: `proposal` (the Grad-CAM CLIP) or `classifier`; `compat`: CAR_COMPAT. `auto` is fp16 on CUDA
    (both models); on a CPU with native bf16 (`cpu_has_native_bf16`) bf16 for the classifier and fp32 for the
    proposal model, whose trunk feeds the Grad-CAM maps, the affinity and so the CRF's input (README
    "Precision": the measured agreement with fp32); fp32 on other CPUs and under CAR_COMPAT=official (the
    official code's own CPU precision). Any other value is returned as given.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if role == "classifier" and compat == "fixed" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively: one of NATIVE_BF16_FLAGS among the `cpuinfo` file's flags
    (x86 Linux; read once per process). False where the file is missing (macOS, Windows) or has no such
    flag: without them torch emulates bf16 matmuls, slower than fp32."""
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                if line.startswith("flags"):
                    return not set(NATIVE_BF16_FLAGS).isdisjoint(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return False


class ClipModel:
    """A frozen open_clip CLIP in eval mode, with a thread-safe LRU cache of L2-normalised text embeddings.

    `encode_texts` replaces the text tower (tests use it to give a hand-built model a lookup table).
    `shared_cache`, when set, is asked for the texts this process has not encoded yet, before the text tower
    (only for models whose `name` identifies their weights: loaded from a spec, or named by the caller).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable | None = None,
        name: str = "custom",
        encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
        cache_size: int = TEXT_CACHE_SIZE,
    ):
        if not isinstance(getattr(model, "visual", None), open_clip.transformer.VisionTransformer):
            raise ModelSpecError(f"{name}: CaR needs a ViT image tower (open_clip VisionTransformer)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self._encode_texts = encode_texts
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.shared_cache: SharedTextCache | None = None

    @property
    def identity(self) -> str:
        """What a shared cache keys this model's embeddings by: its weights, precision and the text encoding
        (`_TEXT_ENCODING`: rows encoded before texts were encoded in fixed blocks are not reused)."""
        return f"{self.name}|{str(self.dtype).removeprefix('torch.')}|{_TEXT_ENCODING}"

    @property
    def visual(self) -> open_clip.transformer.VisionTransformer:
        return self.model.visual

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): 100 for OpenAI CLIP."""
        return float(self.model.logit_scale.detach().float().exp())

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) float32 unit vectors on the model's device; each distinct text is encoded once."""
        if not texts:
            return torch.zeros(0, self.visual.output_dim, device=self.device)
        distinct = list(dict.fromkeys(texts))
        with self._lock:
            rows = {t: self._cache[t] for t in distinct if t in self._cache}
            for text in rows:
                self._cache.move_to_end(text)
        missing = [t for t in distinct if t not in rows]
        if missing:
            shared = self.shared_cache if self.name != "custom" else None
            if shared is not None:
                found = shared.get_many(self.identity, missing)
                width = self.visual.output_dim
                rows.update((t, torch.tensor(np.asarray(v, dtype=np.float32), device=self.device))
                            for t, v in zip(missing, found, strict=True) if v is not None and np.shape(v) == (width,))
            to_encode = [t for t in missing if t not in rows]
            if to_encode:
                fresh = torch.cat([self._encode(to_encode[i:i + _TEXT_BATCH])
                                   for i in range(0, len(to_encode), _TEXT_BATCH)])
                rows.update(zip(to_encode, fresh, strict=True))
                if shared is not None:
                    shared.put_many(self.identity, {t: row.cpu().numpy() for t, row in zip(to_encode, fresh,
                                                                                        strict=True)})
            with self._lock:
                self._cache.update((t, rows[t]) for t in missing)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([rows[t] for t in texts])

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        if self._encode_texts is not None:
            features = self._encode_texts(texts)
        else:
            # A text's embedding must not depend on the texts it happens to be batched with, or results would
            # depend on what a worker encoded before (a 1e-7 difference can flip a thresholded pixel). Rounding
            # depends on the shapes of the products, so texts are encoded in groups of equal token length, each
            # cut at its own end-of-text token, in blocks of exactly _TEXT_BLOCK rows.
            tokens = self.tokenizer(texts).to(self.device)
            lengths = tokens.argmax(dim=-1)
            features = None
            for length in lengths.unique().tolist():
                rows = (lengths == length).nonzero().squeeze(1)
                for start in range(0, len(rows), _TEXT_BLOCK):
                    block = rows[start:start + _TEXT_BLOCK]
                    padded = torch.cat([block, block[:1].expand(_TEXT_BLOCK - len(block))])
                    encoded = _encode_text_truncated(self.model, tokens[padded])[: len(block)]
                    if features is None:
                        features = encoded.new_empty((len(texts), encoded.shape[1]))
                    features[block] = encoded
        return torch.nn.functional.normalize(features.float(), dim=-1).to(self.device)


def _encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text, run only up to the last end-of-text token of the batch.

    The text tower is causal and pools the end-of-text token (the arg-max id), so positions after it cannot
    change the result: cutting the padding makes a short prompt ~5x cheaper to encode. Towers that are not
    causal or pool differently go through the model's own encode_text.
    """
    stock = (
        type(model).encode_text is open_clip.CLIP.encode_text
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )
    if not stock:
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


_LOADED: dict[tuple, ClipModel] = {}
_REGISTERED_CONFIGS: set[str] = set()
_LOAD_LOCK = threading.Lock()


def load_clip(
    spec: str | ModelSpec,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    weights_dir: str = "",
    setting: str = "CAR_PROPOSAL_MODEL",
) -> ClipModel:
    """The CLIP named by `spec`, loaded once per process per (spec, device, precision, weights_dir).

    `setting` is the environment variable that supplied the spec; errors name it.
    """
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    device = torch.device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(precision, device)
    key = (str(spec), str(device), dtype, weights_dir)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _build(spec, device, dtype, weights_dir, setting)
        return _LOADED[key]


def _build(spec: ModelSpec, device: torch.device, dtype: torch.dtype, weights_dir: str, setting: str) -> ClipModel:
    architecture = _register_architecture(spec, setting)
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    quick_gelu = False
    checkpoint: str | None
    if spec.weights == RANDOM_WEIGHTS:
        log.warning("%s=%s: random weights, the masks will be meaningless (tests and benchmarks only)", setting, spec)
        checkpoint = None
    elif _looks_like_path(spec.weights):
        checkpoint = spec.weights
        if not os.path.isfile(checkpoint):
            raise ModelLoadError(
                f"checkpoint {checkpoint} not found (from {setting}={spec}); point {setting} at an existing file"
            )
        _warn_if_openai_gelu_mismatch(architecture)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(architecture, spec.weights)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(architecture)
            raise ModelLoadError(
                f"{setting}={spec}: {spec.weights!r} is neither a pretrained tag of {architecture} "
                f"(known: {', '.join(tags) or 'none'}), a checkpoint path, nor {RANDOM_WEIGHTS!r}"
            )
        # OpenAI's CLIPs were trained with QuickGELU; open_clip's plain names use nn.GELU.
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        checkpoint = _fetch_pretrained(spec, architecture, tag_cfg, weights_dir, setting)
    mapped = _prefixed_state_dict(checkpoint, spec, setting) if checkpoint and _looks_like_path(checkpoint) else None
    try:
        # Random weights are seeded so that every worker process builds the same model and a job's
        # answer does not depend on which worker ran it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(
                architecture,
                pretrained=None if mapped is not None else checkpoint,
                precision=precision,
                device=device,
                force_quick_gelu=quick_gelu,
            )
        if mapped is not None:
            # Every weight of the CLIP must be there; extra keys under the prefix (OVSeg's mask-prompt-tuning
            # tokens, which plain CLIP inference does not use) are left out, with a log line.
            missing, unexpected = model.load_state_dict(mapped, strict=False)
            if missing:
                raise RuntimeError(f"Missing key(s) in the checkpoint's CLIP: {', '.join(missing[:8])}")
            if unexpected:
                log.info("%s=%s: checkpoint keys not used by the CLIP: %s", setting, spec, ", ".join(unexpected[:8]))
    except Exception as exc:  # open_clip raises bare RuntimeErrors; keep the cause, name the setting
        raise ModelLoadError(f"{setting}={spec}: could not build the model: {exc}") from exc
    return ClipModel(model, open_clip.get_tokenizer(architecture), name=str(spec))


def _prefixed_state_dict(checkpoint: str, spec: ModelSpec, setting: str) -> dict[str, torch.Tensor] | None:
    """The CLIP's state dict with CHECKPOINT_KEY_PREFIXES mapped, if the checkpoint stores it under one;
    None for a checkpoint open_clip loads itself. Keys outside the prefix (the rest of OVSeg's model) are
    ignored."""
    if checkpoint.endswith(".safetensors"):
        return None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # a TorchScript archive or another format: open_clip's own loader decides
        return None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        return None
    for prefix, replacement in CHECKPOINT_KEY_PREFIXES.items():
        picked = {replacement + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            log.info("%s=%s: CLIP weights read from the checkpoint's %r keys", setting, spec, prefix)
            return picked
    return None


def _register_architecture(spec: ModelSpec, setting: str) -> str:
    if spec.is_config_path:
        if not os.path.isfile(spec.name):
            raise ModelSpecError(f"{setting}={spec}: model config {spec.name} not found")
        path = os.path.abspath(spec.name)
        if path not in _REGISTERED_CONFIGS:
            open_clip.add_model_config(path)
            _REGISTERED_CONFIGS.add(path)
    if spec.architecture not in open_clip.list_models():
        raise ModelSpecError(
            f"{setting}={spec}: unknown model {spec.architecture!r}; use an open_clip model name "
            f"(e.g. ViT-B-16, ViT-L-14) or a path to a model-config JSON"
        )
    return spec.architecture


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _warn_if_openai_gelu_mismatch(architecture: str) -> None:
    openai_cfg = open_clip.get_pretrained_cfg(architecture, "openai")
    if openai_cfg and openai_cfg.get("quick_gelu") and not architecture.endswith("-quickgelu"):
        log.warning(
            "%s uses nn.GELU; if this checkpoint holds OpenAI weights, name %s-quickgelu instead "
            "(OpenAI CLIPs were trained with QuickGELU)", architecture, architecture,
        )


def _fetch_pretrained(spec: ModelSpec, architecture: str, tag_cfg: dict, weights_dir: str, setting: str) -> str:
    """Local path of a pretrained tag's checkpoint: from the cache, else downloaded if the network answers."""
    cache_dir = weights_dir or None
    hub = tag_cfg.get("hf_hub", "")
    url = tag_cfg.get("url", "")
    if hub:
        repo_id, filename = (hub.rstrip("/"), HF_WEIGHTS_NAME) if hub.endswith("/") else os.path.split(hub)
        where = f"{repo_id}/{filename} from huggingface.co"
        cached = _find_cached_hub(repo_id, filename, cache_dir)
        host = "huggingface.co"
    elif url:
        where = url
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(urlparse(url).path))
        cached = target if os.path.isfile(target) else None
        host = urlparse(url).hostname or ""
    else:
        raise ModelLoadError(f"{setting}={spec}: open_clip knows no download location for this tag")
    if cached:
        return cached
    cache_note = f"CAR_WEIGHTS_DIR={weights_dir}" if weights_dir else "CAR_WEIGHTS_DIR unset, default cache"
    offline_reason = _offline_reason(host)
    if offline_reason:
        raise ModelLoadError(
            f"cannot load {setting}={spec}: checkpoint {where} is not in the local cache ({cache_note}) and "
            f"cannot be downloaded ({offline_reason}). Download it on a machine with network access into "
            f"CAR_WEIGHTS_DIR, or set {setting}={spec.name}:/path/to/checkpoint"
        )
    log.info("downloading %s for %s=%s", where, setting, spec)
    try:
        return open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {setting}={spec}: downloading {where} failed ({exc}); put the checkpoint in "
            f"CAR_WEIGHTS_DIR or set {setting}={spec.name}:/path/to/checkpoint"
        ) from exc


def _find_cached_hub(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    """The cached file, preferring the safetensors twin that open_clip's downloader prefers too."""
    from huggingface_hub import hf_hub_download

    stem, suffix = os.path.splitext(filename)
    safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else stem + ".safetensors"
    for candidate in dict.fromkeys([safe if suffix in (".bin", ".pth") else filename, filename]):
        try:
            return hf_hub_download(repo_id, candidate, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # huggingface_hub signals "not cached" with several exception types
            continue
    return None


def _offline_reason(host: str) -> str:
    """Why no download should be tried ('' when the host answers)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((host, 443), timeout=_NETWORK_PROBE_TIMEOUT_S):
            return ""
    except OSError as exc:
        return f"{host} is unreachable: {exc}"
