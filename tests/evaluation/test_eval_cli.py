import json
from pathlib import Path

import pytest

from car_backend import cli
from car_backend.evaluation import classnames
from car_backend.evaluation import cli as eval_cli
from tests.evaluation.fake_datasets import OracleSegmenter, label_map, make_refcoco, make_voc
from tests.support.engine import TINY_CLIP_CONFIG as TINY_CLIP


@pytest.fixture
def voc_root(tmp_path):
    labels = {f"2007_{i:06d}": label_map(i, (15, 7 + i), ignore_border=True) for i in range(3)}
    make_voc(tmp_path / "data", labels)
    return tmp_path / "data"


@pytest.fixture
def oracle(monkeypatch):
    segmenter = OracleSegmenter({q: i + 1 for i, q in enumerate(classnames.VOC_QUERIES)})
    monkeypatch.setattr(eval_cli, "_load_engine", lambda settings: segmenter)
    return segmenter


def test_table_and_json(voc_root, oracle, capsys):
    assert cli.main(["eval", "--dataset", "voc", "--root", str(voc_root), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = "\n".join(out[:-1])
    assert "Pascal VOC 2012 (VOC-21), split val, preset voc: 3 images" in table
    assert "mIoU: 100.00   paper: 67.60 (CaR paper (CVPR 2024) Table 1, CaR w/o SAM, VOC-21 mIoU)" in table
    assert "ours - paper: +32.40" in table
    assert "images/s" in table
    summary = json.loads(out[-1])
    assert summary["metrics"]["mIoU"] == 100.0
    assert summary["paper"]["mIoU"] == 67.6 and summary["paper"]["delta"] == 32.4
    assert summary["class_iou"]["person"] == 100.0 and summary["class_iou"]["sheep"] is None
    assert summary["images"] == summary["computed"] == 3
    assert Path(summary["cache"]).parent == voc_root / ".car-eval-cache"
    assert Path(summary["cache"]).name.startswith("voc-")


def test_limit_cache_and_resume(voc_root, oracle, tmp_path, capsys):
    args = ["eval", "--dataset", "voc", "--root", str(voc_root / "VOCdevkit"), "--limit", "2",
            "--cache", str(tmp_path / "elsewhere"), "--json"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["images"] == 2 and first["computed"] == 2
    assert Path(first["cache"]).parent == tmp_path / "elsewhere"
    assert cli.main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["computed"] == 0 and second["cached"] == 2
    assert len(oracle.calls) == 2


def test_referring_output(tmp_path, monkeypatch, capsys):
    make_refcoco(tmp_path)
    monkeypatch.setattr(eval_cli, "_load_engine", lambda settings: OracleSegmenter())
    assert cli.main(["eval", "--dataset", "refcoco", "--root", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.strip().startswith("oIoU: 100.00") for line in out)
    assert json.loads(out[-1])["paper"]["source"].endswith("Table 7, RefCOCO (UNC), val mIoU")


@pytest.mark.parametrize("dataset, split_by, figure", [("refcoco+", "unc", "RefCOCO+ (UNC) val mIoU"),
                                                      ("refcocog", "umd", "RefCOCOg val(U) mIoU")])
def test_refcoco_plus_and_g_read_their_own_files_and_figures(tmp_path, monkeypatch, capsys, dataset, split_by,
                                                             figure):
    make_refcoco(tmp_path, dataset=dataset, split_by=split_by)
    monkeypatch.setattr(eval_cli, "_load_engine", lambda settings: OracleSegmenter())
    assert cli.main(["eval", "--dataset", dataset, "--root", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["paper"]["source"].endswith(figure)
    assert (summary["dataset"], summary["preset"], summary["images"]) == (dataset, dataset, 2)


def test_errors_exit_2(tmp_path, oracle, capsys):
    assert cli.main(["eval", "--dataset", "context", "--root", str(tmp_path)]) == 2
    assert "SegmentationContext" in capsys.readouterr().err
    assert cli.main(["eval", "--dataset", "voc", "--root", str(tmp_path), "--limit", "0"]) == 2


def test_tiny_random_engine_end_to_end(voc_root, monkeypatch, capsys):
    monkeypatch.setenv("CAR_PROPOSAL_MODEL", f"{TINY_CLIP}:random")
    monkeypatch.setenv("CAR_CLASSIFIER_MODEL", f"{TINY_CLIP}:random")
    monkeypatch.setenv("CAR_DEVICE", "cpu")
    args = ["eval", "--dataset", "voc", "--root", str(voc_root), "--limit", "2", "--json"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("mIoU:" in line and "paper: 67.60" in line for line in out)
    summary = json.loads(out[-1])
    assert summary["images"] == 2 and summary["computed"] == 2
    assert summary["images_per_s"] > 0
    assert 0 <= summary["metrics"]["mIoU"] <= 100
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["computed"] == 0


def test_refiner_and_proposal_mode_are_printed_next_to_the_papers_sam_figure(voc_root, oracle, capsys, tmp_path):
    checkpoint = tmp_path / "sam_hq_vit_h.pth"
    assert cli.main(["eval", "--dataset", "voc", "--root", str(voc_root), "--json", "--sam-model-type", "hq_vit_h",
                     "--sam-checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert ("setting: refiner: HQ-SAM hq_vit_h (automatic, sam_hq_vit_h.pth); proposals: car; compat: fixed; "
            "paper for it: 70.20 (CaR paper (CVPR 2024) Table 1, CaR+SAM (HQ-SAM ViT-H, automatic masks matched "
            "by IoM), VOC-21 mIoU) (the paper's setting)") in out
    summary = json.loads(out[-1])
    assert summary["engine_setting"]["refiner"]["family"] == "HQ-SAM" and summary["paper_sam"]["mIoU"] == 70.2
    assert cli.main(["eval", "--dataset", "voc", "--root", str(voc_root), "--sam-model-type", "sam2.1_hiera_l",
                     "--sam-checkpoint", str(checkpoint), "--sam-mode", "prompted", "--proposals", "sam"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("setting:")][0]
    assert "SAM 2 sam2.1_hiera_l (prompted" in line and "proposals: sam" in line and "70.20" in line
    assert "differs" in line
    assert cli.main(["eval", "--dataset", "voc", "--root", str(voc_root)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("setting:")][0]
    assert line.startswith("setting: refiner: none; proposals: car") and "67.60" in line
    assert cli.main(["eval", "--dataset", "voc", "--root", str(voc_root), "--proposals", "sam"]) == 2
    assert "CAR_SAM_CHECKPOINT" in capsys.readouterr().err
