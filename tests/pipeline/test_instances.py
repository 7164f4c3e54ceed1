"""Instances, boxes and tags from one CaR run: planning, computing and the regions Label Studio 1.23.2 accepts,
with a CLIP whose behaviour the test controls (tests/support/colour_model.py: it sees hue)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from label_studio_sdk.label_interface import LabelInterface

from car_backend.engine import EngineConfig, Segmenter
from car_backend.engine.instances import split_instances
from car_backend.engine.postprocess import SamRefiner
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.interactive import parse_context
from car_backend.labelstudio.results import prediction_entry
from car_backend.pipeline.compute import compute, segment_run, task_entry
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobSpec, Project
from car_backend.pipeline.versions import model_version
from tests.support.colour_model import CLASSIFIER_NEUTRAL, PROPOSAL_NEUTRAL, colour_clip, objects_scene
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings

MIXED = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="objects" toName="image" car_regions="instances">
    <Label value="red"/><Label value="blue"/><Label value="green"/>
  </BrushLabels>
  <PolygonLabels name="outlines" toName="image">
    <Label value="red"/><Label value="blue"/><Label value="green"/>
  </PolygonLabels>
  <RectangleLabels name="boxes" toName="image">
    <Label value="Red" predicted_values="red"/><Label value="blue"/><Label value="green"/>
  </RectangleLabels>
  <Choices name="tags" toName="image" choice="multiple">
    <Choice value="red"/><Choice value="blue"/><Choice value="green"/><Choice value="blurry"/>
  </Choices>
  <Choices name="best" toName="image">
    <Choice value="red"/><Choice value="blue"/>
  </Choices>
</View>"""
TASK = {"id": 7, "data": {"image": "http://h/scene.png"}}


@pytest.fixture(scope="module")
def colour_segmenter():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    models = colour_clip(PROPOSAL_NEUTRAL), colour_clip(CLASSIFIER_NEUTRAL)
    yield Segmenter(EngineConfig(device="cpu", preset="coco"), proposal_model=models[0], classifier_model=models[1])
    torch.set_num_threads(previous)


class SceneFetcher:
    """Serves one image for every reference (what MediaFetcher.fetch returns: the decoded image)."""

    def __init__(self, image):
        self.image = image
        self.fetched = 0

    def fetch(self, ref, task_id=None):
        self.fetched += 1
        return self.image


def planned(xml: str, settings, task=TASK, **plan_kwargs) -> JobSpec:
    config = parse_label_config(xml)
    plan = plan_task(task, Project(config, model_version(settings, config)), settings, **plan_kwargs)
    assert plan.failure is None and len(plan.specs) == 1
    return plan.specs[0]


