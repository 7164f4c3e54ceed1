"""A real Label Studio 1.23.2 and `car-backend serve` with basic auth on (the secure default): Connect Model
with credentials, retrieve (answered and late predictions), interactive prompts, Start Training; a project
that adds a label gets it predicted; instance, detection and classification configs get predictions that
Label Studio stores and serves back.

Models are the tiny random-weight CLIP, so what the masks cover means nothing; the checks are about the
protocol, the regions' shapes and what Label Studio stores.
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
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from car_backend.engine.instances import MIN_AREA_PX
from car_backend.engine.segmenter import Segmenter
from car_backend.review.fit import held_out
from car_backend.settings import Settings
from tests.support.label_configs import read_config
from tests.support.label_studio import REPO, LabelStudioError, wait_for_http
from tests.support.redis import free_port
from tests.support.settings import TINY_MODEL

pytestmark = pytest.mark.e2e

USER, PASSWORD = "car-e2e", "a long e2e password"
AUTH = (USER, PASSWORD)
SIZES = [(64, 48), (1024, 1024), (72, 40)]


@pytest.fixture(scope="module")
def secure_backend(label_studio, tmp_path_factory):
    """`car-backend serve` with basic auth (embedded worker and Redis); a short CAR_PREDICT_WAIT, so the large
    image's prediction is written late through Label Studio's API."""
    port = free_port()
    folder = tmp_path_factory.mktemp("secure-backend")
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAR_", "LABEL_STUDIO_", "REDIS_", "BASIC_"))}
    env.update(CAR_DATA_DIR=str(folder / "data"), CAR_PROPOSAL_MODEL=TINY_MODEL, CAR_CLASSIFIER_MODEL=TINY_MODEL,
               CAR_DEVICE="cpu", CAR_PRECISION="fp32", CAR_PREDICT_WAIT="2", CAR_CALIBRATE_AFTER="0", CAR_FIT_AFTER="0",
               CAR_FIT_EPOCHS="3", CAR_HEAD_WIDTH="32", CAR_HEAD_DEPTH="1",
               BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD, LABEL_STUDIO_URL=label_studio.url,
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
    text = log.read_text()
    assert label_studio.pat not in text and PASSWORD not in text, "a secret reached the backend's log"


def scenes(tmp_path: Path, prefix: str) -> list[Path]:
    """One image per SIZES entry: green ground, three separate red squares and a blue bar."""
    paths = []
    for i, (w, h) in enumerate(SIZES):
        image = Image.new("RGB", (w, h), (90, 140, 60))
        for k in range(3):
            x = w * (1 + 3 * k) // 10
            image.paste((220, 30, 30), (x, h // 5, x + w // 6, h // 5 + h // 6))
        image.paste((30, 30, 220), (w // 10, 3 * h // 5, 9 * w // 10, 4 * h // 5))
        path = tmp_path / f"{prefix}{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def size_of(client, project_id: int, task_id: int, prefix: str) -> tuple[int, int]:
    """The uploaded image's size from its file name (the task list: `GET /api/tasks/<id>` would ask us)."""
    (task,) = [t for t in client.tasks(project_id) if t["id"] == task_id]
    return SIZES[int(task["data"]["image"].rsplit(prefix, 1)[1].split(".")[0])]


def connect(client, project_id: int, url: str, **fields) -> dict:
    return client.connect_ml_backend(project_id, url, title="car", auth_method="BASIC_AUTH",
                                     basic_auth_user=USER, basic_auth_pass=PASSWORD, **fields)


def setup_version(url: str, config: str, project: int) -> str:
    reply = requests.post(f"{url}/setup", json={"project": str(project), "schema": config}, auth=AUTH, timeout=10)
    reply.raise_for_status()
    return reply.json()["model_version"]


