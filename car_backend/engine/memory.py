"""Memory of long jobs (mask-head training, threshold calibration): what a held object costs, and telling an
allocation failure from other errors.

`is_out_of_memory` recognises the ways an allocation fails: Python's MemoryError, torch's CUDA
OutOfMemoryError (a RuntimeError "CUDA out of memory"), and torch's CPU allocator failure (a RuntimeError
"DefaultCPUAllocator: can't allocate memory"). `release_memory` hands freed memory back to the system
(Python's cycles, the C heap's free pages, CUDA's cached blocks): after such a failure, so that the worker
goes on with the next job, and between a training's phases. Why the C heap: tensors of a few tens of MB (a
1024 px image's features) come from glibc's heap once its dynamic mmap threshold has risen, and freed
there they stay resident (measured: a training's 2 GB of features still held while the held-out images
were prepared) unless `malloc_trim` gives their pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterable

import numpy as np
import torch

_OUT_OF_MEMORY = ("out of memory", "defaultcpuallocator", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (see the module docstring)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _OUT_OF_MEMORY)


def release_memory() -> None:
    """Collect Python's garbage, give the C heap's free pages back (glibc) and return CUDA's cached blocks
    (where CUDA is in use)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def nbytes(values: Iterable[object]) -> int:
    """Bytes of the distinct tensors and numpy arrays among `values` (anything else counts 0)."""
    seen: set[int] = set()
    total = 0
    for value in values:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, np.ndarray):
            total += value.nbytes
    return total
