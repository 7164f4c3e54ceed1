"""`car-backend worker` processes: see car_backend.testing.processes (shared with the benchmarks)."""

from car_backend.testing.processes import WORKER_START_TIMEOUT_S, WorkerProcess, start_worker, wait_for_worker

__all__ = ["WORKER_START_TIMEOUT_S", "WorkerProcess", "start_worker", "wait_for_worker"]
