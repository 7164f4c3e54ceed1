"""The active-learning loop for real: /predict, annotation webhooks, review jobs and a calibration on a real
worker process, with the tiny random CLIP.

The "annotators" here correct every prediction to what CaR gives with a lower keep threshold (they want more
labels kept). Calibration must find that out from a few corrected tasks: afterwards the project has a new
model_version whose predictions agree better with held-out corrected tasks than the first ones did.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from hashlib import sha256

import numpy as np
import pytest
from PIL import Image

from car_backend.labelstudio.config import parse_label_config
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.review.store import ReviewStore
from tests.support.label_configs import label_config
from tests.support.review import annotated_regions, mean_agreement, review_image
from tests.support.settings import settings_env

pytestmark = pytest.mark.integration

BRUSH = label_config("brush")
TRAINING, HELD_OUT = 4, 4
CALIBRATION_TIMEOUT_S = 180.0


def test_corrections_are_compared_and_calibrate_a_new_model_version(service_settings, make_client, fake_ls, redis,
                                                                      spawn_worker, task_ids):
    ids = task_ids(TRAINING + HELD_OUT)
    project = str(ids[0])  # a project of its own in the shared test database
    settings = service_settings(calibrate_after=TRAINING, predict_wait=60.0, queue=f"review-{project}")
    pid = ProjectId(instance_of(settings.label_studio_url), int(project), 1)  # /setup's "<id>.1"
    spawn_worker(settings)
    client = make_client(settings)
    tasks = [{"id": t, "data": {"image": f"{fake_ls.url}/img/review-{i}.png"}} for i, t in enumerate(ids)]
    wanted = annotated_regions(BRUSH, [review_image(i) for i in range(len(ids))])

    first_version = client.post("/setup", json={"project": f"{project}.1", "schema": BRUSH}).get_json()[
        "model_version"]
    first = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH, "project": f"{project}.1"}
                        ).get_json()["results"]
    assert all("result" in entry and entry["model_version"] == first_version for entry in first)

    fake_ls.add_project(int(project), BRUSH, tasks)
    for task, regions in zip(tasks[:TRAINING], wanted[:TRAINING], strict=True):
        fake_ls.add_annotation(task["id"], task["id"], int(project), regions)  # what the webhook reads back
        resp = client.post("/webhook", json={
            "action": "ANNOTATION_CREATED", "annotation": {"id": task["id"], "result": regions},
            "task": task, "project": {"id": int(project), "label_config": BRUSH}})
        assert resp.status_code == 200 and resp.get_json()["status"] == "queued"

    review = ReviewStore(redis)
    deadline = time.monotonic() + CALIBRATION_TIMEOUT_S
    while review.calibration(pid) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    calibration = review.calibration(pid)
    assert calibration is not None, "no calibration within the timeout"

    # the comparison of the corrected tasks with what we had delivered
    stats = review.agreement(pid)
    assert list(stats) == [first_version] and stats[first_version].tasks == TRAINING
    expected = mean_agreement([e["result"] for e in first[:TRAINING]], wanted[:TRAINING])
    assert stats[first_version].mean_score == pytest.approx(expected, abs=0.02)  # masks compared at <=256 px

    # the calibration found better thresholds, and they make a new model version
    assert calibration.generation == 1 and calibration.after > calibration.before
    assert calibration.thresholds["confidence_threshold"] < calibration.previous["confidence_threshold"]
    fresh = make_client(settings)  # no cached calibration in this server process
    new_version = fresh.post("/setup", json={"project": f"{project}.1", "schema": BRUSH}).get_json()["model_version"]
    assert new_version != first_version and new_version.endswith("-cal1")

    # held-out corrected tasks agree better with the new version's predictions than with the first ones
    second = fresh.post("/predict", json={"tasks": tasks[TRAINING:], "label_config": BRUSH,
                                          "project": f"{project}.1"}).get_json()["results"]
    assert all(entry["model_version"] == new_version for entry in second)
    before = mean_agreement([e["result"] for e in first[TRAINING:]], wanted[TRAINING:])
    after = mean_agreement([e["result"] for e in second], wanted[TRAINING:])
    assert after > before

    # the report and /metrics show the same figures
    env = settings_env(settings)
    out = subprocess.run([sys.executable, "-m", "car_backend.cli", "report", "--project", project, "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["calibration"]["thresholds"] == calibration.thresholds
    assert report["versions"][0]["tasks"] == TRAINING
    text = subprocess.run([sys.executable, "-m", "car_backend.cli", "report", "--project", project],
                          capture_output=True, text=True, env=env, timeout=60).stdout
    assert "calibration generation 1" in text and "confidence_threshold" in text
    metrics = fresh.get("/metrics").get_data(as_text=True)
    assert f'car_calibration_generation{{project="{project}"}} 1.0' in metrics
    assert f'car_review_tasks{{model_version="{first_version}",project="{project}"}} 4.0' in metrics


@pytest.fixture
def in_process_worker(service_settings, redis):
    """run review jobs in this process (tasks.install), as the embedded worker thread does."""
    from car_backend.worker import tasks
    from car_backend.worker.context import WorkerContext

    def install(**overrides):
        settings = service_settings(**overrides)
        context = WorkerContext(settings, redis, name="test")
        tasks.install(context)
        return context

    yield install
    tasks.install(None)


def test_a_correction_without_our_prediction_is_kept_but_not_compared(in_process_worker, fake_ls, task_ids):
    from car_backend.pipeline.planning import plan_task
    from car_backend.pipeline.spec import Project
    from car_backend.pipeline.versions import model_version
    from car_backend.review.corrections import review_annotation
    from car_backend.review.webhook import AnnotationEvent

    ctx = in_process_worker(calibrate_after=0)
    (task_id,) = task_ids(1)
    project = ProjectId(instance_of(ctx.settings.label_studio_url), task_id)
    config = parse_label_config(BRUSH)
    task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/review-0.png"}}
    spec = plan_task(task, Project(config, model_version(ctx.settings, config)), ctx.settings).specs[0]
    (regions,) = annotated_regions(BRUSH, [review_image(0)])
    fake_ls.add_project(task_id, BRUSH, [task])
    fake_ls.add_annotation(task_id, task_id, task_id, regions)
    outcome = review_annotation(AnnotationEvent(project, task_id, task_id, sha256(BRUSH.encode()).hexdigest(),
                                                (spec,), (("image", spec.image),)), ctx.review_runtime)
    assert outcome.ignored is None
    assert outcome.compared is False and outcome.corrected_tasks == 1
    assert outcome.calibration_queued is False  # CAR_CALIBRATE_AFTER=0: never
    assert ctx.review.agreement(project) == {}
    (stored,) = ctx.review.corrections(project)
    assert set(stored.masks) == {r["value"]["brushlabels"][0] for r in regions}


def test_a_calibration_that_finds_nothing_better_keeps_the_version(in_process_worker, fake_ls, task_ids):
    """Annotations equal to what the preset's thresholds give: the search cannot improve, no new version."""
    from car_backend.engine import Segmenter
    from car_backend.labelstudio.regions import label_masks, shrink
    from car_backend.labelstudio.results import segmentation_to_regions
    from car_backend.pipeline.planning import plan_task
    from car_backend.pipeline.spec import Project
    from car_backend.pipeline.versions import model_version
    from car_backend.review.calibration import calibrate_project
    from car_backend.review.store import Correction
    from car_backend.service.projects import Projects

    ctx = in_process_worker()
    ids = task_ids(3)
    project = ProjectId(instance_of(ctx.settings.label_studio_url), ids[0], 1)  # /setup's "<id>.1" below
    config = parse_label_config(BRUSH)
    (target,) = config.targets
    version = model_version(ctx.settings, config)
    segmenter = Segmenter(ctx.settings.engine_config())
    for i, task_id in enumerate(ids):
        task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/review-{i}.png"}}
        spec = plan_task(task, Project(config, version), ctx.settings).specs[0]
        image = np.array(Image.open(io.BytesIO(review_image(i))).convert("RGB"))
        seg = segmenter.segment(image, [label.prompt for label in target.labels])
        regions = segmentation_to_regions(seg, target, list(target.labels), kind="brush")
        ctx.review.put_correction(project, Correction(task_id, (spec,), shrink(label_masks(regions, (64, 96)))))
    for _ in range(100):  # a slow machine may need more than one slice (CALIBRATION_SLICE_S); each queues the next
        if not (result := calibrate_project(project, ctx.review_runtime)).continued:
            break
    calibration = ctx.review.calibration(project)
    assert result.calibrated is False and calibration.generation == 0
    assert calibration.thresholds == calibration.previous and calibration.after == calibration.before
    assert calibration.tasks == 3
    projects = Projects(ctx.settings, ctx.state.projects, ctx.review)
    assert projects.setup(f"{project.id}.1", BRUSH, None).version == version


