"""car-backend serve connected to a real Label Studio 1.23.2: retrieve predictions, interactive prompts.

Models are the tiny random-weight CLIP of car_backend/testing, so the masks mean nothing; what is checked is that
Label Studio stores one prediction per task with our model_version whose regions decode at the image's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from tests.support.label_configs import read_config
from tests.support.label_studio import REPO, wait_for_http
from tests.support.redis import free_port
from tests.support.settings import TINY_MODEL

pytestmark = pytest.mark.e2e

TINY = TINY_MODEL
SIZES = [(64, 48), (40, 56), (72, 40)]
CALIBRATE_AFTER = 4


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    """`car-backend serve` (inline worker, embedded Redis) with Label Studio's URL and token."""
    port = free_port()
    folder = tmp_path_factory.mktemp("backend")
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAR_", "LABEL_STUDIO_", "REDIS_"))}
    # The embedded Redis keeps its data in CAR_DATA_DIR: a folder of this session's, so that projects of an
    # earlier Label Studio with the same ids (calibrations, delivery marks) are not found here.
    env.update(CAR_DATA_DIR=str(folder / "data"), CAR_PROPOSAL_MODEL=TINY, CAR_CLASSIFIER_MODEL=TINY, CAR_DEVICE="cpu", CAR_PREDICT_WAIT="60",
               CAR_CALIBRATE_AFTER=str(CALIBRATE_AFTER), LABEL_STUDIO_URL=label_studio.url,
               LABEL_STUDIO_API_KEY=label_studio.pat, LOG_LEVEL="INFO")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "car_backend.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process=proc, timeout=60)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert label_studio.pat not in log.read_text(), "the access token reached the backend's log"


