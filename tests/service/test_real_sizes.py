"""Images of real sizes through the whole service: a 1024x1024 image answered by /predict and a 4000x3000
photo written late through the API, by a real worker process (the tiny random CLIP: the sizes are the
point), served by the fake Label Studio. Each region must be valid at the image's own size: a brush's RLE
decodes to exactly original_height x original_width."""

from __future__ import annotations

import pytest

from car_backend.labelstudio.regions import label_masks
from tests.support.fake_label_studio import Reply, image_bytes
from tests.support.service import DELIVERY_TIMEOUT_S, ls_tasks, predict

pytestmark = pytest.mark.integration

PNG = {"Content-Type": "image/png"}
# The tiny random CLIP finds a region in this generated picture (two flat colours) at every size, with the
# default label config (tests.support.service.BRUSH).
PICTURE = "b"
JOB_S = 240.0  # one large image on a loaded CPU takes tens of seconds with the tiny model


def assert_valid_regions(result: list[dict], width: int, height: int) -> None:
    assert result, "no region"
    for region in result:
        assert (region["original_width"], region["original_height"]) == (width, height), region["id"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"]
    masks = label_masks(result, max_pixels=width * height)  # checks every RLE's length before decoding it
    assert masks and all(m.shape == (height, width) and m.any() for m in masks.values())


def test_a_1024_image_by_predict_and_a_4000x3000_photo_by_late_delivery(
        service_settings, make_client, spawn_worker, fake_ls, task_ids):
    square, photo = task_ids(2)
    paths = {square: f"/data/upload/1/square-{square}.png", photo: f"/data/upload/1/photo-{photo}.png"}
    fake_ls.routes[paths[square]] = Reply(body=image_bytes(PICTURE, (1024, 1024)), headers=PNG)
    fake_ls.routes[paths[photo]] = Reply(body=image_bytes(PICTURE, (4000, 3000)), headers=PNG)
    tasks = {t: {"id": t, "data": {"image": path}} for t, path in paths.items()}
    ls_tasks(fake_ls, 1, list(tasks.values()))
    settings = service_settings(queue=f"sizes-{square}", predict_wait=JOB_S)
    spawn_worker(settings)
    body = predict(make_client(settings), [tasks[square]])
    (entry,) = body["results"]
    assert "error" not in entry, entry
    assert_valid_regions(entry["result"], 1024, 1024)
    late = predict(make_client(service_settings(queue=settings.queue, predict_wait=0.0)), [tasks[photo]])
    assert "result" not in late["results"][0]  # pending: the worker writes it when it is done
    written = fake_ls.wait_for_predictions([photo], timeout=JOB_S + DELIVERY_TIMEOUT_S)[photo]
    assert len(written) == 1 and written[0]["model_version"] == late["model_version"]
    assert_valid_regions(written[0]["result"], 4000, 3000)

