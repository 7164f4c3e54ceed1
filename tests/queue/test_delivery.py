"""The Deliverer against the real Redis and the fake Label Studio: batches, read-back, retries, takeover."""

from __future__ import annotations

import time

from redis import Redis

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.config import config_hash
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.spec import JobResult
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.ledger import CLAIMED, LateRecord, Outcome, TaskState
from car_backend.queue.state import RedisState
from car_backend.queue.stats import CounterFamily, DeliveryOutcome
from tests.support.service import REGION
from tests.support.settings import tiny_settings

VERSION = "car-test-v1"
CREATED = 1700000000  # the projects' creation stamp (part of their ProjectId)

def world(redis_url, ls, task_ids, n, project=None, **overrides):
    """Settings, Redis state, deliverer and `n` late records of one project whose (shared) job has finished."""
    settings = tiny_settings(redis_url=redis_url, label_studio_url=ls.url, label_studio_api_key=ls.api_key,
                             delivery_retry_max=0.2, **overrides)
    state = RedisState.on(Redis.from_url(settings.redis_url), settings)
    ids = task_ids(n)
    project = ProjectId(instance_of(settings.label_studio_url), project or ids[0], CREATED)
    key = f"key-{ids[0]}"
    image = f"{ls.url}/img/{ids[0]}.png"
    ls.add_project(project.id, "<View/>", [{"id": t, "data": {"image": image}} for t in ids], created=CREATED)
    state.results.put(key, JobResult(ok=True, regions=[REGION], score=0.5))
    records = [LateRecord(t, VERSION, (key,), project, (image,), config=config_hash("<View/>"),
                          sources=(("image", image),)) for t in ids]
    state.ledger.register_late(records)
    deliverer = Deliverer(state.ledger, state.results, state.stats, LabelStudioClient(settings, settings.ls_timeout),
                          settings, owner="test-worker")
    return settings, state, deliverer, records, key


def states(state, records) -> list[TaskState]:
    """The ledger state of each record's task, whose entry must hold the record's model_version."""
    entries = state.ledger.state_of(records[0].project, [r.task for r in records])
    assert [entries[r.task].version for r in records] == [r.version for r in records]
    return [entries[r.task].state for r in records]


def refused(state) -> float:
    return state.stats.read().get(CounterFamily.DELIVERIES, DeliveryOutcome.REFUSED)


def writes(ls) -> int:
    return len([s for s in ls.seen if s.method == "POST" and s.path.startswith(("/api/predictions",
                                                                                 "/api/projects/"))])


def test_1000_late_predictions_of_one_project_take_at_most_10_write_requests(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 1000)
    assert stage_ready(state.ledger, state.results, key) == {records[0].project}
    assert deliverer.deliver_due(projects=[records[0].project]) == 1000
    counts = ls.prediction_counts()
    assert all(counts[(r.task, VERSION)] == 1 for r in records)
    assert writes(ls) <= 10 and ls.bulk_requests == writes(ls)  # 1000 / CAR_DELIVERY_BATCH (200) = 5
    assert state.ledger.outbox_size(records[0].project) == 0 and state.ledger.late(key) == []
    assert states(state, records[:3]) == [TaskState.DELIVERED] * 3


def test_without_the_bulk_endpoint_each_task_is_written_once(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 5)
    ls.bulk_missing = True
    stage_ready(state.ledger, state.results, key)
    assert deliverer.deliver_due(projects=[records[0].project]) == 5
    assert ls.bulk_requests == 1  # tried once, then one by one (and remembered)
    assert len(ls.seen_paths("/api/predictions/")) == 5
    assert all(ls.prediction_counts()[(r.task, VERSION)] == 1 for r in records)


def test_a_task_holding_another_image_or_of_another_project_is_not_written(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 3)
    forged_image, other_project, control = records
    ls.add_tasks(forged_image.project.id, [{"id": forged_image.task, "data": {"image": f"{ls.url}/img/other.png"}}])
    ls.add_tasks(forged_image.project.id + 1, [{"id": other_project.task, "data": {"image": control.images[0]}}])
    before = refused(state)
    stage_ready(state.ledger, state.results, key)
    assert deliverer.deliver_due(projects=[control.project]) == 1
    assert ls.predictions_for(forged_image.task) == [] and ls.predictions_for(other_project.task) == []
    assert len(ls.predictions_for(control.task)) == 1
    assert refused(state) - before == 2
    tracked = state.ledger.state_of(control.project)
    assert tracked[forged_image.task].state is TaskState.DROPPED and "refused" in tracked[forged_image.task].reason
    assert state.ledger.outbox_size(control.project) == 0  # dropped, not retried forever


def test_the_image_under_another_key_or_another_config_in_label_studio_is_not_written(redis_url, ls, task_ids):
    """Not "the string appears somewhere": the image must be under the key the config names, and the
    project's config in Label Studio must be the one that planned the job."""
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 2)
    elsewhere, control = records
    ls.add_tasks(elsewhere.project.id, [{"id": elsewhere.task, "data": {"image": f"{ls.url}/img/decoy.png",
                                                                       "caption": elsewhere.images[0]}}])
    before = refused(state)
    stage_ready(state.ledger, state.results, key)
    assert deliverer.deliver_due(projects=[control.project]) == 1
    assert ls.predictions_for(elsewhere.task) == [] and len(ls.predictions_for(control.task)) == 1
    assert refused(state) - before == 1
    # The project's config changed in Label Studio: nothing planned with the old one is written.
    _, state, deliverer, records, key = world(redis_url, ls, task_ids, 2)
    ls.add_project(records[0].project.id, "<View><Image name='image' value='$image'/></View>",
                   [{"id": r.task, "data": {"image": r.images[0]}} for r in records], created=CREATED)
    stage_ready(state.ledger, state.results, key)
    assert deliverer.deliver_due(projects=[records[0].project]) == 0
    assert all(ls.predictions_for(r.task) == [] for r in records)
    entries = state.ledger.state_of(records[0].project, [r.task for r in records])
    assert all(e.state is TaskState.DROPPED and "label config" in e.reason for e in entries.values())


