"""`car_proposals="sam"` on a control: parsed, planned as its own run, and passed to the engine."""

from __future__ import annotations

import numpy as np
import pytest

from car_backend.engine.result import Segmentation
from car_backend.labelstudio.config import LabelConfigError, parse_label_config
from car_backend.pipeline.compute import segment_run
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobSpec, Project
from car_backend.pipeline.versions import model_version
from tests.support.settings import tiny_settings

XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="two_stage" toName="image" car_proposals="sam">
    <Label value="cat"/><Label value="dog"/>
  </BrushLabels>
  <PolygonLabels name="plain" toName="image">
    <Label value="car"/>
  </PolygonLabels>
</View>"""


class SpySegmenter:
    def __init__(self):
        self.calls = []
        self.config = tiny_settings().engine_config()

    def segment(self, image, queries, **kwargs):
        self.calls.append((list(queries), kwargs))
        return Segmentation(list(queries), np.zeros((4, 4), np.int32), np.zeros((len(queries), 4, 4), bool),
                            np.zeros(len(queries), np.float32), steps=2)


def test_car_proposals_makes_its_own_run_and_reaches_the_engine():
    settings = tiny_settings()
    config = parse_label_config(XML)
    assert [(t.from_name, t.proposals) for t in config.targets] == [("two_stage", "sam"), ("plain", None)]
    plan = plan_task({"id": 1, "data": {"image": "http://h/a.png"}}, Project(config, model_version(settings, config)),
                     settings)
    (spec,) = plan.specs
    runs = {run.proposals: run for run in spec.runs}
    assert runs["sam"].queries == ("cat", "dog") and runs[None].queries == ("car",)
    assert JobSpec.from_dict(spec.to_dict()) == spec  # the field survives the JSON form
    spy = SpySegmenter()
    segment_run(spy, "image", runs["sam"], {})
    segment_run(spy, "image", runs[None], {})
    assert spy.calls[0][1]["proposals"] == "sam" and "proposals" not in spy.calls[1][1]


def test_an_unknown_proposal_mode_is_a_label_config_error():
    with pytest.raises(LabelConfigError, match="car_proposals.*car, sam"):
        parse_label_config(XML.replace('car_proposals="sam"', 'car_proposals="ovseg"'))
