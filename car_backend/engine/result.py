"""What one CaR run returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from car_backend.engine.instances import Parts


@dataclass(frozen=True, eq=False)
class QueryMasks:
    """Per-query masks held compactly: rows only for the queries that have one, at the resolution they were
    computed at (the engine's working resolution), nearest-resized to `size` only when read.

    It reads like the (count, H, W) bool array it stands for: `len`, `shape`, `dtype`, `masks[i]` (one
    (H, W) mask), `masks[indices]` or `masks[bool_per_query]` (a QueryMasks of those queries, nothing
    resized), `any()`, and `np.asarray(masks)` (the full array; also what numpy operators and comparisons
    use). A job therefore never holds full-resolution masks for every query: 100 labels on a 12-megapixel
    photo would be 1.2 GB of them.
    """

    rows: np.ndarray  # (K, h, w) bool
    index: tuple[int, ...]  # (K,) the query of each row, distinct
    count: int  # number of queries
    size: tuple[int, int]  # (H, W) the masks are read at

    dtype = np.dtype(bool)
    ndim = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, *self.size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        if isinstance(key, int | np.integer):
            position = int(key) + (self.count if key < 0 else 0)
            if not 0 <= position < self.count:
                raise IndexError(f"query {key} out of range for {self.count} queries")
            if position in self.index:
                return self._resized(self.rows[self.index.index(position)])
            return np.zeros(self.size, dtype=bool)
        selected = np.arange(self.count)[key] if not isinstance(key, tuple) else None
        if selected is None or selected.ndim != 1:
            return np.asarray(self)[key]
        return self.select(selected.tolist())

    def select(self, queries: Sequence[int]) -> QueryMasks:
        """The masks of `queries` (indices into this one's, repeats allowed), in that order."""
        rows, index = [], []
        for position, query in enumerate(queries):
            if query in self.index:
                rows.append(self.rows[self.index.index(query)])
                index.append(position)
        stacked = np.stack(rows) if rows else np.zeros((0, *self.rows.shape[1:]), dtype=bool)
        return QueryMasks(stacked, tuple(index), len(queries), self.size)

    def any(self) -> bool:
        return bool(self.rows.any())

    def sum(self) -> int:
        return int(np.asarray(self).sum())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = np.zeros(self.shape, dtype=bool)
        for row, query in zip(self.rows, self.index, strict=True):
            full[query] = self._resized(row)
        return full if dtype is None else full.astype(dtype)

    def _resized(self, mask: np.ndarray) -> np.ndarray:
        return resize_nearest(mask, self.size)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each of `target` pixels along one axis, nearest-neighbour (pixel centres)."""
    return np.minimum((np.arange(target) + 0.5) * source / target, source - 1).astype(int)


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes of `array` to `size` = (H, W); the array itself if equal."""
    height, width = size
    if array.shape[-2:] == (height, width):
        return array
    rows = nearest_indices(array.shape[-2], height)
    cols = nearest_indices(array.shape[-1], width)
    return array[..., rows, :][..., cols]


@dataclass
class Segmentation:
    """CaR's answer for one image and one query set.

    Semantic mode: `queries` is the vocabulary; `label_map` holds 0 for background and i + 1 for `queries[i]`.
    Referring mode: `queries` are sentences describing one object; `label_map` is the merged object mask
    (1 = object, 0 = background) and `masks`/`scores` are per sentence.
    """

    queries: list[str]
    label_map: np.ndarray  # (H, W) int32 at the image's size
    # (len(queries), H, W) bool, all False for dropped queries: an array, or (from the engine) QueryMasks
    masks: np.ndarray | QueryMasks
    scores: np.ndarray  # (len(queries),) float32; the last step's classifier score, 0 for dropped queries
    steps: int
    mode: str = "semantic"  # "semantic" | "referring"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # Mean over pixels of the CRF's top-1 minus top-2 marginal probability (1 = certain, 0 = tie), before any
    # SAM refinement; referring mode: the mean over the sentences' CRFs. None when not computed.
    margin: float | None = None
    # The objects Segment Anything found for the kept labels, at the image's size (engine.instances.Parts;
    # automatic and two-stage modes, prompted mode when asked for instances); None: no SAM objects.
    parts: Parts | None = None

    @property
    def kept(self) -> list[str]:
        """The queries that survived the recurrence, in input order."""
        return [q for q, s in zip(self.queries, self.scores, strict=True) if s > 0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        return int(self.label_map.shape[1]), int(self.label_map.shape[0])
