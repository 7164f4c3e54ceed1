"""The Label Studio API client against the fake Label Studio."""

from __future__ import annotations

import pytest

from car_backend.labelstudio.client import (
    LabelStudioAPIError,
    LabelStudioClient,
    prediction_versions,
)
from tests.support.settings import tiny_settings


def test_writes_a_prediction_with_an_exchanged_access_token(fake_ls, task_ids):
    (task_id,) = task_ids(1)
    client = LabelStudioClient(tiny_settings(label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.api_key))
    client.create_prediction(task_id, {"result": [{"id": "r"}], "score": 0.4, "model_version": "v1", "extra": 1})
    (posted,) = fake_ls.predictions_for(task_id)
    assert (posted["result"], posted["score"], posted["model_version"]) == ([{"id": "r"}], 0.4, "v1")
    assert "extra" not in posted


def test_lists_every_task_page_by_page(fake_ls, task_ids):
    ids = task_ids(7)
    fake_ls.add_project(ids[0], "<View/>", [{"id": t, "data": {}} for t in ids])
    client = LabelStudioClient(tiny_settings(label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.api_key))
    client.create_prediction(ids[2], {"result": [], "model_version": "v9"})
    tasks = list(client.tasks(ids[0], page_size=3))
    assert [t["id"] for t in tasks] == ids
    assert prediction_versions(tasks[2]) == {"v9"} and prediction_versions(tasks[0]) == set()
    assert client.project(ids[0])["label_config"] == "<View/>"


def test_a_refused_key_is_reported_without_the_key(fake_ls):
    key = fake_ls.api_key[:-4] + "xxxx"
    client = LabelStudioClient(tiny_settings(label_studio_url=fake_ls.url, label_studio_api_key=key))
    with pytest.raises(LabelStudioAPIError) as caught:
        client.create_prediction(1, {"result": [], "model_version": "v1"})
    assert caught.value.retryable and key not in str(caught.value)


def test_configured_needs_url_and_key():
    assert not tiny_settings(label_studio_url="http://ls").can_write_predictions
    assert tiny_settings(label_studio_url="http://ls", label_studio_api_key="k").can_write_predictions
    assert prediction_versions({"predictions_model_versions": "a, b"}) == {"a", "b"}
