"""The fit job and the head's life in Redis, run in this process (tasks.install) on the test Redis: too few
tasks, a training cut by its time budget and resumed, CAR_FIT_AFTER, START_TRAINING at /webhook, and a
worker that ignores a corrupt or foreign head with a log line."""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from car_backend.engine import Segmentation
from car_backend.engine.head import HeadConfig, MaskHead, head_to_bytes, new_head
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.queue.jobqueue import JobName
from car_backend.review.corrections import review_annotation
from car_backend.review.fit import fit_project, held_out
from car_backend.review.store import Correction, FitState, FitStatus, ReviewStore
from car_backend.review.webhook import AnnotationEvent
from car_backend.testing.fake_label_studio import Reply
from car_backend.testing.scenes import SceneClass, labelled_scene
from tests.support.settings import settings_env

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


def _corrections(ctx, fake_ls, ids: list[int]) -> list[Correction]:
    """Corrected tasks of generated scenes served by the fake Label Studio."""
    config = parse_label_config(LABEL_CONFIG)
    project = Project(config, model_version(ctx.settings, config))
    out = []
    for task_id in ids:
        scene = labelled_scene(task_id, CLASSES, SIZE)
        png = io.BytesIO()
        Image.fromarray(scene.image).save(png, format="PNG")
        fake_ls.routes[f"/scene/{task_id}.png"] = Reply(body=png.getvalue(), headers={"Content-Type": "image/png"})
        task = {"id": task_id, "data": {"image": f"{fake_ls.url}/scene/{task_id}.png"}}
        out.append(Correction(task_id, tuple(plan_task(task, project, ctx.settings).specs), scene.masks))
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


def test_start_training_at_the_webhook(service_settings, make_client, redis, task_ids):
    (project,) = task_ids(1)
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
