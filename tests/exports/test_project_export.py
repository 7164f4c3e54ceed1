"""`export --project`: a fake Label Studio project's annotations (preferred) and predictions, exported and
read back to the label maps they were written from."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO

import numpy as np
from PIL import Image

from car_backend.engine.result import Segmentation
from car_backend.exports import rle
from car_backend.exports.project import export_project, task_item
from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.config import LabelSpec, parse_label_config
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.settings import Settings
from car_backend.testing.fake_label_studio import Reply
from tests.exports.known import ring_scene, stripes_scene
from tests.exports.test_writers import iou, read_yolo, read_yolo_instances
from tests.support.settings import settings_env

CONFIG = ('<View><Image name="image" value="$image"/>'
          '<BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>'
          '<PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels></View>')
LABELS = ["cat", "dog"]
H, W = 64, 96  # the fake's images


def regions(label_map: np.ndarray, kind: str, scores=(0.9, 0.6)) -> list[dict]:
    target = next(t for t in parse_label_config(CONFIG).targets if t.kind == kind)
    seg = Segmentation(queries=LABELS, label_map=label_map, masks=np.stack([label_map == 1, label_map == 2]),
                       scores=np.asarray(scores, np.float32), steps=1)
    return segmentation_to_regions(seg, target, [LabelSpec(v, v) for v in LABELS], polygon_tolerance=0.0)


def scenes():
    ring, stripes = ring_scene(H, W), stripes_scene(H, W)
    shifted = np.roll(ring, 20, axis=1)
    return ring, stripes, shifted


def make_project(fake_ls, task_ids):
    """Tasks: a prediction; a prediction and an annotation; a cancelled annotation and a prediction; nothing;
    an empty prediction on a broken image; an empty prediction on a good one. Returns (project, ids, expected)."""
    ids = task_ids(6)
    ring, stripes, shifted = scenes()
    url = fake_ls.url
    tasks = [
        {"id": ids[0], "data": {"image": f"{url}/img/one.png"}},
        {"id": ids[1], "data": {"image": f"{url}/img/two.png"},
         "annotations": [{"id": 1, "result": regions(stripes, "polygon"), "was_cancelled": False,
                          "created_at": "2026-01-01T00:00:00Z"}]},
        {"id": ids[2], "data": {"image": "/data/local-files/?d=set/three.png"},
         "annotations": [{"id": 2, "result": regions(ring, "brush"), "was_cancelled": True}]},
        {"id": ids[3], "data": {"image": f"{url}/img/four.png"}},
        {"id": ids[4], "data": {"image": f"{url}/bad/five.png"}},
        {"id": ids[5], "data": {"image": f"{url}/img/six.png"}},
    ]
    fake_ls.add_project(ids[0], CONFIG, tasks)
    client = LabelStudioClient(Settings(label_studio_url=url, label_studio_api_key=fake_ls.api_key))
    client.create_prediction(ids[0], {"result": regions(ring, "brush"), "score": 0.8, "model_version": "v1"})
    client.create_prediction(ids[1], {"result": regions(ring, "brush"), "score": 0.8, "model_version": "v1"})
    client.create_prediction(ids[2], {"result": regions(shifted, "brush", (0.3, 0.2)), "model_version": "v1"})
    client.create_prediction(ids[4], {"result": [], "model_version": "v1"})
    client.create_prediction(ids[5], {"result": [], "model_version": "v1"})
    expected = {"one.png": ring, "two.png": stripes, "three.png": shifted, "six.png": np.zeros((H, W), np.int32)}
    return ids[0], ids, expected


def settings_for(fake_ls) -> Settings:
    return Settings(label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.api_key)


def test_coco_from_a_project_prefers_annotations(fake_ls, task_ids, tmp_path):
    project, ids, expected = make_project(fake_ls, task_ids)
    assert export_project(project, "coco", tmp_path, settings_for(fake_ls)) == 0
    doc = json.loads((tmp_path / "annotations.json").read_text())
    assert [c["name"] for c in doc["categories"]] == LABELS
    assert sorted(i["file_name"] for i in doc["images"]) == sorted(expected)
    for image in doc["images"]:
        decoded = np.zeros((image["height"], image["width"]), np.int32)
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        for ann in anns:
            decoded[rle.decode(ann["segmentation"])] = ann["category_id"]
        assert (decoded == expected[image["file_name"]]).all(), image["file_name"]
        scores = {LABELS[a["category_id"] - 1]: a["score"] for a in anns}
        assert scores == {"one.png": {"cat": 0.9, "dog": 0.6}, "two.png": {"cat": 1.0, "dog": 1.0},
                          "three.png": {"cat": 0.3, "dog": 0.2}, "six.png": {}}[image["file_name"]]
    assert {i["file_name"]: i["ls_task"] for i in doc["images"]} == {
        "one.png": ids[0], "two.png": ids[1], "three.png": ids[2], "six.png": ids[5]}
    failed = dict(line.split("\t") for line in (tmp_path / "failed.txt").read_text().splitlines())
    assert sorted(failed) == ["five.png", "four.png"]
    assert "no annotation or prediction" in failed["four.png"] and f"task {ids[4]}" in failed["five.png"]


def test_png_and_yolo_from_a_project(fake_ls, task_ids, tmp_path):
    project, _, expected = make_project(fake_ls, task_ids)
    assert export_project(project, "png", tmp_path / "png", settings_for(fake_ls)) == 0
    for name, label_map in expected.items():
        assert (np.asarray(Image.open(tmp_path / "png" / "SegmentationClass" / name)) == label_map).all()
    assert export_project(project, "yolo", tmp_path / "yolo", settings_for(fake_ls)) == 0
    for name, label_map in expected.items():
        masks = read_yolo(tmp_path / "yolo" / "labels" / name.replace(".png", ".txt"), H, W, 2)
        for k, mask in enumerate(masks):
            # holes kept; a semantic brush region is one instance of several parts, joined by cuts that
            # cv2.fillPoly draws one pixel wide (as for any multi-part segment in YOLO)
            want = label_map == k + 1
            assert iou(mask, want) >= 0.9 if want.any() else not mask.any()


def test_the_export_command_writes_a_gallery(fake_ls, task_ids, tmp_path):
    project, _, expected = make_project(fake_ls, task_ids)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "export", "--project", str(project), "--format",
                           "coco", "--out", str(out), "--gallery"], env=settings_env(settings_for(fake_ls)),
                          capture_output=True, text=True, timeout=120)
    # three.png is a local-files reference the fake does not serve: exported without a thumbnail
    assert done.returncode == 0, done.stderr
    assert "1 from annotations" in done.stdout and "gallery:" in done.stdout
    summary = (out / "gallery" / "data" / "summary.js").read_text()
    data = json.loads(summary.split("=", 1)[1].rstrip().rstrip(";"))
    assert data["total"] == 4 and data["failed"] == 2
    assert len(list((out / "gallery" / "thumbs").iterdir())) == 3
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 4
    assert fake_ls.api_key not in done.stdout + done.stderr


def test_bad_settings_and_projects_are_refused(fake_ls, tmp_path):
    assert export_project(1, "coco", tmp_path, Settings()) == 2
    assert export_project(987654, "coco", tmp_path, settings_for(fake_ls)) == 1


def test_export_has_real_help():
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "export", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: car-backend export")
    assert "{coco,png,yolo,yolo-detect}" in done.stdout and "annotation" in done.stdout


def test_prelabel_project_refuses_export_flags(fake_ls):
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "prelabel", "--project", "3", "--export", "coco"],
                          env=settings_env(settings_for(fake_ls)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "car-backend export --project" in done.stderr


MIXED = ('<View><Image name="image" value="$image"/>'
         '<BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>'
         '<PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>'
         '<RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>'
         '<Choices name="scene" toName="image" choice="multiple"><Choice value="indoor"/><Choice value="night"/>'
         '</Choices></View>')


def objects_scene() -> list[tuple[str, str, np.ndarray]]:
    """(label, region kind, mask) of four objects: two cats (brush, polygon), a dog with a hole (brush), a dog
    box (rectangle)."""
    cat_a, cat_b, dog = (np.zeros((H, W), bool) for _ in range(3))
    cat_a[5:20, 5:30] = True
    cat_b[40:60, 10:25] = True
    dog[10:50, 40:70] = True
    dog[20:30, 50:60] = False  # a hole
    box = np.zeros((H, W), bool)
    box[16:48, 72:96] = True  # x 75%..100%, y 25%..75%
    return [("cat", "brush", cat_a), ("cat", "polygon", cat_b), ("dog", "brush", dog), ("dog", "rectangle", box)]


def object_regions() -> list[dict]:
    found = []
    for n, (label, kind, mask) in enumerate(objects_scene()):
        if kind == "rectangle":
            region = {"type": "rectanglelabels", "original_width": W, "original_height": H, "from_name": "box",
                      "to_name": "image", "value": {"x": 75.0, "y": 25.0, "width": 25.0, "height": 50.0,
                                                    "rotation": 0, "rectanglelabels": [label]}}
        else:
            label_map = mask.astype(np.int32) * (LABELS.index(label) + 1)
            region = regions(label_map, kind)[0]
        found.append({**region, "id": f"r{n}"})
    found.append({"id": "c1", "type": "choices", "from_name": "scene", "to_name": "image",
                  "value": {"choices": ["indoor", "night"]}})
    return found


def test_instance_regions_rectangles_and_choices_from_a_project(fake_ls, task_ids, tmp_path):
    mask_api = __import__("pytest").importorskip("pycocotools.mask")
    ids = task_ids(1)
    fake_ls.add_project(ids[0], MIXED, [
        {"id": ids[0], "data": {"image": f"{fake_ls.url}/img/objects.png"},
         "annotations": [{"id": 7, "result": object_regions(), "was_cancelled": False}]}])
    objects = objects_scene()
    assert export_project(ids[0], "coco", tmp_path / "coco", settings_for(fake_ls)) == 0
    doc = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert doc["images"][0]["tags"] == ["indoor", "night"]
    anns = doc["annotations"]
    assert [LABELS[a["category_id"] - 1] for a in anns] == [label for label, _, _ in objects]
    for ann, (_, _, mask) in zip(anns, objects, strict=True):
        decoded = mask_api.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        assert (decoded.astype(bool) == mask).all()
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] == 0 and ann["score"] == 1.0 and ann["area"] == int(mask.sum())

    assert export_project(ids[0], "yolo-detect", tmp_path / "det", settings_for(fake_ls)) == 0
    lines = (tmp_path / "det" / "labels" / "objects.txt").read_text().splitlines()
    box = [float(v) for v in lines[3].split()]
    assert box == [1.0, 0.875, 0.5, 0.25, 0.5]  # the rectangle, as Label Studio drew it
    assert len(lines) == 4

    assert export_project(ids[0], "yolo", tmp_path / "yolo", settings_for(fake_ls)) == 0
    found = read_yolo_instances(tmp_path / "yolo" / "labels" / "objects.txt", H, W)
    assert [LABELS[k] for k, _ in found] == [label for label, _, _ in objects]
    for (_, mask), (_, _, want) in zip(found, objects, strict=True):
        assert iou(mask, want) >= 0.98
    assert not found[2][1][25, 55]  # the dog's hole stays open
    assert json.loads((tmp_path / "yolo" / "tags.json").read_text()) == {"objects.png": ["indoor", "night"]}


def test_a_region_claiming_a_huge_image_fails_its_task_only(fake_ls, task_ids, tmp_path):
    ids = task_ids(3)
    ring = ring_scene(H, W)
    huge_brush = {**regions(ring, "brush")[0], "original_width": 100_000, "original_height": 100_000}
    huge_box = {"id": "b", "type": "rectanglelabels", "original_width": 100_000, "original_height": 100_000,
                "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]}}
    fake_ls.add_project(ids[0], CONFIG, [
        {"id": ids[0], "data": {"image": f"{fake_ls.url}/img/good.png"},
         "annotations": [{"id": 1, "result": regions(ring, "brush")}]},
        {"id": ids[1], "data": {"image": f"{fake_ls.url}/img/huge.png"}, "annotations": [{"id": 2, "result": [huge_brush]}]},
        {"id": ids[2], "data": {"image": f"{fake_ls.url}/img/box.png"}, "annotations": [{"id": 3, "result": [huge_box]}]},
    ])
    assert export_project(ids[0], "coco", tmp_path, settings_for(fake_ls)) == 0
    doc = json.loads((tmp_path / "annotations.json").read_text())
    assert [i["file_name"] for i in doc["images"]] == ["good.png"]
    failed = dict(line.split("\t") for line in (tmp_path / "failed.txt").read_text().splitlines())
    assert sorted(failed) == ["box.png", "huge.png"]
    for reason in failed.values():
        assert "100000x100000" in reason and "CAR_MAX_IMAGE_PIXELS" in reason


def test_yolo_links_only_files_under_the_local_files_root(fake_ls, task_ids, tmp_path):
    root = tmp_path / "documents"
    (root / "set").mkdir(parents=True)
    Image.new("RGB", (W, H)).save(root / "set" / "inside.png")
    secret = tmp_path / "home" / "credentials.png"  # what a task may name: any absolute path
    secret.parent.mkdir()
    secret.write_text("aws_secret_access_key = x")
    ids = task_ids(4)
    result = regions(ring_scene(H, W), "brush")
    refs = ["/data/local-files/?d=set/inside.png", str(secret), "/data/local-files/?d=../home/credentials.png",
            str(root / "set" / "inside.png")]
    fake_ls.add_project(ids[0], CONFIG, [{"id": i, "data": {"image": ref}, "annotations": [{"id": i, "result": result}]}
                                        for i, ref in zip(ids, refs, strict=True)])
    settings = Settings(label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.api_key,
                        local_files_document_root=str(root))
    assert export_project(ids[0], "yolo", tmp_path / "out", settings) == 0
    images = tmp_path / "out" / "images"
    assert {p.name: p.resolve() for p in images.iterdir()} == {
        "inside.png": (root / "set" / "inside.png").resolve(), f"{ids[3]}-inside.png": (root / "set" / "inside.png").resolve()}
    assert len(list((tmp_path / "out" / "labels").iterdir())) == 4  # every task exported, only links held back
    assert export_project(ids[0], "yolo", tmp_path / "none", settings_for(fake_ls)) == 0  # no root: no links
    assert not (tmp_path / "none" / "images").exists()


def test_overlapping_regions_later_label_wins_and_instances_follow_the_label_map():
    def box(rid, x, label):
        return {"id": rid, "type": "rectanglelabels", "original_width": 100, "original_height": 10,
                "value": {"x": x, "y": 0, "width": 40, "height": 100, "rectanglelabels": [label]}}

    task = {"id": 5, "annotations": [{"id": 1, "result": [box("a", 0, "dog"), box("b", 30, "cat"),
                                                          box("c", 60, "cat")]}]}
    labels = ["cat", "dog"]
    item, image = task_item(task, "t.png", "/x.png", labels, fetcher=None, max_pixels=10_000)
    assert image is None and item.label_map.shape == (10, 100)
    row = item.label_map[0]
    assert (row[:40] == 2).all() and (row[40:100] == 1).all()  # dog (later in the list) keeps 30..40
    objects = item.instances
    assert objects.labels == (2, 1, 1) and objects.scores == (1.0, 1.0, 1.0)
    inst = objects.instance_map[0]
    assert (inst[:40] == 1).all() and (inst[40:60] == 2).all() and (inst[60:] == 3).all()  # c over b
    assert labels == ["cat", "dog"] and item.scores == {"cat": 1.0, "dog": 1.0}


def real_size_scene(height: int, width: int) -> np.ndarray:
    """Three separate cats and a dog ring around the middle one, at a real photo's size."""
    label_map = np.zeros((height, width), np.int32)
    for k in range(3):
        x = width * (1 + 3 * k) // 10
        label_map[height // 3: 2 * height // 3, x: x + width // 8] = 1
    ring = np.zeros((height, width), bool)
    ring[height // 5: 4 * height // 5, 3 * width // 10: 6 * width // 10] = True
    ring[height // 4: 3 * height // 4, 7 * width // 20: 11 * width // 20] = False
    label_map[ring & (label_map == 0)] = 2
    return label_map


def test_real_size_annotations_export_to_coco_and_yolo(fake_ls, task_ids, tmp_path):
    """A 1024x1024 and a 4000x3000 annotated task: COCO decodes (pycocotools) to each object, YOLO polygons
    rasterise back to each label, the dog's hole open."""
    mask_api = __import__("pytest").importorskip("pycocotools.mask")
    ids = task_ids(2)
    sizes = {ids[0]: (1024, 1024), ids[1]: (3000, 4000)}
    tasks = []
    for task, (height, width) in sizes.items():
        fake_ls.routes[f"/big/{task}.png"] = _png_reply(height, width)
        tasks.append({"id": task, "data": {"image": f"{fake_ls.url}/big/{task}.png"},
                      "annotations": [{"id": task, "result": regions(real_size_scene(height, width), "brush")}]})
    fake_ls.add_project(ids[0], CONFIG, tasks)
    assert export_project(ids[0], "coco", tmp_path / "coco", settings_for(fake_ls)) == 0
    doc = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(doc["images"]) == 2
    for image in doc["images"]:
        height, width = sizes[image["ls_task"]]
        assert (image["height"], image["width"]) == (height, width)
        label_map = real_size_scene(height, width)
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        for value in (1, 2):
            decoded = np.zeros((height, width), bool)
            for ann in (a for a in anns if a["category_id"] == value):
                decoded |= mask_api.decode({"size": ann["segmentation"]["size"],
                                            "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
            assert (decoded == (label_map == value)).all()
    assert export_project(ids[0], "yolo", tmp_path / "yolo", settings_for(fake_ls)) == 0
    for task, (height, width) in sizes.items():
        label_map = real_size_scene(height, width)
        masks = read_yolo(tmp_path / "yolo" / "labels" / f"{task}.txt", height, width, 2)
        for k, mask in enumerate(masks):
            assert iou(mask, label_map == k + 1) >= 0.98
        assert not masks[1][height // 2, width // 2 + width // 40]  # inside the ring: no dog


def _png_reply(height: int, width: int) -> Reply:
    out = BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(out, format="PNG")
    return Reply(body=out.getvalue(), headers={"Content-Type": "image/png"})
