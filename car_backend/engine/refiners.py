"""Segment Anything for CaR: three families behind one interface, loaded on first use.

`CAR_SAM_MODEL_TYPE` names the family and the model, `CAR_SAM_CHECKPOINT` the weights:

| family | model types | package (extra) | licence |
| --- | --- | --- | --- |
| SAM | `vit_h`, `vit_l`, `vit_b` | segment-anything (`sam`) | Apache-2.0 |
| HQ-SAM (the paper's) | `hq_vit_h`, `hq_vit_l`, `hq_vit_b`, `hq_vit_tiny` | segment-anything-hq (`sam-hq`) | Apache-2.0 |
| SAM 2 / 2.1 | `sam2_hiera_{t,s,b+,l}`, `sam2.1_hiera_{t,s,b+,l}` | sam2 (`sam2`) | Apache-2.0 |

Each family gives the same two things: an automatic mask generator (a grid of point prompts, the
official settings SAM_GENERATOR_SETTINGS) and a predictor (the image encoded once, then one decoder call per
prompt). A missing package or checkpoint raises ModelLoadError naming both settings, the package and its
extra; the job that needed SAM fails and stays pending (a setting fixed later still gets it predicted).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from car_backend.engine.config import HQ_SAM_TYPES, SAM2_TYPES, SAM_MODEL_TYPES, SAM_TYPES
from car_backend.engine.models import ModelLoadError, ModelSpecError

log = logging.getLogger(__name__)

# The official automatic mask generator settings (spec section 4).
SAM_GENERATOR_SETTINGS = {
    "points_per_side": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
}



@dataclass(frozen=True)
class SamSpec:
    """What CAR_SAM_MODEL_TYPE names: the family, its package and the model within it."""

    model_type: str
    family: str  # "sam" | "sam-hq" | "sam2"
    package: str  # pip name
    module: str  # import name
    extra: str  # car-backend extra that installs the package

    @classmethod
    def parse(cls, model_type: str) -> SamSpec:
        """Raises ModelSpecError for a name no family has."""
        if model_type in SAM_TYPES:
            return cls(model_type, "sam", "segment-anything", "segment_anything", "sam")
        if model_type in HQ_SAM_TYPES:
            return cls(model_type, "sam-hq", "segment-anything-hq", "segment_anything_hq", "sam-hq")
        if model_type in SAM2_TYPES:
            return cls(model_type, "sam2", "sam2", "sam2", "sam2")
        raise ModelSpecError(f"CAR_SAM_MODEL_TYPE={model_type!r}: use one of {', '.join(SAM_MODEL_TYPES)}")

    @property
    def registry_name(self) -> str:
        """The model's name in its package: segment-anything(-hq)'s registry key, or SAM 2's config file."""
        if self.family == "sam-hq":
            return self.model_type.removeprefix("hq_")
        if self.family == "sam2":
            version = self.model_type.split("_", 1)[0]
            return f"configs/{version}/{self.model_type}.yaml"
        return self.model_type


