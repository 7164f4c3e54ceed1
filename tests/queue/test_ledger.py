"""The delivery ledger on the real Redis: one entry per task holding its newest model_version, claims decided
in one script, versions that never overwrite each other, and /status in a constant number of round trips."""

from __future__ import annotations

import inspect

import pytest
from redis import Redis

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.config import config_hash
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.spec import JobResult
from car_backend.queue import ledger as ledger_module
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.jobqueue import JobQueue
from car_backend.queue.ledger import CLAIM_TTL_S, DeliveryLedger, LateRecord, Outcome, TaskState
from car_backend.queue.state import RedisState
from car_backend.review.store import ReviewStore
from car_backend.service.status import Progress, project_status
from tests.support.service import REGION
from tests.support.settings import tiny_settings


def _state(redis_url, ls=None, **overrides) -> tuple:
    values = {"label_studio_url": ls.url, "label_studio_api_key": ls.api_key} if ls is not None else {}
    settings = tiny_settings(redis_url=redis_url, **values, **overrides)
    return settings, RedisState.on(Redis.from_url(redis_url), settings)


def test_an_answer_is_the_delivered_mark_and_other_projects_are_other_deliveries(redis_url, task_ids):
    """(Contention for one claim: tests/queue/test_store.py.)"""
    _, state = _state(redis_url)
    (task,) = task_ids(1)
    project = ProjectId("ledger", task, 1700000000)
    assert state.ledger.answer(project, [(task, "v1", ("k",), TaskState.DELIVERED, "")], "predict:0") == [True]
    entry = state.ledger.state_of(project, [task])[task]
    assert entry.state is TaskState.DELIVERED and entry.version == "v1" and entry.delivered.keys == ("k",)
    assert 0 < entry.until - state.redis.time()[0] <= CLAIM_TTL_S + 1
    assert state.ledger.answer(project, [(task, "v2", ("k2",), TaskState.DELIVERED, "")], "x") == [True]
    # The same task of another project (or another Label Studio) is another delivery.
    other = ProjectId("ledger-b", task, 1700000000)
    assert state.ledger.answer(other, [(task, "v1", ("k",), TaskState.DELIVERED, "")], "y") == [True]


def test_claim_owners_and_states_reach_the_script_as_arguments():
    source = ledger_module._TRANSITION
    for literal in ("predict:", "deliver:", "delivered:", "prelabel:"):
        assert literal not in source
    assert "claimed_states[ARGV[i]]" in source
    run = inspect.getsource(ledger_module.DeliveryLedger._run)
    assert "CLAIMED" in run and "owner" in run


def test_an_older_version_is_never_staged_nor_written_after_a_newer_one(redis_url, ls, task_ids):
    settings, state = _state(redis_url, ls, delivery_retry_max=0.2)
    (task,) = task_ids(1)
    project = ProjectId(instance_of(settings.label_studio_url), task, 1700000000)
    image = f"{ls.url}/img/{task}.png"
    ls.add_project(project.id, "<View/>", [{"id": task, "data": {"image": image}}], created=1700000000)
    planned = {"config": config_hash("<View/>"), "sources": (("image", image),)}
    old = LateRecord(task, "car-old", (f"old-{task}",), project, (image,), **planned)
    new = LateRecord(task, "car-new", (f"new-{task}",), project, (image,), **planned)
    state.ledger.register_late([old])
    state.ledger.register_late([new])  # Label Studio asked again with the project's new config
    for record in (new, old):  # the newer job finishes first; the older one later
        state.results.put(record.keys[0], JobResult(ok=True, regions=[REGION], score=0.5))
    assert stage_ready(state.ledger, state.results, new.keys[0]) == {project}
    assert stage_ready(state.ledger, state.results, old.keys[0]) == set()  # superseded: not staged
    assert state.ledger.outbox(project, 10) == [new]
    assert state.ledger.late(old.keys[0]) == []
    deliverer = Deliverer(state.ledger, state.results, state.stats, LabelStudioClient(settings, settings.ls_timeout),
                          settings, owner="ledger-test")
    assert deliverer.deliver_due(projects=[project]) == 1
    assert ls.prediction_counts() == {(task, "car-new"): 1}
    # A deliverer still holding the old record (read before the new version came) cannot claim it.
    assert state.ledger.claim_for_delivery(old, "deliver:late") is Outcome.SUPERSEDED
    assert state.ledger.state_of(project, [task])[task].version == "car-new"


