"""The queue for real: the real Redis, real `car-backend worker` processes running the tiny random CLIP,
and a fake Label Studio API that records every prediction written into it.

Jobs are made slow or failing by their inputs only: images that answer late, fail N times, or are no image.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rq.registry import FailedJobRegistry

from car_backend.queue.jobqueue import SERIALIZER
from car_backend.queue.stats import CounterFamily, JobOutcome, Stats, TextLookup
from car_backend.queue.textcache import RedisTextCache
from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from tests.support.label_configs import label_config
from tests.support.processes import start_worker
from tests.support.service import BRUSH, DELIVERY_TIMEOUT_S, ls_tasks, predict
from tests.support.settings import settings_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
POLYGON_AND_BRUSH = label_config("brush_polygon")


@pytest.fixture(scope="module")
def shared_workers(redis_url, fake_ls, tmp_path_factory):
    """Two workers on the default queues, shared by the tests of this module (they load the models once)."""
    from tests.support.settings import tiny_settings

    settings = tiny_settings(redis_url=redis_url, label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.api_key)
    log_dir = tmp_path_factory.mktemp("workers")
    workers = [start_worker(settings, log_dir) for _ in range(2)]
    yield workers
    for worker in workers:
        worker.stop(timeout=10)


def test_same_task_twice_is_one_job_and_one_delivery(shared_workers, service_settings, make_client, fake_ls,
                                                     task_ids):
    """Two overlapping /predict calls (two server processes) for one task: one job, one fetch, one answer."""
    (task_id,) = task_ids(1)
    name = f"dedup-{task_id}.png"
    task = {"id": task_id, "data": {"image": f"{fake_ls.url}/slow/1.0/{name}"}}
    settings = service_settings(predict_wait=30.0)
    clients = [make_client(settings), make_client(settings)]
    answers = [None, None]

    def call(i: int) -> None:
        answers[i] = predict(clients[i], [task])["results"][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted("result" in a for a in answers) == [False, True]
    assert "already delivered" in next(a for a in answers if "result" not in a)["reason"]
    assert fake_ls.hits[f"slow/{name}"] == 1  # one job fetched the image once
    time.sleep(1.0)
    assert fake_ls.predictions_for(task_id) == []  # delivered by /predict, so never posted


def test_tasks_sharing_an_image_share_a_job(shared_workers, service_settings, make_client, fake_ls, task_ids):
    ids = task_ids(3)
    name = f"shared-{ids[0]}.png"
    tasks = [{"id": t, "data": {"image": f"{fake_ls.url}/img/{name}"}} for t in ids]
    body = predict(make_client(service_settings()), tasks)
    assert all("result" in e for e in body["results"])
    assert len({json.dumps(e["result"]) for e in body["results"]}) == 1
    assert fake_ls.hits[f"img/{name}"] == 1


def test_workers_share_text_embeddings_through_redis(service_settings, make_client, fake_ls, redis, spawn_worker,
                                                     task_ids):
    """A worker that never saw the vocabulary reads its embeddings from Redis instead of encoding them."""
    settings = service_settings(queue=f"textcache-{task_ids(1)[0]}")
    client = make_client(settings)

    def text_stats() -> tuple[float, float]:
        stats = Stats(redis).read()
        return stats.get(CounterFamily.TEXT, TextLookup.HIT), stats.get(CounterFamily.TEXT, TextLookup.MISS)

    for task_id in task_ids(2):  # each image on a fresh worker process: no in-process cache to help
        worker = spawn_worker(settings)
        before = text_stats()
        body = predict(client, [{"id": task_id, "data": {"image": f"{fake_ls.url}/img/text-{task_id}.png"}}])
        assert "result" in body["results"][0]
        worker.stop()
    hits, misses = (after - start for after, start in zip(text_stats(), before, strict=True))
    assert redis.keys(RedisTextCache.TEXT.pattern())
    assert hits > misses  # the templates of the whole vocabulary at least came from Redis
    assert 'car_text_cache_total{outcome="hit"}' in client.get("/metrics").get_data(as_text=True)


def test_two_controls_are_segmented_once_and_answered_in_both_forms(shared_workers, service_settings, make_client,
                                                                    fake_ls, redis, task_ids):
    (task_id,) = task_ids(1)
    name = f"both-{task_id}.png"
    client = make_client(service_settings())
    body = predict(client, [{"id": task_id, "data": {"image": f"{fake_ls.url}/img/{name}"}}], xml=POLYGON_AND_BRUSH)
    entry = body["results"][0]
    assert "result" in entry and fake_ls.hits[f"img/{name}"] == 1
    kinds = {(r["from_name"], r["type"]) for r in entry["result"]}
    assert kinds <= {("stuff", "brushlabels"), ("objects", "polygonlabels")}
    for region in entry["result"]:
        assert (region["original_width"], region["original_height"]) == (96, 64)


def test_a_slow_job_is_pending_then_written_through_the_api(shared_workers, service_settings, make_client, fake_ls,
                                                            task_ids):
    a, b = task_ids(2)
    tasks = [{"id": a, "data": {"image": f"{fake_ls.url}/slow/3.0/late-{a}.png"}},
             {"id": b, "data": {"image": f"{fake_ls.url}/slow/3.0/late-{b}.png"}}]
    ls_tasks(fake_ls, 1, tasks)  # late writes read the task back before writing into it
    client = make_client(service_settings(predict_wait=0.5))
    version = client.post("/setup", json={"schema": BRUSH}).get_json()["model_version"]
    started = time.monotonic()
    body = predict(client, tasks)
    assert time.monotonic() - started < 3.0
    assert all("result" not in e and e["model_version"] == version for e in body["results"])
    posted = fake_ls.wait_for_predictions([a, b], DELIVERY_TIMEOUT_S)
    assert [len(posted[a]), len(posted[b])] == [1, 1]
    assert {p["model_version"] for p in posted[a] + posted[b]} == {version}
    # Label Studio would not ask again, but an overlapping request that does gets no second copy.
    again = predict(client, tasks)
    assert all("result" not in e for e in again["results"])
    time.sleep(1.0)
    assert [len(fake_ls.predictions_for(a)), len(fake_ls.predictions_for(b))] == [1, 1]


def test_a_transient_failure_is_retried(shared_workers, service_settings, make_client, fake_ls, task_ids):
    (task_id,) = task_ids(1)
    name = f"flaky-once-{task_id}.png"
    client = make_client(service_settings(job_retries=2))
    body = predict(client, [{"id": task_id, "data": {"image": f"{fake_ls.url}/flaky/1/{name}"}}])
    assert "result" in body["results"][0]
    assert fake_ls.hits[f"flaky/{name}"] == 2


def test_retries_run_out_then_the_error_is_recorded(shared_workers, service_settings, make_client, fake_ls, redis,
                                                    task_ids):
    (task_id,) = task_ids(1)
    name = f"flaky-always-{task_id}.png"
    settings = service_settings(job_retries=1)
    before = Stats(redis).read().get(CounterFamily.JOBS, JobOutcome.ERROR)
    body = predict(make_client(settings), [{"id": task_id, "data": {"image": f"{fake_ls.url}/flaky/100/{name}"}}])
    entry = body["results"][0]
    assert "result" not in entry and "503" in entry["reason"]  # pending: the next request tries again
    assert fake_ls.hits[f"flaky/{name}"] == 2  # the first attempt and one retry
    assert Stats(redis).read().get(CounterFamily.JOBS, JobOutcome.ERROR) - before == 2
    failed = FailedJobRegistry(settings.queue + "-interactive", connection=redis, serializer=SERIALIZER)
    assert any("503" in (job.latest_result().exc_string or "") for job in
               (failed.get_queue().fetch_job(i) for i in failed.get_job_ids()) if job is not None)
    time.sleep(0.5)
    assert fake_ls.predictions_for(task_id) == []


def test_an_undecodable_image_gets_an_empty_prediction_at_once(shared_workers, service_settings, make_client,
                                                                fake_ls, task_ids):
    (task_id,) = task_ids(1)
    body = predict(make_client(service_settings(job_retries=3)),
                   [{"id": task_id, "data": {"image": f"{fake_ls.url}/bad/{task_id}.png"}}])
    entry = body["results"][0]
    assert entry["result"] == [] and "cannot decode" in entry["error"]


def test_a_killed_worker_loses_no_job(redis_url, fake_ls, spawn_worker, service_settings, make_client, task_ids,
                                      redis):
    """SIGKILL mid-job: the job is requeued by the other worker's maintenance and written exactly once."""
    (task_id,) = task_ids(1)
    name = f"killed-{task_id}.png"
    settings = service_settings(queue=f"kill-{task_id}", predict_wait=0.0, job_retries=2)
    doomed = spawn_worker(settings)
    client = make_client(settings)
    task = {"id": task_id, "data": {"image": f"{fake_ls.url}/slow/4.0/{name}"}}
    ls_tasks(fake_ls, 1, [task])
    predict(client, [task])
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while fake_ls.hits[f"slow/{name}"] == 0:  # the doomed worker is fetching the image: mid-job
        assert time.monotonic() < deadline, doomed.output()
        time.sleep(0.05)
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    survivor = spawn_worker(settings)
    posted = fake_ls.wait_for_predictions([task_id], DELIVERY_TIMEOUT_S)[task_id]
    assert len(posted) == 1, survivor.output()
    assert fake_ls.hits[f"slow/{name}"] == 2
    time.sleep(1.0)
    assert len(fake_ls.predictions_for(task_id)) == 1