class SamModel:
    """One SAM of any family, built on first use; thread-safe loading, one predictor call at a time.

    `checkpoint` None builds the model with random weights (tests and benchmarks only; `random` as the
    setting's value means the same). `build` replaces the family's builder (tests). `generator_settings`
    replaces SAM_GENERATOR_SETTINGS (benchmarks on a CPU use a smaller grid).
    """

    def __init__(self, model_type: str, checkpoint: str | None, device: str = "cpu",
                 build: Callable[[], Any] | None = None, generator_settings: dict | None = None):
        self.spec = SamSpec.parse(model_type)
        self.checkpoint = None if checkpoint in (None, "", "random") else checkpoint
        self.device = device
        self._build = build
        self.generator_settings = dict(SAM_GENERATOR_SETTINGS if generator_settings is None else generator_settings)
        self._model: Any = None
        self._predictor: Any = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------------- loading
    def _package(self) -> Any:
        spec = self.spec
        try:
            return importlib.import_module(spec.module)
        except ImportError as exc:
            raise ModelLoadError(
                f"CAR_SAM_MODEL_TYPE={spec.model_type} needs the package {spec.package}, which is not installed "
                f"({exc}); pip install 'car-backend[{spec.extra}]', or unset CAR_SAM_CHECKPOINT "
                f"(={self.checkpoint or 'random'}) to run without SAM"
            ) from exc

    @property
    def model(self) -> Any:
        """The built model (see load)."""
        return self.load()

    def load(self) -> Any:
        """Build the model once; raises ModelLoadError / ModelSpecError naming the settings and package."""
        with self._lock:
            if self._model is None:
                self._model = self._build() if self._build is not None else self._load()
            return self._model

    def _load(self) -> Any:
        spec = self.spec
        self._package()
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise ModelLoadError(
                f"CAR_SAM_CHECKPOINT={self.checkpoint}: no such file (for CAR_SAM_MODEL_TYPE={spec.model_type}, "
                f"package {spec.package}); point it at a {spec.family} checkpoint"
            )
        if self.checkpoint is None:
            log.warning("SAM %s with random weights: its masks are meaningless (tests and benchmarks only)",
                        spec.model_type)
        log.info("loading %s %s from %s", spec.family, spec.model_type, self.checkpoint or "random weights")
        try:
            if spec.family == "sam2":
                from sam2.build_sam import build_sam2

                return build_sam2(spec.registry_name, self.checkpoint, device=self.device)
            registry = importlib.import_module(spec.module).sam_model_registry
            return registry[spec.registry_name](checkpoint=self.checkpoint).to(self.device).eval()
        except ModelLoadError:
            raise
        except Exception as exc:  # the packages raise bare errors for a checkpoint of the wrong model
            raise ModelLoadError(
                f"CAR_SAM_MODEL_TYPE={spec.model_type} with CAR_SAM_CHECKPOINT={self.checkpoint}: "
                f"could not build the model ({exc})"
            ) from exc

    # ----------------------------------------------------------------------------------------- use
    def automatic_masks(self, rgb: np.ndarray, settings: dict | None = None) -> list[np.ndarray]:
        """Class-agnostic (H, W) bool masks from the family's automatic mask generator (`settings`, else
        generator_settings: the official ones unless replaced)."""
        return [mask for mask, _ in self.automatic_objects(rgb, settings)]

    def automatic_objects(self, rgb: np.ndarray, settings: dict | None = None) -> list[tuple[np.ndarray, float]]:
        """automatic_masks' masks with SAM's predicted IoU of each."""
        settings = dict(self.generator_settings if settings is None else settings)
        model = self.model
        if self.spec.family == "sam2":
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Generator
        else:
            Generator = importlib.import_module(self.spec.module).SamAutomaticMaskGenerator  # noqa: N806
        with self._lock:
            return [(np.asarray(m["segmentation"], dtype=bool), float(m.get("predicted_iou", 1.0)))
                    for m in Generator(model, **settings).generate(rgb)]

    def predictor(self) -> Any:
        """The family's image predictor (set_image once, then predict per prompt), built once."""
        with self._lock:
            if self._predictor is None:
                model = self.model
                if self.spec.family == "sam2":
                    from sam2.sam2_image_predictor import SAM2ImagePredictor

                    self._predictor = SAM2ImagePredictor(model)
                else:
                    self._predictor = importlib.import_module(self.spec.module).SamPredictor(model)
            return self._predictor

    def prompted_masks(self, rgb: np.ndarray, prompts: list[MaskPrompt]) -> list[np.ndarray]:
        """One (H, W) bool mask per prompt: the image encoded once, one decoder call per prompt."""
        return [mask for mask, _ in self.prompted_objects(rgb, prompts)]

    def prompted_objects(self, rgb: np.ndarray, prompts: list[MaskPrompt]) -> list[tuple[np.ndarray, float]]:
        """prompted_masks' masks with SAM's predicted IoU of each."""
        with self._lock:
            predictor = self.predictor()
            predictor.set_image(rgb)
            answers = []
            for prompt in prompts:
                predicted, quality, _ = predictor.predict(point_coords=prompt.points, point_labels=prompt.labels,
                                                          box=prompt.box, multimask_output=False)
                answers.append((np.asarray(predicted[0], dtype=bool), float(np.asarray(quality).ravel()[0])))
            return answers


@dataclass(frozen=True)
class MaskPrompt:
    """SAM prompts for one label: a box (x0, y0, x1, y1) and points (P, 2) (x, y) with labels 1 / 0."""

    box: np.ndarray  # (4,) float32
    points: np.ndarray  # (P, 2) float32
    labels: np.ndarray  # (P,) int32: 1 positive, 0 negative


POSITIVE_POINTS = 3


def mask_prompts(masks: np.ndarray, positives: int = POSITIVE_POINTS) -> list[MaskPrompt]:
    """One prompt per mask of CaR's non-empty masks (K, H, W), in order.

    Box: the mask's bounding box. Positive points: the `positives` pixels deepest inside the mask (largest
    distance to its border, each next one at least a quarter of the box's shorter side from those chosen).
    Negative points: the deepest pixel of every other label's mask.
    """
    import cv2

    deepest = []
    for mask in masks:
        distance = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        deepest.append(distance)
    prompts = []
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
        spacing = max(1.0, min(box[2] - box[0], box[3] - box[1]) / 4)
        distance = deepest[k].copy()
        chosen: list[tuple[int, int]] = []
        while len(chosen) < positives and distance.max() > 0:
            y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
            chosen.append((int(x), int(y)))
            yy, xx = np.ogrid[: distance.shape[0], : distance.shape[1]]
            distance[(yy - y) ** 2 + (xx - x) ** 2 < spacing ** 2] = 0
        negatives = []
        for j, other in enumerate(deepest):
            if j != k and other.max() > 0:
                y, x = np.unravel_index(int(np.argmax(other)), other.shape)
                negatives.append((int(x), int(y)))
        points = np.array(chosen + negatives, dtype=np.float32).reshape(-1, 2)
        labels = np.array([1] * len(chosen) + [0] * len(negatives), dtype=np.int32)
        prompts.append(MaskPrompt(box, points, labels))
    return prompts