def test_the_older_version_in_the_outbox_is_superseded_when_the_newer_one_is_staged(redis_url, task_ids):
    _, state = _state(redis_url)
    (task,) = task_ids(1)
    project = ProjectId("ledger", task, None)
    old = LateRecord(task, "v-old", ("ko",), project, ("img",))
    new = LateRecord(task, "v-new", ("kn",), project, ("img",))
    state.ledger.register_late([old])
    assert state.ledger.stage([old], due=0.0) == [Outcome.WRITTEN]
    state.ledger.register_late([new])
    assert state.ledger.stage([new], due=0.0) == [Outcome.WRITTEN]
    assert 0 < state.redis.ttl(DeliveryLedger.OUTBOX.key(project.key)) <= state.ledger.late_ttl
    # Each record waits in a slot of its own; the older one leaves when a deliverer finds it superseded.
    assert sorted(r.version for r in state.ledger.outbox(project, 10)) == ["v-new", "v-old"]
    assert state.ledger.claim_for_delivery(old, "deliver:a") is Outcome.SUPERSEDED
    assert state.ledger.outbox(project, 10) == [new]
    assert state.ledger.stage([old], due=0.0) == [Outcome.SUPERSEDED]
    assert state.ledger.outbox(project, 10) == [new]


def test_a_write_in_flight_blocks_predict_and_a_confirmed_one_is_the_delivered_mark(redis_url, task_ids):
    _, state = _state(redis_url)
    (task,) = task_ids(1)
    project = ProjectId("ledger", task, None)
    record = LateRecord(task, "v1", ("k1", "k2"), project, ("img",))
    state.ledger.register_late([record])
    state.ledger.stage([record], due=0.0)
    assert state.ledger.claim_for_delivery(record, "deliver:a") is Outcome.WON
    assert state.ledger.claim_for_delivery(record, "deliver:b") is Outcome.TAKEN_OVER  # the lease holder's
    assert state.ledger.answer(project, [(task, "v1", record.keys, TaskState.DELIVERED, "")], "predict:x") == [False]
    state.ledger.confirm([record], "deliver:b")
    entry = state.ledger.state_of(project, [task])[task]
    assert entry.state is TaskState.DELIVERED and entry.owner == "deliver:b"
    assert state.ledger.delivered(project, task).keys == ("k1", "k2")
    assert state.ledger.outbox_size(project) == 0
    assert state.ledger.claim_for_delivery(record, "deliver:c") is Outcome.CLAIMED


class CountingRedis(Redis):
    """A client that counts round trips: single commands and pipeline executions."""

    trips = 0

    def execute_command(self, *args, **options):
        CountingRedis.trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted(*args, **kwargs):
            CountingRedis.trips += 1
            return execute(*args, **kwargs)

        pipe.execute = counted
        return pipe


@pytest.mark.parametrize("tasks", [50, 5000])
def test_status_of_a_project_takes_a_constant_number_of_round_trips(redis_url, task_ids, tasks):
    settings, writer = _state(redis_url)
    ids = task_ids(tasks)
    project = ProjectId("ledger-status", ids[0], 1700000000)
    delivered, late = ids[: tasks // 2], ids[tasks // 2:]
    writer.ledger.answer(project, [(t, "v1", (f"d-{t}",), TaskState.DELIVERED, "") for t in delivered], "predict:x")
    writer.ledger.register_late([LateRecord(t, "v1", (f"l-{t}",), project, ("img",)) for t in late])
    for t in delivered:
        writer.results.put(f"d-{t}", JobResult(ok=True, regions=[REGION]))
    redis = CountingRedis.from_url(redis_url)
    state = RedisState.on(redis, settings)
    queue, review = JobQueue(settings, redis, state.locks), ReviewStore(redis)
    CountingRedis.trips = 0
    progress = project_status(state, queue, review, project)
    assert CountingRedis.trips <= 6  # entries, results, locks, job statuses, fit and calibration (+ a script load)
    assert progress.total == tasks
    assert progress.counts[Progress.DELIVERED.value] == len(delivered)
    assert progress.counts[Progress.FAILED.value] == len(late)  # no job was ever queued for them
