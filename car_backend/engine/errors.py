"""The error vocabulary every layer shares: a failure says whether trying again can help.

`CarError.retryable` is True when the same call may succeed later (a timeout, Label Studio or Redis away,
HTTP 5xx, credentials an operator can fix); False when asking again cannot help (an undecodable image, a
malformed model spec, a task that is gone). What the callers do with it:
- a job records a non-retryable MediaError (a property of the image) as a failed result, answered as an
  empty prediction; any other exception fails the attempt, RQ retries it while retries are left, the last
  attempt caches a pending failure for at most a minute, and the task stays pending (a setting fixed later
  still gets it predicted);
- a late write (queue.delivery) is retried with backoff on a retryable LabelStudioAPIError, and that task
  is dropped on any other.
The class lives in the engine because the engine is the bottom layer: every other package may import it,
and it imports nothing.
"""

from __future__ import annotations


class CarError(Exception):
    """A failure of car-backend's own, with `retryable` telling whether asking again may succeed."""

    retryable: bool = False

    def __init__(self, message: str, retryable: bool | None = None):
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable
