"""Model specs, loading (random, offline errors, QuickGELU for OpenAI weights), the text-embedding cache."""

from __future__ import annotations

import logging
import time

import open_clip
import pytest
import torch

from car_backend.engine import (
    ClipModel,
    EngineConfig,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    Segmenter,
    load_clip,
    models,
)
from tests.support.engine import TINY_CLIP_CONFIG


@pytest.mark.parametrize(
    ("spec", "name", "weights", "architecture"),
    [
        ("ViT-B-16:openai", "ViT-B-16", "openai", "ViT-B-16"),
        ("ViT-L-14:/models/clip.bin", "ViT-L-14", "/models/clip.bin", "ViT-L-14"),
        ("/cfg/tiny-clip.json:random", "/cfg/tiny-clip.json", "random", "tiny-clip"),
        ("/a:b/tiny.json:/ckpt:v2/w.pt", "/a:b/tiny.json", "/ckpt:v2/w.pt", "tiny"),
        (" ViT-B-16 : openai ", "ViT-B-16", "openai", "ViT-B-16"),
    ],
)
def test_model_spec_parsing(spec, name, weights, architecture):
    parsed = ModelSpec.parse(spec)
    assert (parsed.name, parsed.weights, parsed.architecture) == (name, weights, architecture)


@pytest.mark.parametrize("spec", ["ViT-B-16", ":openai", "ViT-B-16:", "  "])
def test_malformed_model_specs_are_rejected(spec):
    with pytest.raises(ModelSpecError):
        ModelSpec.parse(spec)


def test_random_weights_from_a_config_path_load_once_and_warn(caplog, monkeypatch):
    monkeypatch.setattr(models, "_LOADED", {})
    spec = f"{TINY_CLIP_CONFIG}:random"
    with caplog.at_level(logging.WARNING, logger="car_backend.engine.models"):
        first = load_clip(spec, "cpu", "fp32", setting="CAR_PROPOSAL_MODEL")
    assert any("random weights" in r.getMessage() and "CAR_PROPOSAL_MODEL" in r.getMessage() for r in caplog.records)
    assert load_clip(spec, "cpu", "fp32") is first
    assert isinstance(first.model, open_clip.CLIP)
    assert first.dtype == torch.float32
    assert not any(p.requires_grad for p in first.model.parameters())


def test_unknown_model_unknown_tag_and_missing_checkpoint_name_the_problem(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model 'ViT-Z-99'"):
        load_clip("ViT-Z-99:openai", setting="CAR_CLASSIFIER_MODEL")
    with pytest.raises(ModelLoadError, match="'nosuchtag'.*known: .*openai"):
        load_clip("ViT-B-16:nosuchtag", setting="CAR_CLASSIFIER_MODEL")
    missing = tmp_path / "weights.pt"
    with pytest.raises(ModelLoadError, match=f"{missing}.*CAR_CLASSIFIER_MODEL"):
        load_clip(f"ViT-B-16:{missing}", setting="CAR_CLASSIFIER_MODEL")


def test_offline_pretrained_tag_fails_fast_naming_file_and_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_clip("ViT-L-14:openai", "cpu", "fp32", weights_dir=str(tmp_path), setting="CAR_CLASSIFIER_MODEL")
    assert time.monotonic() - start < 10
    message = str(error.value)
    for part in ("CAR_CLASSIFIER_MODEL=ViT-L-14:openai", "vit_large_patch14_clip_224.openai", "CAR_WEIGHTS_DIR",
                 str(tmp_path)):
        assert part in message


def test_segmenter_loads_models_lazily_and_reports_load_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    segmenter = Segmenter(EngineConfig(proposal_model="ViT-B-16:openai", weights_dir=str(tmp_path), device="cpu"))
    with pytest.raises(ModelLoadError, match="CAR_PROPOSAL_MODEL=ViT-B-16:openai"):
        segmenter.segment(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), ["cat"])


def test_openai_tag_builds_quick_gelu_and_uses_the_cached_file(monkeypatch, tmp_path):
    """A checkpoint already in CAR_WEIGHTS_DIR (huggingface_hub cache layout) is used without network."""
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"stub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_LOADED", {})
    calls = {}
    tiny = open_clip.CLIP(embed_dim=8, vision_cfg={"layers": 1, "width": 16, "patch_size": 16, "head_width": 16},
                          text_cfg={"layers": 1, "width": 8, "heads": 1})

    def fake_create_model(name, **kwargs):
        calls.update(kwargs, name=name)
        return tiny

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    load_clip("ViT-B-16:openai", "cpu", "fp32", weights_dir=str(tmp_path))
    assert calls["name"] == "ViT-B-16"
    assert calls["force_quick_gelu"] is True
    assert calls["pretrained"].endswith("open_clip_model.safetensors")


