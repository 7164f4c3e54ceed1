"""The installed rq is one car_backend.queue.rqcompat was written for: within the pin, with every internal."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

from packaging.specifiers import SpecifierSet
from rq import Queue
from rq.worker import SimpleWorker

from car_backend.queue import rqcompat

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_pins_rq_to_the_supported_range():
    pins = re.findall(r'"rq\s*([<>=!~][^"]*)"', PYPROJECT.read_text())
    assert [SpecifierSet(p) for p in pins] == [SpecifierSet(rqcompat.SUPPORTED)]


def test_the_installed_rq_is_in_the_supported_range():
    assert version("rq") in SpecifierSet(rqcompat.SUPPORTED)


def test_the_installed_rq_has_every_internal_used(redis):
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in rqcompat.INTERNALS
               if not hasattr(owner, name)]
    worker = SimpleWorker([Queue("rqcompat-check", connection=redis)], connection=redis)
    missing += [f"worker.{name}" for name in rqcompat.WORKER_INSTANCE_INTERNALS if not hasattr(worker, name)]
    assert missing == []


def test_the_installed_rq_takes_the_parameters_used():
    lacking = {func.__qualname__: sorted(set(names) - set(inspect.signature(func).parameters))
               for func, names in rqcompat.SIGNATURES}
    assert {name: params for name, params in lacking.items() if params} == {}
