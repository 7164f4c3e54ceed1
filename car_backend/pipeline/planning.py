"""Planning: a Label Studio task and its project's config -> the jobs that predict it.

`plan_task` makes one `JobSpec` per image the task has targets on, with every target over that image:
one semantic run with the union vocabulary, one referring run per target with sentences, and the
interactive narrowing (keypoints, rectangles, a typed prompt) when the call is interactive.

Equal runs are one object (`_shared`): tasks of one project mostly ask for the same runs, and a run converts
to JSON once per object (`Run.plain`), so planning 10,000 tasks of 20 labels costs 10,000 hashes of a run,
not 10,000 conversions of it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from car_backend.labelstudio.config import LabelSpec, ProjectConfig, Target, task_sentences, task_vocabulary
from car_backend.labelstudio.interactive import InteractiveRequest, focus_of, label_named_by
from car_backend.pipeline.spec import JobSpec, Project, Run, TargetOutput
from car_backend.pipeline.versions import engine_fingerprint
from car_backend.settings import Settings

log = logging.getLogger(__name__)

SHARED_RUNS = 4096  # distinct runs kept for sharing (least recently used go first)
_shared_runs: OrderedDict[Run, Run] = OrderedDict()
_shared_lock = threading.Lock()


@dataclass
class TaskPlan:
    task_id: int | None
    specs: list[JobSpec] = field(default_factory=list)
    failure: str | None = None  # a permanent problem found while planning: no job is needed
    # A problem a setting decides (CAR_MAX_LABELS, CAR_MAX_LABEL_LENGTH): no job now, and the task is answered
    # pending with this reason (never an empty prediction), so raising the limit predicts it on the next ask.
    pending: str | None = None
    sources: list[tuple[str, str]] = field(default_factory=list)  # (task-data key, image) of each spec

    @property
    def keys(self) -> list[str]:
        return [spec.key for spec in self.specs]


def output_targets(config: ProjectConfig, settings: Settings) -> tuple[Target, ...]:
    """The controls to fill: the project's `output` extra_param, else CAR_OUTPUT, picks the brush or polygon
    controls of that kind when the config has both (rectangles and choices are always filled); a control's
    region type is always its own, because Label Studio cannot show a polygon in a BrushLabels control or a
    mask in a PolygonLabels one."""
    masks = [t for t in config.targets if t.kind in ("brush", "polygon")]
    for choice in (config.output, settings.output):
        if choice and choice != "auto":
            chosen = [t for t in masks if t.kind == choice] or masks
            return tuple(t for t in config.targets if t in chosen or t not in masks)
    return config.targets


def wants_instances(target: Target, settings: Settings) -> bool:
    """Whether a control gets one region per object: its `car_regions`, else CAR_REGIONS for brushes and
    polygons and instances for rectangles (a box around all of a label's objects says little); never for
    Choices, which name labels."""
    if target.kind == "choices":
        return False
    if target.regions is not None:
        return target.regions == "instances"
    return target.kind == "rectangle" or settings.regions == "instances"


def plan_task(task: dict, project: Project, settings: Settings, prompt: list[str] | None = None,
              request: InteractiveRequest | None = None) -> TaskPlan:
    """The jobs of one task: one per image, with every target over that image.

    Interactive calls give `prompt` (the sentences typed into the config's TextArea) and `request` (what the
    annotator drew: the selected label, keypoints, rectangles).
    """
    config = project.config
    task_id = task.get("id") if isinstance(task.get("id"), int) else None
    data = task.get("data")
    if not isinstance(data, dict):
        return TaskPlan(task_id, failure="the task has no data object")
    by_image: dict[str, list[Target]] = {}
    for target in output_targets(config, settings):
        by_image.setdefault(target.data_key, []).append(target)
    plan = TaskPlan(task_id)
    problems, limited = [], []
    for data_key, targets in by_image.items():
        ref = data.get(data_key)
        if not isinstance(ref, str) or not ref.strip():
            problems.append(f"the task data has no image under {data_key!r}")
            continue
        runs = _runs(targets, data, project, settings, prompt, request)
        if not runs:
            problems.append(f"no labels to look for in {', '.join(t.from_name for t in targets)}")
            continue
        too_many = label_limit_problem(runs, settings)
        if too_many:
            limited.append(too_many)
            continue
        relative = not ref.strip().lower().startswith(("http://", "https://", "s3://", "gs://", "azure-blob://"))
        plan.specs.append(JobSpec(
            image=ref.strip(), site=settings.label_studio_url if relative else "", task_id=task_id,
            runs=tuple(runs), model_version=project.version, engine=engine_fingerprint(settings),
            polygon_tolerance=settings.polygon_tolerance, score=settings.score,
            focus=focus_of(request, request.label if request else None), thresholds=project.thresholds,
            head=project.head))
        plan.sources.append((data_key, ref.strip()))
    if limited:  # a setting refuses part of the task: all of it waits, so raising the limit predicts it whole
        return TaskPlan(task_id, pending="; ".join(limited + problems))
    if not plan.specs:
        plan.failure = "; ".join(problems + limited) or "nothing to predict"
    elif problems:
        log.warning("task %s: %s", task_id, "; ".join(problems))
    return plan


def label_limit_problem(runs: list[Run], settings: Settings) -> str | None:
    """Why these runs ask for too much (more distinct queries than CAR_MAX_LABELS, or a label, prompt or
    sentence longer than CAR_MAX_LABEL_LENGTH characters), or None. Task data can hold any number of
    labels of any length; each is a text the engine encodes."""
    queries = {query for run in runs for query in run.queries}
    if len(queries) > settings.max_labels:
        return f"the task asks for {len(queries)} labels, more than CAR_MAX_LABELS={settings.max_labels}"
    texts = queries | {label.value for run in runs for out in run.outputs for label in out.labels}
    longest = max(texts, key=len, default="")
    if len(longest) > settings.max_label_length:
        return (f"a label or sentence is {len(longest)} characters long ({longest[:40]!r}...), more than "
                f"CAR_MAX_LABEL_LENGTH={settings.max_label_length}")
    return None


def _runs(targets: list[Target], data: dict, project: Project, settings: Settings,
          prompt: list[str] | None, request: InteractiveRequest | None) -> list[Run]:
    config = project.config
    pointed = request is not None and bool(request.points or request.boxes)
    semantic: dict[tuple, list[TargetOutput]] = {}
    runs = []
    for target in targets:
        labels = task_vocabulary(target, data, settings.task_labels_key)
        if not labels:
            continue
        kind = target.kind
        instances = wants_instances(target, settings)
        preset = target.preset or config.preset
        background = target.background or config.background
        group = (preset, background, target.proposals)
        if kind == "choices" and (prompt or pointed):
            continue  # an annotator's prompt asks for a region, not for the image's tags
        sentences = prompt or task_sentences(target, data)
        named = label_named_by(prompt[0], labels) if prompt and len(prompt) == 1 else None
        selected = _selected(labels, request)
        if named is not None:
            # A typed label name asks for that label alone, in semantic mode.
            semantic.setdefault(group, []).append(TargetOutput(target, (named,), kind, instances))
        elif sentences:
            # Referring mode: the sentences describe one object, returned with the label the annotator
            # selected (the control's first label when none is).
            runs.append(Run("referring", tuple(sentences), preset, background,
                            (TargetOutput(target, (selected or labels[0],), kind, instances),)))
        elif pointed:
            # Keypoints or a rectangle alone ask for the selected label's mask, narrowed to the objects they pick.
            semantic.setdefault(group, []).append(TargetOutput(target, (selected or labels[0],), kind, instances))
        else:
            semantic.setdefault(group, []).append(TargetOutput(target, labels, kind, instances))
    for (preset, background, proposals), outputs in semantic.items():
        queries = tuple(dict.fromkeys(label.prompt for out in outputs for label in out.labels))
        runs.append(Run("semantic", queries, preset, background, tuple(outputs), proposals=proposals))
    return [_shared(run) for run in runs]


def _shared(run: Run) -> Run:
    """The one object kept for runs equal to `run` (see the module docstring)."""
    with _shared_lock:
        kept = _shared_runs.get(run)
        if kept is None:
            _shared_runs[run] = kept = run
            if len(_shared_runs) > SHARED_RUNS:
                _shared_runs.popitem(last=False)
        else:
            _shared_runs.move_to_end(run)
        return kept


def _selected(labels: list[LabelSpec], request: InteractiveRequest | None) -> LabelSpec | None:
    """The target's label that the annotator's drawn regions carry, if any."""
    if request is None or request.label is None:
        return None
    return next((spec for spec in labels if spec.value == request.label), None) or label_named_by(request.label,
                                                                                                 labels)


def typed_prompt(context: Any, config: ProjectConfig) -> list[str] | None:
    """Sentences typed into the config's TextArea, from an interactive /predict's `params.context`."""
    if not isinstance(context, dict) or not config.prompt_from_name:
        return None
    regions = context.get("result")
    sentences = []
    for item in regions if isinstance(regions, list) else ():
        if (isinstance(item, dict) and item.get("from_name") == config.prompt_from_name
                and isinstance(item.get("value"), dict)):
            text = item["value"].get("text")
            sentences.extend(s.strip() for s in (text if isinstance(text, list) else [text])
                             if isinstance(s, str) and s.strip())
    return sentences or None
