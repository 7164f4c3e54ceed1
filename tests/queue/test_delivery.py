"""The Deliverer against the real Redis and the fake Label Studio: batches, read-back, retries, takeover."""

from __future__ import annotations

import time

import pytest

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.pipeline.spec import JobResult
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.jobqueue import make_store
from car_backend.queue.store import LateRecord
from car_backend.testing.fake_label_studio import FakeLabelStudio
from tests.support.settings import tiny_settings

VERSION = "car-test-v1"
REGION = {"from_name": "tag", "to_name": "image", "type": "brushlabels",
          "value": {"format": "rle", "rle": [1, 2], "brushlabels": ["cat"]}}


@pytest.fixture
def ls():
    with FakeLabelStudio() as fake:
        yield fake


def world(redis_url, ls, task_ids, n, project=None, **overrides):
    """Settings, store, deliverer and `n` late records of one project whose (shared) job has finished."""
    settings = tiny_settings(redis_url=redis_url, label_studio_url=ls.url, label_studio_api_key=ls.api_key,
                             delivery_retry_max=0.2, **overrides)
    store = make_store_for(settings)
    ids = task_ids(n)
    project = project or ids[0]
    key = f"key-{ids[0]}"
    image = f"{ls.url}/img/{ids[0]}.png"
    ls.add_project(project, "<View/>", [{"id": t, "data": {"image": image}} for t in ids])
    store.put_result(key, JobResult(ok=True, regions=[REGION], score=0.5))
    records = [LateRecord(t, VERSION, (key,), project, (image,)) for t in ids]
    store.add_late(records)
    deliverer = Deliverer(store, LabelStudioClient(settings, settings.ls_timeout), settings, owner="test-worker")
    return settings, store, deliverer, records, key


def make_store_for(settings):
    from redis import Redis

    return make_store(Redis.from_url(settings.redis_url), settings)


def writes(ls) -> int:
    return len([s for s in ls.seen if s.method == "POST" and s.path.startswith(("/api/predictions",
                                                                                 "/api/projects/"))])


def test_1000_late_predictions_of_one_project_take_at_most_10_write_requests(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 1000)
    assert stage_ready(store, key) == {records[0].project}
    assert deliverer.deliver_due(projects=[records[0].project]) == 1000
    counts = ls.prediction_counts()
    assert all(counts[(r.task, VERSION)] == 1 for r in records)
    assert writes(ls) <= 10 and ls.bulk_requests == writes(ls)  # 1000 / CAR_DELIVERY_BATCH (200) = 5
    assert store.outbox_size(records[0].project) == 0 and store.late(key) == []
    assert store.delivery_states([r.task for r in records[:3]], VERSION) == ["delivered"] * 3


def test_without_the_bulk_endpoint_each_task_is_written_once(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 5)
    ls.bulk_missing = True
    stage_ready(store, key)
    assert deliverer.deliver_due(projects=[records[0].project]) == 5
    assert ls.bulk_requests == 1  # tried once, then one by one (and remembered)
    assert len(ls.seen_paths("/api/predictions/")) == 5
    assert all(ls.prediction_counts()[(r.task, VERSION)] == 1 for r in records)


def test_a_task_holding_another_image_or_of_another_project_is_not_written(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 3)
    forged_image, other_project, control = records
    ls.add_tasks(forged_image.project, [{"id": forged_image.task, "data": {"image": f"{ls.url}/img/other.png"}}])
    ls.add_tasks(forged_image.project + 1, [{"id": other_project.task, "data": {"image": control.images[0]}}])
    before = float(store.redis.hget("car:stats", "deliveries:refused") or 0)
    stage_ready(store, key)
    assert deliverer.deliver_due(projects=[control.project]) == 1
    assert ls.predictions_for(forged_image.task) == [] and ls.predictions_for(other_project.task) == []
    assert len(ls.predictions_for(control.task)) == 1
    assert float(store.redis.hget("car:stats", "deliveries:refused")) - before == 2
    tracked = store.tracked(control.project)
    assert tracked[forged_image.task]["state"] == "dropped" and "refused" in tracked[forged_image.task]["reason"]
    assert store.outbox_size(control.project) == 0  # dropped, not retried forever


