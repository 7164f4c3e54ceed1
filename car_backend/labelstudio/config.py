"""Read a Label Studio label config: which controls CaR can predict, with which labels and prompts.

A *target* is one BrushLabels, PolygonLabels, RectangleLabels (not smart: smart ones are interactive
prompts) or Choices control over one Image whose value is a task-data variable (`value="$image"`).
Everything else in the config is either a source of text (a Text tag with referring sentences, a TextArea
for interactive prompts) or skipped with a reason that `/setup` and the logs can show.

A Choices control is a target when no other target is over its Image (a classification project), or when
some of its choices name the labels of another target over that Image (by value or `predicted_values`):
then those choices are its labels, with the prompt of the label they name, so the semantic run those
controls share looks for exactly what it looked for without the Choices. `choice="multiple"` makes it
`Target.multiple` (every label found, else the best one).

Attributes CaR reads from a config (all optional):
- on a Label: `predicted_values="a,b"` (the prompt sent to CLIP instead of the value), `car_skip="true"`
  (never predict this label, e.g. a catch-all "background" label);
- on a control: `car_preset="refcoco"`, `car_background="sky,wall"`, `car_proposals="sam"` (two-stage), `car_referring="expression"` (the Text
  tag name or `$key` holding referring sentences; `car_referring="false"` turns the guess below off),
  `car_regions="instances"` (one region per object) or `"semantic"` (one per label; polygons: one per
  connected part); absent: CAR_REGIONS for brushes and polygons, instances for rectangles.

Without `car_referring`, a control with exactly one static Label reads its sentences from the config's
only Text tag (or TextArea with a `$value`) when there is exactly one: the referring-expression layout of
label_config/referring.xml.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from car_backend.engine.config import PROPOSAL_MODES, REGION_MODES
from car_backend.engine.errors import CarError
from car_backend.engine.presets import PRESETS

KINDS = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle", "choices": "choices"}
RESULT_TYPES = {"brush": "brushlabels", "polygon": "polygonlabels", "rectangle": "rectanglelabels",
                "choices": "choices"}  # a target's kind -> the `type` of its regions
OUTPUTS = ("brush", "polygon", "auto")  # a project's `output` extra_param; auto: every control
_FALSE = {"false", "no", "off", "0", "none"}
_SMART_TAGS = ("keypointlabels", "rectanglelabels")


class LabelConfigError(CarError, ValueError):
    """The label config (or extra_params) cannot be used; the message says what is wrong."""



@dataclass(frozen=True)
class LabelSpec:
    value: str  # what goes into the region (the Label's alias when it has one, else its value)
    prompt: str  # what CaR looks for: `predicted_values` when present, else the Label's value


@dataclass(frozen=True)
class Target:
    """One predictable control over one Image."""

    from_name: str
    to_name: str
    data_key: str
    kind: str  # "brush" | "polygon" | "rectangle" | "choices"
    labels: tuple[LabelSpec, ...]
    dynamic_key: str | None = None
    referring_key: str | None = None
    preset: str | None = None
    background: tuple[str, ...] | None = None
    proposals: str | None = None  # `car_proposals` on the control: "car" | "sam"; None = CAR_PROPOSALS
    regions: str | None = None  # `car_regions` on the control: "semantic" | "instances"; None = the default
    multiple: bool = False  # a Choices control with choice="multiple": every kept label, else the best one


@dataclass(frozen=True)
class ProjectConfig:
    targets: tuple[Target, ...]
    skipped: tuple[str, ...]
    prompt_from_name: str | None
    preset: str | None
    background: tuple[str, ...] | None
    output: str | None = None  # "brush" | "polygon" | "auto" from extra_params; None = not set
    interactive_controls: tuple[str, ...] = ()  # smart KeyPointLabels/RectangleLabels: prompts, not targets


def parse_label_config(xml: str, extra_params: dict | str | None = None) -> ProjectConfig:
    """Find every predictable control in `xml`; raise LabelConfigError when there is none."""
    params = _extra_params(extra_params)
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises lxml, pydantic and its own errors alike
        raise LabelConfigError(f"the label config cannot be parsed: {exc}") from None

    objects = {obj.name: obj for obj in interface.objects or ()}
    controls = list(interface.controls or ())
    text_keys = _text_sources(objects, controls)
    targets: list[Target] = []
    skipped: list[str] = []
    prompt_from_name = None
    interactive: list[str] = []
    for control in controls:
        tag = control.tag.lower()
        over_image = any(_is_image(objects.get(n)) for n in control.to_name)
        if tag == "textarea" and over_image:
            prompt_from_name = prompt_from_name or control.name
            continue
        if tag in _SMART_TAGS and over_image and _is_smart(control):
            interactive.append(control.name)
            continue
        if tag not in KINDS:
            skipped.append(f"{control.name}: {_why_not(control.tag)}")
            continue
        if tag == "choices" and str(control.attr.get("perRegion", "")).lower() == "true":
            skipped.append(f"{control.name}: Choices with perRegion describe regions, not the image")
            continue
        for to_name in control.to_name:
            target = _target(control, to_name, objects.get(to_name), text_keys, skipped)
            if target is not None:
                targets.append(target)
    targets = _with_choices(targets, skipped)

    if not targets:
        reasons = "; ".join(skipped) or "the config has no control tags"
        raise LabelConfigError(
            "nothing to predict: CaR needs a BrushLabels, PolygonLabels, RectangleLabels or Choices control "
            f'with labels over an <Image value="$key"> tag ({reasons})'
        )
    return ProjectConfig(
        targets=tuple(targets),
        skipped=tuple(skipped),
        prompt_from_name=prompt_from_name,
        preset=_preset(params.get("preset"), "extra_params preset"),
        background=_words(params.get("background")),
        output=_output(params.get("output")),
        interactive_controls=tuple(interactive),
    )


def config_hash(xml: str, extra_params: dict | str | None = None) -> str:
    """A short stable hash of the config and its extra_params, for caching parsed configs and for checking a
    late write against the config Label Studio holds (which it stores with surrounding whitespace stripped:
    the hash ignores that and the line-ending style)."""
    xml = xml.strip().replace("\r\n", "\n")
    try:
        params = _extra_params(extra_params)
    except LabelConfigError:
        params = {"raw": str(extra_params)}
    blob = json.dumps([xml, params], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_vocabulary(target: Target, task_data: dict, task_labels_key: str = "") -> tuple[LabelSpec, ...]:
    """The labels to look for in one task: static, then dynamic, narrowed by the task's own label list."""
    specs = list(target.labels)
    if target.dynamic_key:
        specs.extend(_dynamic_labels(task_data.get(target.dynamic_key)))
    unique: dict[str, LabelSpec] = {}
    for spec in specs:
        unique.setdefault(spec.value, spec)
    if task_labels_key and task_labels_key in task_data:
        wanted = {w.casefold() for w in _words(task_data[task_labels_key]) or ()}
        return tuple(spec for spec in unique.values() if spec.value.casefold() in wanted)
    return tuple(unique.values())