def by_control(regions: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for region in regions:
        out.setdefault(region["from_name"], []).append(region)
    return out


def box_of(mask: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (round(100 * xs.min() / width, 4), round(100 * ys.min() / height, 4),
            round(100 * (xs.max() + 1 - xs.min()) / width, 4), round(100 * (ys.max() + 1 - ys.min()) / height, 4))


def test_a_mixed_config_gets_instances_boxes_and_tags_from_one_run(colour_segmenter):
    settings = tiny_settings()
    spec = planned(MIXED, settings)
    (run,) = spec.runs  # one CaR run serves every control
    assert run.queries == ("red", "blue", "green")  # the unmatched choice "blurry" adds no query
    assert [(o.target.from_name, o.kind, o.instances) for o in run.outputs] == [
        ("objects", "brush", True), ("outlines", "polygon", False), ("boxes", "rectangle", True),
        ("tags", "choices", False), ("best", "choices", False)]
    image, truth, objects = objects_scene()
    fetcher = SceneFetcher(image)
    result = compute(spec, colour_segmenter, fetcher)
    assert result.ok and fetcher.fetched == 1
    controls = by_control(result.regions)
    seg = segment_run(colour_segmenter, image, run, {})
    red, blue = float(seg.scores[0]), float(seg.scores[1])

    brushes = controls["objects"]  # instances: three red objects and a blue one, each its own region
    assert [(r["value"]["brushlabels"], r["score"]) for r in brushes] == [
        (["red"], red), (["red"], red), (["red"], red), (["blue"], blue)]
    outlines = controls["outlines"]  # semantic polygons: one per connected part, as before
    assert [r["value"]["polygonlabels"] for r in outlines] == [["red"]] * 3 + [["blue"]]

    boxes = controls["boxes"]  # one box per instance: the instances' bounding boxes
    found = split_instances(seg.label_map, seg.scores, [1, 2])
    assert len(boxes) == len(found) == 4
    for j, region in enumerate(boxes):
        value = region["value"]
        assert value["rectanglelabels"] == [["Red", "blue"][found.labels[j] - 1]] and value["rotation"] == 0
        assert (value["x"], value["y"], value["width"], value["height"]) == box_of(found.mask(j), 128, 128)
        assert region["score"] == pytest.approx(found.scores[j])
    for region, obj in zip(boxes[:3], objects, strict=True):  # and those are the objects drawn
        assert (region["value"]["x"], region["value"]["y"], region["value"]["width"],
                region["value"]["height"]) == box_of(obj, 128, 128)

    (tags,) = controls["tags"]  # choices: the kept labels
    assert tags["type"] == "choices" and tags["value"] == {"choices": sorted(seg.kept, key=["red", "blue"].index)}
    assert set(tags["value"]["choices"]) == {"red", "blue"} and tags["score"] == pytest.approx((red + blue) / 2)
    (best,) = controls["best"]  # choice="single": the best one
    assert best["value"] == {"choices": ["red" if red >= blue else "blue"]}

    entry = task_entry([result], spec.model_version)
    assert LabelInterface(MIXED).validate_prediction(entry, return_errors=True) in (True, [])


def test_instances_are_off_by_default_for_brushes_and_on_with_the_setting(colour_segmenter):
    image, _, _ = objects_scene()
    xml = label_config("brush").replace('value="person" predicted_values="person with clothes,people,human"',
                                        'value="red"').replace('value="car"', 'value="blue"')
    semantic_spec = planned(xml, tiny_settings())
    semantic = compute(semantic_spec, colour_segmenter, SceneFetcher(image))
    assert [r["value"]["brushlabels"] for r in semantic.regions] == [["red"], ["blue"]]  # one per label
    instances_spec = planned(xml, tiny_settings(regions="instances"))
    instances = compute(instances_spec, colour_segmenter, SceneFetcher(image))
    assert [r["value"]["brushlabels"] for r in instances.regions] == [["red"]] * 3 + [["blue"]]
    assert semantic_spec.model_version != instances_spec.model_version
    assert semantic_spec.key != instances_spec.key
    attribute = planned(xml.replace('<BrushLabels name="tag"', '<BrushLabels name="tag" car_regions="instances"'),
                        tiny_settings())
    assert attribute.runs[0].outputs[0].instances and attribute.key != semantic_spec.key
    assert JobSpec.from_dict(attribute.to_dict()) == attribute
    # a control's car_regions="semantic" wins over CAR_REGIONS=instances
    pinned = planned(xml.replace('<BrushLabels name="tag"', '<BrushLabels name="tag" car_regions="semantic"'),
                     tiny_settings(regions="instances"))
    assert not pinned.runs[0].outputs[0].instances


def test_detection_and_classification_configs(colour_segmenter):
    image, truth, objects = objects_scene()
    swap = {'value="person" predicted_values="person with clothes,people,human"': 'value="red"',
            'value="car"': 'value="blue"'}
    detection, classification = label_config("detection"), label_config("classification")
    for old, new in swap.items():
        detection, classification = detection.replace(old, new), classification.replace(old, new)
    boxes = compute(planned(detection, tiny_settings()), colour_segmenter, SceneFetcher(image)).regions
    assert [r["value"]["rectanglelabels"] for r in boxes] == [["red"]] * 3 + [["blue"]]
    assert [(r["value"]["x"], r["value"]["y"], r["value"]["width"], r["value"]["height"]) for r in boxes[:3]] == [
        box_of(obj, 128, 128) for obj in objects]
    assert LabelInterface(detection).validate_prediction(prediction_entry(boxes, "v"), return_errors=True) in (True, [])
    (tags,) = compute(planned(classification, tiny_settings()), colour_segmenter, SceneFetcher(image)).regions
    assert sorted(tags["value"]["choices"]) == ["blue", "red"]
    assert LabelInterface(classification).validate_prediction(prediction_entry([tags], "v"),
                                                              return_errors=True) in (True, [])


def test_a_keypoint_narrows_to_the_object_it_touches(colour_segmenter):
    """Interactive: a smart keypoint on one of two touching red squares keeps that square alone when SAM
    told the objects apart (connected parts would keep both)."""
    image, truth, objects = objects_scene(touching=True)
    generated = [*((obj, 0.9) for obj in objects), (truth == 2, 0.9)]
    refiner = SamRefiner("unused", "vit_b", "cpu", generate=lambda rgb: generated)
    with_sam = Segmenter(colour_segmenter.config, proposal_model=colour_segmenter.proposal_clip,
                         classifier_model=colour_segmenter.classifier_clip, sam_refiner=refiner)
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image" car_regions="instances"><Label value="red"/><Label value="blue"/>
      </BrushLabels>
      <KeyPointLabels name="points" toName="image" smart="true"><Label value="red" smart="true"/></KeyPointLabels>
    </View>"""
    context = {"result": [{"type": "keypointlabels", "from_name": "points", "to_name": "image", "is_positive": True,
                           "value": {"x": 50.0, "y": 20.0, "width": 1, "keypointlabels": ["red"]}}]}  # on square 2
    spec = planned(xml, tiny_settings(), request=parse_context(context))
    (region,) = compute(spec, with_sam, SceneFetcher(image)).regions
    from label_studio_sdk.converter.brush import decode_rle

    mask = decode_rle(region["value"]["rle"]).reshape(128, 128, 4)[..., 3] > 0
    assert np.array_equal(mask, objects[1]) and region["score"] == pytest.approx(0.9, abs=1e-3)


def test_a_1024_pixel_scene_through_the_instance_path(colour_segmenter):
    image, truth, objects = objects_scene(1024)
    spec = planned(MIXED, tiny_settings())
    start = time.perf_counter()
    result = compute(spec, colour_segmenter, SceneFetcher(image))
    seconds = time.perf_counter() - start
    controls = by_control(result.regions)
    assert [r["value"]["brushlabels"] for r in controls["objects"]] == [["red"]] * 3 + [["blue"]]
    for region, obj in zip(controls["boxes"][:3], objects, strict=True):
        value = region["value"]
        assert (value["x"], value["y"], value["width"], value["height"]) == box_of(obj, 1024, 1024)
        assert region["original_width"] == region["original_height"] == 1024
    assert LabelInterface(MIXED).validate_prediction(task_entry([result], "v"), return_errors=True) in (True, [])
    print(f"1024x1024 mixed config through compute: {seconds:.2f} s")


def test_car_output_picks_among_masks_only_and_prompts_leave_tags_out():
    spec = planned(MIXED, tiny_settings(output="polygon"))
    assert [o.target.from_name for o in spec.runs[0].outputs] == ["outlines", "boxes", "tags", "best"]
    context = {"result": [{"type": "keypointlabels", "value": {"x": 10.0, "y": 10.0, "width": 1,
                                                               "keypointlabels": ["red"]}}]}
    pointed = planned(MIXED, tiny_settings(), request=parse_context(context))
    assert [o.target.from_name for o in pointed.runs[0].outputs] == ["objects", "outlines", "boxes"]
