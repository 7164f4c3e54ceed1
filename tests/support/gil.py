"""A job that holds the GIL, as the dense CRF does on a large image: a C call made without releasing it.

A worker runs only car-backend's own jobs (queue.jobqueue.JobName: any other function is failed unrun), so
the GIL-holding job reaches a worker process as a segment job: `worker_pythonpath` gives that process a
`sitecustomize` which makes its segment jobs given `{HOLD: seconds}` call `hold_gil` instead (every other
segment job runs as usual).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

HOLD = "hold_gil_s"  # a segment job's argument {HOLD: seconds}: the job holds the GIL that long
ROOT = Path(__file__).resolve().parents[2]


def hold_gil(seconds: float) -> float:
    """Sleep `seconds` inside libc's usleep called through PyDLL, which keeps the GIL for the whole call:
    no other thread of this process runs meanwhile. Returns `seconds`."""
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return seconds


def install_in_worker() -> None:
    """Make this process's segment jobs (car_backend.worker.tasks.segment, which RQ looks up by name when a
    job runs) hold the GIL when their argument is {HOLD: seconds}."""
    from car_backend.worker import tasks

    real = tasks.segment

    def segment(spec: dict) -> dict | float:
        if isinstance(spec, dict) and HOLD in spec:
            return hold_gil(float(spec[HOLD]))
        return real(spec)

    tasks.segment = segment


def worker_pythonpath(folder: Path) -> str:
    """A PYTHONPATH for worker processes started from here: `folder` (given a sitecustomize.py that runs
    `install_in_worker` at start) and the repository (for this module)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.support.gil import install_in_worker\ninstall_in_worker()\n")
    return f"{folder}:{ROOT}"
