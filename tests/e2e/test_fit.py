""""Start Training" in a real Label Studio 1.23.2: annotations submitted in Label Studio become corrected tasks,
`POST /api/ml/<id>/train` sends START_TRAINING to the backend, a worker trains and adopts a mask head, and the
next "Retrieve predictions" stores predictions of the new `-fit1` model_version.

Models are the tiny random-weight CLIP; the scenes are generated (car_backend.testing.scenes), and each task
names its object's label (CAR_TASK_LABELS_KEY), as in tests/review/test_fit_integration.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from car_backend.engine import Segmentation
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.review.fit import held_out
from car_backend.review.store import ReviewStore
from car_backend.testing.scenes import SceneClass, labelled_scene
from tests.support.label_studio import REPO, wait_for_http
from tests.support.redis import free_port
from tests.support.settings import TINY_MODEL

pytestmark = pytest.mark.e2e

CLASSES = (SceneClass("red", (220, 40, 40), "flat", "ellipse"), SceneClass("yellow", (230, 220, 40), "stripes", "rectangle"),
           SceneClass("green", (40, 200, 60), "checks", "ellipse"), SceneClass("blue", (40, 60, 220), "dots", "rectangle"))
NAMES = [c.name for c in CLASSES]
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                + "".join(f'<Label value="{n}"/>' for n in NAMES) + "</BrushLabels></View>")
SIZE = (128, 128)
TRAIN, HELD_OUT, PREDICTED = 16, 4, 2  # corrected tasks in each split, and tasks left to predict
SCENES = 36  # generated; tasks are picked among them by the split their Label Studio ids fall in


@pytest.fixture(scope="module")
def fit_backend(label_studio, tmp_path_factory, redis_url):
    """`car-backend serve` and `car-backend worker` on the test Redis, training heads only when asked."""
    port = free_port()
    folder = tmp_path_factory.mktemp("fit-backend")
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAR_", "LABEL_STUDIO_", "REDIS_"))}
    env.update(CAR_PROPOSAL_MODEL=TINY_MODEL, CAR_CLASSIFIER_MODEL=TINY_MODEL, CAR_DEVICE="cpu", CAR_PREDICT_WAIT="60",
               CAR_CALIBRATE_AFTER="0", CAR_FIT_AFTER="0", CAR_FIT_EPOCHS="20", CAR_HEAD_WIDTH="64",
               CAR_HEAD_DEPTH="1", CAR_TASK_LABELS_KEY="labels", LABEL_STUDIO_URL=label_studio.url,
               LABEL_STUDIO_API_KEY=label_studio.pat, LOG_LEVEL="INFO", REDIS_URL=redis_url,
               CAR_QUEUE=f"e2e-fit-{port}", OMP_NUM_THREADS="1")
    procs = []
    with open(log, "w") as out, open(folder / "worker.log", "w") as worker_out:
        procs.append(subprocess.Popen([sys.executable, "-m", "car_backend.cli", "serve", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO))
        procs.append(subprocess.Popen([sys.executable, "-m", "car_backend.cli", "worker"], env=env,
                                      stdout=worker_out, stderr=subprocess.STDOUT, cwd=REPO))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process=procs[0], timeout=60)
        yield url, log
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    for name in ("serve.log", "worker.log"):
        assert label_studio.pat not in (folder / name).read_text(), f"the access token reached {name}"


def _regions(masks: dict[str, np.ndarray]) -> list[dict]:
    (target,) = parse_label_config(LABEL_CONFIG).targets
    label_map = np.zeros(SIZE, dtype=np.int32)
    for i, name in enumerate(NAMES):
        if name in masks:
            label_map[masks[name]] = i + 1
    seg = Segmentation(NAMES, label_map, np.stack([label_map == i + 1 for i in range(len(NAMES))]),
                       np.ones(len(NAMES), np.float32), steps=2)
    return segmentation_to_regions(seg, target, list(target.labels), kind="brush")


def _metric(url: str, line_start: str) -> float | None:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _versions(client, task_ids: list[int]) -> dict[int, list[str]]:
    return {t: [p["model_version"] for p in client.predictions(t)] for t in task_ids}


def test_start_training_in_label_studio_gives_fit1_predictions(label_studio, fit_backend, tmp_path, redis):
    url, _ = fit_backend
    client = label_studio.client
    project = client.create_project(LABEL_CONFIG, title="e2e fit")
    project_id = project["id"]
    pid = ProjectId.from_api(project, instance_of(label_studio.url))  # id and creation stamp, as the backend keys it
    # one object each, the classes in turn, so that every class is among the corrected tasks
    scenes = [labelled_scene(9000 + i, (CLASSES[i % len(CLASSES)],), SIZE) for i in range(SCENES)]
    # uploaded as files (served by Label Studio itself), then their labels set through the task data
    paths = []
    for i, scene in enumerate(scenes):
        path = tmp_path / f"fit-{i}.png"
        Image.fromarray(scene.image).save(path)
        paths.append(path)
    client.upload_images(project_id, paths)
    uploaded = {t["id"]: t["data"] for t in client.tasks(project_id)}
    index = {task: int(data["image"].rsplit("fit-", 1)[1].split(".")[0]) for task, data in uploaded.items()}
    for task_id, i in index.items():  # before the backend is connected: a task read would ask it to predict
        client.api("PATCH", f"/api/tasks/{task_id}",
                   json={"data": {**uploaded[task_id], "labels": list(scenes[i].masks)}})
    train = [t for t in sorted(index) if not held_out(t)][:TRAIN]
    held = [t for t in sorted(index) if held_out(t)][:HELD_OUT]
    rest = [t for t in sorted(index) if t not in train + held][:PREDICTED]
    assert len(train) == TRAIN and len(held) == HELD_OUT and len(rest) == PREDICTED, "too few scenes for the split"
    ml_backend = client.connect_ml_backend(project_id, url, title="car")

    client.retrieve_predictions(project_id, rest)
    deadline = time.monotonic() + 90
    while not all(_versions(client, rest).values()) and time.monotonic() < deadline:
        time.sleep(1)
    (first_version,) = {v for versions in _versions(client, rest).values() for v in versions}
    assert "-fit" not in first_version

    # Label Studio sends each to /webhook (ANNOTATION_CREATED); the review jobs that store them as corrected
    # tasks are queued before the training, on the same queue
    for task_id in train + held:
        client.create_annotation(task_id, _regions(scenes[index[task_id]].masks))

    client.api("POST", f"/api/ml/{ml_backend['id']}/train", json={})  # "Start Training"
    deadline = time.monotonic() + 240
    generation = None
    while time.monotonic() < deadline:
        generation = _metric(url, f'car_fit_generation{{project="{project_id}"}}')
        if generation or _metric(url, f'car_fit_agreement{{project="{project_id}",stage="after"}}') is not None:
            break  # adopted, or judged and not adopted
        time.sleep(1)
    review = ReviewStore(redis)
    status = review.fit_status(pid)
    corrections = review.corrections(pid)
    assert generation == 1.0, (status, [(c.task, {k: int(v.sum()) for k, v in c.masks.items()},
                                         [r.queries for s in c.specs for r in s.runs]) for c in corrections])

    client.retrieve_predictions(project_id, rest)  # /setup first: the -fit1 version, so new predictions
    deadline = time.monotonic() + 90
    second: dict[int, list[str]] = {}
    while time.monotonic() < deadline:
        second = {t: [v for v in versions if v != first_version] for t, versions in _versions(client, rest).items()}
        if all(second.values()):
            break
        time.sleep(1)
    assert all(len(v) == 1 and v[0].endswith("-fit1") for v in second.values()), second
