"""model_version: what changes a project's output changes it, what does not leaves it alone."""

from __future__ import annotations

import dataclasses
import time

from car_backend.labelstudio.config import Target, parse_label_config
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import config_identity, model_version
from tests.support.settings import tiny_settings

SETTINGS = tiny_settings()


def brush(labels: str, control: str = "", image: str = "") -> str:
    """A BrushLabels config; `labels`: the <Label> tags; `control`, `image`: extra attributes."""
    return (f'<View><Image name="image" value="$image" {image}/>'
            f'<BrushLabels name="tag" toName="image" {control}>{labels}</BrushLabels></View>')


def labels(*values: str) -> str:
    return "".join(f'<Label value="{v}"/>' for v in values)


def version(xml: str, extra_params=None, settings=SETTINGS) -> str:
    return model_version(settings, parse_label_config(xml, extra_params))


def test_the_label_set_changes_the_version():
    versions = {version(brush(labels("cat", "dog"))), version(brush(labels("cat", "dog", "bird"))),
                version(brush(labels("tumour", "vessel"))), version(brush(labels("cat")))}
    assert len(versions) == 4
    assert version(brush(labels("cat", "dog"))) != model_version(SETTINGS)  # not the settings' own version


def test_equal_configs_share_the_version_whatever_the_cosmetics():
    plain = version(brush(labels("cat", "dog")))
    assert version(brush(labels("cat", "dog"))) == plain
    # label order (a semantic target's output does not depend on it), colours, hotkeys, attribute order and
    # whitespace are not output
    assert version(brush(labels("dog", "cat"))) == plain
    styled = ('<View>\n  <Image value="$image"   name="image"/>\n  <BrushLabels toName="image" name="tag">\n'
              '    <Label background="#ff0000" hotkey="c" value="cat"/>\n    <Label value="dog" background="blue"/>\n'
              '  </BrushLabels>\n</View>')
    assert version(styled) == plain


def test_prompts_and_control_settings_change_the_version():
    plain = version(brush(labels("cat", "dog")))
    changed = [
        version(brush('<Label value="cat" predicted_values="a cat,kitten"/><Label value="dog"/>')),
        version(brush(labels("cat", "dog"), control='car_preset="refcoco"')),
        version(brush(labels("cat", "dog"), control='car_background="sky,wall"')),
        version(brush(labels("cat", "dog"), control='car_proposals="car"')),
        version(brush(labels("cat", "dog")).replace("BrushLabels", "PolygonLabels")),
        version(brush(labels("cat", "dog")), {"preset": "refcoco"}),
        version(brush(labels("cat", "dog")), {"background": "sky"}),
        version(brush(labels("cat", "dog")), {"output": "polygon"}),
        version(brush(labels("cat", "dog")).replace("$image", "$photo")),
        version(brush(labels("cat", "dog")), settings=tiny_settings(task_labels_key="labels")),
        version(brush(labels("cat", "dog")), settings=tiny_settings(polygon_tolerance=3.0)),
    ]
    assert plain not in changed and len(set(changed)) == len(changed)


def test_every_target_field_enters_the_identity_and_defaults_stay_out():
    """A field added to Target later (say an instance/semantic mode) enters the version once it is set, and
    leaves today's versions alone while at its default."""
    config = parse_label_config(brush(labels("cat", "dog")))
    identity = config_identity(config)
    (target,) = identity["targets"]
    assert {"from_name", "to_name", "data_key", "kind", "labels"} <= set(target)
    assert "preset" not in target and "skipped" not in identity  # defaults and what is not output stay out
    fields = {f.name for f in dataclasses.fields(Target)}
    for name in fields - {"from_name", "to_name", "data_key", "kind", "labels"}:
        odd = dataclasses.replace(config.targets[0], **{name: ("x",) if name == "background" else "x"})
        other = dataclasses.replace(config, targets=(odd,))
        assert model_version(SETTINGS, other) != model_version(SETTINGS, config), name


def test_job_keys_follow_the_version_and_the_version_is_fast():
    task = {"id": 1, "data": {"image": "http://h/a.png"}}
    keys = set()
    for xml in (brush(labels("cat", "dog")), brush(labels("cat", "dog", "bird"))):
        config = parse_label_config(xml)
        keys.add(plan_task(task, Project(config, model_version(SETTINGS, config)), SETTINGS).specs[0].key)
    assert len(keys) == 2
    config = parse_label_config(brush(labels(*(f"label{i}" for i in range(50)))))
    started = time.perf_counter()
    for _ in range(100):
        model_version(SETTINGS, config)
    assert (time.perf_counter() - started) / 100 < 0.005  # /setup answers in milliseconds
