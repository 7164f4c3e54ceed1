from pathlib import Path

import pytest

from car_backend.labelstudio.config import (
    LabelConfigError,
    LabelSpec,
    config_hash,
    parse_label_config,
    task_sentences,
    task_vocabulary,
)

CONFIGS = Path(__file__).resolve().parents[2] / "label_config"


def view(*body: str) -> str:
    return "<View>" + "".join(body) + "</View>"


IMAGE = '<Image name="image" value="$image"/>'


def test_every_shipped_config_parses_and_starts_with_a_usage_comment():
    files = sorted(CONFIGS.glob("*.xml"))
    assert {f.name for f in files} >= {"brush.xml", "polygon.xml", "brush_polygon.xml", "referring.xml"}
    for file in files:
        xml = file.read_text()
        assert xml.lstrip().startswith("<!--"), f"{file.name} lacks its leading comment"
        config = parse_label_config(xml)
        assert config.targets, file.name
        assert config.skipped == (), f"{file.name}: {config.skipped}"
        for target in config.targets:
            assert target.to_name == "image" and target.data_key == "image"
            assert target.labels


def test_brush_config():
    config = parse_label_config((CONFIGS / "brush.xml").read_text())
    (target,) = config.targets
    assert (target.from_name, target.kind, target.dynamic_key, target.referring_key) == (
        "tag",
        "brush",
        None,
        None,
    )
    assert target.labels[0] == LabelSpec("person", "person with clothes,people,human")
    assert target.labels[1] == LabelSpec("car", "car")
    assert [spec.value for spec in target.labels] == ["person", "car", "dog", "cat", "tree"]
    assert config.prompt_from_name is None


def test_polygon_and_brush_polygon_configs():
    (target,) = parse_label_config((CONFIGS / "polygon.xml").read_text()).targets
    assert target.kind == "polygon"
    both = parse_label_config((CONFIGS / "brush_polygon.xml").read_text())
    assert [(t.from_name, t.kind) for t in both.targets] == [("stuff", "brush"), ("objects", "polygon")]
    assert [s.value for s in both.targets[0].labels] == ["sky", "grass", "road"]


def test_referring_config_reads_sentences_and_preset_and_prompt_textarea():
    config = parse_label_config((CONFIGS / "referring.xml").read_text())
    (target,) = config.targets
    assert target.referring_key == "expression"
    assert target.preset == "refcoco"
    assert config.prompt_from_name == "prompt"
    assert task_sentences(target, {"expression": "the man in red\n\n  the tall man \n"}) == [
        "the man in red",
        "the tall man",
    ]
    assert task_sentences(target, {"expression": ["a", " ", 3, "b"]}) == ["a", "b"]
    assert task_sentences(target, {"image": "x"}) == []


def test_semantic_config_has_no_sentences_even_with_a_text_field():
    xml = view(
        IMAGE,
        '<Text name="caption" value="$caption"/>',
        '<BrushLabels name="b" toName="image"><Label value="a"/><Label value="b"/></BrushLabels>',
    )
    (target,) = parse_label_config(xml).targets
    assert target.referring_key is None
    assert task_sentences(target, {"caption": "a dog"}) == []


def test_car_referring_attribute_names_the_text_explicitly_or_turns_the_guess_off():
    text = '<Text name="expr" value="$sentence"/>'
    labels = '<Label value="thing"/></BrushLabels>'
    by_name = parse_label_config(
        view(IMAGE, text, f'<BrushLabels name="b" toName="image" car_referring="expr">{labels}')
    )
    assert by_name.targets[0].referring_key == "sentence"
    by_key = parse_label_config(
        view(IMAGE, f'<BrushLabels name="b" toName="image" car_referring="$other">{labels}')
    )
    assert by_key.targets[0].referring_key == "other"
    off = parse_label_config(
        view(IMAGE, text, f'<BrushLabels name="b" toName="image" car_referring="false">{labels}')
    )
    assert off.targets[0].referring_key is None
    with pytest.raises(LabelConfigError, match="car_referring='nope'"):
        parse_label_config(view(IMAGE, f'<BrushLabels name="b" toName="image" car_referring="nope">{labels}'))


