"""Service benchmark: tasks through /predict and through `prelabel --project`, with 1, 2 and 4 workers.

Everything is real except Label Studio, which is car_backend/testing/fake_label_studio.py (it records each
prediction written into it and serves the images): Redis (REDIS_URL, else a database of its own on
127.0.0.1:6379, else a private redis-server), `car-backend serve` (waitress) and `car-backend worker`
processes running the tiny random CLIP on CPU.

Per run it prints throughput, p50/p95 latency (request start to the task's delivery, whether returned by
/predict or written through the API later), and the tasks lost (never delivered) or duplicated (delivered
more than once). It also measures the queue's own overhead: a next-to-no-op job (a mask-head training of a
project without corrected tasks: a few Redis calls; workers run only car-backend's jobs), enqueue to
finished, and the latency a person sees while a pre-label runs: interactive /predict calls (one task, a
prompt typed into the TextArea) spread over a `prelabel --project` of the same size, POST to answer, with the pre-label's
throughput meanwhile (`interactive_under_batch_p50_ms` / `_p95_ms`, mode `prelabel+interactive`).
Workers split the CPU cores (OMP_NUM_THREADS = cores / workers, unless OMP_NUM_THREADS is set), as CPU
workers sharing a host must: each one taking every core makes them many times slower together.
The last line is one JSON object with keys `lost` and `duplicated` (totals) and the per-run figures.

Responsiveness (key `responsiveness`): `/health` and `/setup` latency p50/p99/max (ms), probed every
PROBE_GAP_S on fresh connections with Label Studio's timeouts (1 s, 3 s; a miss counts as the timeout),
idle (the baseline of the same run) and under each load: many `/predict` calls waiting on slow jobs, clients
dripping their bodies, jobs running in embedded mode (REDIS_URL unset); planning time for 10,000 tasks x
20 labels (plan and job keys) and the answer time of such a `/predict` against CAR_PREDICT_WAIT; the
interactive p95 while a pre-label batch of `--tasks` tasks waits with 1 worker. Goals: health p99 < 100 ms,
planning < 5 s, interactive p95 < 3 s.

    python benchmarks/service.py [--tasks 200] [--workers 1,2,4] [--interactive 20] [--quick]
                                 [--only responsiveness|planning]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.job import Job  # noqa: E402

from car_backend.pipeline.identity import ProjectId, instance_of  # noqa: E402
from car_backend.queue.jobqueue import SERIALIZER, JobName  # noqa: E402
from car_backend.settings import Settings  # noqa: E402
from car_backend.testing.fake_label_studio import FakeLabelStudio  # noqa: E402
from car_backend.testing.processes import start_worker  # noqa: E402
from car_backend.testing.redis import claim_redis_db, free_port, port_open, start_redis_server  # noqa: E402
from car_backend.testing.settings import settings_env, tiny_settings  # noqa: E402

LABEL_CONFIG = (ROOT / "label_config" / "brush.xml").read_text()
INTERACTIVE_CONFIG = (ROOT / "label_config" / "interactive.xml").read_text()
PREDICT_WAIT_S = 60.0
DRAIN_TIMEOUT_S = 900.0
PRELABEL = [sys.executable, "-m", "car_backend.cli", "prelabel", "--project"]
PROBE_GAP_S = 0.05  # between two /health (or /setup) probes under load
LOAD_S = 8.0  # how long each load is probed
WAITING_PREDICTS = 12  # concurrent /predict calls waiting on slow jobs
SLOW_CLIENTS = 12  # concurrent clients dripping their request bodies
PLAN_TASKS, PLAN_LABELS = 10_000, 20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def redis_url(stack: contextlib.ExitStack) -> str:
    """REDIS_URL; else a database of our own on 127.0.0.1:6379; else a private redis-server."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    if port_open("127.0.0.1", 6379):
        return stack.enter_context(contextlib.contextmanager(claim_redis_db)())
    port = free_port()
    server = start_redis_server(port)
    stack.callback(server.terminate)
    return f"redis://127.0.0.1:{port}/0"