def test_sigterm_lets_the_current_job_finish(fake_ls, spawn_worker, service_settings, make_client, task_ids):
    (task_id,) = task_ids(1)
    name = f"warm-{task_id}.png"
    settings = service_settings(queue=f"stop-{task_id}", predict_wait=0.0)
    worker = spawn_worker(settings)
    task = {"id": task_id, "data": {"image": f"{fake_ls.url}/slow/2.0/{name}"}}
    ls_tasks(fake_ls, 1, [task])
    predict(make_client(settings), [task])
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while fake_ls.hits[f"slow/{name}"] == 0:
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.05)
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(DELIVERY_TIMEOUT_S) == 0
    assert len(fake_ls.predictions_for(task_id)) == 1, worker.output()


def test_workers_and_server_come_back_with_redis(fake_ls, spawn_worker, make_client, task_ids):
    """Redis restarts (empty): the server answers pending meanwhile, then both find it again by themselves."""
    from tests.support.redis import free_port, start_redis_server
    from tests.support.settings import tiny_settings

    port = free_port()
    redis_server = start_redis_server(port)
    settings = tiny_settings(redis_url=f"redis://127.0.0.1:{port}/0", label_studio_url=fake_ls.url,
                             label_studio_api_key=fake_ls.api_key, predict_wait=60.0)
    try:
        spawn_worker(settings)
        client = make_client(settings)
        a, b, c = task_ids(3)
        assert "result" in predict(client, [{"id": a, "data": {"image": f"{fake_ls.url}/img/outage-{a}.png"}}])[
            "results"][0]
        redis_server.kill()
        redis_server.wait(10)
        down = predict(client, [{"id": b, "data": {"image": f"{fake_ls.url}/img/outage-{b}.png"}}])["results"][0]
        assert "result" not in down and "unavailable" in down["reason"]
        time.sleep(2.0)
        redis_server = start_redis_server(port)
        # The worker registers again by itself (until then /predict answers pending at once: no live worker).
        deadline = time.monotonic() + 60
        while client.get("/health").get_json().get("workers", 0) < 1:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.2)
        back = predict(client, [{"id": c, "data": {"image": f"{fake_ls.url}/img/outage-{c}.png"}}])["results"][0]
        assert "result" in back
    finally:
        redis_server.kill()
        redis_server.wait(10)