def test_textarea_with_a_value_is_a_sentence_source():
    xml = view(
        IMAGE,
        '<TextArea name="q" toName="image" value="$expression"/>',
        '<PolygonLabels name="p" toName="image"><Label value="object"/></PolygonLabels>',
    )
    config = parse_label_config(xml)
    assert config.targets[0].referring_key == "expression"
    assert config.prompt_from_name == "q"


def test_labels_nested_in_views_alias_and_car_skip():
    xml = view(
        '<View style="display:flex"><View>',
        IMAGE,
        "</View><View>",
        '<PolygonLabels name="p" toName="image"><View><Label value="Sky" alias="sky_id"/></View>',
        '<Label value="Person" predicted_values="person,human"/><Label value="background" car_skip="true"/>',
        "</PolygonLabels></View></View>",
    )
    (target,) = parse_label_config(xml).targets
    assert target.labels == (LabelSpec("sky_id", "Sky"), LabelSpec("Person", "person,human"))


def test_dynamic_labels_come_from_task_data_after_static_ones():
    xml = view(
        IMAGE, '<BrushLabels name="b" toName="image" value="$objects"><Label value="car"/></BrushLabels>'
    )
    (target,) = parse_label_config(xml).targets
    assert target.dynamic_key == "objects"
    data = {
        "objects": [
            {"value": "dog"},
            "cat",
            {"value": "car"},
            {"value": "Tree", "predicted_values": "tree,bush"},
            {"nope": 1},
            "  ",
            7,
        ]
    }
    assert task_vocabulary(target, data) == (
        LabelSpec("car", "car"),
        LabelSpec("dog", "dog"),
        LabelSpec("cat", "cat"),
        LabelSpec("Tree", "tree,bush"),
    )
    assert task_vocabulary(target, {"objects": "not a list"}) == (LabelSpec("car", "car"),)
    assert task_vocabulary(target, {}) == (LabelSpec("car", "car"),)


def test_only_dynamic_labels_is_a_target():
    (target,) = parse_label_config(
        view(IMAGE, '<BrushLabels name="b" toName="image" value="$objects"/>')
    ).targets
    assert target.labels == () and target.dynamic_key == "objects"
    assert task_vocabulary(target, {"objects": ["a", "b"]}) == (LabelSpec("a", "a"), LabelSpec("b", "b"))


def test_task_labels_key_narrows_to_labels_the_task_can_display():
    (target,) = parse_label_config((CONFIGS / "brush.xml").read_text()).targets
    assert [s.value for s in task_vocabulary(target, {"labels": ["Dog", "person", "unicorn"]}, "labels")] == [
        "person",
        "dog",
    ]
    assert [s.value for s in task_vocabulary(target, {"labels": "cat, tree"}, "labels")] == ["cat", "tree"]
    assert task_vocabulary(target, {"labels": []}, "labels") == ()
    assert len(task_vocabulary(target, {}, "labels")) == 5  # key absent: everything