class Bench:
    def __init__(self, url: str, fake: FakeLabelStudio, log_dir: Path):
        self.url = url
        self.fake = fake
        self.log_dir = log_dir
        self.redis = Redis.from_url(url)
        self.threads_fixed = "OMP_NUM_THREADS" in os.environ

    def settings(self, **overrides):
        values = {"redis_url": self.url, "label_studio_url": self.fake.url, "label_studio_api_key": self.fake.api_key,
                  "predict_wait": PREDICT_WAIT_S, "log_level": "WARNING"}
        values.update(overrides)
        return tiny_settings(**values)

    def workers(self, settings, count: int) -> list:
        # CPU workers sharing a host must split its cores: torch's default (all cores each) oversubscribes
        # them, and OpenMP's spinning makes that many times slower than running one worker.
        if not self.threads_fixed:
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
        return [start_worker(settings, self.log_dir) for _ in range(count)]

    def warm_up(self, server: str, workers: int, tag: str, first_id: int) -> None:
        """Each worker loads the models on its first job; keep that out of the measured runs."""
        tasks = [{"id": first_id + i, "data": {"image": f"{self.fake.url}/img/warm-{tag}-{i}.png"}}
                 for i in range(3 * workers)]
        body = requests.post(f"{server}/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG},
                             timeout=600).json()
        answered = {t["id"]: 0.0 for t, e in zip(tasks, body["results"], strict=True) if "result" in e}
        self.drain([t["id"] for t in tasks], answered, time.monotonic())

    def drain(self, task_ids: list[int], answered: dict[int, float], started: float) -> dict[int, list[float]]:
        """Wait until every task got a delivery (or time runs out); delivery times per task, in seconds."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(t in answered or self.fake.predictions_for(t) for t in task_ids):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # let a would-be duplicate arrive before counting
        wall_offset = time.time() - time.monotonic()
        deliveries = {}
        for t in task_ids:
            times = [answered[t] - started] if t in answered else []
            times += [p["at"] - wall_offset - started for p in self.fake.predictions_for(t)]
            deliveries[t] = times
        return deliveries

    @contextlib.contextmanager
    def service(self, queue: str, workers: int):
        """`workers` workers and a `car-backend serve` on `queue`; yields (worker settings, server URL)."""
        settings = self.settings(queue=queue)
        pool = self.workers(settings, workers)
        port = free_port()
        env = settings_env(self.settings(queue=queue, port=port, host="127.0.0.1"))
        server = subprocess.Popen([sys.executable, "-m", "car_backend.cli", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/health")
            yield settings, base
        finally:
            server.terminate()
            server.wait(60)
            for worker in pool:
                worker.stop()

    def predict_run(self, tasks: int, workers: int) -> dict:
        with self.service(f"bench-predict-{workers}", workers) as (_, base):
            self.warm_up(base, workers, f"p{workers}", 10_000_000 + 1000 * workers)
            ids = list(range(workers * 100_000, workers * 100_000 + tasks))
            batch = [{"id": t, "data": {"image": f"{self.fake.url}/img/predict-{workers}-{t}.png"}} for t in ids]
            started = time.monotonic()
            body = requests.post(f"{base}/predict", json={"tasks": batch, "label_config": LABEL_CONFIG},
                                 timeout=PREDICT_WAIT_S + 60).json()
            answered_at = time.monotonic()
            answered = {t: answered_at for t, e in zip(ids, body["results"], strict=True) if "result" in e}
            return self.summarize("predict", workers, ids, self.drain(ids, answered, started),
                                  {"answered_by_predict": len(answered)})

    def prelabel_run(self, tasks: int, workers: int) -> dict:
        settings = self.settings(queue=f"bench-prelabel-{workers}")
        pool = self.workers(settings, workers)
        try:
            project = 900 + workers
            ids = self.add_project(project, tasks, f"prelabel-{workers}")
            warm = [{"id": 20_000_000 + workers * 100 + i,
                     "data": {"image": f"{self.fake.url}/img/warm-l{workers}-{i}.png"}} for i in range(3 * workers)]
            self.fake.add_project(project + 1000, LABEL_CONFIG, warm)
            subprocess.run(PRELABEL + [str(project + 1000)], env=settings_env(settings), capture_output=True,
                           timeout=DRAIN_TIMEOUT_S)
            started = time.monotonic()
            done = subprocess.run(PRELABEL + [str(project)], env=settings_env(settings), capture_output=True,
                                  text=True, timeout=DRAIN_TIMEOUT_S)
            if done.returncode != 0:
                print(done.stdout, done.stderr, file=sys.stderr)
            return self.summarize("prelabel", workers, ids, self.drain(ids, {}, started), {})
        finally:
            for worker in pool:
                worker.stop()

    def add_project(self, project: int, tasks: int, tag: str) -> list[int]:
        """A project of `tasks` tasks with images of their own in the fake Label Studio; their ids."""
        ids = list(range(project * 100_000, project * 100_000 + tasks))
        self.fake.add_project(project, LABEL_CONFIG, [
            {"id": t, "data": {"image": f"{self.fake.url}/img/{tag}-{t}.png"}} for t in ids])
        return ids

    def interactive_run(self, tasks: int, workers: int, calls: int, expected_s: float) -> dict:
        """`calls` interactive /predict calls spread over a pre-label of `tasks` tasks (expected to take about
        `expected_s` seconds): POST-to-answer latency, and the pre-label's throughput and deliveries."""
        with self.service(f"bench-mixed-{workers}", workers) as (settings, base):
            self.warm_up(base, workers, f"m{workers}", 30_000_000 + 1000 * workers)
            project = 800 + workers
            ids = self.add_project(project, tasks, f"mixed-{workers}")
            first_id = 40_000_000 + 1000 * workers  # interactive tasks: an image of their own each

            def ask(i: int, text: str) -> tuple[float, bool]:
                return self.ask_interactive(base, first_id + i, f"mixed-{workers}", text)

            ask(calls, "the car")  # the first referring-mode job of the run, out of the figures
            started = time.monotonic()
            prelabel = subprocess.Popen(PRELABEL + [str(project)], env=settings_env(settings),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                batch_key = Queue(settings.queue, connection=self.redis).key
                while self.redis.llen(batch_key) == 0 and prelabel.poll() is None:
                    time.sleep(0.01)  # until the pre-label's jobs wait in the batch queue
                first = time.monotonic()
                gap = max(0.05, 0.8 * max(0.0, expected_s - (first - started)) / calls)
                latencies, overlapped, unanswered = [], 0, 0
                for i in range(calls):
                    time.sleep(max(0.0, first + i * gap - time.monotonic()))
                    seconds, answered = ask(i, f"the object number {i}")
                    latencies.append(seconds)
                    unanswered += not answered
                    overlapped += prelabel.poll() is None and self.redis.llen(batch_key) > 0
                out, err = prelabel.communicate(timeout=DRAIN_TIMEOUT_S)
            finally:
                if prelabel.poll() is None:
                    prelabel.kill()
                    prelabel.wait(10)
            if prelabel.returncode != 0:
                print(out, err, file=sys.stderr)
            extra = {"interactive_calls": calls, "interactive_during_batch": overlapped,
                     "interactive_unanswered": unanswered,
                     "interactive_under_batch_p50_ms": round(1000 * percentile(latencies, 0.5), 1),
                     "interactive_under_batch_p95_ms": round(1000 * percentile(latencies, 0.95), 1)}
            row = self.summarize("prelabel+interactive", workers, ids, self.drain(ids, {}, started), extra)
            print(f"{'':>8} interactive /predict under a {tasks}-task pre-label, workers={workers}: "
                  f"p50 {extra['interactive_under_batch_p50_ms']:.0f} ms  "
                  f"p95 {extra['interactive_under_batch_p95_ms']:.0f} ms  ({overlapped} of {calls} answered while "
                  f"batch jobs waited, {unanswered} unanswered); batch throughput {row['throughput']:.2f} tasks/s",
                  flush=True)
            return row

    def ask_interactive(self, server: str, task_id: int, tag: str, text: str) -> tuple[float, bool]:
        """One interactive /predict (a sentence typed into the TextArea): seconds to the answer, and whether
        it carried a prediction."""
        task = {"id": task_id, "data": {"image": f"{self.fake.url}/img/interactive-{tag}-{task_id}.png"}}
        context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": [text]}}]}
        started = time.monotonic()
        body = requests.post(f"{server}/predict", json={"tasks": [task], "label_config": INTERACTIVE_CONFIG,
                                                        "params": {"context": context}},
                             timeout=PREDICT_WAIT_S + 60).json()
        return time.monotonic() - started, "result" in body["results"][0]

    def queue_overhead(self, workers: int, jobs: int) -> dict:
        """Enqueue-to-finished time of a job that does next to nothing, one at a time, per queue: a training of
        a project that has no corrected task (workers fail any job that is not one of car-backend's)."""
        settings = self.settings(queue=f"bench-noop-{workers}")
        empty = ProjectId(instance_of(settings.label_studio_url), 990_000 + workers)  # no corrections: trains nothing
        pool = self.workers(settings, workers)
        try:
            out = {}
            for name in (f"{settings.queue}-interactive", settings.queue):
                queue = Queue(name, connection=self.redis, serializer=SERIALIZER)  # workers run JSON jobs only
                times = []
                for _ in range(jobs):
                    started = time.monotonic()
                    job = queue.enqueue(JobName.FIT.value, empty.key, result_ttl=60)
                    while (status := Job.fetch(job.id, connection=self.redis, serializer=SERIALIZER)
                           .get_status()) != "finished":
                        if status == "failed":
                            raise RuntimeError(f"the no-op job failed on {name}:\n{pool[0].output()[-2000:]}")
                        time.sleep(0.001)
                    times.append(time.monotonic() - started)
                out["interactive" if name.endswith("-interactive") else "batch"] = {
                    "p50_ms": round(1000 * statistics.median(times), 2),
                    "p95_ms": round(1000 * percentile(times, 0.95), 2)}
            return out
        finally:
            for worker in pool:
                worker.stop()

    @staticmethod
    def summarize(mode: str, workers: int, ids: list[int], deliveries: dict[int, list[float]], extra: dict) -> dict:
        firsts = [min(times) for times in deliveries.values() if times]
        lost = sum(1 for times in deliveries.values() if not times)
        duplicated = sum(1 for times in deliveries.values() if len(times) > 1)
        span = max(firsts) if firsts else float("nan")
        row = {"mode": mode, "workers": workers, "tasks": len(ids), "seconds": round(span, 2),
               "throughput": round(len(firsts) / span, 2) if firsts else 0.0,
               "p50_s": round(percentile(firsts, 0.5), 2), "p95_s": round(percentile(firsts, 0.95), 2),
               "lost": lost, "duplicated": duplicated, **extra}
        print(f"{mode:>8} workers={workers}  {row['throughput']:6.2f} tasks/s  p50 {row['p50_s']:6.2f} s  "
              f"p95 {row['p95_s']:6.2f} s  lost {lost}  duplicated {duplicated}  {extra or ''}", flush=True)
        return row


def latency_summary(seconds: list[float]) -> dict:
    ms = [1000 * s for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 1), "p99_ms": round(percentile(ms, 0.99), 1),
            "max_ms": round(max(ms), 1) if ms else float("nan")}


