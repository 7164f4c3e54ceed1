"""The fit job and the head's life in Redis, run in this process (tasks.install) on the test Redis: too few
tasks, a training cut by its time budget and resumed, CAR_FIT_AFTER, START_TRAINING at /webhook, and a
worker that ignores a corrupt or foreign head with a log line."""

from __future__ import annotations

import hashlib
import io
import logging
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from rq.job import JobStatus

from car_backend.engine import Segmentation
from car_backend.engine.head import HeadConfig, MaskHead, head_to_bytes, new_head
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.queue.jobqueue import JobName
from car_backend.review.calibration import MAX_CALIBRATION_TASKS, recent
from car_backend.review.corrections import review_annotation
from car_backend.review.fit import fit_project, held_out, training_items
from car_backend.review.store import Calibration, Correction, FitState, FitStatus, ReviewStore
from car_backend.review.triggers import queue_calibration, queue_fit
from car_backend.review.webhook import AnnotationEvent
from car_backend.service.status import project_status
from car_backend.testing.fake_label_studio import Reply
from car_backend.testing.scenes import SceneClass, labelled_scene
from car_backend.worker.process import CarWorker, make_worker
from tests.support.settings import settings_env, tiny_settings

CLASSES = (SceneClass("red", (220, 40, 40), "flat", "ellipse"), SceneClass("blue", (40, 60, 220), "stripes", "rectangle"))
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                + "".join(f'<Label value="{c.name}"/>' for c in CLASSES) + "</BrushLabels></View>")
SIZE = (64, 64)
FAST = {"fit_epochs": 3, "head_width": 32, "head_depth": 1, "calibrate_after": 0, "fit_after": 0}


@pytest.fixture
def context(service_settings, redis):
    """install(**overrides) -> the WorkerContext that jobs run with in this process."""
    from car_backend.worker import tasks
    from car_backend.worker.context import WorkerContext

    previous = torch.get_num_threads()
    torch.set_num_threads(1)

    def install(**overrides):
        ctx = WorkerContext(service_settings(**{**FAST, **overrides}), redis, name="test")
        tasks.install(ctx)
        return ctx

    yield install
    tasks.install(None)
    torch.set_num_threads(previous)


def _corrections(ctx, fake_ls, ids: list[int], size: tuple[int, int] = SIZE) -> list[Correction]:
    """Corrected tasks of generated scenes served by the fake Label Studio, annotated in the order of `ids`."""
    config = parse_label_config(LABEL_CONFIG)
    project = Project(config, model_version(ctx.settings, config))
    out = []
    for task_id in ids:
        scene = labelled_scene(task_id, CLASSES, size)
        png = io.BytesIO()
        Image.fromarray(scene.image).save(png, format="PNG")
        fake_ls.routes[f"/scene/{task_id}.png"] = Reply(body=png.getvalue(), headers={"Content-Type": "image/png"})
        task = {"id": task_id, "data": {"image": f"{fake_ls.url}/scene/{task_id}.png"}}
        out.append(Correction(task_id, tuple(plan_task(task, project, ctx.settings).specs), scene.masks,
                              annotated=1_700_000_000.0 + len(out)))
    return out


def _project(ctx, project_id: int) -> ProjectId:
    """The ProjectId of Label Studio project `project_id` (no creation stamp), as this worker sees it."""
    return ProjectId(instance_of(ctx.settings.label_studio_url), project_id)


def _ids(task_ids, train: int, held: int) -> list[int]:
    """Fresh task ids with `train` outside and `held` inside the held-out split."""
    picked, kept = [], {True: held, False: train}
    while kept[True] or kept[False]:
        (task,) = task_ids(1)
        if kept[held_out(task)]:
            kept[held_out(task)] -= 1
            picked.append(task)
    return picked


def test_too_few_corrections_train_nothing(context, fake_ls, task_ids):
    ctx = context()
    ids = _ids(task_ids, 2, 1)
    project = _project(ctx, ids[0])
    for correction in _corrections(ctx, fake_ls, ids):
        ctx.review.put_correction(project, correction)
    outcome = fit_project(project, ctx.review_runtime)
    assert outcome.state is FitState.DONE and not outcome.adopted and "needs 4 training" in outcome.reason
    assert ctx.review.checkpoint(project) is None


