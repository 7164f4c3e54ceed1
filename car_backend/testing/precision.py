"""How far the engine's answers at a lower precision are from its fp32 answers (README "Precision").

benchmarks/precision.py prints these figures; tests/engine/test_precision.py holds them to the thresholds the
README states. Two segmenters on the same weights (one with fp32 models, one with the models the precision
under test resolves to) segment the same cases: the parity cases (`PARITY_CASES`, the ones
tests/engine/test_parity.py runs against the literal implementation) and generated scenes
(engine.synthetic.scene) with a vocabulary of queries. Per case: whether the kept labels and the number of
steps are equal, the largest difference of a step's scores (over the steps both ran with the same live
queries: always step 1, the classifier's rounding on every query; later steps where the kept labels did not
diverge), and the share of pixels where the label maps agree.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from car_backend.engine import ClipModel, EngineConfig, Segmenter, get_preset
from car_backend.engine.presets import Preset
from car_backend.engine.synthetic import scene

PARITY_WORDS = ["cat", "dog", "car", "tree person", "red apple", "boat", "sofa", "bird", "horse", "train", "bus",
                "cow"]
SCENE_VOCABULARY = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
                    "traffic light", "fire hydrant", "stop sign", "bench", "bird", "cat", "dog", "horse", "sheep",
                    "cow", "elephant")


@dataclass(frozen=True)
class Case:
    """One segmentation: a preset with theta lowered (random weights give near-uniform scores), a generated
    scene's seed and size, the queries, optionally other visual prompts, and the mode."""

    preset: str
    theta: float
    seed: int
    queries: tuple[str, ...]
    prompts: tuple[str, ...] | None = None  # override the preset's visual prompts
    mode: str = "semantic"
    size: tuple[int, int] = (96, 128)  # (H, W)

    @property
    def name(self) -> str:
        return f"{self.preset}-{self.mode}-{self.seed}"

    def resolved_preset(self) -> Preset:
        # eta is nudged off the preset's round value: refined proposals can hold pixels at 0.5 to within a few
        # 1e-6, and the two implementations round such a pixel to different sides of the threshold (a
        # one-pixel mask difference that the random tiny classifier turns into a different score). Both
        # agree on either side of a 1e-5 margin (case coco-3 has a pixel between 0.500001 and 0.50001).
        base = get_preset(self.preset)
        preset = dataclasses.replace(base, confidence_threshold=self.theta, mask_threshold=base.mask_threshold + 1e-5)
        return dataclasses.replace(preset, visual_prompts=self.prompts) if self.prompts else preset

    def image(self) -> np.ndarray:
        return scene(self.seed, *self.size)


# Chosen so that queries get dropped, several survive, and the loop runs > 2 steps (test_parity checks it).
PARITY_CASES = (
    Case("coco", 0.04, 1, tuple(PARITY_WORDS[1:7])),
    Case("coco", 0.04, 3, tuple(PARITY_WORDS[3:9])),
    Case("voc", 0.04, 0, tuple(PARITY_WORDS[0:6])),
    Case("voc", 0.04, 2, tuple(PARITY_WORDS[2:8])),
    Case("coco", 0.1, 2, ("horse", "cat", "train", "red apple", "dog", "boat")),
    Case("coco", 0.08, 3, tuple(PARITY_WORDS)),
    Case("coco", 0.1, 4, ("cat", "dog", "car", "boat", "sofa"), prompts=("black", "rectangle", "contour")),
    Case("voc", 0.04, 5, ("bird", "horse", "train", "bus", "cow"), prompts=("circle", "blur", "gray")),
    Case("refcoco+", 0.05, 6, ("the cat on the left", "a red car", "the tree person", "small boat"),
         mode="referring"),
    Case("refcocog", 0.02, 7, ("a dog", "the horse near the bus", "a big cow"), mode="referring"),
)


def scene_cases(count: int, size: tuple[int, int], queries: int = 20, theta: float = 0.06,
                first_seed: int = 100) -> tuple[Case, ...]:
    """`count` generated scenes of `size` (H, W), each with the first `queries` words of SCENE_VOCABULARY,
    the coco preset with theta lowered so that several labels survive on random weights."""
    words = SCENE_VOCABULARY[:queries]
    return tuple(Case("coco", theta, first_seed + i, words, size=size) for i in range(count))


