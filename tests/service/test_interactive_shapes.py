"""Interactive contexts of any JSON shape: answered (the odd parts ignored) or 400, never 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INTERACTIVE = (REPO / "label_config" / "interactive.xml").read_text()
BIG = 10 ** 400  # a JSON integer no float holds

REGION_SHAPES = [
    {"from_name": "prompt", "type": "textarea", "value": "a car"},  # TextArea value a string, not an object
    {"from_name": "prompt", "type": "textarea", "value": {"text": "a car"}},
    {"from_name": "prompt", "type": "textarea", "value": {"text": 5}},
    {"from_name": "prompt", "type": "textarea", "value": {"text": [None, 3, {"a": 1}, ["b"], "car"]}},
    {"from_name": "prompt", "type": "textarea", "value": None},
    {"from_name": "prompt", "type": "textarea", "value": [["car"]]},
    {"from_name": ["prompt"], "type": {"t": 1}, "value": {"text": ["car"]}},
    {"from_name": "points", "type": "keypointlabels", "value": {"x": BIG, "y": 1, "keypointlabels": ["car"]}},
    {"from_name": "points", "type": "keypointlabels", "value": {"x": float("nan"), "y": float("inf"),
                                                                "keypointlabels": ["car"]}},
    {"from_name": "points", "type": "keypointlabels", "value": {"x": "50", "y": [50], "keypointlabels": "car"}},
    {"from_name": "points", "type": "keypointlabels", "is_positive": {"no": 1},
     "value": {"x": 50, "y": 50, "keypointlabels": [{"label": "car"}, 7]}},
    {"from_name": "box", "type": "rectanglelabels", "value": {"x": -1e308, "y": 1e308, "width": BIG,
                                                              "height": True, "rectanglelabels": None}},
    {"type": "rectanglelabels", "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": "car"}},
]
CONTEXTS = [
    "a string", 5, 1.5, True, None, [], ["result"], {}, {"result": None}, {"result": "textarea"},
    {"result": 7}, {"result": {"value": {"text": "car"}}}, {"result": [None, 1, "x", [], [[{}]]]},
    *({"result": [region]} for region in REGION_SHAPES),
    {"result": REGION_SHAPES},
]


@pytest.fixture
def client(service_settings, make_client):
    return make_client(service_settings(predict_wait=0.5))


def _body(context, fake_ls) -> str:
    task = {"id": 1, "data": {"image": f"{fake_ls.url}/img/shapes.png"}}
    # allow_nan: Python's JSON reader takes NaN and Infinity, so a caller can send them
    return json.dumps({"tasks": [task], "label_config": INTERACTIVE, "params": {"context": context}})


@pytest.mark.parametrize("context", CONTEXTS, ids=[f"context{i}" for i in range(len(CONTEXTS))])
def test_any_interactive_context_is_answered_or_refused_never_500(client, fake_ls, context):
    response = client.post("/predict", data=_body(context, fake_ls), content_type="application/json")
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    body = response.get_json()
    if response.status_code == 200:
        assert len(body["results"]) == 1
    else:
        assert body["error"]


def test_deeply_nested_json_is_refused_not_500(client):
    nested = "[" * 100_000 + "]" * 100_000
    response = client.post("/predict", data=f'{{"tasks": [], "label_config": "x", "params": {{"context": {nested}}}}}',
                           content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