def test_several_controls_and_images_and_skipped_controls_are_explained():
    xml = view(
        '<Image name="left" value="$a"/><Image name="right" value="$b"/><Text name="t" value="$text"/>',
        '<BrushLabels name="both" toName="left,right"><Label value="x"/><Label value="y"/></BrushLabels>',
        '<Choices name="kind" toName="left"><Choice value="ok"/></Choices>',
        '<RectangleLabels name="boxes" toName="left"><Label value="x"/></RectangleLabels>',
        '<RectangleLabels name="prompts" toName="left" smart="true"><Label value="x"/></RectangleLabels>',
        '<Polygon name="free" toName="right"/>',
        '<PolygonLabels name="on_text" toName="t"><Label value="x"/></PolygonLabels>',
        '<PolygonLabels name="ghost" toName="missing"><Label value="x"/></PolygonLabels>',
        '<BrushLabels name="empty" toName="left"></BrushLabels>',
    )
    config = parse_label_config(xml)
    assert [(t.from_name, t.to_name, t.data_key, t.kind) for t in config.targets] == [
        ("both", "left", "a", "brush"),
        ("both", "right", "b", "brush"),
        ("boxes", "left", "a", "rectangle"),  # not smart: a target; the smart one is a prompt
    ]
    assert config.interactive_controls == ("prompts",)
    skipped = "\n".join(config.skipped)
    assert "kind -> left: no choice names a label of the other controls over left" in skipped
    assert "free: Polygon has no labels; use PolygonLabels" in skipped
    assert "on_text -> t: PolygonLabels over a Text tag" in skipped
    assert "ghost -> missing: toName names no object tag" in skipped
    assert "empty -> left: BrushLabels has no Label" in skipped


