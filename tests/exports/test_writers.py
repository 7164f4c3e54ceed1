"""The writers on label maps with known shapes: each format read back gives the label maps again."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from car_backend.exports import rle
from car_backend.exports.records import ExportItem, Failure, Journal, write_failures
from car_backend.exports.writers import (
    ExportSpec,
    Layout,
    file_stems,
    voc_palette,
    write_export,
)
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.regions import label_masks, polygons_mask
from tests.exports.known import LABELS, known_items

FAILURES = [Failure("broken.jpg", "/data/broken.jpg", "cannot decode the image: not an image")]


def spec(format: str, **kw) -> ExportSpec:
    return ExportSpec(format, LABELS, "car-test-1", **kw)


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (what an outline without holes covers)."""
    outside = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    cv2.floodFill(outside, None, (0, 0), 2)
    return (outside[1:-1, 1:-1] != 2) | mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_rle_matches_pycocotools_both_ways():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(7)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((h, w)) < rng.random() if trial % 2 else np.zeros((h, w), bool)
        if trial % 4 == 0:
            mask[h // 3:, w // 5:] = True
        ours = rle.encode(mask)
        theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == [h, w]
        assert (mask_api.decode({"size": [h, w], "counts": ours["counts"].encode()}) == mask).all()
        assert (rle.decode(ours) == mask).all()
        assert (rle.decode({"size": [h, w], "counts": rle.mask_counts(mask)}) == mask).all()


def test_rle_refuses_counts_of_another_size():
    with pytest.raises(ValueError, match="cover"):
        rle.decode({"size": [4, 4], "counts": [3, 2]})
    with pytest.raises(ValueError):
        rle.string_counts("0\x7f")


def test_coco_decodes_to_the_label_maps(tmp_path):
    items = known_items()
    path = write_export(spec("coco"), Layout.of("coco", tmp_path), items, FAILURES)
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["categories"]] == list(LABELS) and [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert [i["file_name"] for i in doc["images"]] == sorted(i.name for i in items)  # broken.jpg is not there
    by_name = {i.name: i for i in items}
    images = {i["id"]: i for i in doc["images"]}
    seen = set()
    for ann in doc["annotations"]:
        image = images[ann["image_id"]]
        item = by_name[image["file_name"]]
        label = LABELS[ann["category_id"] - 1]
        expected = item.label_map == ann["category_id"]
        assert [image["height"], image["width"]] == ann["segmentation"]["size"] == list(item.label_map.shape)
        assert (rle.decode(ann["segmentation"]) == expected).all()
        assert ann["area"] == int(expected.sum()) and ann["score"] == pytest.approx(item.scores[label])
        x, y, w, h = ann["bbox"]
        assert expected[y:y + h, x:x + w].sum() == expected.sum() and expected[y, x:x + w].any()
        seen.add((item.name, label))
    assert seen == {("b/ring.png", "cat"), ("b/ring.png", "dog"), ("a-stripes.jpg", "cat"), ("a-stripes.jpg", "dog")}


def test_coco_reads_with_pycocotools(tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    path = write_export(spec("coco"), Layout.of("coco", tmp_path), known_items(), FAILURES)
    coco = coco_module.COCO(str(path))
    ring = next(i for i in coco.dataset["images"] if i["file_name"] == "b/ring.png")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[ring["id"]], catIds=[1]))
    assert (coco.annToMask(anns[0]) == (known_items()[0].label_map == 1)).all()


def test_png_label_maps_equal_the_label_maps(tmp_path):
    items = known_items()
    write_export(spec("png"), Layout.of("png", tmp_path), items, FAILURES)
    meta = json.loads((tmp_path / "labels.json").read_text())
    assert [e["name"] for e in meta["labels"]] == ["background", *LABELS]
    assert meta["files"] == {"b/ring.png": "SegmentationClass/b_ring.png",
                             "a-stripes.jpg": "SegmentationClass/a-stripes.png", "empty.png": "SegmentationClass/empty.png"}
    for item in items:
        image = Image.open(tmp_path / meta["files"][item.name])
        assert image.mode == "P"
        assert (np.asarray(image) == item.label_map).all()
        palette = np.asarray(image.getpalette()[:12], np.uint8).reshape(4, 3)
        assert (palette == voc_palette(4)).all() and [e["color"] for e in meta["labels"]] == palette.tolist()
    assert (tmp_path / "ImageSets/Segmentation/default.txt").read_text().split() == ["a-stripes", "b_ring", "empty"]
    assert voc_palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # VOC's background, 1, 2


def test_png_refuses_more_labels_than_a_byte_holds():
    with pytest.raises(ValueError, match="at most 254"):
        ExportSpec("png", tuple(f"l{i}" for i in range(255)), "v")


def read_yolo(path: Path, height: int, width: int, classes: int) -> list[np.ndarray]:
    masks = [np.zeros((height, width), bool) for _ in range(classes)]
    for line in path.read_text().splitlines():
        values = line.split()
        points = np.asarray(values[1:], float).reshape(-1, 2) * [width, height]
        masks[int(values[0])] |= polygons_mask([points.ravel()], height, width)
    return masks