def test_a_calibration_in_one_candidate_slices_ends_where_one_job_does(in_process_worker, fake_ls, task_ids,
                                                                       monkeypatch):
    """CALIBRATION_SLICE_S = 0: every job scores one candidate, stores its progress and queues the next one
    (on the batch queue, behind interactive work); the last finds the same thresholds as a single job."""
    import uuid

    from car_backend.labelstudio.regions import label_masks, shrink
    from car_backend.pipeline.planning import plan_task
    from car_backend.pipeline.spec import Project
    from car_backend.pipeline.versions import model_version
    from car_backend.queue.jobqueue import JobName
    from car_backend.review import calibration
    from car_backend.review.calibration import calibrate_project
    from car_backend.review.store import Correction
    from car_backend.review.triggers import CALIBRATION_LOCK_S

    ctx = in_process_worker(queue=f"slices-{uuid.uuid4().hex[:8]}")
    review = ctx.review
    ids = task_ids(1)
    config = parse_label_config(BRUSH)
    version = model_version(ctx.settings, config)
    annotated = annotated_regions(BRUSH, [review_image(i) for i in range(1)])
    instance = instance_of(ctx.settings.label_studio_url)
    whole, sliced = (ProjectId(instance, project) for project in task_ids(2))
    for project in (whole, sliced):
        for i, (task_id, regions) in enumerate(zip(ids, annotated, strict=True)):
            task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/review-{i}.png"}}
            spec = plan_task(task, Project(config, version), ctx.settings).specs[0]
            review.put_correction(project, Correction(task_id, (spec,), shrink(label_masks(regions, (64, 96)))))
    monkeypatch.setattr(calibration, "CALIBRATION_SLICE_S", 1e9)
    assert calibrate_project(whole, ctx.review_runtime).calibrated is True
    expected = review.calibration(whole)

    monkeypatch.setattr(calibration, "CALIBRATION_SLICE_S", 0.0)
    assert review.try_lock_calibration(sliced, "test", CALIBRATION_LOCK_S)
    slices = 0
    while (outcome := calibrate_project(sliced, ctx.review_runtime)).continued:
        slices += 1
        assert slices <= expected.evaluations, "the slices make no progress"
        assert review.redis.exists(ReviewStore.CALIBRATING.key(sliced.key))  # held between slices
        assert ctx.queue.batch.count == slices  # each slice queued the next one
        assert ctx.queue.batch.get_jobs()[-1].func_name == JobName.CALIBRATE.value
        assert list(ctx.queue.batch.get_jobs()[-1].args) == [sliced.key]
    got = review.calibration(sliced)
    assert outcome.calibrated is True and slices == expected.evaluations - 1
    assert (got.thresholds, got.before, got.after, got.evaluations, got.labels_after) == (
        expected.thresholds, expected.before, expected.after, expected.evaluations, expected.labels_after)
    assert not review.redis.exists(ReviewStore.CALIBRATING.key(sliced.key))
    assert review.calibration_progress(sliced) is None


