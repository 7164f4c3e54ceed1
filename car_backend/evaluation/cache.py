"""Per-image predictions on disk, so an interrupted evaluation resumes where it stopped.

One folder per (dataset, engine identity); one PNG per sample holding the predicted dataset label ids
(0/1 for referring sets), with the seconds the segmentation took in a PNG text chunk. Files are written
under a temporary name and renamed, so a killed run never leaves a half-written prediction behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from car_backend import __version__
from car_backend.engine.config import EngineConfig
from car_backend.engine.presets import get_preset

log = logging.getLogger(__name__)

# The engine config fields that change what the engine predicts (device and the weights folder do not).
ENGINE_SETTINGS = ("proposal_model", "classifier_model", "precision", "max_steps", "sam_checkpoint", "sam_model_type",
                   "sam_mode", "proposals", "compat")


@dataclass(frozen=True)
class CachedPrediction:
    labels: np.ndarray  # (H, W) uint8
    seconds: float


def cache_identity(config: EngineConfig, dataset: str, preset: str, queries: object) -> dict:
    """Everything a cached prediction depends on; the preset by its values, so retuning it starts afresh."""
    identity = {name: getattr(config, name) for name in ENGINE_SETTINGS}
    identity.update(car_backend=__version__, dataset=dataset, preset=dataclasses.asdict(get_preset(preset)),
                    queries=queries)
    return identity


def cache_folder(base: Path, dataset: str, identity: dict) -> Path:
    """`base/<dataset>-<12 hex digits of the identity's hash>`."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return base / f"{dataset}-{digest}"


class PredictionCache:
    def __init__(self, folder: Path, identity: dict) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "identity.json").write_text(json.dumps(identity, indent=2, sort_keys=True, default=str) + "\n")

    def path(self, key: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.png"

    def load(self, key: str) -> CachedPrediction | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as image:
                labels = np.asarray(image, dtype=np.uint8)
                seconds = float(image.text["seconds"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cached prediction %s (%s); recomputing it", path, exc)
            return None
        return CachedPrediction(labels, seconds)

    def save(self, key: str, labels: np.ndarray, seconds: float) -> None:
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
            raise ValueError("cached label maps hold ids 0..255")
        info = PngInfo()
        info.add_text("seconds", repr(float(seconds)))
        path = self.path(key)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        Image.fromarray(labels.astype(np.uint8)).save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
