"""The error vocabulary every layer shares: a failure says whether trying again can help.

`CarError.retryable` is True when the same call may succeed later without anyone changing anything (a
timeout, Label Studio or Redis away, HTTP 5xx); False when it cannot (an undecodable image, a missing
checkpoint, a task that is gone). Jobs raise retryable errors so RQ retries them, and record the others as
failed results. The class lives in the engine because the engine is the bottom layer: every other package
may import it, and it imports nothing.
"""

from __future__ import annotations


class CarError(Exception):
    """A failure of car-backend's own, with `retryable` telling whether asking again may succeed."""

    retryable: bool = False

    def __init__(self, message: str, retryable: bool | None = None):
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


def is_retryable(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: a CarError says so itself; anything else (a bug, an OS error
    outside our wrappers) is retried, bounded by the job's retries."""
    return exc.retryable if isinstance(exc, CarError) else True
