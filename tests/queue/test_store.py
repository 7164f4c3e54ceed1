"""Redis-side state on the real Redis: delivery claims, dedup of submissions, late records, worker stats."""

from __future__ import annotations

import threading
import time

from rq.job import Job

from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobResult
from car_backend.queue.jobqueue import SERIALIZER, JobQueue
from car_backend.queue.ledger import CLAIM_TTL_S, LateRecord, TaskState
from car_backend.queue.results import ResultCache
from car_backend.queue.state import RedisState
from car_backend.queue.stats import Stats
from car_backend.review.store import ReviewStore
from car_backend.service.projects import Projects
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings

PROJECT = ProjectId("local", 1, 1700000000)


def _answer(task: int, version: str) -> tuple:
    """A /predict answer of (task, version) for `DeliveryLedger.answer`: delivered, holding one job key."""
    return task, version, (f"key-{task}-{version}",), TaskState.DELIVERED, ""


def _release(task: int, version: str) -> tuple:
    """Giving a claim back after the delivery failed (the old `release_claim`): the entry settles as pending."""
    return task, version, (f"key-{task}-{version}",), TaskState.PENDING, "the delivery failed"


def test_only_one_caller_wins_a_delivery_claim(redis, redis_url, task_ids):
    ledger = RedisState.on(redis, tiny_settings(redis_url=redis_url)).ledger
    (task,) = task_ids(1)
    wins = []

    def contend(owner: str) -> None:
        wins.append(ledger.answer(PROJECT, [_answer(task, "v1")], owner)[0])

    threads = [threading.Thread(target=contend, args=(f"owner-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    # The claim lives in the task's ledger entry now (no claim key with a TTL): it lasts CLAIM_TTL_S.
    entry = ledger.state_of(PROJECT, [task])[task]
    assert entry.state is TaskState.DELIVERED and entry.owner.startswith("owner-")
    assert 0 < entry.until - time.time() <= CLAIM_TTL_S
    ledger.settle(PROJECT, [_release(task, "v1")], owner="not-the-owner")
    assert ledger.state_of(PROJECT, [task])[task] == entry  # still claimed: only its owner releases it
    assert ledger.answer(PROJECT, [_answer(task, "v1")], "x") == [False]
    # Checked after the release above: a task holds one entry, its newest version, so v2 supersedes v1.
    assert ledger.answer(PROJECT, [_answer(task, "v2")], "x") == [True]  # another model version is another delivery


def test_released_claims_can_be_won_again(redis, redis_url, task_ids):
    ledger = RedisState.on(redis, tiny_settings(redis_url=redis_url)).ledger
    (task,) = task_ids(1)
    assert ledger.answer(PROJECT, [_answer(task, "v1"), _answer(task, "v1")], "a") == [True, False]
    ledger.settle(PROJECT, [_release(task, "v1")], owner="a")
    assert ledger.answer(PROJECT, [_answer(task, "v1")], "b") == [True]


def test_submitting_a_key_twice_makes_one_job(redis, redis_url, task_ids):
    settings = tiny_settings(redis_url=redis_url, queue=f"q-{task_ids(1)[0]}")
    state = RedisState.on(redis, settings)
    queue = JobQueue(settings, redis, state.locks)
    project = Projects(settings, state.projects, ReviewStore(redis)).setup(None, label_config("brush"), None)
    spec = plan_task({"id": 1, "data": {"image": "http://h/x.png"}}, project, settings).specs[0]
    results = []
    threads = [threading.Thread(target=lambda: results.append(queue.submit(spec))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job_id for job_id, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1
    assert queue.batch.count == 1
    # A job that failed for good no longer blocks its key: the next submission makes a new one.
    job_id = results[0][0]
    Job.fetch(job_id, connection=redis, serializer=SERIALIZER).set_status("failed")
    new_id, created = queue.submit(spec)
    assert created and new_id != job_id and queue.batch.count == 2


def test_late_records_round_trip(redis, redis_url, task_ids):
    ledger = RedisState.on(redis, tiny_settings(redis_url=redis_url)).ledger
    (task,) = task_ids(1)
    record = LateRecord(task, "v1", ("k1", "k2"), PROJECT)
    ledger.register_late([record])
    assert ledger.late("k1") == [record] and ledger.late("k2") == [record]
    ledger.done([record])  # what took a record off its keys (remove_late) once it was delivered
    assert ledger.late("k1") == [] and ledger.late("k2") == []


def test_results_round_trip(redis, redis_url):
    results = RedisState.on(redis, tiny_settings(redis_url=redis_url, result_ttl=60)).results
    result = JobResult(ok=False, regions=[], error="cannot decode", seconds=0.2)
    results.put("some-key", result)
    assert results.get_many(["some-key", "other"]) == [result, None]
    assert 0 < redis.ttl(ResultCache.RESULT.key("some-key")) <= 60


def _counting_clip(name: str, encoded: list[str]):
    import open_clip
    import torch

    from car_backend.engine.models import ClipModel

    def encode(texts):
        encoded.extend(texts)
        return torch.tensor([[float(len(t)), 1.0, float(t.count("a"))] for t in texts])

    tiny = open_clip.CLIP(embed_dim=3, vision_cfg={"layers": 1, "width": 16, "patch_size": 16, "head_width": 16},
                          text_cfg={"layers": 1, "width": 8, "heads": 1})
    return ClipModel(tiny, name=name, encode_texts=encode)


def test_text_embeddings_are_shared_between_processes_through_redis(redis):
    import numpy as np
    import torch

    from car_backend.queue.textcache import RedisTextCache

    redis.delete(Stats.STATS.key())
    cache = RedisTextCache(redis, ttl=60)
    first_encoded: list[str] = []
    second_encoded: list[str] = []
    first = _counting_clip("shared-test:random", first_encoded)  # as two workers would each load it
    second = _counting_clip("shared-test:random", second_encoded)
    first.shared_cache = second.shared_cache = cache
    a = first.embed_texts(["a cat", "a dog"])
    b = second.embed_texts(["a dog", "a cat", "a bird"])
    assert first_encoded == ["a cat", "a dog"]
    assert second_encoded == ["a bird"]  # the other two came from Redis
    assert torch.allclose(b[0], a[1]) and torch.allclose(b[1], a[0])
    assert 0 < redis.ttl(cache.key(first.identity, "a cat")) <= 60
    stats = {k.decode(): int(float(v)) for k, v in redis.hgetall(Stats.STATS.key()).items()}
    assert stats["text:hit"] == 2 and stats["text:miss"] == 3
    # another model (or precision) never reads these rows; a wrong-width row is a miss, not a crash
    other_encoded: list[str] = []
    other = _counting_clip("other-model:random", other_encoded)
    other.shared_cache = cache
    other.embed_texts(["a cat"])
    assert other_encoded == ["a cat"]
    redis.set(cache.key(first.identity, "a fish"), np.ones(7, dtype=np.float32).tobytes())
    first.embed_texts(["a fish"])
    assert first_encoded[-1] == "a fish"


def test_an_unreachable_text_cache_falls_back_to_encoding():
    from redis import Redis

    from car_backend.queue.textcache import RedisTextCache

    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    encoded: list[str] = []
    clip = _counting_clip("dead-cache:random", encoded)
    clip.shared_cache = RedisTextCache(dead, ttl=60)
    assert clip.embed_texts(["a cat", "a dog"]).shape == (2, 3)
    assert encoded == ["a cat", "a dog"]