def test_a_training_cut_by_its_time_budget_resumes_from_its_checkpoint(context, fake_ls, task_ids):
    ctx = context(fit_seconds=1e-6)  # stops after its first epoch
    ids = _ids(task_ids, 5, 2)
    project = _project(ctx, ids[0])
    for correction in _corrections(ctx, fake_ls, ids):
        ctx.review.put_correction(project, correction)
    cut = fit_project(project, ctx.review_runtime)
    assert cut.epochs == 1 and cut.train_tasks == 5 and cut.held_out_tasks == 2
    cut_losses = list(cut.losses)
    review = ctx.review
    assert review.checkpoint(project) is not None
    resumed = fit_project(project, context(fit_seconds=600.0).review_runtime)
    assert resumed.epochs == 3 and resumed.losses[0] == cut_losses[0]
    assert review.checkpoint(project) is None
    assert review.fit_status(project).epochs == 3
    review.put_checkpoint(project, b"corrupt")  # a bad checkpoint is ignored: the training starts afresh
    assert fit_project(project, context(fit_epochs=1).review_runtime).epochs == 1


def test_fit_after_queues_a_training_once_enough_tasks_are_corrected(context, fake_ls, task_ids):
    ctx = context(fit_after=2, queue=f"fit-after-{task_ids(1)[0]}")
    ids = task_ids(3)
    project = _project(ctx, ids[0])
    queued = []
    (target,) = parse_label_config(LABEL_CONFIG).targets
    corrections = _corrections(ctx, fake_ls, ids)
    # What the review job reads back (it never believes the webhook's payload): the project, tasks, annotations.
    fake_ls.add_project(project.id, LABEL_CONFIG,
                        [{"id": c.task, "data": {"image": c.specs[0].image}} for c in corrections])
    for correction in corrections:
        names = [c.name for c in CLASSES]
        label_map = np.zeros(SIZE, dtype=np.int32)
        for i, name in enumerate(names):
            label_map[correction.masks.get(name, np.zeros(SIZE, bool))] = i + 1
        seg = Segmentation(names, label_map, np.stack([label_map == i + 1 for i in range(len(names))]),
                           np.ones(len(names), np.float32), steps=2)
        regions = segmentation_to_regions(seg, target, list(target.labels), kind="brush")
        fake_ls.add_annotation(correction.task, correction.task, project.id, regions)
        event = AnnotationEvent(project, correction.task, correction.task,
                                hashlib.sha256(LABEL_CONFIG.encode()).hexdigest(), correction.specs,
                                tuple((target.data_key, spec.image) for spec in correction.specs))
        queued.append(review_annotation(event, ctx.review_runtime).fit_queued)
    assert queued == [False, True, False]  # the third finds the lock of the queued one
    jobs = ctx.queue.batch.get_jobs()
    fit_jobs = [job for job in jobs if job.func_name == JobName.FIT.value]
    assert len(fit_jobs) == 1 and list(fit_jobs[0].args) == [project.key]
    assert ctx.review.fit_status(project).state is FitState.QUEUED


def test_start_training_at_the_webhook(service_settings, make_client, redis, fake_ls, task_ids):
    (project,) = task_ids(1)
    fake_ls.add_project(project, LABEL_CONFIG, [])
    client = make_client(service_settings(queue=f"start-{project}"))
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
    assert first.status_code == 200 and first.get_json()["status"] == "queued" and first.get_json()["fit_job"]
    assert "job" not in first.get_json()  # Label Studio would make a TrainJob of it
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
    assert second.get_json()["status"] == "already training"
    for body in ({"action": "START_TRAINING"}, {"action": "START_TRAINING", "project": {"title": "x"}}):
        resp = client.post("/webhook", json=body)
        assert resp.status_code == 400 and "project" in resp.get_json()["error"]


def test_the_worker_ignores_a_corrupt_missing_or_foreign_head_with_a_log_line(context, caplog):
    ctx = context()
    review = ctx.review
    clip = ctx.segmenter().proposal_clip
    config = HeadConfig.for_clip(clip, width=32, depth=1, heads=2)
    good_blob = head_to_bytes(new_head(config, 0, clip.name))
    good = review.put_head(FitStatus(), good_blob)
    assert good == hashlib.sha256(good_blob).hexdigest()  # content-addressed: the reference is the digest
    foreign_status = FitStatus()
    foreign = review.put_head(foreign_status, head_to_bytes(new_head(config, 0, "another-clip")))
    corrupt = review.put_head(FitStatus(), b"\x00 not a head")
    swapped = "0" * len(good)  # a reference whose stored blob is not the weights it names
    review.redis.set(ReviewStore.HEAD.key(swapped), good_blob)
    missing = hashlib.sha256(b"never stored").hexdigest()
    with caplog.at_level(logging.WARNING, logger="car_backend.worker.context"):
        assert isinstance(ctx.head(good), MaskHead)
        for ref in (foreign, corrupt, swapped, missing):
            assert ctx.head(ref) is None
    assert len([r for r in caplog.records if "mask head" in r.getMessage()]) == 4
    review.redis.delete(ReviewStore.HEAD.key(good))
    assert isinstance(ctx.head(good), MaskHead)  # loaded once per worker: not read again
    later = [review.put_head(foreign_status, blob) for blob in (b"x2", b"x3")]  # the two latest generations are kept
    generations = [foreign, *later]
    assert [review.redis.exists(ReviewStore.HEAD.key(ref)) for ref in generations] == [0, 1, 1]
    assert foreign_status.kept == later


