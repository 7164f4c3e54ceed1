"""The active-learning loop for real: /predict, annotation webhooks, review jobs and a calibration on a real
worker process, with the tiny random CLIP.

The "annotators" here correct every prediction to what CaR gives with a lower keep threshold (they want more
labels kept). Calibration must find that out from a few corrected tasks: afterwards the project has a new
model_version whose predictions agree better with held-out corrected tasks than the first ones did.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from car_backend.agreement import compare, label_masks
from car_backend.engine import Segmenter, get_preset
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.review import ReviewStore
from tests.conftest import settings_env, tiny_settings
from tests.service.conftest import label_config
from tests.service.fake_ls import image_bytes

pytestmark = pytest.mark.integration

BRUSH = label_config("brush")
WANTED = {"confidence_threshold": 0.1}  # the annotators' taste, unknown to the backend
TRAINING, HELD_OUT = 4, 4
CALIBRATION_TIMEOUT_S = 180.0


def annotated_regions(names: list[str]) -> list[list[dict]]:
    """What the annotators submit for each image: CaR's output with the WANTED thresholds."""
    config = parse_label_config(BRUSH)
    (target,) = config.targets
    segmenter = Segmenter(tiny_settings())
    preset = dataclasses.replace(get_preset("coco"), **WANTED)
    out = []
    for name in names:
        image = np.array(Image.open(io.BytesIO(image_bytes(name))).convert("RGB"))
        seg = segmenter.segment(image, [label.prompt for label in target.labels], preset=preset)
        out.append(segmentation_to_regions(seg, target, list(target.labels), kind="brush"))
    return out


def agreement(predicted: list[dict], annotated: list[dict]) -> float:
    size = (64, 96)
    return compare(label_masks(predicted, size), label_masks(annotated, size)).score


def test_corrections_are_compared_and_calibrate_a_new_model_version(service_settings, make_client, fake_ls, redis,
                                                                      spawn_worker, task_ids):
    ids = task_ids(TRAINING + HELD_OUT)
    project = str(ids[0])  # a project of its own in the shared test database
    settings = service_settings(calibrate_after=TRAINING, predict_wait=60.0, queue=f"review-{project}")
    spawn_worker(settings)
    client = make_client(settings)
    names = [f"review-{i}.png" for i in range(len(ids))]
    tasks = [{"id": t, "data": {"image": f"{fake_ls.url}/img/{n}"}} for t, n in zip(ids, names, strict=True)]
    wanted = annotated_regions(names)

    first_version = client.post("/setup", json={"project": f"{project}.1", "schema": BRUSH}).get_json()[
        "model_version"]
    first = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH, "project": f"{project}.1"}
                        ).get_json()["results"]
    assert all("result" in entry and entry["model_version"] == first_version for entry in first)

    for task, regions in zip(tasks[:TRAINING], wanted[:TRAINING], strict=True):
        resp = client.post("/webhook", json={
            "action": "ANNOTATION_CREATED", "annotation": {"id": task["id"], "result": regions},
            "task": task, "project": {"id": int(project), "label_config": BRUSH}})
        assert resp.status_code == 200 and resp.get_json()["status"] == "queued"

    review = ReviewStore(redis, settings.result_ttl)
    deadline = time.monotonic() + CALIBRATION_TIMEOUT_S
    while review.calibration(project) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    calibration = review.calibration(project)
    assert calibration is not None, "no calibration within the timeout"

    # the comparison of the corrected tasks with what we had delivered
    stats = review.agreement(project)
    assert list(stats) == [first_version] and stats[first_version].tasks == TRAINING
    expected = np.mean([agreement(e["result"], w) for e, w in zip(first[:TRAINING], wanted[:TRAINING],
                                                                  strict=True)])
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
    before = np.mean([agreement(e["result"], w) for e, w in zip(first[TRAINING:], wanted[TRAINING:], strict=True)])
    after = np.mean([agreement(e["result"], w) for e, w in zip(second, wanted[TRAINING:], strict=True)])
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
