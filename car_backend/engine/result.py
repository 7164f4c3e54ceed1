"""What one CaR run returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Segmentation:
    """CaR's answer for one image and one query set.

    Semantic mode: `queries` is the vocabulary; `label_map` holds 0 for background and i + 1 for `queries[i]`.
    Referring mode: `queries` are sentences describing one object; `label_map` is the merged object mask
    (1 = object, 0 = background) and `masks`/`scores` are per sentence.
    """

    queries: list[str]
    label_map: np.ndarray  # (H, W) int32 at the image's size
    masks: np.ndarray  # (len(queries), H, W) bool; all False for dropped queries
    scores: np.ndarray  # (len(queries),) float32; the last step's classifier score, 0 for dropped queries
    steps: int
    mode: str = "semantic"  # "semantic" | "referring"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # Mean over pixels of the CRF's top-1 minus top-2 marginal probability (1 = certain, 0 = tie), before any
    # SAM refinement; referring mode: the mean over the sentences' CRFs. None when not computed.
    margin: float | None = None

    @property
    def kept(self) -> list[str]:
        """The queries that survived the recurrence, in input order."""
        return [q for q, s in zip(self.queries, self.scores, strict=True) if s > 0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        return int(self.label_map.shape[1]), int(self.label_map.shape[0])