def stored(client, task_ids, version: str, deadline_s: float = 180.0) -> dict[int, list[dict]]:
    """Predictions of `version` per task, waiting for the late ones the backend writes through the API."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = {t: [p for p in client.predictions(t) if p["model_version"] == version] for t in task_ids}
        if all(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def metric(url: str, name: str) -> float | None:
    """The value of an unlabelled /metrics sample (read with the credentials)."""
    text = requests.get(f"{url}/metrics", auth=AUTH, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_basic_auth_connect_retrieve_late_interactive_and_training(label_studio, secure_backend, tmp_path):
    url, log = secure_backend
    client = label_studio.client
    config = read_config("interactive.xml")
    project_id = client.create_project(config, title="e2e secure")["id"]
    task_ids = client.upload_images(project_id, scenes(tmp_path, "secure"))

    # An outsider gets the bare status and 401s; Label Studio without the credentials cannot connect.
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "UP"}
    for path in ("/status", "/metrics"):
        assert requests.get(f"{url}{path}", timeout=5).status_code == 401
    assert requests.post(f"{url}/setup", json={"project": "1", "schema": config}, timeout=5).status_code == 401
    train = {"action": "START_TRAINING", "project": {"id": project_id}}
    assert requests.post(f"{url}/webhook", json=train, timeout=5).status_code == 401
    with pytest.raises(LabelStudioError):
        client.connect_ml_backend(project_id, url, title="car without credentials")

    ml_id = connect(client, project_id, url, is_interactive=True)["id"]
    version = setup_version(url, config, project_id)
    client.retrieve_predictions(project_id, task_ids)
    found = stored(client, task_ids, version)
    for task_id in task_ids:
        assert len(found[task_id]) == 1, f"task {task_id}: {client.predictions(task_id)}"
        w, h = size_of(client, project_id, task_id, "secure")
        for region in found[task_id][0]["result"]:
            assert region["type"] == "brushlabels" and (region["original_width"], region["original_height"]) == (w, h)
            assert decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3].any()
    written = metric(url, "car_api_deliveries_total")
    assert written is not None and written >= 1, "the large image's prediction should have been written late"

    context = {"result": [{"id": "p1", "type": "textarea", "from_name": "prompt", "to_name": "image",
                           "origin": "manual", "value": {"text": ["the red square"]}}]}
    reply = client.interactive_annotating(ml_id, task_ids[0], context)
    assert "errors" not in reply, reply
    assert len(reply["data"]["result"]) <= 1

    # "Start Training" goes through Label Studio's ML API with the connection's credentials.
    client.api("POST", f"/api/ml/{ml_id}/train", json={})
    (backend,) = [b for b in client.ml_backends(project_id) if b["id"] == ml_id]
    assert backend["state"] != "ER", backend
    status = requests.get(f"{url}/status", params={"project": project_id}, auth=AUTH, timeout=10)
    assert status.status_code == 200
    assert "fit" in status.text.lower()


def test_adding_a_label_predicts_the_project_again(label_studio, secure_backend, tmp_path):
    url, _ = secure_backend
    client = label_studio.client
    before = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
              '<Label value="grass"/><Label value="sky"/></BrushLabels></View>')
    after = before.replace('<Label value="sky"/>', '<Label value="sky"/><Label value="building"/>')
    project_id = client.create_project(before, title="e2e add a label")["id"]
    paths = scenes(tmp_path, "grow")
    task_ids = client.upload_images(project_id, paths)
    # Which scenes the added label is found in, by the same engine in this process (the random-weight model
    # finds what it finds; the backend must agree once it predicts with the new vocabulary).
    engine = Segmenter(Settings(proposal_model=TINY_MODEL, classifier_model=TINY_MODEL, device="cpu",
                                precision="fp32").engine_config())  # the backend's settings
    expected = {path.name for path in paths
                if (engine.segment(Image.open(path).convert("RGB"), ["grass", "sky", "building"]).label_map == 3
                    ).sum() >= MIN_AREA_PX}
    assert expected, "the tiny model finds the added label in no scene: choose another label for this test"
    connect(client, project_id, url)
    first = setup_version(url, before, project_id)
    client.retrieve_predictions(project_id, task_ids)
    assert all(stored(client, task_ids, first).values())

    client.update_project(project_id, label_config=after)
    second = setup_version(url, after, project_id)
    assert second != first, "adding a label must change the model version"
    client.retrieve_predictions(project_id, task_ids)
    found = stored(client, task_ids, second)
    assert all(len(p) == 1 for p in found.values()), found
    labels = {label for p in found.values() for r in p[0]["result"] for label in r["value"]["brushlabels"]}
    assert labels <= {"grass", "sky", "building"}
    names = {t["id"]: t["data"]["image"].rsplit("/", 1)[1].split("-", 1)[1] for t in client.tasks(project_id)}
    with_building = {names[t] for t, p in found.items()
                     if any("building" in r["value"]["brushlabels"] for r in p[0]["result"])}
    assert with_building == expected, "the added label is predicted where the engine finds it"


@pytest.mark.parametrize("config,kind", [("instances.xml", "brushlabels"), ("detection.xml", "rectanglelabels"),
                                         ("classification.xml", "choices")])
def test_instance_box_and_tag_projects_store_their_predictions(label_studio, secure_backend, tmp_path, config, kind):
    url, _ = secure_backend
    client = label_studio.client
    text = read_config(config)
    project_id = client.create_project(text, title=f"e2e {config}")["id"]
    task_ids = client.upload_images(project_id, scenes(tmp_path, kind))
    connect(client, project_id, url)
    version = setup_version(url, text, project_id)
    client.retrieve_predictions(project_id, task_ids)
    found = stored(client, task_ids, version)
    choices = {"person", "car", "dog", "bottle"}
    regions = 0
    for task_id in task_ids:
        assert len(found[task_id]) == 1, f"task {task_id}: {client.predictions(task_id)}"
        w, h = size_of(client, project_id, task_id, kind)
        for region in found[task_id][0]["result"]:
            regions += 1
            assert region["type"] == kind and isinstance(region["score"], float)
            value = region["value"]
            if kind == "brushlabels":
                mask = decode_rle(value["rle"]).reshape(h, w, 4)[:, :, 3] > 0
                count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
                assert count == 2, "an instance region is one connected object"
            elif kind == "rectanglelabels":
                box = np.array([value["x"], value["y"], value["width"], value["height"]])
                assert (box >= 0).all() and value["x"] + value["width"] <= 100.001
                assert value["y"] + value["height"] <= 100.001 and value["width"] > 0 and value["height"] > 0
                assert set(value["rectanglelabels"]) <= choices
            else:
                assert value["choices"] and set(value["choices"]) <= choices
    assert regions > 0
    # The Data Manager's task list shows them (what the labeling screen loads).
    listed = {t["id"]: t for t in client.tasks(project_id)}
    assert all(listed[t]["total_predictions"] >= 1 for t in task_ids)


def test_start_training_on_corrections_of_1024_images(label_studio, secure_backend, tmp_path):
    """Four training and one held-out corrected task, each a 1024x1024 image: Start Training in Label Studio
    trains a head on them within the memory budget and says how it went in /status."""
    url, _ = secure_backend
    client = label_studio.client
    config = read_config("brush.xml")
    project_id = client.create_project(config, title="e2e training at 1024 px")["id"]
    image = Image.new("RGB", (1024, 1024), (90, 140, 60))
    image.paste((220, 30, 30), (200, 200, 520, 600))
    path = tmp_path / "big.png"
    image.save(path)
    train, held = [], []
    for _ in range(40):  # task ids are Label Studio's; upload until both splits have what a fit needs
        (task_id,) = client.upload_images(project_id, [path])
        (held if held_out(task_id) else train).append(task_id)
        if len(train) >= 4 and held:
            break
    tasks = train[:4] + held[:1]
    assert len(tasks) == 5, "no held-out task id among 40 uploads"
    ml_id = connect(client, project_id, url)["id"]
    version = setup_version(url, config, project_id)
    client.retrieve_predictions(project_id, tasks)
    assert all(stored(client, tasks, version, deadline_s=300).values())

    square = np.zeros((1024, 1024), dtype=np.uint8)
    square[200:600, 200:520] = 255
    region = {"id": "car1", "from_name": "tag", "to_name": "image", "type": "brushlabels",
              "original_width": 1024, "original_height": 1024, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask2rle(square), "brushlabels": ["car"]}}
    reviewed = 'car_webhook_annotations_total{outcome="reviewed"}'
    before = metric(url, reviewed) or 0
    for task_id in tasks:  # the annotators' corrections (Label Studio sends them to /webhook)
        client.create_annotation(task_id, [region])
    deadline = time.monotonic() + 120
    while (metric(url, reviewed) or 0) < before + len(tasks):  # every correction reviewed before training
        assert time.monotonic() < deadline, "the corrections were not all reviewed"
        time.sleep(1)

    client.api("POST", f"/api/ml/{ml_id}/train", json={})
    deadline = time.monotonic() + 300
    fit = None
    while time.monotonic() < deadline:
        report = requests.get(f"{url}/status", params={"project": project_id}, auth=AUTH, timeout=10).json()
        fit = report.get("fit")
        if fit and fit["state"] in ("done", "failed"):
            break
        time.sleep(2)
    assert fit and fit["state"] == "done", fit
    assert fit["train_tasks"] == 4 and fit["held_out_tasks"] == 1 and fit["left_out"] == 0, fit
    assert fit["features_mb"] > 0 and "memory" not in fit["reason"], fit
