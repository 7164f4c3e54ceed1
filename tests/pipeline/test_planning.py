"""From tasks to jobs: grouping targets per image, vocabularies, modes, region kinds, job keys, combining."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from car_backend.engine.result import Segmentation
from car_backend.labelstudio.config import parse_label_config
from car_backend.pipeline.compute import restrict, task_entry
from car_backend.pipeline.planning import plan_task, typed_prompt
from car_backend.pipeline.spec import JobResult, Project
from car_backend.pipeline.versions import model_version
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings

REPO = Path(__file__).resolve().parents[2]


def project(xml: str, settings, extra_params=None) -> Project:
    config = parse_label_config(xml, extra_params)
    return Project(config, model_version(settings, config))


def test_two_controls_over_one_image_make_one_job_with_the_union_vocabulary():
    settings = tiny_settings()
    plan = plan_task({"id": 1, "data": {"image": "http://h/a.png"}}, project(label_config("brush_polygon"), settings),
                     settings)
    assert plan.failure is None and len(plan.specs) == 1
    (run,) = plan.specs[0].runs
    assert run.mode == "semantic"
    assert run.queries == ("sky", "grass", "road", "person with clothes,people,human", "car", "bicycle")
    assert [(o.target.from_name, o.kind, [label.value for label in o.labels]) for o in run.outputs] == [
        ("stuff", "brush", ["sky", "grass", "road"]), ("objects", "polygon", ["person", "car", "bicycle"])]


def test_referring_sentences_switch_to_referring_mode():
    settings = tiny_settings()
    proj = project(label_config("referring"), settings)
    plan = plan_task({"id": 1, "data": {"image": "http://h/a.png", "expression": "the man\nin red"}}, proj, settings)
    (run,) = plan.specs[0].runs
    assert (run.mode, run.queries, run.preset) == ("referring", ("the man", "in red"), "refcoco")
    assert [label.value for label in run.outputs[0].labels] == ["object"]
    # Sentences typed into the TextArea (an interactive request) take their place.
    context = {"result": [{"from_name": "prompt", "type": "textarea", "value": {"text": ["a dog"]}}]}
    typed = plan_task({"id": 1, "data": {"image": "http://h/a.png", "expression": "the man"}}, proj, settings,
                      typed_prompt(context, proj.config))
    assert typed.specs[0].runs[0].queries == ("a dog",)
    # No sentence in the task: the control's labels are looked for as classes.
    plain = plan_task({"id": 1, "data": {"image": "http://h/a.png"}}, proj, settings)
    assert plain.specs[0].runs[0].mode == "semantic"


def test_a_typed_label_name_runs_semantic_mode_for_that_label_alone():
    settings = tiny_settings()
    proj = project((REPO / "label_config" / "interactive.xml").read_text(), settings)
    data = {"image": "http://h/a.png"}

    def typed(text):
        context = {"result": [{"from_name": "prompt", "type": "textarea", "value": {"text": [text]}}]}
        (run,) = plan_task({"id": 1, "data": data}, proj, settings, typed_prompt(context, proj.config)).specs[0].runs
        return run.mode, run.queries, [label.value for label in run.outputs[0].labels]

    assert typed("people") == ("semantic", ("person with clothes,people,human",), ["person"])
    assert typed("Car") == ("semantic", ("car",), ["car"])
    assert typed("the man in red") == ("referring", ("the man in red",), ["person"])


def test_keypoints_and_selected_labels_in_interactive_plans():
    from car_backend.labelstudio.interactive import Point, parse_context

    settings = tiny_settings()
    proj = project((REPO / "label_config" / "interactive.xml").read_text(), settings)
    task = {"id": 1, "data": {"image": "http://h/a.png"}}

    def keypoint(label, positive=True):
        return {"type": "keypointlabels", "from_name": "points", "to_name": "image", "is_positive": positive,
                "value": {"x": 30.0, "y": 40.0, "width": 1, "keypointlabels": [label]}}

    def text(sentence):
        return {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [sentence]}}

    def plan(*regions):
        context = {"result": list(regions)}
        (spec,) = plan_task(task, proj, settings, typed_prompt(context, proj.config), parse_context(context)).specs
        (run,) = spec.runs
        return spec, run.mode, run.queries, [label.value for label in run.outputs[0].labels]

    # a keypoint alone: that label's mask alone, narrowed to the part under the point
    spec, mode, queries, labels = plan(keypoint("car"))
    assert (mode, queries, labels) == ("semantic", ("car",), ["car"])
    assert spec.focus.points == (Point(30.0, 40.0, True, "car"),)
    # a sentence and a keypoint: referring mode, answered with the keypoint's label and narrowed by it
    spec, mode, queries, labels = plan(text("the one on the left"), keypoint("bottle", positive=False))
    assert (mode, queries, labels) == ("referring", ("the one on the left",), ["bottle"])
    assert spec.focus.points[0].positive is False
    # a sentence alone: the first label, nothing to narrow
    spec, mode, _, labels = plan(text("the one on the left"))
    assert (mode, labels, spec.focus) == ("referring", ["person"], None)
    # the focus is part of the job key: two clicks are two jobs
    assert plan(keypoint("car"))[0].key != plan(keypoint("car", positive=False))[0].key


def test_task_vocabularies_dynamic_labels_and_task_label_lists():
    xml = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" value="$options">'
           '<Label value="cat"/></BrushLabels></View>')
    settings = tiny_settings(task_labels_key="wanted")
    proj = project(xml, settings)
    data = {"image": "http://h/a.png", "options": ["dog", {"value": "car", "predicted_values": "automobile"}]}
    assert plan_task({"id": 1, "data": data}, proj, settings).specs[0].runs[0].queries == ("cat", "dog", "automobile")
    narrowed = plan_task({"id": 1, "data": {**data, "wanted": "dog, car"}}, proj, settings)
    assert narrowed.specs[0].runs[0].queries == ("dog", "automobile")
    empty = plan_task({"id": 1, "data": {**data, "wanted": "zebra"}}, proj, settings)
    assert empty.specs == [] and "no labels" in empty.failure


@pytest.mark.parametrize("env_output, extra, expected", [
    ("auto", None, [("stuff", "brush"), ("objects", "polygon")]),
    ("polygon", None, [("objects", "polygon")]),
    ("polygon", {"output": "brush"}, [("stuff", "brush")]),
    ("auto", {"output": "polygon"}, [("objects", "polygon")])])
def test_output_setting_picks_controls_of_that_kind(env_output, extra, expected):
    settings = tiny_settings(output=env_output)
    plan = plan_task({"id": 1, "data": {"image": "http://h/a.png"}},
                     project(label_config("brush_polygon"), settings, extra), settings)
    assert [(o.target.from_name, o.kind) for o in plan.specs[0].runs[0].outputs] == expected


@pytest.mark.parametrize("output", ["brush", "polygon"])
def test_output_setting_never_changes_a_controls_region_type(output):
    settings = tiny_settings(output=output)
    plan = plan_task({"id": 1, "data": {"image": "http://h/a.png"}}, project(label_config("brush"), settings),
                     settings)
    assert [(o.target.from_name, o.kind) for o in plan.specs[0].runs[0].outputs] == [("tag", "brush")]


def test_job_keys_share_images_not_versions_or_sites():
    settings = tiny_settings(label_studio_url="http://ls-one:8080")
    proj = project(label_config("brush"), settings)
    key = plan_task({"id": 1, "data": {"image": "/data/upload/1/a.png"}}, proj, settings).keys[0]
    assert plan_task({"id": 2, "data": {"image": "/data/upload/1/a.png"}}, proj, settings).keys == [key]
    assert plan_task({"id": 1, "data": {"image": "/data/upload/1/b.png"}}, proj, settings).keys != [key]
    other_site = dataclasses.replace(settings, label_studio_url="http://ls-two:8080")
    assert plan_task({"id": 1, "data": {"image": "/data/upload/1/a.png"}}, proj, other_site).keys != [key]
    voc = project(label_config("brush"), settings, {"preset": "voc"})
    assert voc.version != proj.version
    assert plan_task({"id": 1, "data": {"image": "/data/upload/1/a.png"}}, voc, settings).keys != [key]


def test_tasks_without_an_image_fail_permanently():
    settings = tiny_settings()
    proj = project(label_config("brush"), settings)
    assert "no image under 'image'" in plan_task({"id": 1, "data": {"image": ""}}, proj, settings).failure
    assert "no data" in plan_task({"id": 1, "data": "x"}, proj, settings).failure


def test_restrict_keeps_one_targets_part_of_a_union_segmentation():
    label_map = np.array([[0, 1, 2, 3]], dtype=np.int32)  # union queries: a, b, c
    seg = Segmentation(["a", "b", "c"], label_map, np.stack([label_map == k for k in (1, 2, 3)]),
                       np.array([0.9, 0.0, 0.4], np.float32), steps=2)
    own = restrict(seg, ["c", "a"])
    assert own.queries == ["c", "a"]
    assert own.label_map.tolist() == [[0, 2, 0, 1]]
    assert own.scores.tolist() == pytest.approx([0.4, 0.9])
    assert own.masks[0].tolist() == [[False, False, False, True]]
    assert restrict(seg, ["a", "b", "c"]) is seg


def test_task_entry_merges_images_and_reports_failures():
    ok = JobResult(ok=True, regions=[{"id": "r1", "score": 0.5}], score=0.5)
    other = JobResult(ok=True, regions=[{"id": "r2", "score": 0.9}], score=0.9)
    bad = JobResult(ok=False, regions=[], error="cannot decode the image")
    merged = task_entry([ok, other], "v1")
    assert [r["id"] for r in merged["result"]] == ["r1", "r2"] and merged["score"] == pytest.approx(0.7)
    assert task_entry([ok, bad], "v1")["result"] == [{"id": "r1", "score": 0.5}]
    failed = task_entry([bad], "v1")
    assert failed["result"] == [] and failed["model_version"] == "v1" and "decode" in failed["error"]


def test_task_scores_for_review_order():
    from car_backend.pipeline.compute import task_score

    assert task_score([], "confidence") is None and task_score([], "uncertainty") is None
    assert task_score([0.9, 0.7], "confidence") == pytest.approx(0.8)
    sure = task_score([0.9, 0.9], "uncertainty", margins=[0.99])
    hesitant_classifier = task_score([0.5, 0.4], "uncertainty", margins=[0.99])
    hesitant_borders = task_score([0.9, 0.9], "uncertainty", margins=[0.6])
    assert 0.0 <= sure < hesitant_classifier <= 1.0
    assert sure < hesitant_borders <= 1.0
    assert task_score([0.8], "uncertainty") == pytest.approx(0.2)  # no CRF margin known: the classifier alone


def test_a_label_limit_on_one_image_makes_the_whole_task_pending():
    """Two images, one of them asking for more labels than CAR_MAX_LABELS, the other missing from the data:
    raising the limit must predict the task, so it is pending, never a (partial or empty) prediction."""
    xml = ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
           '<BrushLabels name="few" toName="a"><Label value="cat"/></BrushLabels>'
           '<BrushLabels name="many" toName="b"><Label value="x1"/><Label value="x2"/><Label value="x3"/>'
           '</BrushLabels></View>')
    settings = tiny_settings(max_labels=2)
    both = plan_task({"id": 1, "data": {"a": "http://h/a.png", "b": "http://h/b.png"}}, project(xml, settings), settings)
    assert both.pending and "CAR_MAX_LABELS" in both.pending and not both.specs and both.failure is None
    one = plan_task({"id": 2, "data": {"b": "http://h/b.png"}}, project(xml, settings), settings)
    assert one.pending and one.failure is None and not one.specs
    fine = plan_task({"id": 3, "data": {"a": "http://h/a.png", "b": "http://h/b.png"}}, project(xml, tiny_settings()),
                     tiny_settings())
    assert len(fine.specs) == 2 and fine.pending is None