def test_a_calibration_over_its_memory_budget_prepares_images_again_and_chooses_the_same(in_process_worker, fake_ls,
                                                                                        task_ids, monkeypatch,
                                                                                        caplog):
    """CAR_FIT_MEMORY_MB=1 holds one of the three prepared images (with its caches' room): the others are
    prepared again for each candidate, one at a time, and the search ends where an unbounded one does."""
    import logging

    from car_backend.labelstudio.regions import label_masks, shrink
    from car_backend.pipeline.planning import plan_task
    from car_backend.pipeline.spec import Project
    from car_backend.pipeline.versions import model_version
    from car_backend.review import calibration
    from car_backend.review.calibration import calibrate_project
    from car_backend.review.store import Correction

    monkeypatch.setattr(calibration, "CALIBRATION_SLICE_S", 1e9)
    config = parse_label_config(BRUSH)
    ids = task_ids(3)
    annotated = annotated_regions(BRUSH, [review_image(i) for i in range(3)])
    found = []
    for budget in (2048, 1):
        ctx = in_process_worker(fit_memory_mb=budget)
        project = ProjectId(instance_of(ctx.settings.label_studio_url), task_ids(1)[0])
        version = model_version(ctx.settings, config)
        for i, (task_id, regions) in enumerate(zip(ids, annotated, strict=True)):
            task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/review-{i}.png"}}
            spec = plan_task(task, Project(config, version), ctx.settings).specs[0]
            ctx.review.put_correction(project, Correction(task_id, (spec,), shrink(label_masks(regions, (64, 96)))))
        with caplog.at_level(logging.INFO, logger="car_backend.review.calibration"):
            caplog.clear()
            calibrate_project(project, ctx.review_runtime)
        again = [r.getMessage() for r in caplog.records if "prepared again" in r.getMessage()]
        assert (again != []) == (budget == 1), again
        got = ctx.review.calibration(project)
        found.append((got.thresholds, got.before, got.after, got.evaluations, got.labels_after, got.tasks))
    assert found[0] == found[1]
