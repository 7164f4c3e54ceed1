"""Fault scenarios for delivery: late writes under outages, slow answers, killed workers and expiry.

Each scenario runs real `car-backend worker` processes on a real Redis and the fake Label Studio, sends the
tasks of one project to /predict (through the real app, answering pending at once), then breaks something
while the workers write the late predictions through the API. It ends when every task has a prediction of
the project's model_version (or a deadline), waits a little for stragglers, and counts per task the
predictions Label Studio stored: `lost` (none) and `duplicated` (copies beyond the first).

    ls_down             Label Studio's API refuses connections for a while during the late writes
    store_then_timeout  every task's first write is stored, then answered after the client's timeout
    worker_killed       a worker is SIGKILLed three times during the run, the first time inside a write
    late_outlives_ttl   the jobs wait (no worker) longer than the old 35-minute late-record TTL: Redis's
                        clock is advanced by rewriting every key's TTL, not slept through
    redis_restarted     a Redis with append-only persistence is stopped and started again mid-batch

Used by tests/service/test_faults.py (few tasks) and benchmarks/faults.py (more).
"""

from __future__ import annotations

import dataclasses
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.queue.ledger import DeliveryLedger
from car_backend.queue.state import lock_ttl
from car_backend.settings import Settings
from car_backend.testing.fake_label_studio import FakeLabelStudio
from car_backend.testing.processes import WorkerProcess, start_worker
from car_backend.testing.redis import free_port, start_redis_server
from car_backend.testing.settings import tiny_settings

ROOT = Path(__file__).resolve().parents[2]
LABEL_CONFIG = (ROOT / "label_config" / "brush.xml").read_text()
DEADLINE_S = 240.0  # a scenario gives up waiting for its writes after this long
SETTLE_S = 2.0  # after the last task got its prediction, copies arriving this late still count
CREATED = 1700000000  # the creation stamp of every scenario's project (sent as "<id>.<created>")


@dataclass
class ScenarioResult:
    scenario: str
    tasks: int
    lost: int
    duplicated: int
    seconds_to_last_write: float
    faults: int = 0  # requests refused or answered late, workers killed, late sets that outlived the old TTL
    note: str = ""


@dataclass
class Run:
    """One scenario's world: its settings, fake Label Studio, project, tasks and workers."""

    name: str
    settings: Settings
    fake: FakeLabelStudio
    project: int
    tasks: list[dict]
    log_dir: Path
    workers: list[WorkerProcess] = dataclasses.field(default_factory=list)
    version: str = ""
    started: float = 0.0

    def spawn(self) -> WorkerProcess:
        worker = start_worker(self.settings, self.log_dir)
        self.workers.append(worker)
        return worker

    def predict(self) -> None:
        """The tasks through /predict, as Label Studio sends a retrieve: every answer must be pending."""
        from car_backend.service.app import create_app
        from car_backend.service.backend import Backend

        backend = Backend(self.settings)
        try:
            client = create_app(self.settings, backend).test_client()
            body = {"tasks": self.tasks, "label_config": LABEL_CONFIG, "project": f"{self.project}.{CREATED}"}
            answer = client.post("/predict", json=body).get_json()
            self.version = answer["model_version"]
            answered = [e for e in answer["results"] if "result" in e]
            if answered:
                raise AssertionError(f"{len(answered)} tasks were answered directly; the scenario needs late writes")
        finally:
            backend.close()

    def wait_for_writes(self, deadline_s: float = DEADLINE_S) -> None:
        ids = [t["id"] for t in self.tasks]
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            counts = self.fake.prediction_counts()
            if all(counts[(t, self.version)] for t in ids):
                break
            time.sleep(0.2)
        time.sleep(SETTLE_S)

    def result(self, faults: int, note: str = "") -> ScenarioResult:
        counts = self.fake.prediction_counts()
        ids = [t["id"] for t in self.tasks]
        lost = sum(1 for t in ids if counts[(t, self.version)] == 0)
        duplicated = sum(max(0, counts[(t, self.version)] - 1) for t in ids)
        times = [p["at"] for p in self.fake.predictions if p["task"] in set(ids)]
        last = max(times) - self.started if times else float("nan")
        return ScenarioResult(self.name, len(ids), lost, duplicated, round(last, 2), faults, note)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=5)


def advance_expiry(redis: Redis, seconds: float) -> int:
    """Make Redis act as if `seconds` had passed: every key with a TTL loses `seconds` of it, and those with
    less left are deleted (the test database's own keys only). The number of keys deleted."""
    deleted = 0
    for key in redis.scan_iter(count=500):
        if key.startswith(b"car-tests:"):
            continue  # the test session's claim on this database
        left = redis.pttl(key)
        if left is None or left < 0:
            continue
        if left <= seconds * 1000:
            deleted += redis.delete(key)
        else:
            redis.pexpire(key, int(left - seconds * 1000))
    return deleted


def _world(name: str, redis_url: str, log_dir: Path, tasks: int, fake: FakeLabelStudio, image: str,
           **settings: object) -> Run:
    tag = uuid.uuid4().hex[:8]
    project = int(tag, 16) % 1_000_000 + 1000
    values = {"redis_url": redis_url, "label_studio_url": fake.url, "label_studio_api_key": fake.api_key,
              "queue": f"faults-{name}-{tag}", "predict_wait": 0.0, "delivery_retry_max": 1.0, "job_retries": 2}
    values.update(settings)
    task_list = [{"id": project * 10_000 + i, "data": {"image": f"{fake.url}{image}/{tag}-{i}.png"}}
                 for i in range(tasks)]
    fake.add_project(project, LABEL_CONFIG, task_list)
    return Run(name, tiny_settings(**values), fake, project, task_list, log_dir)


