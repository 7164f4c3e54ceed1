"""The writers on label maps with known shapes: each format read back gives the label maps again."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from car_backend.engine.instances import Instances, split_instances
from car_backend.exports import rle
from car_backend.exports.records import ExportItem, Failure, Journal, write_failures
from car_backend.exports.writers import (
    ExportSpec,
    Layout,
    allowed_image,
    file_stems,
    instance_rings,
    voc_palette,
    write_export,
)
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.regions import label_masks
from tests.exports.known import LABELS, known_items, ring_scene

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


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected parts of a mask, in raster order of their first pixel."""
    count, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [parts == k for k in range(1, count)]


def bounds(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_coco_has_one_annotation_per_instance(tmp_path):
    items = known_items()
    path = write_export(spec("coco"), Layout.of("coco", tmp_path), items, FAILURES)
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["categories"]] == list(LABELS) and [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert [i["file_name"] for i in doc["images"]] == sorted(i.name for i in items)  # broken.jpg is not there
    by_name = {i.name: i for i in items}
    images = {i["id"]: i for i in doc["images"]}
    for image_id, image in images.items():
        item = by_name[image["file_name"]]
        anns = [a for a in doc["annotations"] if a["image_id"] == image_id]
        for k, label in enumerate(LABELS):
            want = components(item.label_map == k + 1)  # each connected part is one object
            got = [a for a in anns if a["category_id"] == k + 1]
            assert len(got) == len(want), (item.name, label)
            for ann, expected in zip(got, want, strict=True):
                assert [image["height"], image["width"]] == ann["segmentation"]["size"]
                assert (rle.decode(ann["segmentation"]) == expected).all()
                assert ann["area"] == int(expected.sum()) and ann["bbox"] == bounds(expected)
                assert ann["iscrowd"] == 0 and ann["score"] == pytest.approx(item.scores[label])
    ring = next(i for i in doc["images"] if i["file_name"] == "b/ring.png")
    assert sorted(a["category_id"] for a in doc["annotations"] if a["image_id"] == ring["id"]) == [1, 1, 2, 2]


def test_coco_instances_decode_with_pycocotools(tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    mask_api = pytest.importorskip("pycocotools.mask")
    scene = ring_scene()
    instances = split_instances(scene, [0.9, 0.4, 0.0])
    given = ExportItem("given.png", "/data/given.png", scene, {"cat": 0.9, "dog": 0.4}, 0.5, 0.5,
                       instances=Instances(instances.instance_map, instances.labels, (0.8, 0.7, 0.6, 0.5)),
                       tags=("indoor", "night"))
    path = write_export(spec("coco"), Layout.of("coco", tmp_path), [*known_items(), given], FAILURES)
    coco = coco_module.COCO(str(path))
    checked = 0
    for image in coco.dataset["images"]:
        item = next(i for i in [*known_items(), given] if i.name == image["file_name"])
        objects = item.instances_for(LABELS)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(objects)
        for j, ann in enumerate(anns):
            mask = coco.annToMask(ann).astype(bool)
            assert (mask == objects.mask(j)).all()
            assert ann["bbox"] == bounds(mask) == mask_api.toBbox(ann["segmentation"]).astype(int).tolist()
            assert ann["category_id"] == objects.labels[j] and ann["score"] == pytest.approx(objects.scores[j])
            checked += 1
    assert checked == 4 + 2 + 4
    given_image = next(i for i in coco.dataset["images"] if i["file_name"] == "given.png")
    assert given_image["tags"] == ["indoor", "night"]
    assert [a["score"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[given_image["id"]]))] == [0.8, 0.7, 0.6, 0.5]


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


def test_png_object_maps_hold_the_instances(tmp_path):
    items = known_items()
    tagged = ExportItem("t.png", "/data/t.png", ring_scene(), {"cat": 0.9, "dog": 0.4}, tags=("indoor",))
    write_export(spec("png"), Layout.of("png", tmp_path), [*items, tagged], FAILURES)
    meta = json.loads((tmp_path / "labels.json").read_text())
    assert meta["object_files"]["b/ring.png"] == "SegmentationObject/b_ring.png"
    assert meta["tags"] == {"t.png": ["indoor"]}
    for item in [*items, tagged]:
        image = Image.open(tmp_path / meta["object_files"][item.name])
        objects = item.instances_for(LABELS)
        assert image.mode == "P" and (np.asarray(image) == objects.instance_map).all()
        classes = np.asarray(Image.open(tmp_path / meta["files"][item.name]))
        assert [o["label"] for o in meta["objects"][item.name]] == list(objects.labels)
        for entry in meta["objects"][item.name]:  # an object's pixels hold its class in the class map
            assert (classes[np.asarray(image) == entry["id"]] == entry["label"]).all()
    assert len(meta["objects"]["b/ring.png"]) == 4 and meta["objects"]["empty.png"] == []


def test_png_object_maps_of_many_instances_are_16_bit(tmp_path):
    label_map = np.zeros((63, 63), np.int32)
    for y in range(0, 63, 3):
        for x in range(0, 63, 3):
            label_map[y:y + 2, x:x + 2] = 1  # 441 separate 2x2 objects
    item = ExportItem("many.png", "/data/many.png", label_map, {"cat": 0.5})
    write_export(spec("png"), Layout.of("png", tmp_path), [item], [])
    objects = item.instances_for(LABELS)
    assert len(objects) > 255
    image = Image.open(tmp_path / "SegmentationObject" / "many.png")
    assert image.mode.startswith("I") and (np.asarray(image) == objects.instance_map).all()
    assert Image.open(tmp_path / "SegmentationClass" / "many.png").mode == "P"


def test_png_refuses_more_labels_than_a_byte_holds():
    with pytest.raises(ValueError, match="at most 254"):
        ExportSpec("png", tuple(f"l{i}" for i in range(255)), "v")


def read_yolo_instances(path: Path, height: int, width: int, rounding: bool = False) -> list[tuple[int, np.ndarray]]:
    """(class, mask) per line, read the way ultralytics (`polygon2mask`) and supervision (`polygon_to_mask`)
    read YOLO segmentation: coordinates scaled to pixels, truncated to integers (or rounded), cv2.fillPoly."""
    found = []
    for line in path.read_text().splitlines():
        values = line.split()
        points = np.asarray(values[1:], float).reshape(-1, 2) * [width, height]
        points = np.round(points) if rounding else points
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [points.astype(np.int32).reshape(-1, 1, 2)], 1)
        found.append((int(values[0]), mask.astype(bool)))
    return found


