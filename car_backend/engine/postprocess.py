"""After the recurrence: dense CRF, optional SAM refinement, label-map assembly, referring merge (spec 4)."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from car_backend.engine.config import SAM_MODES
from car_backend.engine.instances import MIN_AREA_PX
from car_backend.engine.refiners import SamModel, mask_prompts
from car_backend.engine.result import nearest_indices

# deeplab-pytorch / CLIP-ES values used by the official code.
CRF_ITERATIONS = 10
CRF_GAUSSIAN = {"sxy": 1, "compat": 3}
CRF_BILATERAL = {"sxy": 67, "srgb": 3, "compat": 4}
UNARY_CLIP = 1e-5

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


def crf_marginals(rgb: np.ndarray, probabilities: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Marginals (K, H, W) float32 of a fully connected CRF over (K, H, W) label probabilities.

    `rgb` is the image the bilateral term sees (see crf_image). `overwrite`: the unary is computed in the
    caller's float32 `probabilities` buffer (which is then garbage), saving two (K, H, W) copies.
    """
    from pydensecrf import densecrf

    labels, height, width = probabilities.shape
    if overwrite and probabilities.dtype == np.float32 and probabilities.flags["C_CONTIGUOUS"]:
        unary = probabilities.reshape(labels, -1)
    else:
        unary = probabilities.reshape(labels, -1).astype(np.float32)
    np.clip(unary, UNARY_CLIP, 1.0, out=unary)
    np.log(unary, out=unary)
    np.negative(unary, out=unary)
    crf = densecrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(unary)  # copied by pydensecrf
    del unary
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(rgb, dtype=np.uint8), **CRF_BILATERAL)
    return np.asarray(crf.inference(CRF_ITERATIONS), dtype=np.float32).reshape(labels, height, width)