@dataclass(frozen=True)
class CaseAgreement:
    name: str
    kept_equal: bool
    steps_equal: bool
    max_score_diff: float  # over the steps both ran with the same live queries (step 1 at least)
    mask_agreement: float  # share of pixels where the label maps are equal


@dataclass(frozen=True)
class Agreement:
    """The figures over a set of cases (README "Precision")."""

    cases: tuple[CaseAgreement, ...]

    @property
    def kept_equal(self) -> int:
        return sum(c.kept_equal for c in self.cases)

    @property
    def max_score_diff(self) -> float:
        return max(c.max_score_diff for c in self.cases)

    @property
    def min_mask_agreement(self) -> float:
        return min(c.mask_agreement for c in self.cases)

    @property
    def mean_mask_agreement(self) -> float:
        return float(np.mean([c.mask_agreement for c in self.cases]))

    def summary(self) -> str:
        return (f"kept labels equal in {self.kept_equal}/{len(self.cases)} cases, max step-score difference "
                f"{self.max_score_diff:.2e}, mask agreement min {self.min_mask_agreement:.4f} mean "
                f"{self.mean_mask_agreement:.4f}")


def segmenter_pair(proposal: torch.nn.Module, proposal_tokenizer, classifier: torch.nn.Module,
                   classifier_tokenizer, dtypes: tuple[torch.dtype, torch.dtype], compat: str = "fixed"
                   ) -> tuple[Segmenter, Segmenter]:
    """(fp32 segmenter, segmenter with the proposal and classifier models in `dtypes`) on the same float32
    CPU weights (converted copies where a dtype is not float32)."""

    def clip(model: torch.nn.Module, tokenizer, dtype: torch.dtype, name: str) -> ClipModel:
        return ClipModel(model if dtype == torch.float32 else copy.deepcopy(model).to(dtype), tokenizer, name)

    reference = Segmenter(EngineConfig(device="cpu", precision="fp32", compat=compat),
                          proposal_model=clip(proposal, proposal_tokenizer, torch.float32, "proposal"),
                          classifier_model=clip(classifier, classifier_tokenizer, torch.float32, "classifier"))
    candidate = Segmenter(EngineConfig(device="cpu", compat=compat),
                          proposal_model=clip(proposal, proposal_tokenizer, dtypes[0], "proposal"),
                          classifier_model=clip(classifier, classifier_tokenizer, dtypes[1], "classifier"))
    return reference, candidate


def agreement(reference: Segmenter, candidate: Segmenter, cases: Iterable[Case]) -> Agreement:
    """The candidate's answers against the reference's, case by case (both segment every case)."""
    return Agreement(tuple(compare_case(reference, candidate, case) for case in cases))


def compare_case(reference: Segmenter, candidate: Segmenter, case: Case) -> CaseAgreement:
    image, preset = case.image(), case.resolved_preset()
    runs = []
    for segmenter in (reference, candidate):
        steps = _StepScores(segmenter)
        result = segmenter.segment(image, list(case.queries), preset=preset, mode=case.mode)
        runs.append((result, steps.restore()))
    (expected, expected_steps), (got, got_steps) = runs
    # Steps are compared in order while both runs had the same live queries (step 1 always does).
    diffs = [float(np.abs(a - b).max()) for (live_a, a), (live_b, b) in zip(expected_steps, got_steps, strict=False)
             if live_a == live_b]
    return CaseAgreement(case.name, expected.kept == got.kept, expected.steps == got.steps, max(diffs),
                         float((expected.label_map == got.label_map).mean()))


class _StepScores:
    """Records the scores of every step of the next `segment` calls of one segmenter: wraps its `_recur`."""

    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter
        self.steps: list[tuple[tuple[int, ...], np.ndarray]] = []
        original = segmenter._recur

        def recur(*args, **kwargs):
            records = original(*args, **kwargs)
            self.steps.extend((tuple(r.live), np.asarray(r.scores)) for r in records)
            return records

        segmenter._recur = recur

    def restore(self) -> Sequence[tuple[tuple[int, ...], np.ndarray]]:
        del self.segmenter._recur  # the instance attribute; the class's method shows again
        return self.steps
