"""`prelabel --images --export`: the tiny random CLIP on a folder; every format read back equals the label
maps the engine gives for the same images, an interrupted run continues, unreadable files are listed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from car_backend.engine.instances import split_instances
from car_backend.exports import rle
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.media import MediaFetcher
from car_backend.labelstudio.regions import label_masks
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.service import prelabel
from tests.exports.test_writers import iou, read_yolo_instances
from tests.support.fake_label_studio import image_bytes
from tests.support.settings import settings_env, tiny_settings

LABELS = ["sky", "grass", "tree"]
GOOD = ["a.png", "b.png", "c.png"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name in GOOD:
        (folder / name).write_bytes(image_bytes(name, (120, 90)))
    (folder / "broken.jpg").write_bytes(b"no image")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def engine_maps(folder):
    """The engine's label maps for the good images, computed here as prelabel plans them."""
    from car_backend.engine import Segmenter

    settings = tiny_settings(output="brush")
    config = parse_label_config(prelabel.import_config(LABELS, "brush"))
    project = Project(config=config, version=model_version(settings, config))
    segmenter = Segmenter(settings.engine_config())
    fetcher = MediaFetcher(settings, allow_local_files=True)
    maps = {}
    for name in GOOD:
        item, _ = prelabel.segment_image(folder / name, name, project, segmenter, fetcher, settings)
        maps[name] = item.label_map
    assert any(m.any() for m in maps.values())  # something to compare: some label is kept
    return maps


def run(folder, out, export, **kw):
    return prelabel.prelabel_images(folder, LABELS, out, "brush", tiny_settings(), export=export, **kw)


def test_coco_export_decodes_to_the_engine_masks(folder, engine_maps, tmp_path):
    out = tmp_path / "coco"
    assert run(folder, out, "coco") == 0
    doc = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in doc["categories"]] == LABELS
    assert [i["file_name"] for i in doc["images"]] == GOOD
    for image in doc["images"]:
        # one annotation per connected part (parts under MIN_AREA_PX pixels go to their neighbours first)
        objects = split_instances(engine_maps[image["file_name"]], [1.0] * len(LABELS))
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        assert [a["category_id"] for a in anns] == list(objects.labels)
        for j, ann in enumerate(anns):
            assert (rle.decode(ann["segmentation"]) == objects.mask(j)).all()
            assert 0 < ann["score"] <= 1 and ann["iscrowd"] == 0
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith("broken.jpg\t") and len(failed[0]) > len("broken.jpg\t")


def test_png_export_equals_the_label_maps(folder, engine_maps, tmp_path):
    out = tmp_path / "png"
    assert run(folder, out, "png") == 0
    for name in GOOD:
        assert (np.asarray(Image.open(out / "SegmentationClass" / name.replace(".png", ".png"))) == engine_maps[name]).all()
    assert [e["name"] for e in json.loads((out / "labels.json").read_text())["labels"]] == ["background", *LABELS]


def test_yolo_export_rasterises_back_to_each_instance(folder, engine_maps, tmp_path):
    out = tmp_path / "yolo"
    assert run(folder, out, "yolo") == 0
    lines = 0
    for name in GOOD:
        expected = engine_maps[name]
        objects = split_instances(expected, [1.0] * len(LABELS))  # each connected part of a label is one object
        found = read_yolo_instances(out / "labels" / name.replace(".png", ".txt"), *expected.shape)
        assert [k + 1 for k, _ in found] == list(objects.labels)
        for j, (_, mask) in enumerate(found):
            assert iou(mask, objects.mask(j)) >= 0.98
        lines += len(found)
        assert (out / "images" / name).resolve() == (folder / name).resolve()
    assert lines > 0
    assert "nc: 3" in (out / "data.yaml").read_text()


def test_yolo_detect_export_boxes_each_instance(folder, engine_maps, tmp_path):
    out = tmp_path / "detect"
    assert run(folder, out, "yolo-detect") == 0
    for name in GOOD:
        expected = engine_maps[name]
        height, width = expected.shape
        objects = split_instances(expected, [1.0] * len(LABELS))
        lines = [line.split() for line in (out / "labels" / name.replace(".png", ".txt")).read_text().splitlines()]
        assert [int(line[0]) + 1 for line in lines] == list(objects.labels)
        for j, line in enumerate(lines):
            x0, y0, x1, y1 = objects.box(j)
            assert [float(v) for v in line[1:]] == pytest.approx(
                [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], abs=1e-6)