def task_sentences(target: Target, task_data: dict) -> list[str]:
    """The referring sentences of a task (one per line or list item); empty when there are none."""
    if not target.referring_key:
        return []
    raw = task_data.get(target.referring_key)
    if isinstance(raw, str):
        items: Iterable[Any] = raw.splitlines()
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        return []
    return [s.strip() for s in items if isinstance(s, str) and s.strip()]


def _target(control, to_name: str, obj, text_keys: dict[str, str], skipped: list[str]) -> Target | None:
    where = f"{control.name} -> {to_name}"
    if obj is None:
        skipped.append(f"{where}: toName names no object tag")
        return None
    if not _is_image(obj):
        skipped.append(f"{where}: {control.tag} over a {obj.tag} tag; CaR segments Image tags only")
        return None
    if "valueList" in obj.attr or not obj.value_is_variable:
        skipped.append(f'{where}: the Image needs value="$key" (valueList and fixed URLs are not supported)')
        return None

    labels = tuple(
        LabelSpec(value=value, prompt=_prompt(label.attr, value))
        for value, label in (control.labels_attrs or {}).items()
        if str(label.attr.get("car_skip", "")).lower() not in ("true", "1", "yes")
    )
    raw_value = control.attr.get("value") or ""
    dynamic_key = raw_value[1:] if raw_value.startswith("$") and len(raw_value) > 1 else None
    if not labels and not dynamic_key:
        skipped.append(f"{where}: {control.tag} has no Label to predict")
        return None
    kind = KINDS[control.tag.lower()]
    return Target(
        from_name=control.name,
        to_name=to_name,
        data_key=obj.value_name,
        kind=kind,
        labels=labels,
        dynamic_key=dynamic_key,
        # a tag is not a referred object: Choices never read referring sentences
        referring_key=None if kind == "choices" else _referring_key(control, labels, dynamic_key, text_keys),
        preset=_preset(control.attr.get("car_preset"), f"{control.name} car_preset"),
        background=_words(control.attr.get("car_background")),
        proposals=_proposals(control.attr.get("car_proposals"), f"{control.name} car_proposals"),
        regions=_regions(control.attr.get("car_regions"), f"{control.name} car_regions"),
        multiple=kind == "choices" and str(control.attr.get("choice", "")).strip().lower() == "multiple",
    )


def _with_choices(targets: list[Target], skipped: list[str]) -> list[Target]:
    """`targets` with each Choices target kept, narrowed or skipped (see the module docstring)."""
    out = []
    for target in targets:
        if target.kind != "choices":
            out.append(target)
            continue
        others = [label for t in targets if t.kind != "choices" and t.to_name == target.to_name for label in t.labels]
        if not others:
            out.append(target)
            continue
        named = {}
        for label in reversed(others):  # the first label of that name wins, as in task_vocabulary
            named[label.value.casefold()] = named[label.prompt.casefold()] = label
        labels = tuple(LabelSpec(choice.value, match.prompt) for choice in target.labels
                       if (match := named.get(choice.value.casefold()) or named.get(choice.prompt.casefold())))
        where = f"{target.from_name} -> {target.to_name}"
        if not labels:
            skipped.append(f"{where}: no choice names a label of the other controls over {target.to_name} "
                           "(CaR fills Choices whose values are the labels it looks for)")
            continue
        left_out = [c.value for c in target.labels if c.value not in {label.value for label in labels}]
        if left_out:
            skipped.append(f"{where}: choices {', '.join(left_out)} name no label of the other controls")
        out.append(replace(target, labels=labels, dynamic_key=None))
    return out


