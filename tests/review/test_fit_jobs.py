"""The fit job and the head's life in Redis, run in this process (jobs.install) on the test Redis: too few
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
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.review.fit import fit_project, held_out
from car_backend.review.heads import FIT_JOB, HeadStore, fit_status
from car_backend.review.jobs import AnnotationEvent, review_annotation
from car_backend.review.store import Correction, ReviewStore
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
    from car_backend.queue import jobs
    from car_backend.queue.worker import worker_context

    previous = torch.get_num_threads()
    torch.set_num_threads(1)

    def install(**overrides):
        ctx = worker_context(service_settings(**{**FAST, **overrides}), redis, name="test")
        jobs.install(ctx)
        return ctx

    yield install
    jobs.install(None)
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
    project = str(ids[0])
    for correction in _corrections(ctx, fake_ls, ids):
        ReviewStore(ctx.store.redis).put_correction(project, correction)
    outcome = fit_project(project)
    assert outcome["state"] == "done" and not outcome["adopted"] and "needs 4 training" in outcome["reason"]
    assert HeadStore(ctx.store.redis).checkpoint(project) is None


def test_a_training_cut_by_its_time_budget_resumes_from_its_checkpoint(context, fake_ls, task_ids):
    ctx = context(fit_seconds=1e-6)  # stops after its first epoch
    ids = _ids(task_ids, 5, 2)
    project = str(ids[0])
    for correction in _corrections(ctx, fake_ls, ids):
        ReviewStore(ctx.store.redis).put_correction(project, correction)
    cut = fit_project(project)
    assert cut["epochs"] == 1 and cut["train_tasks"] == 5 and cut["held_out_tasks"] == 2
    heads = HeadStore(ctx.store.redis)
    assert heads.checkpoint(project) is not None
    context(fit_seconds=600.0)
    resumed = fit_project(project)
    assert resumed["epochs"] == 3 and resumed["losses"][0] == cut["losses"][0]
    assert heads.checkpoint(project) is None
    assert fit_status(ctx.store.redis, project)["epochs"] == 3
    heads.put_checkpoint(project, b"corrupt")  # a bad checkpoint is ignored: the training starts afresh
    context(fit_epochs=1)
    assert fit_project(project)["epochs"] == 1


def test_fit_after_queues_a_training_once_enough_tasks_are_corrected(context, fake_ls, task_ids):
    ctx = context(fit_after=2, queue=f"fit-after-{task_ids(1)[0]}")
    ids = task_ids(3)
    project = str(ids[0])
    queued = []
    (target,) = parse_label_config(LABEL_CONFIG).targets
    corrections = _corrections(ctx, fake_ls, ids)
    # What the review job reads back (it never believes the webhook's payload): the project, tasks, annotations.
    fake_ls.add_project(int(project), LABEL_CONFIG,
                        [{"id": c.task, "data": {"image": c.specs[0].image}} for c in corrections])
    for correction in corrections:
        names = [c.name for c in CLASSES]
        label_map = np.zeros(SIZE, dtype=np.int32)
        for i, name in enumerate(names):
            label_map[correction.masks.get(name, np.zeros(SIZE, bool))] = i + 1
        seg = Segmentation(names, label_map, np.stack([label_map == i + 1 for i in range(len(names))]),
                           np.ones(len(names), np.float32), steps=2)
        regions = segmentation_to_regions(seg, target, list(target.labels), kind="brush")
        fake_ls.add_annotation(correction.task, correction.task, int(project), regions)
        event = AnnotationEvent(project, correction.task, correction.task,
                                hashlib.sha256(LABEL_CONFIG.encode()).hexdigest(), correction.specs)
        queued.append(review_annotation(event.to_dict()).get("fit_queued"))
    assert queued == [False, True, False]  # the third finds the lock of the queued one
    jobs = ctx.queue.batch.get_jobs()
    assert [job.func_name for job in jobs if job.func_name == FIT_JOB] == [FIT_JOB]
    assert fit_status(ctx.store.redis, project)["state"] == "queued"


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
    heads = HeadStore(ctx.store.redis)
    clip = ctx.segmenter.proposal_clip
    config = HeadConfig.for_clip(clip, width=32, depth=1, heads=2)
    good = heads.put_head("heads-test", 1, head_to_bytes(new_head(config, 0, clip.name)))
    foreign = heads.put_head("heads-test-foreign", 1, head_to_bytes(new_head(config, 0, "another-clip")))
    corrupt = heads.put_head("heads-test-corrupt", 1, b"\x00 not a head")
    key, _, digest = good.rpartition("#")
    swapped = f"{key}#{'0' * len(digest)}"
    with caplog.at_level(logging.WARNING, logger="car_backend.queue.jobs"):
        assert isinstance(ctx.head(good), MaskHead)
        for ref in (foreign, corrupt, swapped, "car:review:heads-test:head:99#00"):
            assert ctx.head(ref) is None
    assert len([r for r in caplog.records if "mask head" in r.getMessage()]) == 4
    ctx.store.redis.delete(key)
    assert isinstance(ctx.head(good), MaskHead)  # loaded once per worker: not read again
    for generation in (2, 3):  # the two latest generations are kept
        heads.put_head("heads-test-foreign", generation, b"x")
    assert [heads.redis.exists(HeadStore.key("heads-test-foreign", f"head:{g}")) for g in (1, 2, 3)] == [0, 1, 1]


def test_an_adopted_head_gets_its_own_version_and_keys(service_settings):
    settings = service_settings()
    config = parse_label_config(LABEL_CONFIG)
    plain = model_version(settings, config)
    fitted = model_version(settings, config, fit_generation=1, head="car:review:1:head:1#ab")
    other = model_version(settings, config, fit_generation=1, head="car:review:1:head:1#cd")
    assert fitted.endswith("-fit1") and len({plain, fitted, other}) == 3
    project = Project(config, fitted, head="car:review:1:head:1#ab")
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
    assert fit_status(redis, str(project))["state"] == "queued"
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "already queued or running" in again.stdout
    env.pop("REDIS_URL")
    missing = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "REDIS_URL" in missing.stderr
