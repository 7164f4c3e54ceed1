"""Segment Anything refiners: the three families built from their own registries with random weights,
the error messages, the automatic IoM matching, and prompted mode (spied predictor).

SAM ViT-B and HQ-SAM ViT-B run their real predictor, prompt encoder and mask decoder; only their image
encoder's 1024x1024 forward (~45 s on a shared CPU core) is replaced by random features of its output shape.
SAM 2.1 hiera-t runs whole (a few seconds).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from car_backend.engine import EngineConfig, ModelLoadError, ModelSpecError, Segmenter, get_preset
from car_backend.engine.postprocess import SamRefiner, match_sam_masks
from car_backend.engine.refiners import MaskPrompt, SamModel, SamSpec, mask_prompts
from tests.support.engine import scene

FAMILY_PACKAGES = {"vit_b": "segment_anything", "hq_vit_b": "segment_anything_hq", "sam2.1_hiera_t": "sam2"}
FEW_POINTS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.7,
              "crop_n_layers": 0}


@pytest.mark.parametrize(("model_type", "family", "package", "name"), [
    ("vit_h", "sam", "segment-anything", "vit_h"),
    ("hq_vit_h", "sam-hq", "segment-anything-hq", "vit_h"),
    ("hq_vit_tiny", "sam-hq", "segment-anything-hq", "vit_tiny"),
    ("sam2.1_hiera_l", "sam2", "sam2", "configs/sam2.1/sam2.1_hiera_l.yaml"),
    ("sam2_hiera_b+", "sam2", "sam2", "configs/sam2/sam2_hiera_b+.yaml"),
])
def test_model_types_name_family_package_and_model(model_type, family, package, name):
    spec = SamSpec.parse(model_type)
    assert (spec.family, spec.package, spec.registry_name) == (family, package, name)


def test_unknown_model_type_missing_package_and_missing_checkpoint_name_both_settings(monkeypatch, tmp_path):
    with pytest.raises(ModelSpecError, match="CAR_SAM_MODEL_TYPE='vit_z'"):
        SamModel("vit_z", "x.pth")
    checkpoint = tmp_path / "sam_hq_vit_b.pth"
    for model_type, module in FAMILY_PACKAGES.items():
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ModelLoadError) as error:
            SamModel(model_type, str(checkpoint)).load()
        message = str(error.value)
        for part in (f"CAR_SAM_MODEL_TYPE={model_type}", SamSpec.parse(model_type).package, "CAR_SAM_CHECKPOINT",
                     str(checkpoint), f"car-backend[{SamSpec.parse(model_type).extra}]"):
            assert part in message, (part, message)
        monkeypatch.undo()
    installed = [t for t, module in FAMILY_PACKAGES.items() if _importable(module)]
    for model_type in installed:
        with pytest.raises(ModelLoadError, match=f"CAR_SAM_CHECKPOINT={checkpoint}: no such file.*"
                                                 f"CAR_SAM_MODEL_TYPE={model_type}"):
            SamModel(model_type, str(checkpoint)).load()


def test_a_missing_sam_fails_the_job_naming_both_settings(tiny_clips, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "segment_anything_hq", None)
    config = EngineConfig(device="cpu", sam_checkpoint=str(tmp_path / "hq.pth"), sam_model_type="hq_vit_h")
    segmenter = Segmenter(config, proposal_model=tiny_clips[0], classifier_model=tiny_clips[1])
    with pytest.raises(ModelLoadError, match="CAR_SAM_MODEL_TYPE=hq_vit_h.*segment-anything-hq.*CAR_SAM_CHECKPOINT"):
        segmenter.segment(scene(1, 48, 64), ["cat", "dog"])


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _fast_encoder(model, family: str) -> None:
    """Random features of the image encoder's output shape instead of its 1024x1024 forward."""
    encoder = model.image_encoder
    generator = torch.Generator().manual_seed(0)

    def forward(x):
        features = torch.randn(len(x), 256, 64, 64, generator=generator)
        if family == "sam-hq":
            width = encoder.blocks[0].attn.qkv.in_features
            return features, [torch.randn(len(x), 64, 64, width, generator=generator)]
        return features

    encoder.forward = forward


