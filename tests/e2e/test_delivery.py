"""Late writes into a real Label Studio 1.23.2: read-back, bulk import, no second copy, forged tasks refused."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.config import config_hash
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.spec import JobResult
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.ledger import DeliveryLedger, LateRecord, Outcome, TaskState
from car_backend.queue.state import RedisState
from tests.support.label_configs import read_config
from tests.support.settings import tiny_settings

pytestmark = pytest.mark.e2e

VERSION = "car-e2e-delivery-1"
REGION = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 4,
          "original_height": 2, "image_rotation": 0,
          "value": {"format": "rle", "rle": [0, 0, 8, 255], "brushlabels": ["person"]}}


def test_late_predictions_go_through_bulk_import_once_and_forged_tasks_are_refused(label_studio, redis_url):
    client = label_studio.client
    created = client.create_project(read_config("brush.xml"), title="car-backend delivery")
    project = ProjectId.from_api(created, instance_of(label_studio.url))  # id and creation stamp
    images = [f"/data/upload/{project.id}/e2e-{i}.png" for i in range(4)]
    task_ids = client.import_tasks(project.id, [{"image": image} for image in images])
    settings = tiny_settings(redis_url=redis_url, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.pat)
    redis = Redis.from_url(redis_url)
    state = RedisState.on(redis, settings)
    ledger = state.ledger
    key = f"e2e-delivery-{project.key}"
    state.results.put(key, JobResult(ok=True, regions=[REGION], score=0.5))
    planned = config_hash(read_config("brush.xml"))  # what Label Studio's own config must hash to
    records = [LateRecord(t, VERSION, (key,), project, (image,), config=planned, sources=(("image", image),))
               for t, image in zip(task_ids, images, strict=True)]
    elsewhere = f"/data/upload/{project.id}/someone-else.png"
    forged = LateRecord(task_ids[3], VERSION, (key,), project, (elsewhere,), config=planned,
                        sources=(("image", elsewhere),))
    ledger.register_late([*records[:3], forged])
    api = LabelStudioClient(settings, settings.ls_timeout)
    deliverer = Deliverer(ledger, state.results, state.stats, api, settings, owner="e2e")

    assert stage_ready(ledger, state.results, key) == {project}
    assert deliverer.deliver_due(projects=[project]) == 3
    assert not deliverer.bulk_missing  # Label Studio 1.23.2 has the bulk endpoint and took the list
    stored = {t: [p for p in client.predictions(t) if p["model_version"] == VERSION] for t in task_ids}
    assert [len(stored[t]) for t in task_ids] == [1, 1, 1, 0], stored
    assert stored[task_ids[0]][0]["result"][0]["value"]["brushlabels"] == ["person"]

    entries = ledger.state_of(project, task_ids)
    assert [entries[t].state for t in task_ids] == [TaskState.DELIVERED] * 3 + [TaskState.DROPPED]

    # The answer was lost (the claims forgotten too): staged again, the read-back finds the predictions.
    redis.hdel(DeliveryLedger.TASKS.key(project.key), *[str(r.task) for r in records[:3]])
    assert ledger.stage(records[:3], due=time.time()) == [Outcome.WRITTEN] * 3
    assert deliverer.deliver_due(projects=[project]) == 3  # confirmed: found in Label Studio, not posted again
    assert [len([p for p in client.predictions(t) if p["model_version"] == VERSION]) for t in task_ids] == [1, 1, 1, 0]
    redis.close()
