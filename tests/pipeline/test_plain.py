"""JSON forms of the pipeline's dataclasses: round trips keep objects and job keys; wrong shapes are refused."""

from __future__ import annotations

import json

import pytest

from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.interactive import Focus, Point
from car_backend.pipeline.plain import PlainError, from_plain, to_plain
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobSpec, Project
from car_backend.pipeline.versions import model_version
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings


def _spec(**settings_overrides) -> JobSpec:
    settings = tiny_settings(**settings_overrides)
    config = parse_label_config(label_config("brush"))
    project = Project(config, model_version(settings, config))
    return plan_task({"id": 7, "data": {"image": "http://h/plain.png"}}, project, settings).specs[0]


@pytest.mark.parametrize("spec", [
    _spec(),
    _spec(polygon_tolerance=2),  # an int where the field says float: must hash the same after the trip
])
def test_a_job_spec_survives_json_with_its_key(spec):
    spec = JobSpec(**{**spec.__dict__, "focus": Focus((Point(10.0, 20.5, True, "car"), Point(3, 4, False)),
                                                       ((1.0, 2.0, 30.0, 40.0),)),
                      "thresholds": (("confidence_threshold", 0.3), ("mask_threshold", 1))})
    back = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.key == spec.key


def test_missing_fields_take_defaults_and_unknown_ones_are_ignored():
    data = _spec().to_dict()
    del data["focus"], data["thresholds"]
    data["added_by_a_newer_version"] = 1
    back = JobSpec.from_dict(data)
    assert back.focus is None and back.thresholds == ()


@pytest.mark.parametrize("change, where", [
    (lambda d: d.update(runs="not a list"), "JobSpec.runs"),
    (lambda d: d["runs"][0].update(queries=[1, 2]), "JobSpec.runs[0].queries[0]"),
    (lambda d: d.update(polygon_tolerance=True), "JobSpec.polygon_tolerance"),
    (lambda d: d.pop("image"), "JobSpec"),
])
def test_data_of_another_shape_is_refused_with_where(change, where):
    data = _spec().to_dict()
    change(data)
    with pytest.raises(PlainError) as caught:
        JobSpec.from_dict(data)
    assert str(caught.value).startswith(where)
    assert caught.value.retryable is False


def test_to_plain_gives_json_values_only():
    plain = to_plain(_spec())
    assert json.loads(json.dumps(plain)) == plain
    assert from_plain(JobSpec, plain) == _spec()
