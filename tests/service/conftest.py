"""Fixtures for the service tests: the fake Label Studio, fresh task ids, settings and app clients."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from tests.support.fake_label_studio import FakeLabelStudio
from tests.support.settings import tiny_settings

_task_ids = itertools.count(1000)


@pytest.fixture(scope="session")
def fake_ls() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio().start()
    yield server
    server.stop()


@pytest.fixture
def task_ids():
    """Fresh task ids, so delivery claims of one test never meet another's."""
    return lambda n=1: [next(_task_ids) for _ in range(n)]


@pytest.fixture
def service_settings(redis_url, fake_ls):
    """settings(**overrides): tiny models, the test Redis, the fake Label Studio."""
    def make(**overrides):
        values = {"redis_url": redis_url, "label_studio_url": fake_ls.url, "label_studio_api_key": fake_ls.api_key,
                  "predict_wait": 20.0}
        values.update(overrides)
        return tiny_settings(**values)
    return make


@pytest.fixture
def make_client():
    """make_client(settings) -> a Flask test client of the real app; its backend is closed afterwards."""
    backends: list[Backend] = []

    def make(settings):
        backend = Backend(settings)
        backends.append(backend)
        return create_app(settings, backend).test_client()

    yield make
    for backend in backends:
        backend.close()
