"""Two Label Studios on one Redis, and a Label Studio whose database was reset: the same project and task ids
never share calibrations, mask heads, delivery claims or outboxes (project identity: pipeline.identity)."""

from __future__ import annotations

import hashlib
import time

import pytest

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.config import config_hash
from car_backend.pipeline.identity import ProjectId, created_stamp, instance_of
from car_backend.pipeline.spec import JobResult
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.ledger import LateRecord, TaskState
from car_backend.review.store import Calibration, FitState, FitStatus
from car_backend.service.backend import Backend
from car_backend.testing.fake_label_studio import FakeLabelStudio
from tests.support.service import BRUSH, DELIVERY_TIMEOUT_S, REGION, predict
from tests.support.settings import tiny_settings

CREATED = 1700000000


@pytest.fixture
def two_studios():
    with FakeLabelStudio() as first, FakeLabelStudio() as second:
        yield first, second


@pytest.fixture
def backends(redis_url, two_studios):
    """A backend per fake Label Studio, both on the test Redis and the same queue names."""
    made = []
    for studio in two_studios:
        settings = tiny_settings(redis_url=redis_url, label_studio_url=studio.url,
                                 label_studio_api_key=studio.api_key, delivery_retry_max=0.2)
        made.append(Backend(settings))
    yield made
    for backend in made:
        backend.close()


def test_the_wire_form_the_api_form_and_a_bare_id_name_the_same_project(redis_url):
    settings = tiny_settings(redis_url=redis_url, label_studio_url="http://Studio.example:80/ls")
    instance = instance_of(settings.label_studio_url)
    assert instance == instance_of("http://studio.example") != instance_of("http://studio.example:8080")
    wire = ProjectId.from_wire(f"12.{CREATED}", instance)
    api = ProjectId.from_api({"id": 12, "created_at": "2023-11-14T22:13:20.482915Z"}, instance)
    assert wire == api == ProjectId(instance, 12, CREATED)
    assert created_stamp("2023-11-14T22:13:20+00:00") == CREATED
    assert ProjectId.from_key(wire.key) == wire and str(wire) == "12"
    assert [ProjectId.from_wire(raw, instance) for raw in (None, "", "x.1", True, "-3")] == [None] * 5
    backend = Backend(settings)
    try:
        backend.projects.identify(f"12.{CREATED}")  # seen: a bare id now resolves to this creation stamp
        assert backend.projects.by_id(12) == wire
        assert backend.projects.identify("12") == wire
        assert backend.projects.identify_api({"id": 12}) == wire
    finally:
        backend.close()


def test_calibrations_heads_and_claims_stay_with_their_label_studio(backends, task_ids):
    first, second = backends
    (task,) = task_ids(1)
    raw = f"{task}.{CREATED}"  # the same project id and creation stamp in both Label Studios
    a, b = first.projects.identify(raw), second.projects.identify(raw)
    assert a.id == b.id and a.created == b.created and a != b
    calibration = Calibration(generation=1, thresholds={"confidence_threshold": 0.3}, previous={}, tasks=4,
                              before=0.1, after=0.2)
    first.review.put_calibration(a, calibration)
    first.review.put_fit_status(a, FitStatus(generation=1, head="ab" * 32, state=FitState.DONE))
    version_a = first.projects.for_predict(raw, BRUSH).version
    version_b = second.projects.for_predict(raw, BRUSH).version
    assert version_a.endswith("-cal1-fit1") and "-cal" not in version_b and "-fit" not in version_b
    assert first.projects.for_predict(raw, BRUSH).head == "ab" * 32 and second.projects.for_predict(raw, BRUSH).head == ""
    # A delivery claim of the first Label Studio's task does not block the second's task of the same id.
    assert first.state.ledger.answer(a, [(task, "v", ("k",), TaskState.DELIVERED, "")], "predict:a") == [True]
    assert second.state.ledger.answer(b, [(task, "v", ("k",), TaskState.DELIVERED, "")], "predict:b") == [True]
    assert first.state.ledger.answer(a, [(task, "v", ("k",), TaskState.DELIVERED, "")], "predict:c") == [False]


def test_a_reset_label_studio_inherits_nothing(backends, task_ids):
    first, _ = backends
    (task,) = task_ids(1)
    old = first.projects.identify(f"{task}.{CREATED}")
    first.review.put_calibration(old, Calibration(generation=2, thresholds={"confidence_threshold": 0.3},
                                                  previous={}, tasks=4, before=0.1, after=0.2))
    assert first.state.ledger.answer(old, [(task, "v", ("k",), TaskState.DELIVERED, "")], "predict:a") == [True]
    # The database was reset: the project with the same id was created again, later.
    new = first.projects.identify(f"{task}.{CREATED + 3600}")
    assert new != old and first.projects.by_id(task) == new  # the bare id now names the new project
    assert "-cal" not in first.projects.for_predict(f"{task}.{CREATED + 3600}", BRUSH).version
    assert first.state.ledger.answer(new, [(task, "v", ("k",), TaskState.DELIVERED, "")], "predict:b") == [True]
    assert first.review.calibration(new) is None and first.review.calibration(old).generation == 2