@pytest.mark.parametrize("tolerance, min_iou", [(0.0, 1.0), (1.0, 0.93)])
def test_yolo_polygons_rasterise_back(tmp_path, tolerance, min_iou):
    items = known_items()
    write_export(spec("yolo", polygon_tolerance=tolerance), Layout.of("yolo", tmp_path), items, FAILURES)
    stems = file_stems([i.name for i in items])
    for item in items:
        masks = read_yolo(tmp_path / "labels" / f"{stems[item.name]}.txt", item.height, item.width, len(LABELS))
        for k, mask in enumerate(masks):
            expected = filled(item.label_map == k + 1)  # YOLO outlines have no holes
            if not expected.any():
                assert not mask.any()
                continue
            assert iou(mask, expected) >= min_iou, (item.name, LABELS[k], iou(mask, expected))
    # the hole of cat's ring is covered by its outline: dog's pixels there count for cat too
    ring = read_yolo(tmp_path / "labels" / "b_ring.txt", 40, 56, 3)
    assert ring[0][15, 15] and ring[1][15, 15]
    yaml = (tmp_path / "data.yaml").read_text()
    assert 'nc: 3' in yaml and '  0: "cat"' in yaml and '  2: "sofa"' in yaml
    assert (tmp_path / "labels" / "empty.txt").read_text() == ""


def test_yolo_links_local_images(tmp_path):
    source = tmp_path / "src" / "a.PNG"
    source.parent.mkdir()
    source.write_bytes(b"png bytes")
    item = ExportItem("a.PNG", str(source), np.zeros((4, 4), np.int32))
    out = tmp_path / "out"
    write_export(spec("yolo"), Layout.of("yolo", out), [item], [])
    write_export(spec("yolo"), Layout.of("yolo", out), [item], [])  # again: the link is replaced
    assert (out / "images" / "a.png").resolve() == source.resolve()


def test_ls_regions_read_back_to_the_label_maps(tmp_path):
    target = parse_label_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="cat"/><Label value="dog"/><Label value="sofa"/></BrushLabels></View>').targets[0]
    out = tmp_path / "tasks.json"
    for kind in ("brush", "polygon"):
        write_export(spec("ls", target=target, region_kind=kind, polygon_tolerance=0.0), Layout.of("ls", out),
                     known_items(), FAILURES)
        tasks = json.loads(out.read_text())
        assert [t["data"]["image"] for t in tasks] == ["/data/a-stripes.jpg", "/data/ring.png", "/data/broken.jpg",
                                                       "/data/empty.png"]
        assert "predictions" not in tasks[2]
        ring = tasks[1]["predictions"][0]
        assert ring["model_version"] == "car-test-1" and ring["score"] == pytest.approx(0.65)
        masks = label_masks(ring["result"])
        expected = known_items()[0].label_map
        if kind == "brush":
            assert (masks["cat"] == (expected == 1)).all() and (masks["dog"] == (expected == 2)).all()
        else:
            assert (masks["cat"] == filled(expected == 1)).all()
    write_export(spec("ls", target=target, url_prefix="/data/local-files/?d=set/"), Layout.of("ls", out),
                 known_items(), FAILURES)
    assert json.loads(out.read_text())[0]["data"]["image"] == "/data/local-files/?d=set/a-stripes.jpg"
    assert Layout.of("ls", out).failed == tmp_path / "tasks-export" / "failed.txt"


def test_file_stems_are_unique_and_safe():
    stems = file_stems(["a.png", "a.jpg", "A.tif", "x y/ü.png", "..png"])
    assert stems == {"a.png": "a", "a.jpg": "a-2", "A.tif": "A-3", "x y/ü.png": "x_y__", "..png": "image"}


def test_failed_txt_lists_each_failure_on_one_line(tmp_path):
    path = tmp_path / "failed.txt"
    assert write_failures(path, [Failure("a.jpg", "/a.jpg", "cannot decode\nthe image"), *FAILURES]) == 2
    assert path.read_text().splitlines() == ["a.jpg\tcannot decode the image",
                                             "broken.jpg\tcannot decode the image: not an image"]
    assert write_failures(path, []) == 0 and not path.exists()  # a clean run leaves no stale list


def test_journal_resumes_and_ignores_a_cut_line(tmp_path):
    path = tmp_path / ".car-export" / "journal.jsonl"
    items = known_items()
    with Journal(path, {"labels": list(LABELS)}) as journal:
        for item in items[:2]:
            journal.add(item)
    with path.open("a") as f:
        f.write('{"name": "empty.png", "sou')  # an interrupted write
    with Journal(path, {"labels": list(LABELS)}) as journal:
        assert journal.items.names == ["a-stripes.jpg", "b/ring.png"]
        back = journal.items.get("b/ring.png")
        assert (back.label_map == items[0].label_map).all() and back.scores == items[0].scores
        assert back.score == items[0].score and back.uncertainty == items[0].uncertainty
        journal.add(items[2])
    with Journal(path, {"labels": list(LABELS)}) as journal:
        assert len(journal.items) == 3
    with Journal(path, {"labels": ["other"]}) as journal:  # other labels: start over
        assert len(journal.items) == 0
