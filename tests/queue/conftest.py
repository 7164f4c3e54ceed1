"""Fixtures of the queue tests: a fake Label Studio of each test's own (deliveries count its writes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from car_backend.testing.fake_label_studio import FakeLabelStudio


@pytest.fixture
def ls() -> Iterator[FakeLabelStudio]:
    with FakeLabelStudio() as fake:
        yield fake
