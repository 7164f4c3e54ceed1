"""A job that holds the GIL, as the dense CRF does on a large image: a C call made without releasing it."""

from __future__ import annotations

import ctypes


def hold_gil(seconds: float) -> float:
    """Sleep `seconds` inside libc's usleep called through PyDLL, which keeps the GIL for the whole call:
    no other thread of this process runs meanwhile. Returns `seconds`."""
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return seconds
