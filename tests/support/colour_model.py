"""A CLIP whose behaviour the tests control: it sees hue, and colour words name hues.

The image tower is a real open_clip VisionTransformer (so Grad-CAM, attention maps and the affinity run the
real code path) with hand-set weights. Tokens carry the patch's chroma (its colour's position in the plane
orthogonal to grey), mirrored and padded with two large constants so that every LayerNorm is ~ the
identity. Attention logits are the dot product of the query's and key's chroma: a patch attends to patches
of its own hue; the CLS token (no chroma) attends uniformly and so collects the image's mean chroma. The
image embedding is (chroma x, chroma y, `neutral`, 0); a colour word's text embedding is
(TEXT_CHROMA * hue direction, 1, 0) and a background word's (0, 0, 0.8, 0.6). The shared third component
keeps cosines in a narrow band, as in a trained CLIP, so that a softmax at logit scale 100 does not
saturate to exact zeros.

`colour_scene` draws the scenes the tests segment with it: three hues on grey, and a vocabulary of hues.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from car_backend.engine import ClipModel

HUES = ("red", "orange", "yellow", "lime", "green", "jade", "cyan", "azure", "blue", "violet", "magenta", "pink")
WIDTH = 8  # token layout: [cx, cy, 0, -cx, -cy, 0, K, -K]
BIG = 50.0  # K: dominates every token's norm, so LayerNorm(x) ~ x (gamma = K / 2)
ATTENTION_GAIN = 3.3  # sqrt of the attention logit scale on chroma
UPDATE_GAIN = 0.25  # each block adds this times the attended chroma
TEXT_CHROMA = 0.5
BACKGROUND_TEXT = (0.0, 0.0, 0.8, 0.6)
# The proposal CLIP's embedding is mostly neutral, so background words take most of the CAM softmax and
# each colour's Grad-CAM points along its own hue; the classifier's is mostly chroma, so it is decisive.
PROPOSAL_NEUTRAL = 10.0
CLASSIFIER_NEUTRAL = 0.1
CHROMA_X = np.array([2.0, -1.0, -1.0]) / math.sqrt(6)
CHROMA_Y = np.array([0.0, 1.0, -1.0]) / math.sqrt(2)


def hue_rgb(index: int, radius: float = 1.0) -> tuple[int, int, int]:
    """The RGB colour (uint8) of hue `index` (30 degrees apart) at chroma `radius` around mid grey."""
    angle = math.radians(30 * index)
    centred = radius * (math.cos(angle) * CHROMA_X + math.sin(angle) * CHROMA_Y)
    return tuple(int(round(255 * (0.5 + 0.5 * c))) for c in centred)


def colour_clip(neutral: float, layers: int = 4) -> ClipModel:
    """The model; `neutral` is the image embedding's constant component (sets how sharp its scores are)."""
    model = open_clip.CLIP(
        embed_dim=4,
        vision_cfg={"image_size": 224, "layers": layers, "width": WIDTH, "head_width": WIDTH, "patch_size": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1},
        quick_gelu=True,
    )
    _set_weights(model.visual, neutral)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    return ClipModel(model, name="colour-clip", encode_texts=_text_embeddings)


def _text_embeddings(texts: list[str]) -> torch.Tensor:
    rows = []
    for text in texts:
        words = set(text.lower().replace(".", " ").split())
        hue = next((i for i, name in enumerate(HUES) if name in words), None)
        if hue is None:  # background words
            rows.append(list(BACKGROUND_TEXT))
        else:
            angle = math.radians(30 * hue)
            rows.append([TEXT_CHROMA * math.cos(angle), TEXT_CHROMA * math.sin(angle), 1.0, 0.0])
    return torch.tensor(rows)


@torch.no_grad()
def _set_weights(visual: torch.nn.Module, neutral: float) -> None:
    for parameter in visual.parameters():
        parameter.zero_()
    patch = visual.patch_size[0]
    mean = np.array(OPENAI_DATASET_MEAN)
    std = np.array(OPENAI_DATASET_STD)
    # centred colour u = 2 p - 1 = 2 std x + (2 mean - 1); chroma = (u . CHROMA_X, u . CHROMA_Y)
    constants = torch.zeros(WIDTH)
    for dim, axis in ((0, CHROMA_X), (1, CHROMA_Y)):
        for channel in range(3):
            visual.conv1.weight[dim, channel] = axis[channel] * 2 * std[channel] / patch ** 2
            visual.conv1.weight[dim + 3, channel] = -visual.conv1.weight[dim, channel]
        constants[dim] = float(axis @ (2 * mean - 1))
        constants[dim + 3] = -constants[dim]
    constants[6], constants[7] = BIG, -BIG
    visual.positional_embedding[1:] = constants
    visual.positional_embedding[0, 6], visual.positional_embedding[0, 7] = BIG, -BIG
    norms = [visual.ln_pre, visual.ln_post] + [n for b in visual.transformer.resblocks for n in (b.ln_1, b.ln_2)]
    for norm in norms:
        norm.weight.fill_(BIG / 2)
    for block in visual.transformer.resblocks:
        qkv = block.attn.in_proj_weight
        scale = ATTENTION_GAIN * WIDTH ** 0.25  # logits = (q . k) / sqrt(width)
        for dim in (0, 1):
            qkv[dim, dim] = scale  # q
            qkv[WIDTH + dim, dim] = scale  # k
            qkv[2 * WIDTH + dim, dim] = 1.0  # v copies the chroma
            block.attn.out_proj.weight[dim, dim] = UPDATE_GAIN
            block.attn.out_proj.weight[dim + 3, dim] = -UPDATE_GAIN
    visual.proj[0, 0] = 1.0
    visual.proj[1, 1] = 1.0
    visual.proj[6, 2] = neutral / BIG


def colour_scene(seed: int, size: int = 128):
    """(image, ground-truth label map over `vocabulary` (0 = grey), present hue names, vocabulary)."""
    rng = np.random.default_rng(seed)
    first = int(rng.integers(0, 12))
    present = [(first + 4 * i) % 12 for i in range(3)]
    vocabulary = sorted(present + [(first + offset) % 12 for offset in (1, 3, 5, 7, 9, 11)])
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    truth = np.zeros((size, size), dtype=np.int32)
    cells = [(0, 0), (0, 1), (1, 0), (1, 1)]
    rng.shuffle(cells)
    half = size // 2
    for hue, (row, col) in zip(present, cells[:3], strict=True):
        y0, x0 = row * half + int(rng.integers(2, 12)), col * half + int(rng.integers(2, 12))
        height, width = int(rng.integers(half // 2, half - 14)), int(rng.integers(half // 2, half - 14))
        region = np.zeros((size, size), dtype=np.uint8)
        if rng.random() < 0.5:
            region[y0:y0 + height, x0:x0 + width] = 1
        else:
            cv2.ellipse(region, (x0 + width // 2, y0 + height // 2), (width // 2, height // 2), 0, 0, 360, 1, -1)
        image[region > 0] = hue_rgb(hue)
        truth[region > 0] = vocabulary.index(hue) + 1
    image = np.clip(image.astype(int) + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)
    return image, truth, [HUES[h] for h in present], [HUES[h] for h in vocabulary]


OBJECT_BOXES = ((10, 10, 30, 30), (12, 80, 28, 36), (78, 30, 34, 30))  # (y, x, height, width) at 128 px
BLUE_BOX = (80, 84, 30, 30)


def objects_scene(size: int = 128, touching: bool = False):
    """Three red squares (apart; with `touching` the second one is moved to share the first one's right
    edge) and a blue one on grey, at `size` px: (image, truth label map over ("red", "blue"), the red
    objects' masks)."""
    scale = size / 128
    boxes = list(OBJECT_BOXES)
    if touching:
        boxes[1] = (10, 40, 30, 30)
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    truth = np.zeros((size, size), dtype=np.int32)
    objects = []
    for label, hue, (y, x, height, width) in [*((1, 0, b) for b in boxes), (2, 8, BLUE_BOX)]:
        y0, x0, y1, x1 = (round(v * scale) for v in (y, x, y + height, x + width))
        image[y0:y1, x0:x1] = hue_rgb(hue)
        truth[y0:y1, x0:x1] = label
        if label == 1:
            mask = np.zeros((size, size), dtype=bool)
            mask[y0:y1, x0:x1] = True
            objects.append(mask)
    rng = np.random.default_rng(0)
    image = np.clip(image.astype(int) + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)
    return image, truth, objects