def test_text_embeddings_are_cached_per_text():
    encoded: list[list[str]] = []

    def encode(texts):
        encoded.append(list(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    tiny = open_clip.CLIP(embed_dim=2, vision_cfg={"layers": 1, "width": 16, "patch_size": 16, "head_width": 16},
                          text_cfg={"layers": 1, "width": 8, "heads": 1})
    clip = ClipModel(tiny, encode_texts=encode)
    first = clip.embed_texts(["a", "bb", "a"])
    second = clip.embed_texts(["bb", "ccc"])
    assert encoded == [["a", "bb"], ["ccc"]]
    assert torch.allclose(first[0], first[2]) and torch.allclose(first[1], second[0])
    assert torch.allclose(first.norm(dim=1), torch.ones(3))


def test_truncated_text_encoding_equals_open_clip(tiny_models):
    model, tokenizer, _, _ = tiny_models
    texts = ["a", "a clean origami dog.", "There is a large traffic light in the scene.", "x" * 200]
    tokens = tokenizer(texts)
    with torch.no_grad():
        expected = model.encode_text(tokens)
        got = models._encode_text_truncated(model, tokens)
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_text_embedding_does_not_depend_on_what_it_is_encoded_with(tiny_models):
    """Bit for bit: a worker's results must not depend on the texts it encoded before (cached rows)."""
    _, _, classifier, tokenizer = tiny_models
    texts = [f"a photo of a {word}." for word in ("red apple", "dog", "tree person", "cat", "boat")]
    alone = ClipModel(classifier, tokenizer, "alone")
    crowded = ClipModel(classifier, tokenizer, "crowded")
    single = alone.embed_texts(texts[:1])
    others = [f"a photo of a {i} thing." for i in range(40)]
    together = crowded.embed_texts(others + texts)[len(others):]
    assert torch.equal(single[0], together[0])
    assert torch.equal(alone.embed_texts(texts), together)


def test_ovseg_style_checkpoint_loads_through_its_key_prefix(tiny_models, tmp_path, monkeypatch):
    """OVSeg's full model keeps its mask-adapted CLIP under `clip_adapter.clip_model.` (with the rest of the
    model beside it, inside "model"): the prefix map gives open_clip the CLIP's own keys."""
    monkeypatch.setattr(models, "_LOADED", {})
    _, _, classifier, _ = tiny_models
    wrapped = {f"clip_adapter.clip_model.{k}": v for k, v in classifier.state_dict().items()}
    wrapped["sem_seg_head.predictor.weight"] = torch.zeros(3)
    path = tmp_path / "ovseg_like.pth"
    torch.save({"model": wrapped, "iteration": 7}, path)
    loaded = load_clip(f"{TINY_CLIP_CONFIG}:{path}", "cpu", "fp32", setting="CAR_CLASSIFIER_MODEL")
    for name, value in classifier.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    broken = {k: v for k, v in wrapped.items() if "ln_final" not in k}
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ModelLoadError, match=r"(?s)CAR_CLASSIFIER_MODEL=.*broken.pth.*ln_final"):
        load_clip(f"{TINY_CLIP_CONFIG}:{tmp_path / 'broken.pth'}", "cpu", "fp32", setting="CAR_CLASSIFIER_MODEL")


def test_extra_keys_under_the_prefix_are_ignored(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_LOADED", {})
    _, _, classifier, _ = tiny_models
    wrapped = {f"clip_adapter.clip_model.{k}": v for k, v in classifier.state_dict().items()}
    wrapped["clip_adapter.clip_model.visual.mask_embedding"] = torch.zeros(1, 3, 16, 16)  # mask prompt tuning
    torch.save({"model": wrapped}, tmp_path / "mpt.pth")
    loaded = load_clip(f"{TINY_CLIP_CONFIG}:{tmp_path / 'mpt.pth'}", "cpu", "fp32")
    assert torch.equal(loaded.model.visual.conv1.weight, classifier.visual.conv1.weight)
