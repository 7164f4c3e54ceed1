"""Fault benchmark: late writes into Label Studio under outages, slow answers, killed workers and expiry.

Runs the scenarios of car_backend/testing/faults.py (real Redis, real `car-backend worker` processes with the
tiny random CLIP, the fake Label Studio in fault modes) and prints one row per scenario: tasks, predictions
lost (never stored) and duplicated (stored more than once), and the seconds from the start of the scenario
to the last prediction stored. The last line is one JSON object with `lost` and `duplicated` summed over
the scenarios, and the rows.

    python benchmarks/faults.py [--tasks 20] [--down 20] [--scenarios ls_down,worker_killed]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from car_backend.testing.faults import SCENARIOS, ls_down  # noqa: E402
from car_backend.testing.redis import redis_for_tests  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20, help="tasks per scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ", ".join(SCENARIOS))
    parser.add_argument("--down", type=float, default=20.0, help="seconds Label Studio's API is down in ls_down")
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    rows = []
    with contextlib.contextmanager(redis_for_tests)() as redis_url, tempfile.TemporaryDirectory(prefix="car-faults-") as tmp:
        for name in names:
            run = functools.partial(ls_down, down_s=args.down) if name == "ls_down" else SCENARIOS[name]
            rows.append(run(redis_url, Path(tmp), args.tasks))
    print(f"{'scenario':<20} {'tasks':>5} {'lost':>5} {'duplicated':>10} {'s to last write':>15}  note")
    for row in rows:
        print(f"{row.scenario:<20} {row.tasks:>5} {row.lost:>5} {row.duplicated:>10} "
              f"{row.seconds_to_last_write:>15.1f}  {row.note}")
    print(json.dumps({"lost": sum(r.lost for r in rows), "duplicated": sum(r.duplicated for r in rows),
                      "scenarios": [dataclasses.asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
