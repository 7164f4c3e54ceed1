"""CaR (CLIP as RNN) segmentation engine: pure torch + numpy, no Label Studio, HTTP or queue code.

    from car_backend.engine import Segmenter
    result = Segmenter(settings).segment(image, ["cat", "dog", "sofa"])
"""

from car_backend.engine.models import ClipModel, ModelLoadError, ModelSpec, ModelSpecError, load_clip
from car_backend.engine.presets import PRESETS, Preset, get_preset
from car_backend.engine.result import Segmentation
from car_backend.engine.segmenter import PreparedImage, Segmenter

__all__ = [
    "PRESETS",
    "ClipModel",
    "ModelLoadError",
    "ModelSpec",
    "ModelSpecError",
    "Preset",
    "PreparedImage",
    "Segmentation",
    "Segmenter",
    "get_preset",
    "load_clip",
]
