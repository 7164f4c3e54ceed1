"""What a /predict caller sends is believed only as far as Label Studio confirms it (black box: the app over
HTTP, the fake Label Studio, a real worker process).

- Claim squatting: a /predict naming a project's task ids with no image takes no claim; the genuine late
  write of those tasks still lands in Label Studio and /status never says the squatter delivered.
- Forged writes: a /predict with the attacker's label config for a real task's image is never written into
  Label Studio (its config is not the project's there), and the genuine prediction is.
"""

from __future__ import annotations

import time

import pytest

from car_backend.labelstudio.config import config_hash
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.queue.ledger import DeliveryLedger, TaskState
from car_backend.queue.stats import CounterFamily, DeliveryOutcome, Stats
from tests.support.service import BRUSH, DELIVERY_TIMEOUT_S, predict

pytestmark = pytest.mark.integration

CREATED = 1700000000
ATTACKER = BRUSH.replace('<Label value="', '<Label value="forged-')  # the attacker's labels, the same image key


def _project(fake_ls, task_ids, n):
    """A project of the fake Label Studio with `n` tasks (each its own image); (wire id, tasks)."""
    ids = task_ids(n + 1)
    project, tasks = ids[0], [{"id": t, "data": {"image": f"{fake_ls.url}/img/claims-{t}.png"}} for t in ids[1:]]
    fake_ls.add_project(project, BRUSH, tasks, created=CREATED)
    return project, tasks


def _ours(fake_ls, tasks):
    """The predictions Label Studio holds for `tasks`, per task id."""
    return {t["id"]: fake_ls.predictions_for(t["id"]) for t in tasks}


def test_a_squatting_predict_takes_no_claim_and_the_genuine_late_write_lands(
        service_settings, make_client, spawn_worker, fake_ls, redis, task_ids):
    project, tasks = _project(fake_ls, task_ids, 3)
    wire = f"{project}.{CREATED}"
    settings = service_settings(queue=f"squat-{project}", predict_wait=0.0)
    client = make_client(settings)
    genuine = predict(client, tasks, project=wire)["results"]  # no worker yet: pending, registered as late
    assert all("result" not in e for e in genuine)
    version = genuine[0]["model_version"]
    # The squatter names the same tasks, with no image, in the same project and in an invented one.
    for target in (wire, "999999.1"):
        squat = predict(client, [{"id": t["id"], "data": {}} for t in tasks], project=target)["results"]
        assert all(e.get("result") == [] for e in squat)  # answered: nothing to predict, no claim taken
    assert client.post("/predict", json={"tasks": [{"id": tasks[0]["id"], "data": {}}], "label_config": "<junk",
                                         "project": wire}).status_code == 400
    status = client.get(f"/status?project={project}").get_json()
    assert status.get("delivered", 0) == 0, status
    pid = ProjectId(instance_of(fake_ls.url), project, CREATED)
    entries = DeliveryLedger(redis).state_of(pid, [t["id"] for t in tasks])
    assert all(e.state is TaskState.LATE and e.version == version for e in entries.values()), entries
    spawn_worker(settings)
    posted = fake_ls.wait_for_predictions([t["id"] for t in tasks], DELIVERY_TIMEOUT_S)
    assert all(len(posted[t["id"]]) == 1 and posted[t["id"]][0]["model_version"] == version for t in tasks), posted


def test_a_forged_config_writes_nothing_and_the_genuine_prediction_is_written(
        service_settings, make_client, spawn_worker, fake_ls, redis, task_ids):
    assert ATTACKER != BRUSH
    project, tasks = _project(fake_ls, task_ids, 2)
    wire = f"{project}.{CREATED}"
    settings = service_settings(queue=f"forged-{project}", predict_wait=0.0)
    client = make_client(settings)
    stats = Stats(redis)
    before = stats.read().get(CounterFamily.DELIVERIES, DeliveryOutcome.REFUSED)
    genuine = predict(client, tasks, project=wire)["results"]
    forged = predict(client, tasks, xml=ATTACKER, project=wire)["results"]  # the real images, the attacker's labels
    assert all("result" not in e for e in genuine + forged)
    spawn_worker(settings)
    fake_ls.wait_for_predictions([t["id"] for t in tasks], DELIVERY_TIMEOUT_S)
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while stats.read().get(CounterFamily.DELIVERIES, DeliveryOutcome.REFUSED) - before < len(tasks):
        assert time.monotonic() < deadline, "the forged records were never judged"
        time.sleep(0.1)
    time.sleep(1.0)  # nothing else arrives
    held = _ours(fake_ls, tasks)
    for task in tasks:
        assert len(held[task["id"]]) == 1, held
        labels = {label for region in held[task["id"]][0]["result"]
                  for label in region["value"].get("brushlabels", [])}
        assert not any(label.startswith("forged-") for label in labels), labels
    assert config_hash(BRUSH) != config_hash(ATTACKER)