def test_an_adopted_head_gets_its_own_version_and_keys(service_settings):
    settings = service_settings()
    config = parse_label_config(LABEL_CONFIG)
    plain = model_version(settings, config)
    fitted = model_version(settings, config, fit_generation=1, head="ab" * 32)  # heads are named by sha256
    other = model_version(settings, config, fit_generation=1, head="cd" * 32)
    assert fitted.endswith("-fit1") and len({plain, fitted, other}) == 3
    project = Project(config, fitted, head="ab" * 32)
    spec = plan_task({"id": 1, "data": {"image": "http://127.0.0.1/a.png"}}, project, settings).specs[0]
    assert spec.head == project.head
    without = plan_task({"id": 1, "data": {"image": "http://127.0.0.1/a.png"}}, Project(config, plain), settings).specs[0]
    assert "head" not in without.to_dict() or without.to_dict()["head"] == ""
    assert spec.key != without.key
    np.testing.assert_equal(type(spec).from_dict(spec.to_dict()).key, spec.key)


def test_fit_command_queues_a_training(service_settings, redis, task_ids):
    (project,) = task_ids(1)
    settings = service_settings(queue=f"cli-{project}")
    env = settings_env(settings)
    run = [sys.executable, "-m", "car_backend.cli", "fit", "--project", str(project)]
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "queued as job" in out.stdout, out.stderr
    # the command names the project by Label Studio's id: this deployment's Label Studio, no creation stamp seen
    pid = ProjectId(instance_of(settings.label_studio_url), project)
    assert ReviewStore(redis).fit_status(pid).state is FitState.QUEUED
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "already queued or running" in again.stdout
    env.pop("REDIS_URL")
    missing = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "REDIS_URL" in missing.stderr


def test_a_fit_on_1024_px_corrections_holds_their_features_within_the_memory_setting(context, fake_ls, task_ids):
    ctx = context()
    ids = _ids(task_ids, 4, 1)
    project = _project(ctx, ids[0])
    corrections = _corrections(ctx, fake_ls, list(reversed(ids)), size=(1024, 1024))  # lowest ids annotated last
    for correction in corrections:
        ctx.review.put_correction(project, correction)
    status = fit_project(project, ctx.review_runtime)
    assert status.state is FitState.DONE and status.epochs == 3, status
    assert status.train_tasks == 4 and status.held_out_tasks == 1 and status.left_out == 0
    # ViT patch 16 at 1024 px: 64 x 64 patches of 2 x 64 float32 features (the tiny CLIP), 2 MiB a task; a
    # prepared image would hold ~210 MB (the affinity and block L's attention)
    assert status.features_mb == pytest.approx(4 * 2.0)

    capped = context(fit_memory_mb=5)  # room for two tasks' features: the two most recently annotated
    train = [c for c in capped.review.corrections(project) if not held_out(c.task)]
    items, held, left_out = training_items(capped.review_runtime, project, train, 5 * 2 ** 20)
    assert [item.task for item in items] == sorted(c.task for c in train)[:2] and left_out == 2
    assert held == 2 * 2 ** 21
    status = fit_project(project, capped.review_runtime)
    assert status.state is FitState.DONE and not status.adopted
    assert status.train_tasks == 2 and status.left_out == 2 and "CAR_FIT_MEMORY_MB=5 holds" in status.reason


def test_corrections_come_oldest_annotation_first_and_calibration_takes_the_latest(redis):
    review = ReviewStore(redis)
    project = ProjectId("local", 9_000_001)
    spec = plan_task({"id": 1, "data": {"image": "http://127.0.0.1/a.png"}},
                     Project(parse_label_config(LABEL_CONFIG), "v"), tiny_settings()).specs[0]
    mask = {"red": np.ones((4, 4), bool)}
    for task in range(1, 41):  # the highest ids annotated first
        review.put_correction(project, Correction(task, (spec,), mask, annotated=1000.0 - task))
    stored = review.corrections(project)
    assert [c.task for c in stored] == list(range(40, 0, -1)) and review.corrected_tasks(project) == 40
    assert [c.task for c in recent(stored)] == list(range(1, MAX_CALIBRATION_TASKS + 1))