def _regions(raw: Any, where: str) -> str | None:
    """`car_regions="instances"` or `"semantic"`; None when absent."""
    if raw is None or not str(raw).strip():
        return None
    regions = str(raw).strip().lower()
    if regions not in REGION_MODES:
        raise LabelConfigError(f"{where}={raw!r} is not allowed; use one of: {', '.join(REGION_MODES)}")
    return regions


def _proposals(raw: Any, where: str) -> str | None:
    """`car_proposals="sam"` (two-stage) or `"car"`; None when absent."""
    if raw is None or not str(raw).strip():
        return None
    proposals = str(raw).strip().lower()
    if proposals not in PROPOSAL_MODES:
        raise LabelConfigError(f"{where}={raw!r} is not a proposal mode; use one of: {', '.join(PROPOSAL_MODES)}")
    return proposals


def _referring_key(control, labels, dynamic_key, text_keys: dict[str, str]) -> str | None:
    explicit = control.attr.get("car_referring")
    if explicit is not None:
        explicit = explicit.strip()
        if explicit.lower() in _FALSE:
            return None
        if explicit.startswith("$") and len(explicit) > 1:
            return explicit[1:]
        if explicit in text_keys:
            return text_keys[explicit]
        raise LabelConfigError(
            f"{control.name}: car_referring={explicit!r} names no Text tag with a $value "
            f"(known: {', '.join(text_keys) or 'none'}); use a tag name or $key"
        )
    if len(labels) == 1 and not dynamic_key and len(set(text_keys.values())) == 1:
        return next(iter(text_keys.values()))
    return None


def _text_sources(objects: dict, controls: list) -> dict[str, str]:
    """Tag name -> task-data key for Text tags and TextAreas whose value is a $variable."""
    sources = {}
    for tag in [*objects.values(), *controls]:
        value = tag.attr.get("value") or ""
        if tag.tag.lower() in ("text", "textarea") and value.startswith("$") and len(value) > 1:
            sources[tag.attr.get("name") or value[1:]] = value[1:]
    return sources


def _is_smart(control) -> bool:
    """Smart tools send the annotator's clicks and boxes to the backend as interactive prompts."""
    if str(control.attr.get("smart", "")).lower() == "true":
        return True
    return any(str(label.attr.get("smart", "")).lower() == "true" for label in (control.labels_attrs or {}).values())


def _is_image(obj) -> bool:
    return obj is not None and obj.tag.lower() == "image"


def _why_not(tag: str) -> str:
    low = tag.lower()
    if low in ("brush", "polygon", "rectangle"):
        return f"{tag} has no labels; use {tag}Labels"
    if low.endswith("labels"):
        return f"{tag} is not predicted (CaR returns BrushLabels, PolygonLabels, RectangleLabels and Choices)"
    return f"{tag} is not a control CaR predicts"


def _prompt(attrs: dict, fallback: str) -> str:
    predicted = (attrs.get("predicted_values") or "").strip()
    return predicted or attrs.get("value") or fallback


def _dynamic_labels(raw: Any) -> list[LabelSpec]:
    if not isinstance(raw, list):
        return []
    specs = []
    for item in raw:
        if isinstance(item, str) and item.strip():
            specs.append(LabelSpec(value=item.strip(), prompt=item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("value"), str) and item["value"].strip():
            value = str(item.get("alias") or item["value"]).strip()
            specs.append(LabelSpec(value=value, prompt=_prompt(item, value)))
    return specs


def _words(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list | tuple) else [raw]
    words = tuple(str(w).strip() for w in items if str(w).strip())
    return words or None


def _preset(raw: Any, where: str) -> str | None:
    if raw is None or str(raw).strip() == "":
        return None
    preset = str(raw).strip().lower()
    if preset not in PRESETS:
        raise LabelConfigError(f"{where}={raw!r} is not a preset; use one of: {', '.join(PRESETS)}")
    return preset


def _output(raw: Any) -> str | None:
    if raw is None or str(raw).strip() == "":
        return None
    output = str(raw).strip().lower()
    if output not in OUTPUTS:
        raise LabelConfigError(
            f"extra_params output={raw!r} is not allowed; use one of: {', '.join(OUTPUTS)}"
        )
    return output


def _extra_params(raw: dict | str | None) -> dict:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LabelConfigError(f"extra_params is not valid JSON: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LabelConfigError(f"extra_params must be a JSON object, got {type(raw).__name__}")
    return raw
