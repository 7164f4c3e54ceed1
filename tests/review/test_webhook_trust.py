"""Annotation webhooks carry no credentials: nothing in them but ids is believed.

A review acts only on the annotation read back from Label Studio (the fake) by its id; forged events change
nothing (no correction, no calibration, the same model_version) and are counted in /metrics; sizes are
checked before anything is allocated.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from hashlib import sha256

import pytest
from rq.job import Job, JobStatus

from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.regions import RegionSizeError, label_masks
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.queue.jobqueue import SERIALIZER
from car_backend.review.corrections import review_annotation
from car_backend.review.store import ReviewStore
from car_backend.review.webhook import AnnotationEvent, WebhookOutcome
from tests.support.label_configs import label_config

pytestmark = pytest.mark.integration

BRUSH = label_config("brush")
BIG = 100_000


def polygon(label: str, points: list[list[float]], height: int = 64, width: int = 96) -> dict:
    return {"id": label, "type": "polygonlabels", "from_name": "label", "to_name": "image",
            "original_width": width, "original_height": height,
            "value": {"points": points, "polygonlabels": [label]}}


def huge_brush() -> dict:
    """A brush region claiming a 100000 x 100000 image, its RLE announcing as many values."""
    announced = (BIG * BIG * 4).to_bytes(8, "big")[-4:]  # the 32-bit count LS would write (wrapped)
    return {"id": "huge", "type": "brushlabels", "from_name": "label", "to_name": "image",
            "original_width": BIG, "original_height": BIG,
            "value": {"format": "rle", "rle": list(announced) + [0] * 64, "brushlabels": ["cat"]}}


def labels_of(config: str) -> list[str]:
    (target,) = parse_label_config(config).targets
    return [label.value for label in target.labels]


def event(annotation_id, task: dict, project_id, config: str = BRUSH, regions=None, **annotation) -> dict:
    return {"action": "ANNOTATION_CREATED", "annotation": {"id": annotation_id, "result": regions or [], **annotation},
            "task": task, "project": {"id": project_id, "label_config": config}}


def wait_for_jobs(redis, job_ids: list[str], timeout: float = 60.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [Job.fetch(j, connection=redis, serializer=SERIALIZER) for j in job_ids]
        if all(job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED) for job in jobs):
            return jobs
        assert time.monotonic() < deadline, [job.get_status() for job in jobs]
        time.sleep(0.2)


def test_forged_events_change_nothing_and_are_counted(service_settings, make_client, fake_ls, redis, spawn_worker,
                                                      task_ids):
    ids = task_ids(4)
    project = ids[0]  # a project of its own in the shared test database
    other_project = ids[1]
    settings = service_settings(calibrate_after=1, queue=f"forged-{project}")  # one believed event would calibrate
    spawn_worker(settings)
    client = make_client(settings)
    task = {"id": ids[2], "data": {"image": f"{fake_ls.url}/img/forged.png"}}
    other_task = {"id": ids[3], "data": {"image": f"{fake_ls.url}/img/other.png"}}
    fake_ls.add_project(project, BRUSH, [task, other_task])
    fake_ls.add_project(other_project, BRUSH, [])
    version = client.post("/setup", json={"project": f"{project}.1", "schema": BRUSH}).get_json()["model_version"]
    label = labels_of(BRUSH)[0]
    everything = [polygon(label, [[0, 0], [100, 0], [100, 100], [0, 100]])]
    base = project * 100
    fake_ls.add_annotation(base + 1, other_task["id"], project, everything)  # another task's annotation
    fake_ls.add_annotation(base + 2, task["id"], other_project, everything)  # another project's
    fake_ls.add_annotation(base + 3, task["id"], project, everything, was_cancelled=True)
    fake_ls.add_annotation(base + 4, task["id"], project, [huge_brush()])  # stored in LS, still too large
    fake_ls.add_annotation(base + 5, task["id"], project, everything)  # genuine, but the event's config is not
    changed = BRUSH.replace(f'value="{label}"', f'value="{label}-forged"')
    assert changed != BRUSH

    forged = [event(base + 50 + i, task, project, regions=everything) for i in range(14)]  # ids LS does not know
    forged += [event(10**15 + 7, task, project, regions=[huge_brush()]),  # unknown, with a 100000^2 payload
               event(base + 1, task, project, regions=everything),  # annotation of another task
               event(base + 1, other_task, other_project),  # ... claimed for another project
               event(base + 2, task, project, regions=everything),  # annotation of another project
               event(base + 3, task, project, regions=everything),  # cancelled in Label Studio
               event(base + 4, task, project),  # too large, as stored
               event(base + 5, task, project, config=changed, regions=everything),  # config is not the project's
               event(base + 5, task, project + 10**6, regions=everything),  # a project Label Studio does not know
               event(base + 51, task, project, regions=everything, was_cancelled=False)]
    malformed = [event("1", task, project), event(True, task, project), event(-1, task, project)]
    assert len(forged) + len(malformed) == 26

    jobs = []
    for body in forged:
        resp = client.post("/webhook", json=body)
        assert resp.status_code == 200, resp.get_json()
        assert resp.get_json()["status"] == "queued", resp.get_json()
        jobs.append(resp.get_json()["job"])
    for body in malformed:
        resp = client.post("/webhook", json=body)
        assert resp.status_code == 400 and "integer 'id'" in resp.get_json()["error"]

    finished = wait_for_jobs(redis, jobs)
    outcomes = [job.return_value() or {} for job in finished]
    assert all(job.get_status() == JobStatus.FINISHED for job in finished), [j.exc_info for j in finished]
    assert [o.get("ignored") for o in outcomes] == (
        ["unknown"] * 15 + ["mismatch"] * 3 + ["cancelled", "too_large", "config_changed", "mismatch", "unknown"])
    assert all(o["compared"] is False and o["corrected_tasks"] is None for o in outcomes)

    review = ReviewStore(redis)
    pid = ProjectId(instance_of(settings.label_studio_url), project, 1)  # /setup's "<id>.1"
    assert review.corrections(pid) == [] and review.calibration(pid) is None
    assert client.post("/setup", json={"project": f"{project}.1", "schema": BRUSH}).get_json()[
        "model_version"] == version
    assert fake_ls.annotation_reads[str(base + 50)] == 1  # every event was looked up
    metrics = client.get("/metrics").get_data(as_text=True)
    for outcome in ("unknown", "mismatch", "cancelled", "too_large", "config_changed"):
        assert f'car_webhook_annotations_total{{outcome="{outcome}"}}' in metrics


def test_the_stored_annotation_is_reviewed_not_the_payload(service_settings, redis, fake_ls, task_ids):
    """The genuine case: the correction keeps what Label Studio stores, whatever the webhook said."""
    from car_backend.worker import tasks
    from car_backend.worker.context import WorkerContext

    settings = service_settings(calibrate_after=0)
    ctx = WorkerContext(settings, redis, name="test")
    tasks.install(ctx)
    try:
        (task_id,) = task_ids(1)
        task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/genuine.png"}}
        fake_ls.add_project(task_id, BRUSH, [task])
        first, second = labels_of(BRUSH)[:2]
        fake_ls.add_annotation(task_id, task_id, task_id, [polygon(first, [[0, 0], [50, 0], [50, 100], [0, 100]])])
        config = parse_label_config(BRUSH)
        plan = plan_task(task, Project(config, model_version(settings, config)), settings)
        pid = ProjectId(instance_of(settings.label_studio_url), task_id)
        ev = AnnotationEvent(pid, task_id, task_id, sha256(BRUSH.encode()).hexdigest(), tuple(plan.specs),
                             tuple(plan.sources))
        outcome = review_annotation(ev, ctx.review_runtime)
        assert outcome.ignored is None and outcome.corrected_tasks == 1
        (stored,) = ReviewStore(redis).corrections(pid)
        assert set(stored.masks) == {first} and second not in stored.masks
        mask = stored.masks[first]
        assert mask[:, : mask.shape[1] // 2 - 1].all() and not mask[:, mask.shape[1] // 2 + 1:].any()
    finally:
        tasks.install(None)


def test_a_100000_squared_event_is_answered_fast_with_bounded_memory(service_settings, make_client, fake_ls,
                                                                      redis, task_ids):
    from car_backend.worker import tasks
    from car_backend.worker.context import WorkerContext

    (task_id,) = task_ids(1)
    settings = service_settings(calibrate_after=1)
    client = make_client(settings)
    task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/huge.png"}}
    fake_ls.add_project(task_id, BRUSH, [task])
    fake_ls.add_annotation(task_id, task_id, task_id, [huge_brush()])
    body = event(task_id, task, task_id, regions=[huge_brush()])
    client.post("/webhook", json=body)  # warm: first-request imports and config parsing

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        started = time.monotonic()
        resp = client.post("/webhook", json=body)
        answered = time.monotonic() - started
        tasks.install(WorkerContext(settings, redis, name="test"))
        try:  # the queued job's argument, run through the RQ entry point
            outcome = tasks.review(Job.fetch(resp.get_json()["job"], connection=redis,
                                             serializer=SERIALIZER).args[0])
        finally:
            tasks.install(None)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert resp.status_code == 200 and resp.get_json()["status"] == "queued"
    assert answered < 1.0
    assert outcome["ignored"] == WebhookOutcome.TOO_LARGE and "CAR_MAX_IMAGE_PIXELS" in outcome["detail"]
    assert traced_peak < 50 * 2**20  # 100000^2 masks would be 10 GB
    assert grown_kib < 200 * 1024
    assert ReviewStore(redis).corrections(ProjectId(instance_of(settings.label_studio_url), task_id)) == []


def test_region_sizes_and_rle_are_checked_before_decoding():
    with pytest.raises(RegionSizeError, match="100000x100000"):
        label_masks([huge_brush()], max_pixels=50_000_000)
    small = huge_brush() | {"original_width": 4, "original_height": 4}
    with pytest.raises(ValueError, match="RLE announces"):  # 4x4 image, RLE claiming another size
        label_masks([small], max_pixels=100)
    padded = huge_brush() | {"original_width": 2, "original_height": 2}
    padded["value"] = {**padded["value"], "rle": list((16).to_bytes(4, "big")) + [0] * 1000}
    with pytest.raises(ValueError, match="too long"):  # 1000 bytes cannot be the RLE of 2x2 pixels
        label_masks([padded], max_pixels=100)
    with pytest.raises(ValueError, match="positive whole numbers"):
        label_masks([polygon("cat", [[0, 0], [1, 1], [0, 1]], height=-5, width=10)], max_pixels=100)
    with pytest.raises(RegionSizeError):
        label_masks([polygon("cat", [[0, 0], [1, 1], [0, 1]])], size=(BIG, BIG), max_pixels=50_000_000)


def test_a_payload_naming_another_project_s_image_stores_no_foreign_image(service_settings, make_client, fake_ls,
                                                                          redis, task_ids):
    """The images a correction keeps come from the task Label Studio holds (read through the project's task
    list, which never makes Label Studio call /predict), never from the payload's task.data."""
    from car_backend.worker import tasks
    from car_backend.worker.context import WorkerContext

    task_id, project, other = task_ids(3)
    settings = service_settings(calibrate_after=0)
    client = make_client(settings)
    own = f"{fake_ls.url}/data/upload/{project}/own.png"
    foreign = f"{fake_ls.url}/data/upload/{other}/private.png"
    fake_ls.add_project(project, BRUSH, [{"id": task_id, "data": {"image": own}}])
    fake_ls.add_project(other, BRUSH, [{"id": other, "data": {"image": foreign}}])
    label = labels_of(BRUSH)[0]
    fake_ls.add_annotation(task_id, task_id, project, [polygon(label, [[0, 0], [50, 0], [50, 100], [0, 100]])])
    pid = ProjectId(instance_of(settings.label_studio_url), project, None)
    review = ReviewStore(redis)
    outcomes = []
    tasks.install(WorkerContext(settings, redis, name="test"))
    try:
        for image in (foreign, own):  # the forged pairing, then the genuine event
            resp = client.post("/webhook", json=event(task_id, {"id": task_id, "data": {"image": image}}, project))
            assert resp.get_json()["status"] == "queued", resp.get_json()
            job = Job.fetch(resp.get_json()["job"], connection=redis, serializer=SERIALIZER)
            outcomes.append(tasks.review(job.args[0]))
            if image == foreign:
                assert review.corrections(pid) == []
    finally:
        tasks.install(None)
    assert outcomes[0]["ignored"] == WebhookOutcome.MISMATCH and "does not hold" in outcomes[0]["detail"]
    assert outcomes[1]["ignored"] is None and outcomes[1]["corrected_tasks"] == 1
    (stored,) = review.corrections(pid)
    assert [spec.image for spec in stored.specs] == [own]
    assert fake_ls.seen_paths(f"/data/upload/{other}/") == []  # the foreign image was never fetched
    assert fake_ls.task_list_reads[task_id] == 2 and fake_ls.seen_paths(f"/api/tasks/{task_id}/") == []