def test_a_write_stored_but_answered_after_the_timeout_is_not_posted_again(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 4, ls_timeout=0.5)
    ls.slow_first_writes = 1.5
    project = records[0].project
    stage_ready(store, key)
    assert deliverer.deliver_due(projects=[project]) == 0  # the answer came too late: not confirmed
    assert store.retry_state(project)[0] == 1 and store.outbox_size(project) == 4
    assert store.delivery_states([records[0].task], VERSION) == ["writing"]  # /predict keeps away meanwhile
    deadline = time.monotonic() + 20
    while store.outbox_size(project) and time.monotonic() < deadline:
        deliverer.deliver_due()
        time.sleep(0.1)
    assert all(ls.prediction_counts()[(r.task, VERSION)] == 1 for r in records)
    assert ls.bulk_requests == 1  # the retry read the tasks back and found the predictions
    assert store.delivery_states([r.task for r in records], VERSION) == ["delivered"] * 4


def test_label_studio_down_is_retried_with_backoff_then_written_once(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 3)
    project = records[0].project
    ls.go_down(1.5, mode="refuse")
    stage_ready(store, key)
    tries = 0
    deadline = time.monotonic() + 20
    while store.outbox_size(project) and time.monotonic() < deadline:
        tries += deliverer.deliver_due() == 0
        time.sleep(0.05)
    assert ls.faults_served >= 2  # failed more than once, each time after a wait
    assert all(ls.prediction_counts()[(r.task, VERSION)] == 1 for r in records)
    assert store.retry_state(project)[0] == 0


def test_writes_are_given_up_after_the_delivery_window(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 2, delivery_window=1)
    project = records[0].project
    ls.go_down(30, mode="503")
    stage_ready(store, key)
    deadline = time.monotonic() + 10
    while store.outbox_size(project) and time.monotonic() < deadline:
        deliverer.deliver_due()
        time.sleep(0.1)
    assert store.outbox_size(project) == 0 and ls.predictions == []
    assert all("CAR_DELIVERY_WINDOW" in store.tracked(project)[r.task]["reason"] for r in records)
    assert store.delivery_states([r.task for r in records], VERSION) == [None, None]  # /predict may answer


def test_a_dead_deliverers_claim_and_lease_are_taken_over(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 2)
    written_before_death, unwritten = records
    project = written_before_death.project
    # A deliverer died after Label Studio stored one write and before it could confirm anything.
    store.take_lease(project, "deliver:dead", 0.3)
    for record in records:
        assert store.claim_for_delivery(record.task, VERSION, "deliver:dead") == "won"
    ls.predictions.append({"task": written_before_death.task, "model_version": VERSION, "result": [REGION],
                           "id": 1, "at": time.time()})
    stage_ready(store, key)
    assert deliverer.deliver_due(projects=[project]) == 0  # the lease is still held
    time.sleep(0.4)
    assert deliverer.deliver_due() == 2
    counts = ls.prediction_counts()
    assert counts[(written_before_death.task, VERSION)] == 1 and counts[(unwritten.task, VERSION)] == 1


def test_a_task_delivered_by_predict_meanwhile_is_not_written(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 2)
    answered, late = records
    assert store.claim([answered.task], VERSION, "predict:server") == [True]
    stage_ready(store, key)
    assert deliverer.deliver_due(projects=[late.project]) == 1
    assert ls.predictions_for(answered.task) == [] and len(ls.predictions_for(late.task)) == 1


def test_a_pending_failure_is_not_written_and_leaves_the_late_sets(redis_url, ls, task_ids):
    settings, store, deliverer, records, key = world(redis_url, ls, task_ids, 1)
    store.put_result(key, JobResult(ok=False, regions=[], error="host 'x' is not allowed", pending=True,
                                    conditions=store.conditions))
    assert stage_ready(store, key) == set()
    assert store.late(key) == [] and ls.predictions == []
    assert store.tracked(records[0].project)[records[0].task]["state"] == "pending"
