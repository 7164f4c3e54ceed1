"""Two-stage proposals in the OVSeg manner (`CAR_PROPOSALS=sam`, `car_proposals="sam"` on a control).

CaR's recurrence decides which labels are in the image; Segment Anything's automatic, class-agnostic masks
decide where. Each SAM mask is classified by the classifier CLIP over the kept labels plus the preset's
background words: the image with OVSeg's mask prompt (outside the mask filled with the classifier's mean
colour, which its normalisation maps to zero) and the preset's outline prompts (circle, rectangle,
contour), cropped to the mask's bounding box, then CLIP's preprocessing. Scores follow CaR's classifier
(per-template softmax, summed and soft-maxed again when the preset has templates). A mask goes to its best
label when that label's probability exceeds the preset's theta; to background when a background word wins
or no label passes. No CRF: SAM's edges are already sharp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN

from car_backend.engine.classifier import MaskClassifier
from car_backend.engine.imageops import shorter_side_resize_crop
from car_backend.engine.visual_prompts import OUTLINE_PROMPTS, apply_prompts, draw_outlines

MASK_PROMPT = "mean"  # OVSeg's mask prompt, added to the preset's outline prompts


@dataclass
class MaskAssignment:
    """Which label each class-agnostic mask went to."""

    labels: np.ndarray  # (M,) int: index into the kept labels, -1 = background
    scores: np.ndarray  # (M,) float32: the probability of the chosen label (0 for background)
    probabilities: np.ndarray  # (M, K + B) over [kept labels; background words]


def mean_colour(classifier: MaskClassifier) -> tuple[int, int, int]:
    """The classifier's normalisation mean as an RGB uint8 colour."""
    cfg = getattr(classifier.clip.visual, "preprocess_cfg", None) or {}
    return tuple(int(round(255 * m)) for m in cfg.get("mean", OPENAI_DATASET_MEAN))


@torch.inference_mode()
def mask_prompted_inputs(classifier: MaskClassifier, pixels: torch.Tensor, masks: torch.Tensor,
                         prompts: tuple[str, ...]) -> torch.Tensor:
    """Classifier inputs (M, 3, S, S) uint8 for (M, H, W) bool masks on (3, H, W) uint8 pixels."""
    fill = torch.tensor(mean_colour(classifier), dtype=torch.uint8, device=pixels.device).view(3, 1, 1)
    background = fill.expand_as(pixels)
    outlines = draw_outlines(masks, tuple(p for p in prompts if p in OUTLINE_PROMPTS))
    inputs = []
    for k, mask in enumerate(masks):
        image = apply_prompts(pixels, mask[None], background, None if outlines is None else outlines[k:k + 1])[0]
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        if len(rows):
            image = image[:, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
        inputs.append(shorter_side_resize_crop(image[None], classifier.input_size)[0])
    return torch.stack(inputs)


def class_probabilities(classifier: MaskClassifier, embeddings: torch.Tensor, texts: torch.Tensor,
                        double_softmax: bool) -> torch.Tensor:
    """(M, C) probabilities of M image embeddings (M, E) over C classes with texts (T, C, E), as CaR's
    classifier computes its scores, but for every class rather than the diagonal."""
    probs = torch.softmax(classifier.clip.logit_scale * torch.einsum("me,tce->tmc", embeddings, texts), dim=-1)
    return torch.softmax(probs.sum(0), dim=-1) if double_softmax else probs[0]


def assign(probabilities: np.ndarray, labels: int, threshold: float) -> MaskAssignment:
    """Each mask's best class over (M, labels + background) probabilities: a label above `threshold`, else
    background (-1)."""
    best = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=int)
    chosen = probabilities[np.arange(len(best)), best] if len(best) else np.zeros(0, dtype=np.float32)
    keep = (best < labels) & (chosen > threshold)
    return MaskAssignment(labels=np.where(keep, best, -1), scores=np.where(keep, chosen, 0.0).astype(np.float32),
                          probabilities=probabilities)


def label_masks(masks: np.ndarray, assignment: MaskAssignment, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) disjoint masks and (K,) scores from class-agnostic masks (M, H, W) and their assignment.

    Overlapping SAM masks: the higher-scoring assignment wins the pixel. A label's score is the best score
    among its masks (0: it got none).
    """
    winner = np.full(masks.shape[1:], -1, dtype=np.int64)
    for m in np.argsort(assignment.scores, kind="stable"):
        if assignment.labels[m] >= 0:
            winner[masks[m]] = assignment.labels[m]
    scores = np.zeros(labels, dtype=np.float32)
    for m, label in enumerate(assignment.labels):
        if label >= 0:
            scores[label] = max(scores[label], assignment.scores[m])
    return winner[None] == np.arange(labels)[:, None, None], scores