def dense_crf(rgb: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Arg-max labels (H, W) of the CRF marginals (see crf_marginals)."""
    return crf_marginals(rgb, probabilities).argmax(axis=0)


_MARGIN_CHUNK = 65536  # pixels per np.partition call: no full (K, H, W) copy of the marginals


def top_two_margin(marginals: np.ndarray) -> np.ndarray:
    """(H, W) top-1 minus top-2 probability of (K >= 2, H, W) marginals: 1 = certain, 0 = tie."""
    flat = marginals.reshape(len(marginals), -1)
    margin = np.empty(flat.shape[1], dtype=marginals.dtype)
    for start in range(0, flat.shape[1], _MARGIN_CHUNK):
        top_two = np.partition(flat[:, start:start + _MARGIN_CHUNK], -2, axis=0)[-2:]
        margin[start:start + _MARGIN_CHUNK] = top_two[1] - top_two[0]
    return margin.reshape(marginals.shape[1:])


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
        marginals = (crf_marginals(rgb, np.stack([1.0 - p, p]).astype(np.float32), overwrite=True)
                     for p in proposals)
        decided = [(q.argmax(axis=0) == 1, top_two_margin(q)) for q in marginals]
        return np.stack([mask for mask, _ in decided]), np.mean([margin for _, margin in decided], axis=0)
    stacked = np.empty((len(proposals) + 1, *proposals.shape[1:]), dtype=np.float32)
    np.max(proposals, axis=0, out=stacked[0])
    np.subtract(1.0, stacked[0], out=stacked[0])
    stacked[1:] = proposals
    marginals = crf_marginals(rgb, stacked, overwrite=True)
    del stacked
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
    kept = matched_sam_masks(mask, sam_masks, iom_threshold, min_pred_threshold, iou_threshold)
    return mask if kept is None else np.logical_or.reduce([sam_masks[i] for i in kept])


def matched_sam_masks(
    mask: np.ndarray, sam_masks: list[np.ndarray], iom_threshold: float, min_pred_threshold: float,
    iou_threshold: float,
) -> list[int] | None:
    """Which SAM masks replace `mask` (indices into `sam_masks`, see match_sam_masks), or None when `mask`
    stays CaR's (empty, no SAM mask, or their union overlaps it too little)."""
    area = mask.sum()
    if area == 0 or not sam_masks:
        return None
    ioms = []
    for sam in sam_masks:
        overlap = np.logical_and(mask, sam).sum()
        iom_pred = overlap / area
        iom_sam = overlap / max(sam.sum(), 1) if iom_pred >= min_pred_threshold else 0.0
        ioms.append(max(iom_pred, iom_sam))
    keep = [i for i, iom in enumerate(ioms) if iom > iom_threshold] or [int(np.argmax(ioms))]
    union = np.logical_or.reduce([sam_masks[i] for i in keep])
    iou = np.logical_and(union, mask).sum() / np.logical_or(union, mask).sum()
    return keep if iou > iou_threshold else None


class SamRefiner:
    """Refines CaR's final masks with Segment Anything (any family, see engine.refiners), loaded on first use.

    automatic (the paper's): the automatic mask generator's class-agnostic masks, matched to each CaR mask
    by IoM (match_sam_masks, thresholds from the preset); the matched masks are the label's objects
    (instances). prompted: each CaR mask prompts SAM with its box and positive points, negative points from
    the other labels' masks (refiners.mask_prompts); the image is encoded once, one decoder call per label,
    and SAM's masks replace CaR's. Asked for instances, prompted mode sends one prompt per connected part of
    each mask instead (the other parts, of every label, are its negative points): each answer is an object,
    and their union replaces the label's mask.

    `generate` replaces the automatic generator (it may return masks, or (mask, predicted IoU) pairs) and
    `sam` the model (tests). Loading raises ModelLoadError or ModelSpecError naming CAR_SAM_MODEL_TYPE,
    CAR_SAM_CHECKPOINT and the package.
    """

    def __init__(self, checkpoint: str, model_type: str, device: str,
                 generate: Callable[[np.ndarray], list[np.ndarray]] | None = None, mode: str = "automatic",
                 sam: SamModel | None = None):
        if mode not in SAM_MODES:
            raise ValueError(f"CAR_SAM_MODE must be one of {SAM_MODES}, got {mode!r}")
        self.checkpoint = checkpoint
        self.model_type = model_type
        self.device = device
        self.mode = mode
        self._generate = generate
        self._sam = sam

    @property
    def sam(self) -> SamModel:
        if self._sam is None:
            self._sam = SamModel(self.model_type, self.checkpoint, self.device)
        return self._sam

    def sam_masks(self, rgb: np.ndarray) -> list[np.ndarray]:
        """SAM's automatic, class-agnostic masks of the image."""
        return [mask for mask, _ in self.sam_objects(rgb)]

    def sam_objects(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """sam_masks' masks with SAM's predicted IoU of each (1.0 where `generate` gives none)."""
        if self._generate is None:
            return self.sam.automatic_objects(rgb)
        return [(np.asarray(item[0], dtype=bool), float(item[1])) if isinstance(item, tuple)
                else (np.asarray(item, dtype=bool), 1.0) for item in self._generate(rgb)]

    def refine(self, rgb: np.ndarray, masks: np.ndarray, iom_threshold: float, min_pred_threshold: float,
               iou_threshold: float) -> np.ndarray:
        """Refined (K, H, W) masks for CaR's (K, H, W) masks of the kept labels on `rgb` (H, W, 3)."""
        return self.refine_objects(rgb, masks, iom_threshold, min_pred_threshold, iou_threshold)[0]

    def refine_objects(self, rgb: np.ndarray, masks: np.ndarray, iom_threshold: float, min_pred_threshold: float,
                       iou_threshold: float, instances: bool = False
                       ) -> tuple[np.ndarray, list[list[tuple[np.ndarray, float]] | None]]:
        """refine's (K, H, W) masks and each label's objects: (H, W) bool masks with SAM's predicted IoU, None
        where SAM gave the label none (its mask stayed CaR's; prompted mode without `instances`)."""
        if self.mode == "prompted":
            refined = masks.copy()
            objects: list[list[tuple[np.ndarray, float]] | None] = [None] * len(masks)
            if instances:
                pieces = [(k, piece) for k, mask in enumerate(masks) for piece in _pieces(mask)]
                if not pieces:
                    return refined, objects
                answers = self.sam.prompted_objects(rgb, mask_prompts(np.stack([p for _, p in pieces])))
                for k in {k for k, _ in pieces}:
                    own = [answer for (j, _), answer in zip(pieces, answers, strict=True) if j == k]
                    refined[k] = np.logical_or.reduce([mask for mask, _ in own])
                    objects[k] = own
                return refined, objects
            nonempty = [k for k, mask in enumerate(masks) if mask.any()]
            predicted = self.sam.prompted_masks(rgb, mask_prompts(masks[nonempty]))
            for k, mask in zip(nonempty, predicted, strict=True):
                refined[k] = mask
            return refined, objects
        candidates = self.sam_objects(rgb)
        candidate_masks = [mask for mask, _ in candidates]
        refined = masks.copy()
        objects = []
        for k, mask in enumerate(masks):
            kept = matched_sam_masks(mask, candidate_masks, iom_threshold, min_pred_threshold, iou_threshold)
            if kept is None:
                objects.append(None)
                continue
            refined[k] = np.logical_or.reduce([candidate_masks[i] for i in kept])
            objects.append([candidates[i] for i in kept])
        return refined, objects


def _pieces(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected parts of `mask` with at least MIN_AREA_PX pixels, each an (H, W) bool mask."""
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [components == c for c in range(1, count) if stats[c, cv2.CC_STAT_AREA] >= MIN_AREA_PX]