@pytest.fixture(scope="module", params=list(FAMILY_PACKAGES))
def random_sam(request):
    model_type = request.param
    pytest.importorskip(FAMILY_PACKAGES[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = SamModel(model_type, "random")
        model = sam.model  # built by the family's own registry / config file
    if sam.spec.family != "sam2":
        _fast_encoder(model, sam.spec.family)
    return sam


def test_each_family_builds_from_its_registry_and_predicts(random_sam):
    model = random_sam.model
    assert sum(p.numel() for p in model.parameters()) > 1_000_000  # a real model, not a stand-in
    rgb = scene(2, 96, 128)
    prompt = MaskPrompt(np.array([10, 10, 60, 50], np.float32), np.array([[30, 30], [100, 80]], np.float32),
                        np.array([1, 0], np.int32))
    answers = random_sam.prompted_objects(rgb, [prompt, prompt])  # masks with SAM's predicted IoU
    assert len(answers) == 2 and all(m.shape == (96, 128) and m.dtype == bool for m, _ in answers)
    assert all(type(q) is float and np.isfinite(q) for _, q in answers)
    automatic = random_sam.automatic_objects(rgb, FEW_POINTS)
    assert isinstance(automatic, list) and all(m.shape == (96, 128) for m, _ in automatic)
    assert all(type(q) is float and np.isfinite(q) for _, q in automatic)


def _rect(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("preset_name", ["voc", "coco", "context"])
def test_automatic_matching_picks_what_the_iom_rule_says(preset_name):
    """Generated SAM masks with known intersections: the kept ones are those with I / min(|m|, |s|) above
    the preset's IoM threshold (I / |s| only counting when I / |m| reaches min_pred), else the best one."""
    preset = get_preset(preset_name)
    rng = np.random.default_rng(4)
    shape = (60, 80)
    for _ in range(30):
        car = _rect(shape, 10, 40, 10, 50)  # 1200 px
        candidates = []
        for _ in range(4):
            y0, x0 = int(rng.integers(0, 50)), int(rng.integers(0, 70))
            candidates.append(_rect(shape, y0, y0 + int(rng.integers(3, 35)), x0, x0 + int(rng.integers(3, 45))))
        ioms = []
        for sam in candidates:
            overlap = (car & sam).sum()
            pred, own = overlap / car.sum(), overlap / sam.sum()
            ioms.append(max(pred, own if pred >= preset.sam_min_pred_threshold else 0.0))
        kept = [s for s, iom in zip(candidates, ioms, strict=True) if iom > preset.iom_threshold]
        union = np.logical_or.reduce(kept or [candidates[int(np.argmax(ioms))]])
        expected = union if (union & car).sum() / (union | car).sum() > preset.sam_iou_threshold else car
        refiner = SamRefiner("unused", "vit_b", "cpu", generate=lambda rgb, c=candidates: c)
        got = refiner.refine(np.zeros((*shape, 3), np.uint8), car[None], preset.iom_threshold,
                             preset.sam_min_pred_threshold, preset.sam_iou_threshold)[0]
        assert np.array_equal(got, expected)
        assert np.array_equal(got, match_sam_masks(car, candidates, preset.iom_threshold,
                                                   preset.sam_min_pred_threshold, preset.sam_iou_threshold))
    # A SAM mask wholly inside the CaR mask has IoM 1 and replaces it when they overlap enough:
    inside = _rect(shape, 11, 40, 10, 50)
    assert np.array_equal(match_sam_masks(_rect(shape, 10, 40, 10, 50), [inside], preset.iom_threshold,
                                          preset.sam_min_pred_threshold, 0.5), inside)


class SpyPredictor:
    """Records set_image and predict calls; answers each predict with a mask of its own."""

    def __init__(self, shape):
        self.shape = shape
        self.images: list[np.ndarray] = []
        self.calls: list[dict] = []
        self.answers: list[np.ndarray] = []

    def set_image(self, rgb):
        self.images.append(rgb.copy())

    def predict(self, point_coords, point_labels, box, multimask_output):
        self.calls.append({"points": point_coords, "labels": point_labels, "box": box,
                           "multimask": multimask_output})
        answer = np.zeros(self.shape, dtype=bool)
        answer[len(self.calls) * 3: len(self.calls) * 3 + 5, 2:20] = True
        self.answers.append(answer)
        return answer[None], np.ones(1), np.zeros((1, *self.shape))


def test_prompted_mode_sends_one_box_per_kept_label_and_sams_masks_replace_cars(tiny_clips):
    image = scene(1, 64, 80)  # three labels kept
    queries = ["cat", "dog", "car", "boat", "sofa"]
    preset = dataclasses.replace(get_preset("coco"), confidence_threshold=0.04)
    plain = Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1])
    before = plain.segment(image, queries, preset=preset)
    kept = [queries.index(q) for q in before.kept]
    assert len(kept) == 3
    spy = SpyPredictor(image.shape[:2])
    sam = SamModel("vit_b", "unused", build=lambda: None)
    sam._predictor = spy
    refiner = SamRefiner("unused", "vit_b", "cpu", mode="prompted", sam=sam)
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=tiny_clips[0], classifier_model=tiny_clips[1],
                          sam_refiner=refiner)
    result = segmenter.segment(image, queries, preset=preset)
    assert len(spy.images) == 1 and np.array_equal(spy.images[0], image)  # encoded once
    assert len(spy.calls) == len(kept)  # one decoder call per kept label
    for call, query, answer in zip(spy.calls, kept, spy.answers, strict=True):
        mask = np.asarray(before.masks[query])
        ys, xs = np.nonzero(mask)
        assert call["box"].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()] and not call["multimask"]
        positives = call["points"][call["labels"] == 1].astype(int)
        negatives = call["points"][call["labels"] == 0].astype(int)
        assert len(positives) >= 1 and all(mask[y, x] for x, y in positives)
        others = [np.asarray(before.masks[j]) for j in kept if j != query]
        assert len(negatives) == len(others)
        assert all(any(o[y, x] for o in others) and not mask[y, x] for x, y in negatives)
        assert np.array_equal(np.asarray(result.masks[query]), answer)  # SAM's mask replaces CaR's
    assert result.kept == before.kept and "sam" in result.timings


def test_mask_prompts_are_spread_inside_the_mask():
    masks = np.stack([_rect((50, 60), 5, 45, 5, 35), _rect((50, 60), 10, 20, 40, 55)])
    first, second = mask_prompts(masks)
    assert first.box.tolist() == [5, 5, 34, 44] and second.box.tolist() == [40, 10, 54, 19]
    positives = first.points[first.labels == 1]
    assert len(positives) == 3 and all(masks[0][int(y), int(x)] for x, y in positives)
    distances = [np.hypot(*(a - b)) for i, a in enumerate(positives) for b in positives[i + 1:]]
    assert min(distances) >= 29 / 4
    (negative,) = first.points[first.labels == 0]
    assert masks[1][int(negative[1]), int(negative[0])]