def probe(base: str, seconds: float) -> dict:
    """/health and /setup latencies for `seconds`, one probe every PROBE_GAP_S, each on a new connection with
    Label Studio's timeouts; a timed-out or failed probe counts as its timeout."""
    health, setup = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path, timeout, out in (("/health", 1.0, health), ("/setup", 3.0, setup)):
            started = time.monotonic()
            try:
                if path == "/health":
                    ok = requests.get(f"{base}{path}", timeout=timeout).ok
                else:
                    ok = requests.post(f"{base}{path}", json={"project": "1.1", "schema": LABEL_CONFIG},
                                       timeout=timeout).ok
            except requests.RequestException:
                ok = False
            out.append(time.monotonic() - started if ok else timeout)
            time.sleep(PROBE_GAP_S)
    return {"health": latency_summary(health), "setup": latency_summary(setup)}


def drip_body(base: str, seconds: float) -> None:
    """A client that sends its headers, then one byte of its body every 0.5 s for `seconds` at most."""
    port = int(base.rsplit(":", 1)[1])
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(b" ")
            time.sleep(0.5)


class Responsiveness:
    """The responsiveness section (see the module docstring); `run()` returns its figures."""

    def __init__(self, bench: Bench, tasks: int, calls: int):
        self.bench = bench
        self.tasks = tasks
        self.calls = calls

    @contextlib.contextmanager
    def server(self, **overrides):
        port = free_port()
        settings = self.bench.settings(port=port, host="127.0.0.1", **overrides)
        env = settings_env(settings)
        if not settings.redis_url:
            env.pop("REDIS_URL")
        proc = subprocess.Popen([sys.executable, "-m", "car_backend.cli", "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/health")
            yield base
        finally:
            proc.terminate()
            proc.wait(60)

    def run(self, interactive: bool) -> dict:
        """The figures; with `interactive`, the interactive-under-batch run too (else main() takes it from the
        mixed run with 1 worker)."""
        out = {}
        queue = f"bench-resp-{os.getpid()}"
        settings = self.bench.settings(queue=queue)
        pool = self.bench.workers(settings, 1)
        try:
            with self.server(queue=queue, predict_wait=LOAD_S + 10) as base:
                out["idle"] = probe(base, LOAD_S / 2)
                out["waiting_predicts"] = self.under(base, self.waiting_predicts, queue)
                out["slow_clients"] = self.under(base, lambda b: [threading.Thread(
                    target=drip_body, args=(b, LOAD_S + 2), daemon=True) for _ in range(SLOW_CLIENTS)])
        finally:
            for worker in pool:
                worker.stop()
        with self.server(redis_url="", predict_wait=0.0) as base:
            batch = [{"id": 60_000_000 + i, "data": {"image": f"{self.bench.fake.url}/img/resp-emb-{i}.png"}}
                     for i in range(40)]
            requests.post(f"{base}/predict", json={"tasks": batch, "label_config": LABEL_CONFIG}, timeout=60)
            time.sleep(2.0)  # the embedded worker loads the models and starts on the jobs
            out["embedded_jobs"] = probe(base, LOAD_S)
        out["planning"] = self.planning()
        if interactive:
            out["interactive_under_batch"] = interactive_figures(
                self.bench.interactive_run(self.tasks, 1, self.calls, expected_s=60.0))
        for load in ("idle", "waiting_predicts", "slow_clients", "embedded_jobs"):
            figures = out[load]
            print(f"responsiveness {load:>16}: /health p50 {figures['health']['p50_ms']} ms p99 "
                  f"{figures['health']['p99_ms']} ms max {figures['health']['max_ms']} ms; /setup p50 "
                  f"{figures['setup']['p50_ms']} ms p99 {figures['setup']['p99_ms']} ms max "
                  f"{figures['setup']['max_ms']} ms", flush=True)
        print(f"planning {PLAN_TASKS} tasks x {PLAN_LABELS} labels: {out['planning']}", flush=True)
        return out

    def under(self, base: str, start_load, *args) -> dict:
        threads = start_load(base, *args) if args else start_load(base)
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every call is in
        figures = probe(base, LOAD_S)
        for thread in threads:
            thread.join(120)
        return figures

    def waiting_predicts(self, base: str, queue: str) -> list[threading.Thread]:
        fake = self.bench.fake

        def call(index: int) -> None:
            tasks = [{"id": 61_000_000 + 10 * index + i,
                      "data": {"image": f"{fake.url}/slow/30/resp-{queue}-{index}-{i}.png"}} for i in range(3)]
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{base}/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG}, timeout=60)

        return [threading.Thread(target=call, args=(i,), daemon=True) for i in range(WAITING_PREDICTS)]

    def planning(self) -> dict:
        """Plan and job keys of PLAN_TASKS tasks x PLAN_LABELS labels in this process, and one such /predict
        at default settings (CAR_PREDICT_WAIT, CAR_MAX_TASKS, CAR_MAX_REQUEST_BYTES; a project, so its tasks
        are registered for late writes; Flask test client, the benchmark's Redis, jobs on a queue no worker
        serves, a worker assumed: the call waits until its deadline). Goal: answered within
        CAR_PREDICT_WAIT + 5 s."""
        from car_backend.pipeline.planning import plan_task
        from car_backend.service.app import create_app
        from car_backend.service.backend import Backend

        labels = "".join(f'<Label value="label{i}"/>' for i in range(PLAN_LABELS))
        xml = (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}'
               "</BrushLabels></View>")
        settings = self.bench.settings(queue=f"bench-plan-{os.getpid()}", predict_wait=Settings().predict_wait)
        wait = settings.predict_wait
        tasks = [{"id": 70_000_000 + i, "data": {"image": f"{self.bench.fake.url}/img/plan-{i}.png"}}
                 for i in range(PLAN_TASKS)]
        backend = Backend(settings)
        try:
            project = backend.projects.for_predict(None, xml)
            started = time.monotonic()
            plans = [plan_task(task, project, settings) for task in tasks]
            keys = {key for plan in plans for key in plan.keys}
            planned = time.monotonic() - started
            backend.workers_available = lambda: True  # a busy worker: the call waits until its deadline
            client = create_app(settings, backend).test_client()
            started = time.monotonic()
            resp = client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "70.1"})
            answered = time.monotonic() - started
            body = resp.get_json()
            if resp.status_code != 200:
                raise RuntimeError(f"/predict of {PLAN_TASKS} tasks answered {resp.status_code}: {body}")
            queued = backend.queue.depth().batch
            for name in (settings.queue, f"{settings.queue}-interactive"):
                Queue(name, connection=self.bench.redis, serializer=SERIALIZER).empty()
        finally:
            backend.close()
        return {"tasks": PLAN_TASKS, "labels": PLAN_LABELS, "distinct_keys": len(keys),
                "plan_and_keys_s": round(planned, 2), "predict_wait_s": wait, "predict_answer_s": round(answered, 2),
                "answered_entries": len(body["results"]), "jobs_queued": queued,
                "pending_entries": sum(1 for e in body["results"] if "result" not in e),
                "within_wait_plus_5_s": answered <= wait + 5.0, "max_tasks": settings.task_limit,
                "max_request_bytes": settings.max_request_bytes}