def test_prelabel_writes_every_prediction_once_and_resumes(shared_workers, service_settings, fake_ls, task_ids):
    ids = task_ids(6)
    project_id = ids[0]
    images = [f"{fake_ls.url}/img/pre-{t}.png" for t in ids[:4]] + [f"{fake_ls.url}/bad/{ids[4]}.png", None]
    tasks = [{"id": t, "data": {"image": img} if img else {"other": 1}} for t, img in zip(ids, images, strict=True)]
    fake_ls.add_project(project_id, BRUSH, tasks, extra_params='{"preset": "voc"}')
    settings = service_settings()
    command = [sys.executable, "-m", "car_backend.cli", "prelabel", "--project", str(project_id)]
    first = subprocess.run(command, env=settings_env(settings), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "wrote 6 predictions (2 empty" in first.stdout
    posted = {t: fake_ls.predictions_for(t) for t in ids}
    assert all(len(p) == 1 for p in posted.values()), posted
    versions = {p[0]["model_version"] for p in posted.values()}
    assert len(versions) == 1 and "-voc-" in versions.pop()  # the backend's extra_params count
    assert posted[ids[4]][0]["result"] == [] and posted[ids[5]][0]["result"] == []
    second = subprocess.run(command, env=settings_env(settings), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "6 already had" in second.stdout and "wrote 0 predictions" in second.stdout
    assert all(len(fake_ls.predictions_for(t)) == 1 for t in ids)


def test_prelabel_without_redis_runs_jobs_in_its_own_process(service_settings, fake_ls, task_ids):
    ids = task_ids(3)
    fake_ls.add_project(ids[0], BRUSH, [{"id": t, "data": {"image": f"{fake_ls.url}/img/alone-{t}.png"}} for t in ids])
    env = settings_env(service_settings(redis_url=""))
    env.pop("REDIS_URL")
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "prelabel", "--project", str(ids[0])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 predictions (0 empty" in done.stdout
    assert all(len(fake_ls.predictions_for(t)) == 1 for t in ids)


def test_prelabel_images_writes_an_import_file_offline(tmp_path):
    from tests.support.fake_label_studio import image_bytes
    from tests.support.settings import tiny_settings

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes("a"))
    (folder / "b.png").write_bytes(image_bytes("b"))
    (folder / "broken.jpg").write_bytes(b"no image")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "tasks.json"
    env = settings_env(tiny_settings())
    env.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "prelabel", "--images", str(folder),
                           "--labels", "sky, grass", "--out", str(out), "--format", "polygon"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"].rsplit("/", 1)[-1] for t in tasks] == ["a.png", "b.png", "broken.jpg"]
    assert [len(t.get("predictions", [])) for t in tasks] == [1, 1, 0]
    for region in tasks[0]["predictions"][0]["result"]:
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"][0] in ("sky", "grass")
    assert "PolygonLabels" in done.stdout
    # with a URL prefix, tasks point where Label Studio can open the files
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "prelabel", "--images", str(folder),
                           "--labels", "sky", "--out", str(out), "--url-prefix", "/data/local-files/?d=set/"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d=set/{n}" for n in ("a.png", "b.png",
                                                                                           "broken.jpg")]
    assert [len(t.get("predictions", [])) for t in tasks] == [1, 1, 0]