def ls_down(redis_url: str, log_dir: Path, tasks: int, down_s: float = 5.0) -> ScenarioResult:
    with FakeLabelStudio() as fake:
        run = _world("ls_down", redis_url, log_dir, tasks, fake, "/img")
        try:
            run.spawn()
            run.started = time.time()
            fake.go_down(down_s, mode="refuse", from_first_request=True)  # from the first late write on
            run.predict()  # /predict itself never calls Label Studio's API
            run.wait_for_writes()
            return run.result(fake.faults_served, f"API refusing connections for {down_s:.0f} s from the first "
                              f"write; {fake.faults_served} requests refused")
        finally:
            run.stop()


def store_then_timeout(redis_url: str, log_dir: Path, tasks: int) -> ScenarioResult:
    with FakeLabelStudio() as fake:
        run = _world("store_then_timeout", redis_url, log_dir, tasks, fake, "/img", ls_timeout=1.0)
        fake.slow_first_writes = 2.5
        try:
            run.spawn()
            run.started = time.time()
            run.predict()
            run.wait_for_writes()
            return run.result(fake.faults_served, f"each task's first write stored, answered 2.5 s later (client "
                              f"timeout 1 s): {fake.faults_served} late answers")
        finally:
            run.stop()


def worker_killed(redis_url: str, log_dir: Path, tasks: int) -> ScenarioResult:
    """Two workers; SIGKILL the one holding the project's delivery lease while Label Studio holds its first
    write unanswered, then two more workers mid-job; each killed one is replaced."""
    with FakeLabelStudio() as fake:
        run = _world("worker_killed", redis_url, log_dir, tasks, fake, "/slow/0.3", ls_timeout=3.0)
        fake.slow_first_writes = 2.0  # a write stays in flight long enough to be killed inside
        redis = Redis.from_url(redis_url)
        kills = 0
        try:
            run.spawn()
            run.spawn()
            run.started = time.time()
            run.predict()
            lease = DeliveryLedger.LEASE.key(
                ProjectId(instance_of(run.settings.label_studio_url), run.project, CREATED).key)
            deadline = time.monotonic() + DEADLINE_S / 2
            while time.monotonic() < deadline and kills == 0:
                holder = redis.get(lease)
                if holder is not None and fake.predictions:  # stored, answer held back: inside the write
                    name = holder.decode().removeprefix("deliver:")
                    victim = next((w for w in run.workers if w.name == name and w.proc.poll() is None), None)
                    if victim is not None:
                        _kill(victim)
                        kills += 1
                        run.spawn()
                time.sleep(0.02)
            for _ in range(2):  # two more, in the middle of jobs
                time.sleep(1.0)
                victim = next((w for w in run.workers if w.proc.poll() is None), None)
                if victim is not None:
                    _kill(victim)
                    kills += 1
                    run.spawn()
            run.wait_for_writes()
            return run.result(kills, f"{kills} workers SIGKILLed, the first inside a write")
        finally:
            redis.close()
            run.stop()


def late_outlives_ttl(redis_url: str, log_dir: Path, tasks: int) -> ScenarioResult:
    with FakeLabelStudio() as fake:
        run = _world("late_outlives_ttl", redis_url, log_dir, tasks, fake, "/img")
        redis = Redis.from_url(redis_url)
        try:
            run.started = time.time()
            run.predict()  # no worker yet: the jobs wait in the queue
            old_ttl = lock_ttl(run.settings)  # what late records used to live (35 minutes by default)
            deleted = advance_expiry(redis, old_ttl + 60)
            late = sum(1 for _ in redis.scan_iter(match=DeliveryLedger.LATE.pattern()))
            run.spawn()
            run.wait_for_writes()
            return run.result(late if deleted else 0, f"Redis clock advanced {old_ttl + 60} s ({deleted} keys "
                              f"expired, {late} late sets left); then a worker started")
        finally:
            redis.close()
            run.stop()


def redis_restarted(redis_url: str, log_dir: Path, tasks: int) -> ScenarioResult:
    """A Redis of its own with append-only persistence, stopped (SIGTERM) and started again mid-batch;
    `redis_url` is not used."""
    port = free_port()
    data = log_dir / f"redis-aof-{port}"
    data.mkdir(parents=True, exist_ok=True)
    server = start_redis_server(port, append_only_dir=data)
    with FakeLabelStudio() as fake:
        run = _world("redis_restarted", f"redis://127.0.0.1:{port}/0", log_dir, tasks, fake, "/slow/0.5")
        try:
            run.spawn()
            run.started = time.time()
            run.predict()
            deadline = time.monotonic() + DEADLINE_S / 2
            while not fake.predictions and time.monotonic() < deadline:  # mid-batch: some written, most not
                time.sleep(0.05)
            server.terminate()
            server.wait(10)
            time.sleep(1.0)
            server = start_redis_server(port, append_only_dir=data)
            run.wait_for_writes()
            return run.result(1, "Redis (appendonly yes) stopped and started again after the first write")
        finally:
            run.stop()
            server.terminate()
            server.wait(10)


SCENARIOS: dict[str, Callable[[str, Path, int], ScenarioResult]] = {
    "ls_down": ls_down,
    "store_then_timeout": store_then_timeout,
    "worker_killed": worker_killed,
    "late_outlives_ttl": late_outlives_ttl,
    "redis_restarted": redis_restarted,
}


def _kill(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGKILL)
    worker.proc.wait(10)