def interactive_figures(row: dict) -> dict:
    return {"tasks": row["tasks"], "workers": row["workers"], "p50_ms": row["interactive_under_batch_p50_ms"],
            "p95_ms": row["interactive_under_batch_p95_ms"]}


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Poll GET `url` until the server answers (any status); ConnectionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200, help="tasks per run (default 200)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure (default 1,2,4)")
    parser.add_argument("--noop-jobs", type=int, default=50, help="no-op jobs for the queue overhead")
    parser.add_argument("--interactive", type=int, default=20,
                        help="interactive /predict calls during the pre-label of the mixed run (default 20)")
    parser.add_argument("--quick", action="store_true", help="40 tasks, 1 and 2 workers, 20 no-op jobs")
    parser.add_argument("--only", choices=("responsiveness", "planning"), help="run only this section")
    args = parser.parse_args()
    tasks, counts, noop = args.tasks, [int(w) for w in args.workers.split(",")], args.noop_jobs
    calls = max(1, args.interactive)
    if args.quick:
        tasks, counts, noop = 40, [1, 2], 20

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the workers and servers started here stop too
    runs, overhead, responsiveness = [], {}, {}
    with contextlib.ExitStack() as stack:
        url = redis_url(stack)
        fake = FakeLabelStudio().start()
        stack.callback(fake.stop)
        log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="car-bench-"))
        bench = Bench(url, fake, Path(log_dir))
        threads = os.environ.get("OMP_NUM_THREADS", "cores / workers")
        print(f"service benchmark: {tasks} tasks, workers {counts}, Redis {url}, torch threads per worker: "
              f"{threads}", flush=True)
        if args.only == "planning":
            planning = Responsiveness(bench, tasks, calls).planning()
            print(f"planning {PLAN_TASKS} tasks x {PLAN_LABELS} labels: {planning}", flush=True)
            print(json.dumps({"benchmark": "service", "cpus": os.cpu_count(), "planning": planning}))
            return 0 if planning["within_wait_plus_5_s"] else 1
        responsiveness = Responsiveness(bench, tasks, calls).run(interactive=args.only == "responsiveness")
        if args.only == "responsiveness":
            counts = []
        else:
            overhead = bench.queue_overhead(1, noop)
            print(f"queue overhead (no-op job, enqueue to finished, 1 worker): {overhead}", flush=True)
        for workers in counts:
            runs.append(bench.predict_run(tasks, workers))
            runs.append(bench.prelabel_run(tasks, workers))
            runs.append(bench.interactive_run(tasks, workers, calls, expected_s=runs[-1]["seconds"]))
    mixed = [r for r in runs if r["mode"] == "prelabel+interactive"]
    if "interactive_under_batch" not in responsiveness and any(r["workers"] == 1 for r in mixed):
        responsiveness["interactive_under_batch"] = interactive_figures(next(r for r in mixed if r["workers"] == 1))
    summary = {"benchmark": "service", "tasks": tasks, "workers": counts, "cpus": os.cpu_count(),
               "lost": sum(r["lost"] for r in runs), "duplicated": sum(r["duplicated"] for r in runs),
               "queue_overhead": overhead,
               "interactive_under_batch": [
                   {"workers": r["workers"], "interactive_under_batch_p50_ms": r["interactive_under_batch_p50_ms"],
                    "interactive_under_batch_p95_ms": r["interactive_under_batch_p95_ms"],
                    "batch_throughput": r["throughput"]} for r in mixed],
               "runs": runs, "responsiveness": responsiveness}
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 and summary["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