def test_a_write_stored_but_answered_after_the_timeout_is_not_posted_again(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 4, ls_timeout=0.5)
    ls.slow_first_writes = 1.5
    project = records[0].project
    stage_ready(state.ledger, state.results, key)
    assert deliverer.deliver_due(projects=[project]) == 0  # the answer came too late: not confirmed
    assert state.ledger.retry_state(project)[0] == 1 and state.ledger.outbox_size(project) == 4
    assert states(state, records[:1]) == [TaskState.WRITING]  # /predict keeps away meanwhile
    deadline = time.monotonic() + 20
    while state.ledger.outbox_size(project) and time.monotonic() < deadline:
        deliverer.deliver_due()
        time.sleep(0.1)
    assert all(ls.prediction_counts()[(r.task, VERSION)] == 1 for r in records)
    assert ls.bulk_requests == 1  # the retry read the tasks back and found the predictions
    assert states(state, records) == [TaskState.DELIVERED] * 4


def test_label_studio_down_is_retried_with_backoff_then_written_once(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 3)
    project = records[0].project
    ls.go_down(1.5, mode="refuse")
    stage_ready(state.ledger, state.results, key)
    tries = 0
    deadline = time.monotonic() + 20
    while state.ledger.outbox_size(project) and time.monotonic() < deadline:
        tries += deliverer.deliver_due() == 0
        time.sleep(0.05)
    assert ls.faults_served >= 2  # failed more than once, each time after a wait
    assert all(ls.prediction_counts()[(r.task, VERSION)] == 1 for r in records)
    assert state.ledger.retry_state(project)[0] == 0


def test_writes_are_given_up_after_the_delivery_window(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 2, delivery_window=1)
    project = records[0].project
    ls.go_down(30, mode="503")
    stage_ready(state.ledger, state.results, key)
    deadline = time.monotonic() + 10
    while state.ledger.outbox_size(project) and time.monotonic() < deadline:
        deliverer.deliver_due()
        time.sleep(0.1)
    assert state.ledger.outbox_size(project) == 0 and ls.predictions == []
    assert all("CAR_DELIVERY_WINDOW" in state.ledger.state_of(project)[r.task].reason for r in records)
    # No claim is left (the old claim keys were gone): /predict may answer.
    assert all(s not in CLAIMED for s in states(state, records))
    assert states(state, records) == [TaskState.DROPPED] * 2
    answers = [(r.task, VERSION, r.keys, TaskState.DELIVERED, "") for r in records]
    assert state.ledger.answer(project, answers, "predict:server") == [True, True]


def test_a_dead_deliverers_claim_and_lease_are_taken_over(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 2)
    written_before_death, unwritten = records
    project = written_before_death.project
    # Staged first: the ledger stages no record whose version is claimed, and a deliverer only ever claims
    # records it read from the outbox (the old test claimed before staging, which the claim keys allowed).
    stage_ready(state.ledger, state.results, key)
    # A deliverer died after Label Studio stored one write and before it could confirm anything.
    state.ledger.take_lease(project, "deliver:dead", 0.3)
    for record in records:
        assert state.ledger.claim_for_delivery(record, "deliver:dead") is Outcome.WON
    ls.predictions.append({"task": written_before_death.task, "model_version": VERSION, "result": [REGION],
                           "id": 1, "at": time.time()})
    assert deliverer.deliver_due(projects=[project]) == 0  # the lease is still held
    time.sleep(0.4)
    assert deliverer.deliver_due() == 2
    counts = ls.prediction_counts()
    assert counts[(written_before_death.task, VERSION)] == 1 and counts[(unwritten.task, VERSION)] == 1


def test_a_task_delivered_by_predict_meanwhile_is_not_written(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 2)
    answered, late = records
    answer = (answered.task, VERSION, answered.keys, TaskState.DELIVERED, "")
    assert state.ledger.answer(answered.project, [answer], "predict:server") == [True]
    stage_ready(state.ledger, state.results, key)
    assert deliverer.deliver_due(projects=[late.project]) == 1
    assert ls.predictions_for(answered.task) == [] and len(ls.predictions_for(late.task)) == 1


def test_a_pending_failure_is_not_written_and_leaves_the_late_sets(redis_url, ls, task_ids):
    settings, state, deliverer, records, key = world(redis_url, ls, task_ids, 1)
    state.results.put(key, JobResult(ok=False, regions=[], error="host 'x' is not allowed", pending=True,
                                     conditions=state.results.conditions))
    assert stage_ready(state.ledger, state.results, key) == set()
    assert state.ledger.late(key) == [] and ls.predictions == []
    assert state.ledger.state_of(records[0].project)[records[0].task].state is TaskState.PENDING
