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
SAM_TYPES = ("vit_h", "vit_l", "vit_b")  # segment-anything
HQ_SAM_TYPES = ("hq_vit_h", "hq_vit_l", "hq_vit_b", "hq_vit_tiny")  # segment-anything-hq
SAM2_TYPES = tuple(f"{version}_hiera_{size}" for version in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l"))
SAM_MODEL_TYPES = SAM_TYPES + HQ_SAM_TYPES + SAM2_TYPES
SAM_MODES = ("automatic", "prompted")
PROPOSAL_MODES = ("car", "sam")
REGION_MODES = ("semantic", "instances")  # CAR_REGIONS and `car_regions`: one region per label, or per object
COMPAT_MODES = ("fixed", "official")
MAX_SIDE = 1024


@dataclass(frozen=True)
class EngineConfig:
    """The models and limits one `Segmenter` runs with.

    proposal_model / classifier_model: `NAME:WEIGHTS` specs (see `engine.models.ModelSpec`).
    device: auto | cpu | cuda. precision: auto | fp32 | fp16 | bf16 (auto = fp16 on CUDA; on a CPU with
    native bf16 the classifier in bf16 and the proposal model in fp32; fp32 on other CPUs and with compat
    official: `engine.models.resolve_precision`).
    preset: the preset a call without one uses (`engine.presets.PRESETS`).
    max_steps: cap on recurrent steps. sam_checkpoint / sam_model_type: Segment Anything (family and model,
    `engine.refiners`), off when the checkpoint is empty (`random`: random weights, tests and benchmarks).
    sam_mode: automatic (the paper's IoM matching) | prompted (CaR's masks prompt SAM). proposals: car
    (CaR's masks) | sam (two-stage: SAM's masks classified over the labels CaR kept; needs SAM). weights_dir: where downloaded weights are cached (open_clip's default
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
    sam_mode: str = "automatic"
    proposals: str = "car"

    def fingerprint(self) -> str:
        """16 hex digits naming the models, the step cap and CAR_COMPAT (with SAM, its mode where not
        automatic; the proposal source where not car): what a worker must share with the server whose
        model_version it computes (pipeline.versions.FINGERPRINT_SETTINGS). Device, precision and the weights
        folder are left out (the same weights give the same predictions up to rounding); the preset is part of
        the model_version on its own."""
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
        if self.sam_checkpoint and self.sam_mode != "automatic":
            parts["sam_mode"] = self.sam_mode
        if self.proposals != "car":
            parts["proposals"] = self.proposals
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