def test_calibration_waits_for_as_many_more_corrections_after_its_capped_record(context, fake_ls, task_ids):
    """A calibration uses MAX_CALIBRATION_TASKS tasks at most, but the next waits for CAR_CALIBRATE_AFTER more
    than the project had then (comparing with the capped count re-queued it on every correction past 50)."""
    ctx = context(calibrate_after=2, queue=f"calibrate-after-{task_ids(1)[0]}")
    ids = task_ids(3)
    project = _project(ctx, ids[0])
    spec = _corrections(ctx, fake_ls, ids[:1])[0].specs[0]
    for task in range(10_000, 10_060):  # 60 corrected tasks when the last calibration ran on 30 of them
        ctx.review.put_correction(project, Correction(task, (spec,), {"red": np.ones(SIZE, bool)}))
    ctx.review.put_calibration(project, Calibration(generation=1, thresholds={}, previous={}, tasks=30, before=0.1,
                                                    after=0.2, corrected_tasks=60))
    corrections = _corrections(ctx, fake_ls, ids)
    fake_ls.add_project(project.id, LABEL_CONFIG,
                        [{"id": c.task, "data": {"image": c.specs[0].image}} for c in corrections])
    (target,) = parse_label_config(LABEL_CONFIG).targets
    queued = []
    for correction in corrections:
        label_map = np.zeros(SIZE, dtype=np.int32)
        label_map[:, : label_map.shape[1] // 2] = 1  # every annotation has red (whatever the scene of its id)
        seg = Segmentation(["red", "blue"], label_map, np.stack([label_map == 1, label_map == 2]),
                           np.ones(2, np.float32), steps=2)
        fake_ls.add_annotation(correction.task, correction.task, project.id,
                               segmentation_to_regions(seg, target, list(target.labels), kind="brush"))
        event = AnnotationEvent(project, correction.task, correction.task,
                                hashlib.sha256(LABEL_CONFIG.encode()).hexdigest(), correction.specs,
                                tuple((target.data_key, spec.image) for spec in correction.specs))
        queued.append(review_annotation(event, ctx.review_runtime).calibration_queued)
    assert queued == [False, True, False]  # at 61 no, at 62 yes; at 63 the queued one holds the lock


def test_a_fit_or_calibration_out_of_memory_is_recorded_and_the_worker_serves_the_next_job(context, fake_ls, task_ids):
    """A test-controlled model raises MemoryError on images of more than 1000 patches (a 512 px image), as an
    allocation at that size would; the corrected tasks are 512 px, the prediction afterwards 64 px."""
    ctx = context(job_retries=2, queue=f"oom-{task_ids(1)[0]}")
    ids = _ids(task_ids, 4, 1)
    project = _project(ctx, ids[0])
    for correction in _corrections(ctx, fake_ls, ids, size=(512, 512)):
        ctx.review.put_correction(project, correction)

    def allocate(_module, args):
        if args[0].shape[-2] > 1000:
            raise MemoryError("injected: no room for this image")

    ctx.segmenter().proposal_clip.visual.transformer.resblocks[0].ln_1.register_forward_pre_hook(allocate)
    fit_job = queue_fit(ctx.queue, ctx.review, project, "test", ctx.settings)
    calibration_job = queue_calibration(ctx.queue, ctx.review, project, "test", ctx.settings)
    (later,) = _corrections(ctx, fake_ls, task_ids(1))
    segment_job = ctx.queue.submit_call(JobName.SEGMENT, (later.specs[0].to_dict(),), description="later")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = make_worker(CarWorker, ctx.settings, ctx.review.redis, f"oom-{uuid.uuid4().hex[:8]}")
    try:
        worker.work(burst=True, max_jobs=10)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    # each job ran once and finished: a memory failure is an answer, not an error RQ retries
    assert ctx.queue.statuses([fit_job, calibration_job, segment_job]) == [JobStatus.FINISHED] * 3
    assert ctx.state.results.get_many([later.specs[0].key])[0].ok  # the worker went on with the next job
    shown = project_status(ctx.state, ctx.queue, ctx.review, project).to_dict()  # what /status answers
    assert shown["fit"]["state"] == FitState.FAILED.value
    assert shown["fit"]["reason"].startswith("out of memory (MemoryError: injected")
    assert "CAR_FIT_MEMORY_MB" in shown["fit"]["reason"]
    assert shown["calibration"]["reason"].startswith("out of memory (MemoryError: injected")
    assert shown["calibration"]["generation"] == 0 and shown["calibration"]["corrected_tasks"] == 5
    assert not ctx.review.try_lock_fit(project, "x") or ctx.review.unlock_fit(project) is None  # locks released
    assert ctx.review.try_lock_calibration(project, "x", 60)
