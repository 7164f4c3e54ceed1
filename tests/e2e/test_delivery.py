"""Late writes into a real Label Studio 1.23.2: read-back, bulk import, no second copy, forged tasks refused."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.pipeline.spec import JobResult
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.jobqueue import make_store
from car_backend.queue.store import LateRecord
from tests.support.label_configs import read_config
from tests.support.settings import tiny_settings

pytestmark = pytest.mark.e2e

VERSION = "car-e2e-delivery-1"
REGION = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 4,
          "original_height": 2, "image_rotation": 0,
          "value": {"format": "rle", "rle": [0, 0, 8, 255], "brushlabels": ["person"]}}


def test_late_predictions_go_through_bulk_import_once_and_forged_tasks_are_refused(label_studio, redis_url):
    client = label_studio.client
    project = client.create_project(read_config("brush.xml"), title="car-backend delivery")["id"]
    images = [f"/data/upload/{project}/e2e-{i}.png" for i in range(4)]
    task_ids = client.import_tasks(project, [{"image": image} for image in images])
    settings = tiny_settings(redis_url=redis_url, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.pat)
    redis = Redis.from_url(redis_url)
    store = make_store(redis, settings)
    key = f"e2e-delivery-{project}"
    store.put_result(key, JobResult(ok=True, regions=[REGION], score=0.5))
    records = [LateRecord(t, VERSION, (key,), project, (image,)) for t, image in zip(task_ids, images, strict=True)]
    forged = LateRecord(task_ids[3], VERSION, (key,), project, (f"/data/upload/{project}/someone-else.png",))
    store.add_late([*records[:3], forged])
    api = LabelStudioClient(settings, settings.ls_timeout)
    deliverer = Deliverer(store, api, settings, owner="e2e")

    stage_ready(store, key)
    assert deliverer.deliver_due(projects=[project]) == 3
    assert not deliverer.bulk_missing  # Label Studio 1.23.2 has the bulk endpoint and took the list
    stored = {t: [p for p in client.predictions(t) if p["model_version"] == VERSION] for t in task_ids}
    assert [len(stored[t]) for t in task_ids] == [1, 1, 1, 0], stored
    assert stored[task_ids[0]][0]["result"][0]["value"]["brushlabels"] == ["person"]

    # The answer was lost (the claims forgotten too): staged again, the read-back finds the predictions.
    for record in records[:3]:
        redis.delete(store.claim_key(record.task, VERSION))
    store.outbox_put(records[:3], due=time.time())
    assert deliverer.deliver_due(projects=[project]) == 3  # confirmed: found in Label Studio, not posted again
    assert [len([p for p in client.predictions(t) if p["model_version"] == VERSION]) for t in task_ids] == [1, 1, 1, 0]
    redis.close()
