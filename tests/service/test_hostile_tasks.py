"""Hostile image URLs through the whole service: /predict, the queue, a real worker process.

Each task with a hostile URL gets its own error entry (pending with the reason where only CAR_ALLOWED_HOSTS
refuses it, so listing the host later fetches it), the control task in the same request is predicted,
nothing connects to the attacker (127.0.0.2) and no Authorization header reaches anything but Label Studio.
"""

from __future__ import annotations

import pytest

from car_backend.testing.attacker import AttackerServer
from tests.support.service import predict
from tests.support.urls import RESOLVED_FORMS, hostile_forms

pytestmark = pytest.mark.integration


def test_every_hostile_url_is_a_clear_per_task_error(service_settings, make_client, spawn_worker, fake_ls, task_ids):
    with AttackerServer() as attacker:
        forms = {name: url for name, url in hostile_forms(fake_ls.port, attacker.port).items()
                 if name not in RESOLVED_FORMS}  # the worker uses the system resolver, which knows no test names
        settings = service_settings(predict_wait=60.0, queue=f"hostile-{task_ids(1)[0]}")
        spawn_worker(settings)
        client = make_client(settings)
        ids = task_ids(len(forms) + 1)
        tasks = [{"id": ids[0], "data": {"image": f"{fake_ls.url}/img/hostile-control.png"}}]
        tasks += [{"id": task_id, "data": {"image": url}} for task_id, url in zip(ids[1:], forms.values(), strict=True)]
        seen_before = len(fake_ls.seen)
        results = predict(client, tasks)["results"]
        control, hostile = results[0], results[1:]
        assert control.get("result") and "error" not in control
        for name, entry in zip(forms, hostile, strict=True):
            if entry.get("status") == "pending":  # a setting decides it (the host is not listed): asked again later
                assert "result" not in entry and "CAR_ALLOWED_HOSTS" in entry["reason"], (name, entry)
                text = entry["reason"]
            else:  # the URL's form or a forbidden address: permanent
                assert entry.get("result") == [] and entry.get("error"), (name, entry)
                text = entry["error"]
            assert fake_ls.api_key not in text
        assert attacker.connections == 0 and attacker.authorizations() == []
        # Label Studio itself saw only the control image and API calls, each with its own token
        media = [s for s in fake_ls.seen[seen_before:] if not s.path.startswith("/api/")]
        assert [s.path for s in media] == ["/img/hostile-control.png"]