def test_ls_export_is_the_import_file_with_the_engine_masks(folder, engine_maps, tmp_path):
    out = tmp_path / "tasks.json"
    assert run(folder, out, "ls") == 0
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [str((folder / n).resolve()) for n in ["a.png", "b.png",
                                                                                      "broken.jpg", "c.png"]]
    for task in tasks:
        name = task["data"]["image"].rsplit("/", 1)[-1]
        if name == "broken.jpg":
            assert "predictions" not in task
            continue
        masks = label_masks(task["predictions"][0]["result"], engine_maps[name].shape)
        for k, label in enumerate(LABELS):
            assert (masks.get(label, np.zeros_like(engine_maps[name], bool)) == (engine_maps[name] == k + 1)).all()
    assert (tmp_path / "tasks-export" / "failed.txt").read_text().startswith("broken.jpg\t")


def test_an_interrupted_export_continues_where_it_stopped(folder, tmp_path, monkeypatch):
    real = prelabel.segment_image
    calls = []

    def interrupted(path, *args):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args)

    out = tmp_path / "resumed"
    monkeypatch.setattr(prelabel, "segment_image", interrupted)
    assert run(folder, out, "coco") == 130
    assert not (out / "annotations.json").exists()
    calls.clear()
    monkeypatch.setattr(prelabel, "segment_image", lambda path, *args: calls.append(path.name) or real(path, *args))
    assert run(folder, out, "coco") == 0
    assert calls == ["b.png", "broken.jpg", "c.png"]  # a.png was finished; the failed file is tried again
    monkeypatch.setattr(prelabel, "segment_image", real)
    fresh = tmp_path / "fresh"
    assert run(folder, fresh, "coco") == 0
    assert (out / "annotations.json").read_bytes() == (fresh / "annotations.json").read_bytes()
    calls.clear()
    monkeypatch.setattr(prelabel, "segment_image", lambda path, *args: calls.append(path.name) or real(path, *args))
    assert prelabel.prelabel_images(folder, ["sky"], out, "brush", tiny_settings(), export="coco") == 0
    assert calls == ["a.png", "b.png", "broken.jpg", "c.png"]  # other labels: nothing is reused
    assert [c["name"] for c in json.loads((out / "annotations.json").read_text())["categories"]] == ["sky"]


def test_bad_arguments_are_refused_before_any_work(folder, tmp_path):
    file = tmp_path / "file.json"
    file.write_text("[]")
    assert run(folder, file, "png") == 2  # a folder format needs a folder
    assert run(folder, tmp_path, "ls") == 2  # and ls a file
    assert run(tmp_path / "missing", tmp_path / "x", "coco") == 2
    assert prelabel.prelabel_images(folder, [f"l{i}" for i in range(300)], tmp_path / "p", "brush", tiny_settings(),
                                    export="png") == 2


def test_the_cli_writes_an_export_and_a_gallery(folder, tmp_path):
    out = tmp_path / "cli"
    env = settings_env(tiny_settings())
    env.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "prelabel", "--images", str(folder), "--labels",
                           "sky,grass,tree", "--export", "png", "--out", str(out), "--gallery"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "SegmentationClass").iterdir()) == GOOD
    assert "1 images could not be read" in done.stdout and f"gallery: {out / 'gallery' / 'index.html'}" in done.stdout
    assert len(list((out / "gallery" / "thumbs").iterdir())) == 3
    assert "prelabel" in done.stderr  # the progress bar


def test_unreadable_files_are_listed_and_the_run_continues(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes("a", (60, 40)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "huge.png").write_bytes(image_bytes("huge", (200, 100)))
    (folder / "truncated.png").write_bytes(image_bytes("t", (60, 40))[:60])
    (folder / "z.png").write_bytes(image_bytes("z", (60, 40)))
    (folder / "folder.png").mkdir()  # not a file: not an image of the folder
    out = tmp_path / "out"
    settings = tiny_settings(max_image_pixels=10_000)
    assert prelabel.prelabel_images(folder, LABELS, out, "brush", settings, export="png") == 0
    assert sorted(p.name for p in (out / "SegmentationClass").iterdir()) == ["a.png", "z.png"]
    failed = dict(line.split("\t") for line in (out / "failed.txt").read_text().splitlines())
    assert sorted(failed) == ["empty.png", "huge.png", "truncated.png"]
    assert "empty" in failed["empty.png"] and "CAR_MAX_IMAGE_PIXELS" in failed["huge.png"]
    assert "cannot decode" in failed["truncated.png"]


def test_a_gallery_added_to_a_finished_export_segments_nothing_again(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run(folder, out, "yolo") == 0
    calls = []
    real = prelabel.segment_image
    monkeypatch.setattr(prelabel, "segment_image", lambda path, *args: calls.append(path.name) or real(path, *args))
    assert run(folder, out, "yolo", gallery=True) == 0
    assert calls == ["broken.jpg"]  # only the failure is tried again
    assert len(list((out / "gallery" / "thumbs").iterdir())) == len(GOOD)
    assert (out / "gallery" / "index.html").is_file()