def test_a_deliverer_writes_only_its_own_label_studios_outboxes(backends, two_studios, task_ids):
    (task,) = task_ids(1)
    records = []
    for backend, studio in zip(backends, two_studios, strict=True):
        project = backend.projects.identify(f"{task}.{CREATED}")
        image = f"{studio.url}/img/{task}-{len(records)}.png"  # the two tasks hold different images
        studio.add_project(project.id, BRUSH, [{"id": task, "data": {"image": image}}], created=CREATED)
        key = f"identity-{task}-{len(records)}"
        backend.state.results.put(key, JobResult(ok=True, regions=[REGION], score=0.5))
        record = LateRecord(task, "car-identity", (key,), project, (image,), config=config_hash(BRUSH),
                            sources=(("image", image),))
        backend.state.ledger.register_late([record])
        assert stage_ready(backend.state.ledger, backend.state.results, key) == {project}
        records.append(record)
    deliverers = [Deliverer(b.state.ledger, b.state.results, b.state.stats,
                            LabelStudioClient(b.settings, b.settings.ls_timeout), b.settings, owner=f"w{i}")
                  for i, b in enumerate(backends)]
    assert deliverers[1].deliver_due() == 1  # every due outbox: only its own Label Studio's
    assert two_studios[1].prediction_counts() == {(task, "car-identity"): 1}
    assert two_studios[0].prediction_counts() == {}
    assert backends[0].state.ledger.outbox(records[0].project, 10) == [records[0]]
    assert deliverers[0].deliver_due() == 1
    assert two_studios[0].prediction_counts() == {(task, "car-identity"): 1}


@pytest.mark.integration
def test_two_label_studios_on_one_redis_each_get_their_own_prediction(redis_url, two_studios, make_client,
                                                                      spawn_worker, task_ids):
    """The same project and task ids in two Label Studios, different images, one Redis: a worker per Label
    Studio (each on its own queue) writes each task's late prediction into its own Label Studio."""
    (task,) = task_ids(1)
    clients = []
    for i, studio in enumerate(two_studios):
        settings = tiny_settings(redis_url=redis_url, label_studio_url=studio.url,
                                 label_studio_api_key=studio.api_key, predict_wait=0.0, queue=f"identity-{task}-{i}")
        image = f"{studio.url}/img/identity-{task}-{i}.png"
        studio.add_project(task, BRUSH, [{"id": task, "data": {"image": image}}], created=CREATED)
        spawn_worker(settings, wait=False)
        client = make_client(settings)
        answer = predict(client, [{"id": task, "data": {"image": image}}], project=f"{task}.{CREATED}")
        assert "result" not in answer["results"][0]  # answered pending: written later through the API
        clients.append((studio, image, answer["model_version"]))
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while time.monotonic() < deadline and not all(s.predictions_for(task) for s, _, _ in clients):
        time.sleep(0.2)
    for studio, image, version in clients:
        written = studio.predictions_for(task)
        assert [p["model_version"] for p in written] == [version]
        assert studio.hits[f"img/{image.rsplit('/img/', 1)[1]}"] == 1  # each computed from its own image


def test_the_first_project_seen_after_an_upgrade_adopts_what_an_older_version_kept_under_its_id(backends,
                                                                                                 task_ids):
    first, second = backends
    (pid,) = task_ids(1)
    review, redis = first.review, first.redis
    calibration = Calibration(generation=3, thresholds={"confidence_threshold": 0.4}, previous={}, tasks=9,
                              before=0.1, after=0.3)
    blob = b"weights of generation 2"
    digest = hashlib.sha256(blob).hexdigest()
    legacy_head = review.LEGACY.key(pid, "head:2")
    old_status = FitStatus(generation=2, head=f"{legacy_head}#{digest}", state=FitState.DONE)
    with redis.pipeline() as pipe:  # what the previous version left under the bare id
        pipe.set(review.LEGACY.key(pid, "calibration"), calibration.to_json())
        pipe.hset(review.LEGACY.key(pid, "corrections"), "5", "{}")
        pipe.set(review.LEGACY.key(pid, "fit"), old_status.to_json())
        pipe.set(legacy_head, blob)
        pipe.execute()
    project = first.projects.identify(f"{pid}.{CREATED}")
    assert review.calibration(project) == calibration
    assert redis.hget(review.CORRECTIONS.key(project.key), "5") == b"{}"
    status = review.fit_status(project)
    assert (status.generation, status.head, status.kept) == (2, digest, [digest])
    assert review.head_blob(digest) == blob and not redis.exists(legacy_head)
    assert not redis.exists(review.LEGACY.key(pid, "calibration"), review.LEGACY.key(pid, "fit"))
    assert project in review.projects()
    version = first.projects.for_predict(f"{pid}.{CREATED}", BRUSH)
    assert version.version.endswith("-cal3-fit2") and version.head == digest
    # Adopted once: the other Label Studio's project with the same id starts empty.
    other = second.projects.identify(f"{pid}.{CREATED}")
    assert second.review.calibration(other) is None and second.review.fit_status(other) is None
