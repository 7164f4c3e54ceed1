"""CaR's recurrent loop (spec section 1): propose masks, score them, drop queries, repeat until stable.

`Segmenter` follows segment-anything's predictor style: `prepare(image)` runs everything that depends only
on the image (the proposal CLIP's trunk and last block, the affinity operator; the prompt backgrounds on
first use) and `segment(prepared or image, queries)` runs the per-query-set part. A few prepared images are
kept, keyed by their pixels, so segmenting the same image again skips the trunk.

Deviation from the official code: images whose longer side exceeds `max_side` (default 1024 px) are
processed at that size and the results resized back (nearest). The proposal CLIP runs at native
resolution, and its attention maps grow with the square of the pixel count: a 12-megapixel photo would need
~100 GB for them.

The recurrence's first step does not depend on theta (preset.confidence_threshold): it is cached on the
prepared image (a few query sets and settings per image), so that re-running with many theta values, as
threshold calibration does, computes it once. Its proposals (CAMs of the raw query texts, refined with
lambda) do not depend on eta, the visual prompts, the templates or the classifier either: they are cached
separately, so that a sweep of eta (or of those) recomputes only step 1's classifier scores.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from car_backend.engine.classifier import MaskClassifier
from car_backend.engine.config import PROPOSAL_MODES, EngineConfig
from car_backend.engine.head import MaskHead
from car_backend.engine.instances import Parts, paint_parts
from car_backend.engine.memory import nbytes
from car_backend.engine.models import (
    ClipModel,
    ModelLoadError,
    SharedTextCache,
    load_clip,
    resolve_device,
    resolve_precision,
)
from car_backend.engine.postprocess import (
    SamRefiner,
    assemble_label_map,
    crf_image,
    crf_masks_with_margin,
    merge_referring,
    pixel_winners,
)
from car_backend.engine.presets import CAM_TEMPLATE, Preset, get_preset
from car_backend.engine.proposals import DenseFeatures, ProposalGenerator, ProposalImage
from car_backend.engine.result import QueryMasks, Segmentation, resize_nearest
from car_backend.engine.two_stage import assign, class_probabilities, label_masks, mask_prompted_inputs
from car_backend.engine.visual_prompts import VISUAL_PROMPTS, prompt_background

log = logging.getLogger(__name__)

T = TypeVar("T")

MODES = ("semantic", "referring")
PREPARED_CACHE_SIZE = 4
FIRST_STEP_CACHE_SIZE = 8  # per prepared image
FIRST_PROPOSALS_CACHE_SIZE = 4  # per prepared image
# The mask head (engine.head.MaskHead) of the current `segment` call, if any: a context variable rather than a
# parameter threaded through every step method, so that the hook stays a few lines.
_HEAD: contextvars.ContextVar = contextvars.ContextVar("car_mask_head", default=None)


@dataclass
class PreparedImage:
    """One image with its text-independent computations done."""

    rgb: np.ndarray  # (H, W, 3) uint8, the working image (the original, unless it exceeds max_side)
    pixels: torch.Tensor  # (3, H, W) uint8 on the device
    proposal: ProposalImage
    key: tuple
    trunk_seconds: float
    original_size: tuple[int, int]  # (H, W) of the image as given
    backgrounds: dict[tuple[str, ...], torch.Tensor | None] = field(default_factory=dict)
    # step-1 (proposals, read-only scores, prompted-image embeddings by mask key) keyed by all they depend on;
    # see Segmenter._first_step
    first_steps: OrderedDict[tuple, tuple[torch.Tensor, np.ndarray, dict[bytes, torch.Tensor]]] = field(
        default_factory=OrderedDict)
    # step-1 proposals keyed by all they depend on (a subset of the above); see Segmenter._first_proposals
    first_proposals: OrderedDict[tuple, torch.Tensor] = field(default_factory=OrderedDict)

    def background(self, prompts: tuple[str, ...]) -> torch.Tensor | None:
        """The outside-the-mask image for this prompt set, computed once per image."""
        key = tuple(p for p in VISUAL_PROMPTS if p in prompts)
        if key not in self.backgrounds:
            self.backgrounds[key] = prompt_background(self.pixels, key)
        return self.backgrounds[key]

    def held_bytes(self) -> int:
        """Bytes of the arrays and tensors this prepared image holds now, its caches included (at 1024 x
        1024 px with ViT-B/16 about 1 GB, mostly block L's attention and the N x N affinity)."""
        proposal = self.proposal
        return nbytes([self.rgb, self.pixels, proposal.transition, *vars(proposal.last_block).values(),
                       *self.backgrounds.values(), *(p for p, _ in self.first_steps.values()),
                       *self.first_proposals.values()])


@dataclass
class StepRecord:
    """One step of the recurrence."""

    live: list[int]  # indices into the query list, in order
    scores: np.ndarray  # (len(live),)
    kept: list[int]  # positions in `live` that survived
    proposals: torch.Tensor | None  # (len(live), H, W) soft maps; dropped once no longer needed
    empty: bool  # all proposals are zero


class Segmenter:
    """CaR on one or two CLIPs; thread-safe (models and caches are shared, a call's state is local)."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        proposal_model: ClipModel | torch.nn.Module | None = None,
        classifier_model: ClipModel | torch.nn.Module | None = None,
        sam_refiner: SamRefiner | None = None,
        text_cache: SharedTextCache | None = None,
    ):
        """Models load from `config` on first use unless given (ClipModel, or an open_clip CLIP).

        `text_cache` is plugged into the models this segmenter loads (see ClipModel.shared_cache).
        Raises nothing itself; loading (on first use) raises ModelSpecError or ModelLoadError.
        """
        self.config = config or EngineConfig()
        self._proposal_clip = _as_clip(proposal_model)
        self._classifier_clip = _as_clip(classifier_model)
        self._sam = sam_refiner
        self._text_cache = text_cache
        self._generators: dict[int, ProposalGenerator] = {}
        self._classifiers: dict[int, MaskClassifier] = {}
        self._prepared: OrderedDict[tuple, PreparedImage] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ models
    @property
    def proposal_clip(self) -> ClipModel:
        if self._proposal_clip is None:
            self._proposal_clip = self._load(self.config.proposal_model, "CAR_PROPOSAL_MODEL", "proposal")
        return self._proposal_clip

    @property
    def classifier_clip(self) -> ClipModel:
        if self._classifier_clip is None:
            self._classifier_clip = self._load(self.config.classifier_model, "CAR_CLASSIFIER_MODEL", "classifier")
        return self._classifier_clip

    def _load(self, spec: str, setting: str, role: str) -> ClipModel:
        s = self.config
        device = resolve_device(s.device)
        precision = resolve_precision(s.precision, device, role, s.compat)
        clip = load_clip(spec, device, precision, s.weights_dir, setting=setting)
        if self._text_cache is not None:
            clip.shared_cache = self._text_cache
        return clip

    @property
    def _official(self) -> bool:
        """CAR_COMPAT=official: reproduce the official code's quirks (see EngineConfig)."""
        return self.config.compat == "official"

    def _generator(self) -> ProposalGenerator:
        clip = self.proposal_clip
        with self._lock:
            return self._generators.setdefault(id(clip), ProposalGenerator(clip, self._official))

    def _classifier(self, preset: Preset) -> MaskClassifier:
        clip = self.proposal_clip if preset.classify_with_proposal_model else self.classifier_clip
        with self._lock:
            return self._classifiers.setdefault(id(clip), MaskClassifier(clip, self._official))

    @property
    def sam(self) -> SamRefiner | None:
        if self._sam is None and self.config.sam_checkpoint:
            s = self.config
            self._sam = SamRefiner(s.sam_checkpoint, s.sam_model_type, str(resolve_device(s.device)),
                                   mode=s.sam_mode)
        return self._sam

    # ------------------------------------------------------------------------------------------ images
    def prepare(self, image: Image.Image | np.ndarray, cache: bool = True,
                original_size: tuple[int, int] | None = None) -> PreparedImage:
        """The image with its text-independent work done, cached for the last few distinct images unless
        `cache` is False (training and calibration hold their images themselves, within a byte budget).
        `original_size` (H, W): the size results are answered at, when `image` is the working image (a
        `PreparedImage.rgb`) of a larger original: preparing it again gives the same prepared image."""
        return self._prepare(image, cache, original_size)[0]

    def dense_features(self, image: Image.Image | np.ndarray) -> DenseFeatures:
        """The proposal CLIP's patch features of an image, as a mask head reads them, computed without the
        attention maps and the affinity `prepare` keeps (see ProposalGenerator.dense_features); not cached."""
        rgb = _fit(to_rgb_array(image), self.config.max_side)
        pixels = torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(self.proposal_clip.device)
        return self._generator().dense_features(pixels)

    def _prepare(self, image: Image.Image | np.ndarray, cache: bool = True,
                 original_size: tuple[int, int] | None = None) -> tuple[PreparedImage, bool]:
        """(prepared image, whether it was computed now rather than taken from the cache)."""
        original = to_rgb_array(image)
        key = (original.shape, original_size, hashlib.blake2b(original.tobytes(), digest_size=16).digest())
        with self._lock:
            cached = self._prepared.get(key)
            if cached is not None:
                self._prepared.move_to_end(key)
                return cached, False
        generator = self._generator()
        start = time.perf_counter()
        rgb = _fit(original, self.config.max_side)
        pixels = torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(generator.clip.device)
        proposal = generator.prepare(pixels)
        _synchronize(pixels.device)
        prepared = PreparedImage(rgb, pixels, proposal, key, trunk_seconds=time.perf_counter() - start,
                                 original_size=original_size or original.shape[:2])
        if not cache:
            return prepared, True
        with self._lock:
            self._prepared[key] = prepared
            while len(self._prepared) > PREPARED_CACHE_SIZE:
                self._prepared.popitem(last=False)
        return prepared, True

    # ------------------------------------------------------------------------------------------ CaR
    def segment(
        self,
        image: Image.Image | np.ndarray | PreparedImage,
        queries: Sequence[str],
        preset: str | Preset | None = None,
        mode: str = "semantic",
        background: Sequence[str] | None = None,
        proposals: str | None = None,
        head: MaskHead | None = None,
        instances: bool = False,
    ) -> Segmentation:
        """Run CaR. `preset` None means config.preset; `background` None means the preset's words.

        `proposals` None means config.proposals: `car` (CaR's masks) or `sam` (two-stage, semantic mode only:
        SAM's masks classified over the labels CaR kept; referring mode always uses CaR's masks).
        With a `head` (trained on this proposal CLIP), its masks replace, or are blended with (`head.blend`),
        the Grad-CAM proposals of every step; the classifier still decides which queries survive.
        With SAM the answer's `parts` are the objects SAM found for the kept labels (engine.instances);
        `instances` asks prompted mode for one prompt per connected part of each mask (else one per label,
        and no parts); automatic and two-stage modes give parts either way.
        """
        start = time.perf_counter()
        queries = _check_queries(queries)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        preset = preset if isinstance(preset, Preset) else get_preset(preset or self.config.preset)
        background = tuple(preset.background if background is None else background)
        timer = StageTimer(self.proposal_clip.device)
        prepared, fresh = (image, False) if isinstance(image, PreparedImage) else self._prepare(image)
        timer.add("trunk", prepared.trunk_seconds if fresh else 0.0)
        proposals = proposals or self.config.proposals
        if proposals not in PROPOSAL_MODES:
            raise ValueError(f"proposals must be one of {PROPOSAL_MODES}, got {proposals!r}")
        if proposals == "sam" and mode == "semantic" and self.sam is None:
            raise ModelLoadError("proposals=sam (CAR_PROPOSALS or a control's car_proposals) needs Segment "
                                 "Anything: set CAR_SAM_CHECKPOINT and CAR_SAM_MODEL_TYPE")
        token = _HEAD.set(head)
        try:
            steps = self._recur(prepared, queries, preset, mode, background, timer)
        finally:
            _HEAD.reset(token)
        if proposals == "sam" and mode == "semantic":
            result = self._finish_two_stage(prepared, queries, preset, background, steps, timer)
        else:
            result = self._finish(prepared, queries, preset, mode, steps, timer, instances)
        result.timings["total"] = time.perf_counter() - start
        return result

    def _recur(self, prepared: PreparedImage, queries: list[str], preset: Preset, mode: str,
               background: tuple[str, ...], timer: StageTimer) -> list[StepRecord]:
        generator = self._generator()
        classifier = self._classifier(preset)
        referring = mode == "referring"
        templates = preset.templates or (CAM_TEMPLATE,)
        with timer("text"):
            background_texts = generator.clip.embed_texts([CAM_TEMPLATE.format(w) for w in background])
            # Fix: without templates the official code filters the prompt strings by *character* index from
            # step 2 on (spec 8.4); here every template's prompt list is filtered like the queries.
            class_texts = classifier.clip.embed_texts([t.format(q) for t in templates for q in queries])
            class_texts = class_texts.reshape(len(templates), len(queries), -1)
        steps: list[StepRecord] = []
        fallback: StepRecord | None = None  # the latest step whose proposals are not all zero
        live = list(range(len(queries)))
        kept_before = 0  # the official loop stops when a step keeps as many queries as the step before
        known: dict[bytes, torch.Tensor] = {}  # this call's prompted-image embeddings by mask key (_scores)
        while True:
            if steps:
                cam_texts = [CAM_TEMPLATE.format(queries[i]) for i in live]
                proposals, scores = self._step(prepared, cam_texts, background_texts, class_texts[:, live],
                                               classifier, preset, referring, timer, known)
            else:
                proposals, scores, first_known = self._first_step(prepared, queries, background, background_texts,
                                                                  class_texts, classifier, preset, referring, timer)
                known.update(first_known)  # a copy: the cached dict is shared with later calls
            kept = [i for i, s in enumerate(scores) if s > preset.confidence_threshold] or [int(np.argmax(scores))]
            record = StepRecord(live=live, scores=scores, kept=kept, proposals=proposals,
                                empty=float(proposals.max()) == 0)
            if steps and steps[-1] is not fallback:
                steps[-1].proposals = None
            if fallback is not None and not record.empty:
                fallback.proposals = None
            steps.append(record)
            if not record.empty:
                fallback = record
            log.debug("step %d: %d live, kept %s", len(steps), len(live), [queries[live[i]] for i in kept])
            # Fix: the official loop has no cap; max_steps bounds a pathological vocabulary.
            if len(kept) == kept_before or len(steps) >= self.config.max_steps:
                return steps
            kept_before = len(kept)
            live = [live[i] for i in kept]

    def _first_step(self, prepared: PreparedImage, queries: list[str], background: tuple[str, ...],
                    background_texts: torch.Tensor, class_texts: torch.Tensor, classifier: MaskClassifier,
                    preset: Preset, referring: bool, timer: StageTimer
                    ) -> tuple[torch.Tensor, np.ndarray, dict[bytes, torch.Tensor]]:
        """Step 1: every query, CAMs prompted with the raw query texts (spec 1); cached on `prepared`.

        Returns the proposals, the scores and the prompted-image embeddings by mask (see `_scores`).

        The key holds everything step 1 reads besides the prepared image: the models (by identity), the
        texts and the thresholds and prompts, but not theta. On a miss the proposals may still come from
        `_first_proposals` (their own cache, not keyed by eta, prompts, templates or classifier). The cached
        tensors are never modified: `_recur` only drops its StepRecord's reference, scores are read-only and
        the embeddings are copied.
        """
        key = (tuple(queries), referring, background, preset.templates, preset.clipes_threshold, preset.mask_threshold,
               preset.visual_prompts, self.proposal_clip, classifier.clip, _HEAD.get())

        def compute() -> tuple[torch.Tensor, np.ndarray, dict[bytes, torch.Tensor]]:
            proposals = self._first_proposals(prepared, queries, background, background_texts, preset, referring,
                                              timer)
            known: dict[bytes, torch.Tensor] = {}
            scores = self._scores(prepared, classifier, proposals, class_texts, preset, timer, known)
            scores.flags.writeable = False
            return proposals, scores, known

        return self._memo(prepared.first_steps, key, FIRST_STEP_CACHE_SIZE, compute)

    def _first_proposals(self, prepared: PreparedImage, queries: list[str], background: tuple[str, ...],
                         background_texts: torch.Tensor, preset: Preset, referring: bool,
                         timer: StageTimer) -> torch.Tensor:
        """Step 1's soft proposals (Q, H, W); cached on `prepared`, keyed by all they depend on.

        That is the raw query texts, the mode, the background words, lambda and the proposal model (which
        embeds the texts and makes the CAMs); not eta, the visual prompts, the templates nor the classifier,
        which only the scores read. The cached tensor is shared, never modified.
        """
        key = (tuple(queries), referring, background, preset.clipes_threshold, self.proposal_clip, _HEAD.get())
        return self._memo(prepared.first_proposals, key, FIRST_PROPOSALS_CACHE_SIZE,
                          lambda: self._proposals(prepared, queries, background_texts, preset, referring, timer))

    def _memo(self, cache: OrderedDict, key: tuple, size: int, compute: Callable[[], T]) -> T:
        """cache[key], computed (outside the lock) on a miss; the cache keeps its `size` latest keys."""
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = compute()
        with self._lock:
            cache[key] = value
            while len(cache) > size:
                cache.popitem(last=False)
        return value

    def _step(self, prepared: PreparedImage, cam_texts: list[str], background_texts: torch.Tensor,
              class_texts: torch.Tensor, classifier: MaskClassifier, preset: Preset, referring: bool,
              timer: StageTimer, known: dict[bytes, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """Proposals (Q, H, W) and classifier scores (Q,) for the live queries' CAM texts and class texts."""
        proposals = self._proposals(prepared, cam_texts, background_texts, preset, referring, timer)
        return proposals, self._scores(prepared, classifier, proposals, class_texts, preset, timer, known)

    def _proposals(self, prepared: PreparedImage, cam_texts: list[str], background_texts: torch.Tensor,
                   preset: Preset, referring: bool, timer: StageTimer) -> torch.Tensor:
        """Soft proposals (Q, H, W): CAMs for the CAM texts against the background, refined with lambda."""
        generator = self._generator()
        head = _HEAD.get()
        with timer("text"):
            foreground = generator.clip.embed_texts(cam_texts)
        if head is not None:
            with timer("head"):
                masks = head.masks(generator.clip, prepared.proposal, foreground)
            if head.blend >= 1.0:
                return masks
        with timer("cam"):
            cams = generator.cams(prepared.proposal, foreground, background_texts, referring)
        with timer("refine"):
            refined = generator.refine(prepared.proposal, cams, preset.clipes_threshold)
        return refined if head is None else head.blend * masks + (1.0 - head.blend) * refined

    def _scores(self, prepared: PreparedImage, classifier: MaskClassifier, proposals: torch.Tensor,
                texts: torch.Tensor, preset: Preset, timer: StageTimer, known: dict[bytes, torch.Tensor]
                ) -> np.ndarray:
        """Scores (Q,) of soft proposals (Q, H, W) against class texts (T, Q, E).

        `known`: the call's prompted-image embeddings (E,) by mask key (MaskClassifier.mask_keys), read and
        extended: an image prompted with a mask that an earlier step or another query prompted already (or
        unprompted, like another query's) is not prompted nor encoded again.
        """
        if len(proposals) == 1:  # a softmax over one query is 1: nothing to compute
            return np.ones(1, dtype=np.float32)
        with timer("prompts"):
            keys = classifier.mask_keys(proposals, preset.mask_threshold)
            fresh = [keys.index(key) for key in dict.fromkeys(keys) if key not in known]
            if fresh:
                inputs = classifier.prompted_inputs(
                    prepared.pixels, proposals[fresh], preset.mask_threshold, preset.visual_prompts,
                    prepared.background(preset.visual_prompts),
                )
        with timer("classify"):
            if fresh:
                known.update(zip((keys[i] for i in fresh), classifier.embed_images(inputs), strict=True))
            embeddings = torch.stack([known[key] for key in keys])
            scores = classifier.scores(embeddings, texts, double_softmax=preset.templates is not None)
        return scores.cpu().numpy()

    def _finish(self, prepared: PreparedImage, queries: list[str], preset: Preset, mode: str,
                steps: list[StepRecord], timer: StageTimer, instances: bool = False) -> Segmentation:
        """CRF (and refiner) on the survivors' final proposals, at working resolution; the answer.

        Memory: masks exist only for survivors and stay at working resolution; only the label map is resized
        to the image's size (`QueryMasks` resizes a mask when it is read).
        """
        last = steps[-1]
        survivors = [last.live[i] for i in last.kept]
        proposals = last.proposals[last.kept]
        earlier = next((step for step in reversed(steps[:-1]) if not step.empty), None)
        if last.empty and earlier is not None:
            # The official loop reuses the previous step's proposals when a step's are all zero (taking their
            # first rows, which misaligns them when that step had more queries; here the survivors' rows).
            proposals = earlier.proposals[[earlier.live.index(i) for i in survivors]]
        official = self._official
        separate = mode == "referring"
        with timer("crf"):
            refined, margin = crf_masks_with_margin(crf_image(prepared.rgb, official),
                                                    proposals.float().cpu().numpy(), separate=separate)
        refined, winners = pixel_winners(refined, separate, official)
        index = [q for q, kept in zip(survivors, winners, strict=True) if kept]
        rows = refined[winners]
        row_scores = last.scores[last.kept][winners]
        objects = None
        if self.sam is not None and len(rows):
            with timer("sam"):
                rows, objects = self.sam.refine_objects(prepared.rgb, rows, preset.iom_threshold,
                                                        preset.sam_min_pred_threshold, preset.sam_iou_threshold,
                                                        instances=instances and mode == "semantic")
            if mode != "semantic" or all(o is None for o in objects):
                objects = None
        return _answer(prepared, queries, mode, index, rows, row_scores, len(steps), timer,
                       float(margin.mean(dtype=np.float64)), objects)

    def _finish_two_stage(self, prepared: PreparedImage, queries: list[str], preset: Preset,
                          background: tuple[str, ...], steps: list[StepRecord], timer: StageTimer) -> Segmentation:
        """The two-stage answer (engine.two_stage): SAM's masks classified over the labels CaR kept."""
        last = steps[-1]
        survivors = [last.live[i] for i in last.kept]
        with timer("sam"):
            found = self.sam.sam_objects(prepared.rgb)
        candidates = [mask for mask, _ in found]
        height, width = prepared.rgb.shape[:2]
        stacked = np.stack(candidates) if candidates else np.zeros((0, height, width), dtype=bool)
        classifier = self._classifier(preset)
        names = [queries[i] for i in survivors] + list(background)
        templates = preset.templates or (CAM_TEMPLATE,)
        probabilities = np.zeros((0, len(names)), dtype=np.float32)
        if candidates:
            with timer("text"):
                texts = classifier.clip.embed_texts([t.format(n) for t in templates for n in names])
                texts = texts.reshape(len(templates), len(names), -1)
            with timer("prompts"):
                inputs = mask_prompted_inputs(classifier, prepared.pixels,
                                              torch.as_tensor(stacked, device=prepared.pixels.device),
                                              preset.visual_prompts)
            with timer("classify"):
                probabilities = class_probabilities(classifier, classifier.embed_images(inputs), texts,
                                                    double_softmax=preset.templates is not None).cpu().numpy()
        assignment = assign(probabilities, len(survivors), preset.confidence_threshold)
        masks, label_scores = label_masks(stacked, assignment, len(survivors))
        won = masks.reshape(len(masks), -1).any(axis=1)  # a label whose masks all lost their pixels is dropped
        index = [q for q, kept in zip(survivors, won, strict=True) if kept]
        objects = [[found[m] for m in np.flatnonzero(assignment.labels == k)] for k in np.flatnonzero(won)]
        return _answer(prepared, queries, "semantic", index, masks[won], label_scores[won], len(steps), timer, None,
                       objects)


def _answer(prepared: PreparedImage, queries: list[str], mode: str, index: list[int], rows: np.ndarray,
            row_scores: np.ndarray, steps: int, timer: StageTimer, margin: float | None,
            objects: list[list[tuple[np.ndarray, float]] | None] | None = None) -> Segmentation:
    """The Segmentation for the kept queries `index` with their (K, h, w) working-resolution masks `rows`
    and scores, and SAM's objects of each row if any (engine.instances.paint_parts); only the label map
    (and the parts' map) is resized to the image's size."""
    scores = np.zeros(len(queries), dtype=np.float32)
    scores[index] = row_scores
    size = prepared.original_size
    if mode == "referring":
        working = merge_referring(rows, row_scores, answered_size=size).astype(np.int32)
    else:
        lut = np.array([0] + [q + 1 for q in index], dtype=np.int32)  # row k + 1 -> query + 1
        working = lut[assemble_label_map(rows, row_scores)]
    parts = None
    if objects is not None and mode == "semantic":
        painted = paint_parts(rows, row_scores, objects)
        parts = Parts(resize_nearest(painted.map, size), painted.quality)
    return Segmentation(queries=queries, label_map=resize_nearest(working, size),
                        masks=QueryMasks(rows, tuple(index), len(queries), size), scores=scores, steps=steps,
                        mode=mode, timings=dict(timer.seconds), margin=margin, parts=parts)


class StageTimer:
    """Seconds per stage, accumulated over steps; waits for the device so GPU work lands in its stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A private (H, W, 3) uint8 RGB copy of a PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    elif array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image arrays must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    return np.array(array, order="C")


def _fit(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image shrunk (area interpolation) so that its longer side is at most max_side."""
    height, width = rgb.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return rgb
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))


def _as_clip(model: ClipModel | torch.nn.Module | None) -> ClipModel | None:
    """An injected model as a ClipModel (an open_clip CLIP gets open_clip's default tokenizer)."""
    if model is None or isinstance(model, ClipModel):
        return model
    return ClipModel(model, SimpleTokenizer(context_length=getattr(model, "context_length", 77)))


def _check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise TypeError("queries must be a sequence of strings, not one string")
    queries = [str(q).strip() for q in queries]
    if not queries or not all(queries):
        raise ValueError("queries must be a non-empty list of non-empty strings")
    return queries


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