def read_yolo(path: Path, height: int, width: int, classes: int) -> list[np.ndarray]:
    """The union mask of each class over the lines of a YOLO segmentation file."""
    masks = [np.zeros((height, width), bool) for _ in range(classes)]
    for k, mask in read_yolo_instances(path, height, width):
        masks[k] |= mask
    return masks


@pytest.mark.parametrize("tolerance, min_iou", [(0.0, 0.98), (1.0, 0.85)])
def test_yolo_polygons_rasterise_back_to_each_instance_with_its_holes(tmp_path, tolerance, min_iou):
    items = known_items()
    write_export(spec("yolo", polygon_tolerance=tolerance), Layout.of("yolo", tmp_path), items, FAILURES)
    stems = file_stems([i.name for i in items])
    worst = 1.0
    for item in items:
        objects = item.instances_for(LABELS)
        for rounding in (False, True):
            lines = read_yolo_instances(tmp_path / "labels" / f"{stems[item.name]}.txt", item.height, item.width,
                                        rounding)
            assert len(lines) == len(objects)  # one line per instance
            for j, (k, mask) in enumerate(lines):
                assert k == objects.labels[j] - 1
                worst = min(worst, iou(mask, objects.mask(j)))
    assert worst >= min_iou
    if tolerance == 0:
        assert worst == 1.0  # exact: vertices sit on the border pixels
    # cat's ring keeps its hole: the dog inside is not cat's
    ring = read_yolo(tmp_path / "labels" / "b_ring.txt", 40, 56, 3)
    assert not ring[0][15, 15] and ring[1][15, 15] and ring[0][6, 6]
    yaml = (tmp_path / "data.yaml").read_text()
    assert 'nc: 3' in yaml and '  0: "cat"' in yaml and '  2: "sofa"' in yaml
    assert (tmp_path / "labels" / "empty.txt").read_text() == ""