def test_embedded_mode_runs_jobs_in_process(service_settings, fake_ls, task_ids):
    """REDIS_URL unset: a private Redis and a worker thread, the same queue code as with real workers."""
    settings = service_settings(redis_url="", predict_wait=60.0)
    backend = Backend(settings)
    try:
        assert backend.mode == "embedded" and backend.connection.url.startswith("unix://")
        client = create_app(settings, backend).test_client()
        ids = task_ids(2)
        body = predict(client, [{"id": t, "data": {"image": f"{fake_ls.url}/img/embedded-{t}.png"}} for t in ids])
        assert all("result" in e for e in body["results"])
        assert client.get("/health").get_json()["workers"] == 1
    finally:
        backend.close()


def test_serve_runs_waitress_with_the_embedded_worker(fake_ls, service_settings, task_ids):
    import requests

    from tests.support.redis import free_port

    port = free_port()
    env = settings_env(service_settings(redis_url="", port=port, host="127.0.0.1", predict_wait=60.0))
    env.pop("REDIS_URL")
    server = subprocess.Popen([sys.executable, "-m", "car_backend.cli", "serve"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"{base}/health", timeout=1)
                break
            except requests.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        assert health.json()["mode"] == "embedded"
        (task_id,) = task_ids(1)
        task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/served-{task_id}.png"}}
        predicted = requests.post(f"{base}/predict", json={"tasks": [task], "label_config": BRUSH}, timeout=90)
        assert "result" in predicted.json()["results"][0]
        started = time.monotonic()
        assert requests.get(f"{base}/health", timeout=1).status_code == 200
        assert time.monotonic() - started < 0.5
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output


def test_an_interactive_keypoint_returns_the_pointed_part_of_its_labels_mask(shared_workers, service_settings,
                                                                           make_client, fake_ls, task_ids):
    """Real workers, interactive config: a keypoint drawn with "car" answers with the connected part of the
    car mask (as CaR finds it for "car" alone) under the point, labelled car."""
    import numpy as np
    from label_studio_sdk.converter.brush import decode_rle

    from car_backend.labelstudio.interactive import Point, narrow_mask

    xml = (REPO / "label_config" / "interactive.xml").read_text()
    client = make_client(service_settings())

    def ask(task, *regions):
        body = client.post("/predict", json={"tasks": [task], "label_config": xml, "project": "7.1",
                                             "params": {"context": {"result": list(regions)}}}).get_json()
        return body["results"][0]["result"]

    def car_mask(regions):
        mask = np.zeros((64, 96), bool)
        for region in regions:
            assert region["value"]["brushlabels"] == ["car"]
            mask |= decode_rle(region["value"]["rle"]).reshape(64, 96, 4)[..., 3] > 0
        return mask

    checked = 0
    for task_id in task_ids(4):
        task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/kp-{task_id}.png"}}
        full = car_mask(ask(task, {"type": "textarea", "from_name": "prompt", "value": {"text": ["car"]}}))
        if not full.any():
            continue  # random weights found no car here
        y, x = (int(v) for v in np.argwhere(full)[len(np.argwhere(full)) // 2])
        point = {"x": (x + 0.5) / 96 * 100, "y": (y + 0.5) / 64 * 100}
        regions = ask(task, {"type": "keypointlabels", "from_name": "points", "is_positive": True,
                             "value": {**point, "width": 1, "keypointlabels": ["car"]}})
        expected = narrow_mask(full, [Point(point["x"], point["y"], True)])
        assert expected.any() and (car_mask(regions) == expected).all()
        checked += 1
    assert checked, "no test image gave a car mask to point at"