def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, (w, h) in enumerate(SIZES):
        image = Image.new("RGB", (w, h), (90, 140, 60))
        image.paste((220, 30, 30), (w // 4, h // 4, w // 2, h // 2))
        path = tmp_path / f"scene{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def connected_project(label_studio, backend_url: str, config: str, tmp_path: Path, **ml) -> tuple[int, list, int]:
    client = label_studio.client
    project = client.create_project(read_config(config), title=f"e2e {config}")
    task_ids = client.upload_images(project["id"], images(tmp_path))
    ml_backend = client.connect_ml_backend(project["id"], backend_url, title="car", **ml)
    return project["id"], task_ids, ml_backend["id"]


def setup_version(backend_url: str, config: str) -> str:
    reply = requests.post(f"{backend_url}/setup", json={"project": "1.1", "schema": read_config(config)}, timeout=5)
    reply.raise_for_status()
    return reply.json()["model_version"]


def size_of(client, project_id: int, task_id: int) -> tuple[int, int]:
    """The uploaded image's size, from its file name (upload order and task order may differ).

    Reads the task list: `GET /api/tasks/<id>` would make Label Studio ask for a prediction."""
    (task,) = [t for t in client.tasks(project_id) if t["id"] == task_id]
    name = task["data"]["image"]
    return SIZES[int(name.rsplit("scene", 1)[1].split(".")[0])]


def stored_predictions(client, task_ids, deadline_s=90.0) -> dict[int, list[dict]]:
    """Predictions per task, waiting for late ones that the worker writes through the API."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = {t: client.predictions(t) for t in task_ids}
        if all(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(1)


@pytest.mark.parametrize("config,kind", [("brush.xml", "brushlabels"), ("polygon.xml", "polygonlabels")])
def test_retrieve_predictions_stores_one_prediction_per_task(label_studio, backend, tmp_path, config, kind):
    backend_url, _ = backend
    client = label_studio.client
    project_id, task_ids, _ = connected_project(label_studio, backend_url, config, tmp_path)
    version = setup_version(backend_url, config)

    client.retrieve_predictions(project_id, task_ids)
    found = stored_predictions(client, task_ids)

    labels = {"person", "car", "dog", "cat", "tree"}
    regions = 0
    for task_id in task_ids:
        w, h = size_of(client, project_id, task_id)
        predictions = found[task_id]
        assert len(predictions) == 1, f"task {task_id}: {predictions}"
        prediction = predictions[0]
        assert prediction["model_version"] == version
        assert isinstance(prediction["score"], float)
        regions += len(prediction["result"])
        for region in prediction["result"]:
            assert region["type"] == kind and region["from_name"] == "tag" and region["to_name"] == "image"
            assert set(region["value"][kind]) <= labels
            if kind == "brushlabels":
                assert (region["original_width"], region["original_height"]) == (w, h)
                mask = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3]
                assert mask.any() and set(np.unique(mask)) <= {0, 255}
            else:
                points = np.array(region["value"]["points"])
                assert points.shape[0] >= 3 and points.min() >= 0 and points.max() <= 100

    # Random weights can leave a kept label with an empty mask after the CRF, but not on every image.
    assert regions > 0

    # A second retrieve asks for nothing new and stores no duplicates.
    client.retrieve_predictions(project_id, task_ids)
    assert all(len(client.predictions(t)) == 1 for t in task_ids)


def test_interactive_text_prompt_returns_one_region(label_studio, backend, tmp_path):
    backend_url, _ = backend
    client = label_studio.client
    project_id, task_ids, ml_id = connected_project(label_studio, backend_url, "interactive.xml", tmp_path,
                                                    is_interactive=True)
    context = {"result": [{"id": "p1", "type": "textarea", "from_name": "prompt", "to_name": "image",
                           "origin": "manual", "value": {"text": ["the red square"]}}]}
    reply = client.interactive_annotating(ml_id, task_ids[0], context)
    assert "errors" not in reply, reply
    result = reply["data"]["result"]
    # One region for the typed object at most (random weights may leave its mask empty after the CRF).
    assert len(result) <= 1
    w, h = size_of(client, project_id, task_ids[0])
    for region in result:
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["person"]
        assert (region["original_width"], region["original_height"]) == (w, h)
        assert decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3].any()
    # A smart keypoint drawn with "car": at most the one connected part of the car mask under it, labelled car.
    keypoint = {"result": [{"id": "k1", "type": "keypointlabels", "from_name": "points", "to_name": "image",
                            "origin": "manual", "is_positive": True, "original_width": w, "original_height": h,
                            "value": {"x": 37.5, "y": 37.5, "width": 1, "keypointlabels": ["car"]}}]}
    reply = client.interactive_annotating(ml_id, task_ids[0], keypoint)
    assert "errors" not in reply, reply
    for region in reply["data"]["result"]:
        assert region["value"]["brushlabels"] == ["car"]
        mask = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
        assert mask[int(0.375 * h), int(0.375 * w)], "the returned part holds the keypoint"
        count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        assert count == 2, "one connected part (plus background)"
    _, log = backend
    assert "car-interactive" in log.read_text(), "interactive prompts go to the high-priority queue"
    assert client.predictions(task_ids[0]) == [], "interactive answers are suggestions, never stored"


def metric(backend_url: str, line_start: str) -> float | None:
    """The value of the /metrics sample whose line starts with `line_start`, if present."""
    text = requests.get(f"{backend_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_corrected_annotations_calibrate_a_better_model_version(label_studio, backend, tmp_path):
    """Annotators correct predictions in Label Studio; past CAR_CALIBRATE_AFTER corrected tasks the backend has
    a new model_version whose predictions agree better with held-out corrections than the first ones."""
    from tests.support.review import annotated_regions, mean_agreement, review_image

    backend_url, _ = backend
    client = label_studio.client
    config = read_config("brush.xml")
    count = 2 * CALIBRATE_AFTER
    paths = []
    for i in range(count):
        path = tmp_path / f"review-{i}.png"
        path.write_bytes(review_image(i))
        paths.append(path)
    project = client.create_project(config, title="e2e active learning")
    project_id = project["id"]
    client.upload_images(project_id, paths)
    client.connect_ml_backend(project_id, backend_url, title="car")
    # task -> picture index, from the uploaded file names
    index = {t["id"]: int(t["data"]["image"].rsplit("review-", 1)[1].split(".")[0]) for t in client.tasks(project_id)}
    order = sorted(index, key=index.get)
    training, held_out = order[:CALIBRATE_AFTER], order[CALIBRATE_AFTER:]
    wanted = dict(zip(order, annotated_regions(config, [review_image(index[t]) for t in order]), strict=True))

    client.retrieve_predictions(project_id, order)
    first = stored_predictions(client, order)
    first_version = first[order[0]][0]["model_version"]
    assert all(len(p) == 1 and p[0]["model_version"] == first_version for p in first.values())

    for task_id in training:  # Label Studio sends each to /webhook (ANNOTATION_CREATED)
        client.create_annotation(task_id, wanted[task_id])

    deadline = time.monotonic() + 180
    generation = None
    while time.monotonic() < deadline:
        generation = metric(backend_url, f'car_calibration_generation{{project="{project_id}"}}')
        if generation is not None:
            break
        time.sleep(1)
    assert generation == 1.0, "no calibration after the corrected tasks"
    compared = metric(backend_url, f'car_review_tasks{{model_version="{first_version}",project="{project_id}"}}')
    assert compared == CALIBRATE_AFTER

    # "Retrieve predictions" asks /setup for the version first: the calibrated one, so held-out tasks get new ones
    client.retrieve_predictions(project_id, held_out)
    second = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        second = {t: [p for p in client.predictions(t) if p["model_version"] != first_version] for t in held_out}
        if all(second.values()):
            break
        time.sleep(1)
    assert all(len(p) == 1 for p in second.values()), second
    new_version = second[held_out[0]][0]["model_version"]
    assert new_version.endswith("-cal1") and new_version != first_version
    before = mean_agreement([first[t][0]["result"] for t in held_out], [wanted[t] for t in held_out])
    after = mean_agreement([second[t][0]["result"] for t in held_out], [wanted[t] for t in held_out])
    assert after > before
