"""`car-backend segment`: outputs, the --json object, errors as exit codes with logged reasons."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from car_backend.cli import build_parser
from car_backend.engine.cli import segment_command
from car_backend.settings import Settings
from tests.support.engine import TINY_CLIP_CONFIG, scene

RANDOM_TINY = f"{TINY_CLIP_CONFIG}:random"


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(scene(9, 60, 90)).save(path)
    return path


def run(argv, settings, capsys):
    args = build_parser().parse_args(argv)
    code = segment_command(args, settings.engine_config())
    return code, capsys.readouterr()


def test_segment_writes_label_map_overlay_and_one_json_object(image_path, tmp_path, capsys):
    settings = Settings(proposal_model=RANDOM_TINY, classifier_model=RANDOM_TINY, device="cpu")
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code, captured = run(["segment", str(image_path), "--labels", "cat, dog,car", "--json", "--out", str(out),
                          "--overlay", str(overlay)], settings, capsys)
    assert code == 0
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["size"] == [90, 60] and summary["mode"] == "semantic" and summary["preset"] == "coco"
    assert summary["labels"] and set(summary["labels"]) <= {"cat", "dog", "car"}
    assert set(summary["scores"]) == set(summary["labels"])
    assert summary["steps"] >= 2 and {"trunk", "cam", "classify", "crf", "total"} <= set(summary["timings"])
    label_map = np.asarray(Image.open(out))
    assert label_map.shape == (60, 90) and set(np.unique(label_map)) <= {0, 1, 2, 3}
    assert Image.open(overlay).size == (90, 60)


def test_segment_prints_a_table_in_referring_mode(image_path, capsys):
    settings = Settings(proposal_model=RANDOM_TINY, classifier_model=RANDOM_TINY, device="cpu")
    code, captured = run(["segment", str(image_path), "--labels", "the cat,a dog", "--referring",
                          "--preset", "refcoco"], settings, capsys)
    assert code == 0
    assert "the cat" in captured.out and "steps:" in captured.out


def test_segment_errors_are_exit_code_2_with_a_logged_reason(image_path, tmp_path, capsys, caplog, monkeypatch):
    settings = Settings(proposal_model=RANDOM_TINY, classifier_model=RANDOM_TINY, device="cpu")
    with caplog.at_level(logging.ERROR):
        assert run(["segment", str(tmp_path / "missing.png"), "--labels", "cat"], settings, capsys)[0] == 2
        assert run(["segment", str(image_path), "--labels", " , "], settings, capsys)[0] == 2
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        offline = Settings(proposal_model="ViT-B-16:openai", classifier_model=RANDOM_TINY, device="cpu",
                           weights_dir=str(tmp_path))
        code, captured = run(["segment", str(image_path), "--labels", "cat"], offline, capsys)
    assert code == 2 and captured.out == ""
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "missing.png" in messages and "--labels" in messages and "CAR_PROPOSAL_MODEL=ViT-B-16:openai" in messages