def test_image_needs_a_variable_value():
    xml = view(
        '<Image name="image" value="https://example.com/a.jpg"/>',
        '<BrushLabels name="b" toName="image"><Label value="x"/></BrushLabels>',
    )
    with pytest.raises(LabelConfigError, match=r'value="\$key"'):
        parse_label_config(xml)
    multi = view(
        '<Image name="image" valueList="$images"/>',
        '<BrushLabels name="b" toName="image"><Label value="x"/></BrushLabels>',
    )
    with pytest.raises(LabelConfigError, match="valueList"):
        parse_label_config(multi)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image name='image' value='$image'>", "cannot be parsed.*line 1"),
        (
            view('<Text name="t" value="$t"/>', '<Choices name="c" toName="t"><Choice value="a"/></Choices>'),
            "nothing to predict.*Choices over a Text tag",
        ),
        (
            view('<Text name="t" value="$t"/>', '<Labels name="l" toName="t"><Label value="a"/></Labels>'),
            "nothing to predict",
        ),
        (view(IMAGE), "no control tags"),
        (
            view(
                IMAGE,
                '<BrushLabels name="b" toName="image" car_preset="nope"><Label value="a"/></BrushLabels>',
            ),
            "b car_preset='nope' is not a preset",
        ),
    ],
)
def test_bad_configs_raise_a_clear_error(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_per_control_and_project_overrides():
    xml = view(
        IMAGE,
        '<BrushLabels name="b" toName="image" car_preset="VOC" car_background="sky, wall,">'
        '<Label value="a"/></BrushLabels>',
    )
    config = parse_label_config(xml, '{"preset": "ade", "background": ["floor", " "], "output": "Polygon"}')
    assert config.targets[0].preset == "voc"
    assert config.targets[0].background == ("sky", "wall")
    assert (config.preset, config.background, config.output) == ("ade", ("floor",), "polygon")
    plain = parse_label_config(xml, {"unknown": 1})
    assert (plain.preset, plain.background, plain.output) == (None, None, None)
    assert parse_label_config(xml, "").preset is None
    assert parse_label_config(xml, "null").preset is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ({"preset": "x"}, "not a preset"),
        ({"output": "mask"}, "output='mask' is not allowed"),
    ],
)
def test_bad_extra_params(params, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config((CONFIGS / "brush.xml").read_text(), params)


def test_label_config_error_is_a_value_error():
    assert issubclass(LabelConfigError, ValueError)


def test_config_hash_is_stable_and_sensitive():
    xml = (CONFIGS / "brush.xml").read_text()
    assert config_hash(xml) == config_hash(xml) == config_hash(xml, None) == config_hash(xml, "")
    assert len(config_hash(xml)) == 16
    assert config_hash(xml, {"a": 1, "b": 2}) == config_hash(xml, '{"b": 2, "a": 1}')
    assert config_hash(xml, {"preset": "voc"}) != config_hash(xml)
    assert config_hash(xml.replace("<View>", "<View> ")) != config_hash(xml)
    assert config_hash(xml, "{broken") != config_hash(xml)


# ---- instances, boxes and tags ----


def test_car_regions_and_rectangles_and_choices_are_read():
    xml = view(
        IMAGE,
        '<BrushLabels name="b" toName="image" car_regions="Instances"><Label value="cat"/></BrushLabels>',
        '<PolygonLabels name="p" toName="image"><Label value="cat"/></PolygonLabels>',
        '<RectangleLabels name="r" toName="image" car_regions="semantic"><Label value="cat"/></RectangleLabels>',
        '<Choices name="c" toName="image" choice="multiple"><Choice value="cat"/></Choices>',
        '<Choices name="one" toName="image"><Choice value="cat"/></Choices>',
    )
    config = parse_label_config(xml)
    assert [(t.from_name, t.kind, t.regions, t.multiple) for t in config.targets] == [
        ("b", "brush", "instances", False), ("p", "polygon", None, False), ("r", "rectangle", "semantic", False),
        ("c", "choices", None, True), ("one", "choices", None, False)]
    with pytest.raises(LabelConfigError, match="b car_regions='objects' is not allowed; use one of: semantic, "
                                               "instances"):
        parse_label_config(xml.replace('car_regions="Instances"', 'car_regions="objects"'))


def test_a_classification_config_predicts_its_choices_and_never_reads_referring_sentences():
    xml = view(IMAGE, '<Text name="caption" value="$caption"/>',
               '<Choices name="c" toName="image"><Choice value="cat" predicted_values="a cat,kitten"/></Choices>')
    (target,) = parse_label_config(xml).targets
    assert target.labels == (LabelSpec("cat", "a cat,kitten"),) and target.referring_key is None


def test_choices_beside_other_controls_keep_the_choices_that_name_their_labels_with_their_prompts():
    xml = view(
        IMAGE,
        '<BrushLabels name="b" toName="image"><Label value="person" predicted_values="person,people"/>'
        '<Label value="car"/></BrushLabels>',
        '<Choices name="c" toName="image"><Choice value="person"/><Choice value="Car"/><Choice value="blurry"/>'
        '</Choices>',
        '<Choices name="quality" toName="image"><Choice value="good"/><Choice value="bad"/></Choices>',
        '<Choices name="by_prompt" toName="image"><Choice value="humans" predicted_values="person,people"/>'
        '</Choices>',
        '<Choices name="regions" toName="image" perRegion="true"><Choice value="car"/></Choices>',
    )
    config = parse_label_config(xml)
    choices = {t.from_name: t.labels for t in config.targets if t.kind == "choices"}
    # the brush's prompt, so the shared run looks for what it looked for without the Choices
    assert choices == {"c": (LabelSpec("person", "person,people"), LabelSpec("Car", "car")),
                       "by_prompt": (LabelSpec("humans", "person,people"),)}
    skipped = "\n".join(config.skipped)
    assert "c -> image: choices blurry name no label of the other controls" in skipped
    assert "quality -> image: no choice names a label of the other controls over image" in skipped
    assert "regions: Choices with perRegion describe regions, not the image" in skipped


def test_the_shipped_instance_detection_and_classification_configs():
    kinds = {name: [(t.kind, t.regions, t.multiple) for t in parse_label_config(
        (Path(__file__).resolve().parents[2] / "label_config" / f"{name}.xml").read_text()).targets]
        for name in ("instances", "detection", "classification")}
    assert kinds == {"instances": [("brush", "instances", False)], "detection": [("rectangle", None, False)],
                     "classification": [("choices", None, True)]}


def test_config_hash_ignores_what_label_studio_strips_when_it_stores_a_config():
    xml = '<View>\n  <Image name="image" value="$image"/>\n</View>\n'
    assert config_hash(xml) == config_hash(xml.strip()) == config_hash(xml.replace("\n", "\r\n"))
    assert config_hash(xml) != config_hash(xml.replace("image", "picture"))
