"""COCO run-length encoding of binary masks: the counts and their compressed string form.

COCO counts runs in column-major order (down each column, then the next), starting with a run of zeros
(0 when the first pixel is set). The compressed form is the one pycocotools writes (`maskApi.c`
`rleToString`): each count, minus the count two before it from the third on, as a little-endian string
of 5-bit groups with a continuation bit (0x20) and a sign bit (0x10) in the last group, each char = 48 +
group. Written here so exports need no compiled dependency; the tests check it against pycocotools.
"""

from __future__ import annotations

import numpy as np


def mask_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of an (H, W) bool mask in COCO order; they sum to H * W."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    return [0, *counts] if flat[0] else counts


def counts_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of COCO run lengths; ValueError when they do not cover H * W pixels."""
    counts = np.asarray(counts, np.int64)
    if (counts < 0).any() or int(counts.sum()) != height * width:
        raise ValueError(f"RLE counts cover {int(counts.sum())} pixels, not {height}x{width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")


def encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an (H, W) bool mask: {"size": [H, W], "counts": str}."""
    height, width = np.asarray(mask).shape
    return {"size": [int(height), int(width)], "counts": counts_string(mask_counts(mask))}


def decode(rle: dict) -> np.ndarray:
    """The (H, W) bool mask of a COCO RLE, compressed (str counts) or not (list counts)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        counts = string_counts(counts.decode() if isinstance(counts, bytes) else counts)
    return counts_mask(list(counts), height, width)


def counts_string(counts: list[int]) -> str:
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends in -1
            more = x != -1 if group & 0x10 else x != 0
            out.append(chr(48 + (group | 0x20 if more else group)))
    return "".join(out)


def string_counts(text: str) -> list[int]:
    """Counts of a compressed RLE string; ValueError on a character outside its alphabet or a cut group."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("compressed RLE ends inside a count")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"compressed RLE has a character outside its alphabet: {text[pos]!r}")
            x |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                x |= -1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts
