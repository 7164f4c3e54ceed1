"""After the recurrence: dense CRF, optional SAM refinement, label-map assembly, referring merge (spec 4)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np

from car_backend.engine.result import nearest_indices

log = logging.getLogger(__name__)

# deeplab-pytorch / CLIP-ES values used by the official code.
CRF_ITERATIONS = 10
CRF_GAUSSIAN = {"sxy": 1, "compat": 3}
CRF_BILATERAL = {"sxy": 67, "srgb": 3, "compat": 4}
UNARY_CLIP = 1e-5

# The official segment-anything automatic mask generator settings.
SAM_GENERATOR_SETTINGS = {
    "points_per_side": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
}

REFERRING_MIN_AREA = 0.05

# deeplab-pytorch's BGR mean, which the official CRF subtracts from the image before casting it to uint8.
OFFICIAL_CRF_MEAN_BGR = (104.008, 116.669, 122.675)


def crf_image(rgb: np.ndarray, official: bool) -> np.ndarray:
    """The (H, W, 3) uint8 image the CRF's bilateral term sees.

    Fixed (default): the RGB image itself. Official (CAR_COMPAT=official): what the official code passes,
    the image as BGR minus OFFICIAL_CRF_MEAN_BGR in float32, cast to uint8, so negative values wrap around
    (numpy's cast, platform-dependent as it is there).
    """
    if not official:
        return rgb
    shifted = rgb[..., ::-1].astype(np.float32) - np.asarray(OFFICIAL_CRF_MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray(shifted.astype(np.uint8))


def pixel_winners(masks: np.ndarray, separate: bool, official: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which CRF survivors stay kept: (masks (K, H, W) aligned to the survivors, kept (K,) bool).

    `masks` are the CRF's masks of the K survivors, in order. Fixed (default): a survivor whose mask is
    empty (it wins no CRF pixel) is dropped: no region would show it, so it must not count in the task
    score either. Official: the one-hot of the CRF's arg-max has as many rows as the largest label that
    wins a pixel, and the masks are zipped with the survivors, so
    - joint CRF (semantic): the survivors after the last one that wins a pixel are dropped; an empty one
      before it stays kept with an empty mask;
    - one CRF per survivor (referring): each empty one-hot contributes no row, so the following survivors
      take the next survivors' masks and the last ones are dropped (as many as were empty).
    """
    count = len(masks)
    nonempty = masks.reshape(count, -1).any(axis=1)
    if not official:
        return masks, nonempty
    if not separate:
        last = int(np.flatnonzero(nonempty)[-1]) + 1 if nonempty.any() else 0
        return masks, np.arange(count) < last
    aligned = np.zeros_like(masks)
    rows = masks[nonempty]
    aligned[: len(rows)] = rows
    return aligned, np.arange(count) < len(rows)


def crf_marginals(rgb: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Marginals (K, H, W) of a fully connected CRF over (K, H, W) label probabilities.

    Fix of the official code: the bilateral term sees the plain RGB uint8 image. The official code passes a
    BGR, mean-subtracted float image cast to uint8, whose negative values wrap around.
    """
    from pydensecrf import densecrf

    labels, height, width = probabilities.shape
    unary = -np.log(np.clip(probabilities, UNARY_CLIP, 1.0)).reshape(labels, -1).astype(np.float32)
    crf = densecrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(rgb, dtype=np.uint8), **CRF_BILATERAL)
    return np.asarray(crf.inference(CRF_ITERATIONS)).reshape(labels, height, width)


def dense_crf(rgb: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Arg-max labels (H, W) of the CRF marginals (see crf_marginals)."""
    return crf_marginals(rgb, probabilities).argmax(axis=0)


def top_two_margin(marginals: np.ndarray) -> np.ndarray:
    """(H, W) top-1 minus top-2 probability of (K >= 2, H, W) marginals: 1 = certain, 0 = tie."""
    top_two = np.partition(marginals, -2, axis=0)[-2:]
    return top_two[1] - top_two[0]


def crf_masks(rgb: np.ndarray, proposals: np.ndarray, separate: bool) -> np.ndarray:
    """Binary masks (K, H, W) from soft proposals (K, H, W), background = 1 - max proposal.

    Semantic mode: one joint CRF, so the masks are disjoint. Referring mode (`separate`): one 2-label CRF per
    proposal.
    """
    return crf_masks_with_margin(rgb, proposals, separate)[0]


def crf_masks_with_margin(rgb: np.ndarray, proposals: np.ndarray, separate: bool
                          ) -> tuple[np.ndarray, np.ndarray]:
    """crf_masks' masks and the CRF's per-pixel top_two_margin (H, W); `separate`: the mean over proposals."""
    if separate:
        marginals = (crf_marginals(rgb, np.stack([1.0 - p, p])) for p in proposals)
        decided = [(q.argmax(axis=0) == 1, top_two_margin(q)) for q in marginals]
        return np.stack([mask for mask, _ in decided]), np.mean([margin for _, margin in decided], axis=0)
    background = 1.0 - proposals.max(axis=0, keepdims=True)
    marginals = crf_marginals(rgb, np.concatenate([background, proposals]))
    labels = marginals.argmax(axis=0)
    return labels[None] == np.arange(1, len(proposals) + 1)[:, None, None], top_two_margin(marginals)


def assemble_label_map(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(H, W) int32: 0 for background, i + 1 where query i's mask is; the higher score wins overlaps."""
    label_map = np.zeros(masks.shape[1:], dtype=np.int32)
    for index in np.argsort(scores, kind="stable"):
        if scores[index] > 0:
            label_map[masks[index]] = index + 1
    return label_map


def merge_referring(masks: np.ndarray, scores: np.ndarray, answered_size: tuple[int, int] | None = None
                    ) -> np.ndarray:
    """One object mask from per-sentence masks: score-weighted mean >= 0.5, else (area <= 5%) their union.

    `answered_size` (H, W): the masks will be nearest-resized to it, and the 5% is measured on that grid
    (each working pixel weighted by the answered pixels it becomes), so merging before the resize gives
    what merging after it would. All scores zero (no sentence kept): an empty mask.
    """
    if scores.sum() <= 0:
        return np.zeros(masks.shape[1:], dtype=bool)
    weights = scores / scores.sum()
    merged = np.tensordot(weights, masks.astype(np.float32), axes=1) >= 0.5
    if _area_fraction(merged, answered_size) <= REFERRING_MIN_AREA:
        merged = masks[scores > 0].any(axis=0)
    return merged


def _area_fraction(mask: np.ndarray, answered_size: tuple[int, int] | None) -> float:
    """mask.mean() on the grid the mask is nearest-resized to (its own when None)."""
    if answered_size is None or tuple(answered_size) == mask.shape:
        return float(mask.mean())
    height, width = answered_size
    row_weights = np.bincount(nearest_indices(mask.shape[0], height), minlength=mask.shape[0])
    col_weights = np.bincount(nearest_indices(mask.shape[1], width), minlength=mask.shape[1])
    return float(row_weights @ mask.astype(np.float64) @ col_weights) / (height * width)


def match_sam_masks(
    mask: np.ndarray, sam_masks: list[np.ndarray], iom_threshold: float, min_pred_threshold: float,
    iou_threshold: float,
) -> np.ndarray:
    """Refine one CaR mask with SAM masks (spec section 4).

    Keep the SAM masks whose IoM with `mask` exceeds `iom_threshold` (the best one if none does); their
    union replaces `mask` when its IoU with `mask` exceeds `iou_threshold`.
    """
    area = mask.sum()
    if area == 0 or not sam_masks:
        return mask
    ioms = []
    for sam in sam_masks:
        overlap = np.logical_and(mask, sam).sum()
        iom_pred = overlap / area
        iom_sam = overlap / max(sam.sum(), 1) if iom_pred >= min_pred_threshold else 0.0
        ioms.append(max(iom_pred, iom_sam))
    keep = [s for s, iom in zip(sam_masks, ioms, strict=True) if iom > iom_threshold] or [sam_masks[int(np.argmax(ioms))]]
    union = np.logical_or.reduce(keep)
    iou = np.logical_and(union, mask).sum() / np.logical_or(union, mask).sum()
    return union if iou > iou_threshold else mask


class SamRefiner:
    """segment-anything's automatic mask generator, loaded on first use, matched against CaR's masks."""

    def __init__(self, checkpoint: str, model_type: str, device: str,
                 generate: Callable[[np.ndarray], list[np.ndarray]] | None = None):
        self.checkpoint = checkpoint
        self.model_type = model_type
        self.device = device
        self._generate = generate

    def sam_masks(self, rgb: np.ndarray) -> list[np.ndarray]:
        if self._generate is None:
            self._generate = self._load()
        return self._generate(rgb)

    def refine(self, rgb: np.ndarray, masks: np.ndarray, iom_threshold: float, min_pred_threshold: float,
               iou_threshold: float) -> np.ndarray:
        candidates = self.sam_masks(rgb)
        return np.stack([
            match_sam_masks(m, candidates, iom_threshold, min_pred_threshold, iou_threshold) for m in masks
        ])

    def _load(self) -> Callable[[np.ndarray], list[np.ndarray]]:
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError as exc:
            raise RuntimeError(
                "CAR_SAM_CHECKPOINT is set but segment-anything is not installed; "
                "pip install 'car-backend[sam]' or unset CAR_SAM_CHECKPOINT"
            ) from exc
        if not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"CAR_SAM_CHECKPOINT={self.checkpoint}: no such file")
        if self.model_type not in sam_model_registry:
            raise ValueError(f"CAR_SAM_MODEL_TYPE={self.model_type!r}: use one of {', '.join(sam_model_registry)}")
        log.info("loading SAM %s from %s", self.model_type, self.checkpoint)
        sam = sam_model_registry[self.model_type](checkpoint=self.checkpoint).to(self.device)
        generator = SamAutomaticMaskGenerator(sam, **SAM_GENERATOR_SETTINGS)
        return lambda rgb: [m["segmentation"] for m in generator.generate(rgb)]
