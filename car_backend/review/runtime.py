"""What the review, calibration and training jobs work with, handed to them by the worker that runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.media import MediaFetcher
from car_backend.queue.jobqueue import JobQueue
from car_backend.queue.state import RedisState
from car_backend.review.store import ReviewStore
from car_backend.settings import Settings

if TYPE_CHECKING:  # torch: loaded only where jobs run
    from car_backend.engine.head import MaskHead
    from car_backend.engine.segmenter import Segmenter


@dataclass(frozen=True)
class ReviewRuntime:
    """Built once per worker process (car_backend.worker.context) and passed to every review job.

    `settings`; `review` and `state`: the Redis state (review keys; results, ledger, stats); `queue`: for
    follow-up jobs; `client`: Label Studio's API (None without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY);
    `fetcher`: image downloads; `segmenter()`: the engine, loaded on first call (raises ModelSpecError /
    ModelLoadError); `head(reference)`: the mask head a `JobSpec.head` names, or None (see
    worker.context.WorkerContext.head); `name`: this worker, written into the locks it takes.
    """

    settings: Settings
    review: ReviewStore
    state: RedisState
    queue: JobQueue
    client: LabelStudioClient | None
    fetcher: MediaFetcher
    segmenter: Callable[[], Segmenter]
    head: Callable[[str], MaskHead | None]
    name: str
