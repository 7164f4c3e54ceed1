"""The mask classifier: score each proposal by how well CLIP recognises its query in the prompted image.

As the official code does (spec section 3): CLIP's preprocessing (shorter side to 224, bicubic, centre crop),
the CLS token of the *penultimate* block through ln_post and proj, and for each template a softmax over
the live queries; with templates, the per-template probabilities are summed and soft-maxed again. The
score of query q is entry (q, q). Unlike the official code, each prompted image is encoded once (not once
per template), text embeddings come from the model's cache, and a prompted image is encoded once per
`segment` call: it depends only on its binary mask (the image, prompts and classifier being fixed), so
queries with equal masks, every unprompted query, and a query whose mask an earlier step of the
recurrence already prompted share one encoding (`mask_keys`; the segmenter keeps the call's embeddings).
"""

from __future__ import annotations

import numpy as np
import torch

from car_backend.engine.imageops import shorter_side_resize_crop
from car_backend.engine.models import ClipModel
from car_backend.engine.visual_prompts import apply_prompts, draw_outlines
from car_backend.engine.vit import block_forward, check_plain_vit, embed_patches, normalise

_CHUNK_PIXELS = 64_000_000  # cap on (queries x H x W) prompted pixels held at once
_ENCODE_BATCH = 32


class MaskClassifier:
    """Prompts, preprocesses and encodes proposals with one CLIP, and scores them against query texts."""

    def __init__(self, clip: ClipModel, half_positions: bool = False):
        """`half_positions`: round the position embeddings to fp16 (CAR_COMPAT=official; see embed_patches)."""
        check_plain_vit(clip)
        self.clip = clip
        self.half_positions = half_positions
        size = clip.visual.image_size
        self.input_size = size[0] if isinstance(size, tuple) else size

    @torch.inference_mode()
    def prompted_inputs(
        self, pixels: torch.Tensor, proposals: torch.Tensor, mask_threshold: float,
        prompts: tuple[str, ...], background: torch.Tensor | None,
    ) -> torch.Tensor:
        """Prompted, resized and cropped images (Q, 3, S, S) uint8 for soft proposals (Q, H, W).

        A proposal whose values sum to at most 1, or whose binary mask (> eta) is empty, leaves the image
        unprompted (the official code checks the sum; an empty mask would make it fail).
        """
        height, width = pixels.shape[-2:]
        chunk = max(1, _CHUNK_PIXELS // (height * width))
        outputs = []
        for soft in proposals.split(chunk):
            masks = soft > mask_threshold
            prompted = (soft.sum(dim=(1, 2)) > 1) & masks.flatten(1).any(dim=1)
            images = pixels.expand(len(soft), -1, -1, -1)
            if prompted.any():
                chosen = masks[prompted]
                marked = apply_prompts(pixels, chosen, background, draw_outlines(chosen, prompts))
                images = images.clone()
                images[prompted] = marked
            outputs.append(shorter_side_resize_crop(images, self.input_size))
        return torch.cat(outputs)

    @torch.inference_mode()
    def mask_keys(self, proposals: torch.Tensor, mask_threshold: float) -> list[bytes]:
        """What each prompted image of soft proposals (Q, H, W) depends on besides the image, prompts and
        threshold (see `prompted_inputs`): b"" for a proposal that leaves the image unprompted, else its
        packed binary mask. Equal keys give equal prompted images."""
        sums = proposals.sum(dim=(1, 2))
        keys = []
        for soft, total in zip(proposals, sums.tolist(), strict=True):
            mask = soft > mask_threshold
            keys.append(np.packbits(mask.cpu().numpy()).tobytes() if total > 1 and bool(mask.any()) else b"")
        return keys

    @torch.inference_mode()
    def embed_images(self, inputs: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (Q, E): CLS of the penultimate block through ln_post and proj."""
        return torch.cat([self._embed(batch) for batch in inputs.split(_ENCODE_BATCH)])

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        tokens = embed_patches(visual, normalise(visual, inputs, self.clip.dtype), self.half_positions)
        for block in visual.transformer.resblocks[:-1]:
            tokens, _ = block_forward(block, tokens, need_weights=False)
        embedding = visual.ln_post(tokens[:, 0]) @ visual.proj
        return torch.nn.functional.normalize(embedding.float(), dim=-1)

    def scores(self, images: torch.Tensor, texts: torch.Tensor, double_softmax: bool) -> torch.Tensor:
        """Diagonal scores (Q,) from image embeddings (Q, E) and text embeddings (T, Q, E), T templates.

        `double_softmax`: sum the per-template probabilities and soft-max the sums (the semantic presets'
        15 templates); otherwise the single template's probabilities are the scores (referring presets).
        """
        probs = torch.softmax(self.clip.logit_scale * torch.einsum("qe,tke->tqk", images, texts), dim=-1)
        combined = torch.softmax(probs.sum(0), dim=-1) if double_softmax else probs[0]
        return combined.diagonal()

