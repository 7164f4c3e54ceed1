"""Per-dataset values of the official configs (spec section 5).

eta = mask_threshold, theta = confidence_threshold, lambda = clipes_threshold. `coco` is the default for
arbitrary vocabularies. Context and ADE run a second "stuff" pass in the official evaluation (stuff classes
against all thing names as background); the generic engine API does not, because a Label Studio vocabulary
does not say which labels are stuff. Their stuff-pass values are kept here for callers that know.
"""

from __future__ import annotations

from dataclasses import dataclass

CAM_TEMPLATE = "a clean origami {}."

BACKGROUND_WORDS = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley", "bridge",
)

SEMANTIC_TEMPLATES = (
    "a clean origami {}.",
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


@dataclass(frozen=True)
class Preset:
    name: str
    mask_threshold: float  # eta: a proposal pixel is in the prompted mask if its value is > eta
    confidence_threshold: float  # theta: a query survives a step if its score is > theta
    clipes_threshold: float  # lambda: CLIP-ES box threshold on the raw CAM
    visual_prompts: tuple[str, ...]  # applied in the fixed order blur, gray, black, circle, rectangle, contour
    templates: tuple[str, ...] | None  # classifier templates; None: "a clean origami {}." and one softmax
    iom_threshold: float  # SAM: keep SAM masks whose intersection over the smaller area exceeds this
    sam_min_pred_threshold: float = 0.01  # SAM: ignore I/|SAM mask| when I/|CaR mask| is below this
    sam_iou_threshold: float = 0.7  # SAM: the union replaces the CaR mask if their IoU exceeds this (paper)
    classify_with_proposal_model: bool = False  # referring configs classify with ViT-B/16, the proposal CLIP
    background: tuple[str, ...] = BACKGROUND_WORDS
    stuff_visual_prompts: tuple[str, ...] | None = None  # context / ade stuff pass (not run by the engine)
    stuff_mask_threshold: float | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("voc", 0.4, 0.6, 0.4, ("circle", "blur"), SEMANTIC_TEMPLATES, iom_threshold=0.6,
               sam_min_pred_threshold=0.05),
        Preset("coco", 0.5, 0.3, 0.5, ("blur", "gray"), SEMANTIC_TEMPLATES, iom_threshold=0.7),
        # The code's theta for Context is 0.25; the paper says 0.2.
        Preset("context", 0.6, 0.25, 0.4, ("blur", "circle"), SEMANTIC_TEMPLATES, iom_threshold=0.5,
               stuff_visual_prompts=("blur", "gray"), stuff_mask_threshold=0.6),
        Preset("ade", 0.6, 0.25, 0.7, ("gray", "blur"), SEMANTIC_TEMPLATES, iom_threshold=0.6,
               stuff_visual_prompts=("gray", "blur"), stuff_mask_threshold=0.6),
        # refcoco.yaml prompts with the circle only; the paper says circle + blur for all referring sets.
        Preset("refcoco", 0.5, 0.3, 0.5, ("circle",), None, iom_threshold=0.5, classify_with_proposal_model=True),
        Preset("refcoco+", 0.2, 0.1, 0.5, ("circle", "blur"), None, iom_threshold=0.5,
               classify_with_proposal_model=True),
        Preset("refcocog", 0.5, 0.1, 0.6, ("circle", "blur"), None, iom_threshold=0.5,
               classify_with_proposal_model=True),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; use one of: {', '.join(PRESETS)}") from None
