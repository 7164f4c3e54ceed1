"""`EngineConfig`: exactly what decides the engine's output, and its fingerprint.

The service builds one from its settings (`car_backend.settings.Settings.engine_config`); the engine never
reads the environment or the service's settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
COMPAT_MODES = ("fixed", "official")
MAX_SIDE = 1024


@dataclass(frozen=True)
class EngineConfig:
    """The models and limits one `Segmenter` runs with.

    proposal_model / classifier_model: `NAME:WEIGHTS` specs (see `engine.models.ModelSpec`).
    device: auto | cpu | cuda. precision: auto | fp32 | fp16 | bf16 (auto = fp16 on CUDA, fp32 on CPU).
    preset: the preset a call without one uses (`engine.presets.PRESETS`).
    max_steps: cap on recurrent steps. sam_checkpoint / sam_model_type: segment-anything refinement, off
    when the checkpoint is empty. weights_dir: where downloaded weights are cached (open_clip's default
    when empty; it changes where weights come from, not what they are). max_side: images with a longer side
    are processed at this size and answered at full size (None: never). compat: `fixed` (the project's
    fixes of the official code, README "Deviations") or `official` (its outputs, quirks included: position
    embeddings rounded to fp16, one-hot truncation of labels that win no CRF pixel, the CRF fed the wrapped
    BGR-minus-mean uint8 image).
    """

    proposal_model: str = "ViT-B-16:openai"
    classifier_model: str = "ViT-L-14:openai"
    device: str = "auto"
    precision: str = "auto"
    preset: str = "coco"
    max_steps: int = 10
    sam_checkpoint: str = ""
    sam_model_type: str = "vit_h"
    weights_dir: str = ""
    max_side: int | None = MAX_SIDE
    compat: str = "fixed"

    def fingerprint(self) -> str:
        """16 hex digits naming the models and the step cap: what a worker must share with the server whose
        model_version it computes. Device, precision and the weights folder are left out (the same weights
        give the same predictions up to rounding); the preset is part of the model_version on its own."""
        parts = {
            "proposal": self.proposal_model,
            "classifier": self.classifier_model,
            "sam": os.path.basename(self.sam_checkpoint),
            "sam_type": self.sam_model_type if self.sam_checkpoint else "",
            "max_steps": self.max_steps,
            # Part of every fingerprint since the fixed mode began dropping labels that win no CRF pixel
            # (their results changed), so results cached before that are not reused.
            "compat": self.compat,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