def test_yolo_polygons_keep_many_holes_and_islands(tmp_path):
    """A ring-shaped label enclosing other labels (and an island of itself inside a hole), random shapes."""
    rng = np.random.default_rng(11)
    label_map = np.zeros((90, 120), np.int32)
    label_map[5:85, 5:115] = 1
    label_map[15:35, 15:40] = 2  # holes filled by other labels
    label_map[50:75, 60:100] = 3
    label_map[20:30, 70:80] = 0  # a background hole
    label_map[58:66, 75:85] = 1  # an island of cat inside dog's... inside the sofa hole
    for _ in range(12):  # ragged edges
        y, x = rng.integers(5, 85), rng.integers(5, 115)
        label_map[y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = rng.integers(0, 4)
    item = ExportItem("holes.png", "/data/holes.png", label_map, {"cat": 0.9, "dog": 0.5, "sofa": 0.4})
    write_export(spec("yolo", polygon_tolerance=0.0), Layout.of("yolo", tmp_path), [item], [])
    objects = item.instances_for(LABELS)
    assert any(len(components(~objects.mask(j))) > 2 for j in range(len(objects)))  # at least two holes
    lines = read_yolo_instances(tmp_path / "labels" / "holes.txt", 90, 120)
    assert [k + 1 for k, _ in lines] == list(objects.labels)
    for j, (_, mask) in enumerate(lines):
        assert iou(mask, objects.mask(j)) >= 0.98, j
    rings = instance_rings(objects.mask(0))
    areas = [0.5 * float(np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(np.roll(r[:, 0], -1), r[:, 1])) for r in rings]
    assert areas[0] > 0 and min(areas) < 0  # outlines one way round, holes the other (nonzero fill)


def test_yolo_detect_boxes_are_the_instance_bounds(tmp_path):
    items = known_items()
    write_export(spec("yolo-detect"), Layout.of("yolo-detect", tmp_path), items, FAILURES)
    stems = file_stems([i.name for i in items])
    for item in items:
        objects = item.instances_for(LABELS)
        lines = (tmp_path / "labels" / f"{stems[item.name]}.txt").read_text().splitlines()
        assert len(lines) == len(objects)
        for j, line in enumerate(lines):
            k, cx, cy, w, h = line.split()
            assert int(k) == objects.labels[j] - 1
            x0, y0, bw, bh = bounds(objects.mask(j))
            assert float(cx) * item.width == pytest.approx(x0 + bw / 2, abs=1e-3)
            assert float(cy) * item.height == pytest.approx(y0 + bh / 2, abs=1e-3)
            assert float(w) * item.width == pytest.approx(bw, abs=1e-3)
            assert float(h) * item.height == pytest.approx(bh, abs=1e-3)
    assert (tmp_path / "data.yaml").is_file()


def test_yolo_links_only_images_under_the_allowed_folder(tmp_path):
    root = tmp_path / "root"
    (root / "set").mkdir(parents=True)
    inside = root / "set" / "a.PNG"
    inside.write_bytes(b"png bytes")
    secret = tmp_path / "elsewhere" / "passwd"  # an absolute path a task may name, outside the root
    secret.parent.mkdir()
    secret.write_text("root:x:0:0")
    (root / "set" / "credentials").write_text("token")  # inside the folder, but no image
    (root / "set" / "placed.png").symlink_to(secret)  # a link the operator placed in the folder: followed
    (tmp_path / "escape").symlink_to(root / "set")  # a way round the folder's name: its real path is inside
    blank = np.zeros((4, 4), np.int32)
    items = [ExportItem("a.PNG", str(inside), blank),
             ExportItem("b.png", "/data/local-files/?d=set/a.PNG", blank),
             ExportItem("c.png", f"file://{inside}", blank),
             ExportItem("passwd", str(secret), blank),
             ExportItem("d.png", "/data/local-files/?d=../elsewhere/passwd", blank),
             ExportItem("e.png", "/data/local-files/?d=set/placed.png", blank),
             ExportItem("h.png", str(tmp_path / "escape" / "a.PNG"), blank),
             ExportItem("i.png", str(root / "set" / ".." / ".." / "elsewhere" / "passwd"), blank),
             ExportItem("j.png", str(root / "set" / "credentials"), blank),
             ExportItem("f.png", f"/data/local-files/?d={secret}", blank),
             ExportItem("g.png", "https://example.com/data/local-files/?d=set/a.PNG", blank)]
    out = tmp_path / "out"
    write_export(spec("yolo", image_root=root), Layout.of("yolo", out), items, [])
    write_export(spec("yolo", image_root=root), Layout.of("yolo", out), items, [])  # again: the links are replaced
    linked = {p.name: p.resolve() for p in (out / "images").iterdir()}
    assert linked == {"a.png": inside.resolve(), "b.png": inside.resolve(), "c.png": inside.resolve(),
                      "e.png": secret.resolve(), "g.png": inside.resolve(), "h.png": inside.resolve()}
    assert allowed_image(str(secret), None) is None and allowed_image(str(inside), None) is None
    write_export(spec("yolo"), Layout.of("yolo", out), items, [])  # no allowed folder: earlier links go
    assert list((out / "images").iterdir()) == []


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


def test_journal_keeps_instances_and_tags_and_restarts_an_old_journal(tmp_path):
    path = tmp_path / ".car-export" / "journal.jsonl"
    scene = ring_scene()
    objects = split_instances(scene, [0.9, 0.4])
    given = Instances(objects.instance_map, objects.labels, (0.8, 0.7, 0.6, 0.5))
    item = ExportItem("a.png", "/data/a.png", scene, {"cat": 0.9, "dog": 0.4}, instances=given, tags=("x", "y"))
    with Journal(path, {"labels": list(LABELS)}) as journal:
        journal.add(item)
        journal.add(known_items()[1])
    with Journal(path, {"labels": list(LABELS)}) as journal:
        back = journal.items.get("a.png")
        assert (back.instances.instance_map == given.instance_map).all()
        assert back.instances.labels == given.labels and back.instances.scores == given.scores
        assert back.tags == ("x", "y")
        assert journal.items.get("a-stripes.jpg").instances is None  # split again when written
    # a journal written before instances (no format in its first line) starts over cleanly
    old = json.dumps({"identity": {"labels": list(LABELS)}}) + "\n" + path.read_text().splitlines()[1] + "\n"
    path.write_text(old)
    with Journal(path, {"labels": list(LABELS)}) as journal:
        assert len(journal.items) == 0
    assert json.loads(path.read_text().splitlines()[0])["format"] >= 2
