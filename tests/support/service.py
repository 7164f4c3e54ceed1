"""Service test helpers: /predict through a Flask test client, and how long a delivery may take."""

from __future__ import annotations

from tests.support.label_configs import label_config

BRUSH = label_config("brush")
DELIVERY_TIMEOUT_S = 60.0
# One brush region: what the delivery tests' cached results hold.
REGION = {"from_name": "tag", "to_name": "image", "type": "brushlabels",
          "value": {"format": "rle", "rle": [1, 2], "brushlabels": ["cat"]}}


def ls_tasks(fake_ls, project: int, tasks: list[dict], xml: str = BRUSH) -> None:
    """`tasks` as tasks of `project` in the fake Label Studio, whose label config there is `xml` unless the
    project exists already: late writes check both."""
    if project not in fake_ls.projects:
        fake_ls.add_project(project, xml, [])
    fake_ls.add_tasks(project, tasks)


def predict(client, tasks, xml=BRUSH, project="1.1"):
    """POST /predict with `tasks` and the label config `xml`; asserts HTTP 200, returns the JSON body."""
    resp = client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": project})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()
