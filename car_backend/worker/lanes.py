"""How interactive lanes are named (worker.process.Lane): the name of the worker that runs the lane plus
LANE_SUFFIX, plus `-<n>` for each restart of the lane process and of its RQ worker. `car-backend worker
--check` (worker.health) leaves lanes out; the worker starts its lane again when it dies.
"""

from __future__ import annotations

import re

LANE_SUFFIX = "-interactive"
LANE_NAME = re.compile(re.escape(LANE_SUFFIX) + r"(-\d+)*$")


def is_lane(name: str) -> bool:
    """Whether an RQ worker name is an interactive lane's."""
    return LANE_NAME.search(name) is not None
