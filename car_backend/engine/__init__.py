"""CaR (CLIP as RNN) segmentation engine: pure torch + numpy, no Label Studio, HTTP or queue code.

    from car_backend.engine import EngineConfig, Segmenter
    result = Segmenter(EngineConfig(device="cpu")).segment(image, ["cat", "dog", "sofa"])

Owns: the models, CaR's recurrence, presets, the result types, `EngineConfig` and the error vocabulary
(errors) every layer shares. May import: nothing of car_backend outside this package (the bottom layer).

Names are imported on first use, so `car_backend.engine.result` (plain numpy) can be used by the HTTP server
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EngineConfig": "config",
    "ClipModel": "models",
    "ModelLoadError": "models",
    "ModelSpec": "models",
    "ModelSpecError": "models",
    "load_clip": "models",
    "PRESETS": "presets",
    "Preset": "presets",
    "get_preset": "presets",
    "Segmentation": "result",
    "PreparedImage": "segmenter",
    "Segmenter": "segmenter",
}

__all__ = [  # noqa: RUF022 (grouped as _EXPORTS)
    "EngineConfig", "ClipModel", "ModelLoadError", "ModelSpec", "ModelSpecError", "load_clip",
    "PRESETS", "Preset", "get_preset",
    "Segmentation",
    "PreparedImage", "Segmenter",
]

if TYPE_CHECKING:
    from car_backend.engine.config import EngineConfig
    from car_backend.engine.models import ClipModel, ModelLoadError, ModelSpec, ModelSpecError, load_clip
    from car_backend.engine.presets import PRESETS, Preset, get_preset
    from car_backend.engine.result import Segmentation
    from car_backend.engine.segmenter import PreparedImage, Segmenter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
