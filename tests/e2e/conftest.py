"""Fixtures for end-to-end tests against a real Label Studio 1.23.2 (see tests/support/label_studio.py).

    @pytest.mark.e2e
    def test_something(label_studio, ls_settings, image_file):
        client = label_studio.client
        project = client.create_project(read_config("brush.xml"))
        (task_id,) = client.upload_images(project["id"], [image_file])
        ...

The first session installs Label Studio into <repo>/.cache/label-studio-venv (a few minutes) and migrates
a template database once; later sessions start it in seconds. One server serves the whole test session;
its output is in <repo>/.cache/e2e/label-studio.log. `read_config` is tests.support.label_configs'.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from car_backend.settings import Settings
from tests.support.label_studio import LabelStudioServer, start_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    """A running Label Studio with an admin user, its personal access token (`.pat`) and a `.client`."""
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    yield server
    server.stop()


@pytest.fixture
def ls_settings(label_studio) -> Settings:
    """car-backend settings that point at this Label Studio with the admin's personal access token."""
    return Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.pat)


@pytest.fixture
def image_file(tmp_path) -> Path:
    """A 64x48 JPEG: grey background, a red box at x 8..31, y 10..37, a blue box at x 40..59, y 4..19."""
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    image.paste((220, 20, 20), (8, 10, 32, 38))
    image.paste((20, 20, 220), (40, 4, 60, 20))
    path = tmp_path / "boxes.jpg"
    image.save(path, quality=95)
    return path
