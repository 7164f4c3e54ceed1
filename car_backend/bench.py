"""`car-backend bench engine|service|calibration|fit`: run a benchmark script from the source checkout's `benchmarks/`.

Benchmarks are scripts of the source checkout (they are not installed with the package); they import only
`car_backend`, never the tests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from car_backend.settings import Settings

CHECKOUT = Path(__file__).resolve().parents[1]


def main(args: argparse.Namespace, settings: Settings) -> int:
    script = CHECKOUT / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        print(f"car-backend bench: {script} not found; benchmarks run from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    extra = [a for a in args.args if a != "--"]
    return subprocess.call([sys.executable, str(script), *extra], cwd=CHECKOUT)
