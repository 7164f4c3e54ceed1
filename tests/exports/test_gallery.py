"""The review gallery opened from disk in a real headless Chromium: thumbnails, labels, order, counts, pages."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from car_backend.exports.gallery import PAGE_SIZE, Gallery, large_file, overlay_thumbnail
from car_backend.exports.records import ExportItem, Failure
from car_backend.service import prelabel
from tests.support.browser import by_class, descendants, dump_dom, parse, screenshot
from tests.support.fake_label_studio import image_bytes
from tests.support.settings import tiny_settings

LABELS = ["cat", "dog", "sofa"]


def random_items(count: int, size: int = 6, seed: int = 3) -> list[ExportItem]:
    rng = np.random.default_rng(seed)
    items = []
    for n in range(count):
        label_map = rng.integers(0, len(LABELS) + 1, (size, size)).astype(np.int32)
        label_map[label_map == 3] = 0 if n % 2 else 3  # sofa in every other image
        scores = {LABELS[k - 1]: round(float(rng.random()), 3) for k in np.unique(label_map) if k}
        items.append(ExportItem(f"img-{n:05d}.png", f"/data/img-{n:05d}.png", label_map, scores,
                                0.5, round(float(rng.random()), 4)))
    return items


def figures(elements):
    return by_class(elements, "thumb", "figure")


def labels_in(figure):
    return [e.text.rsplit(" ", 1)[0] for e in descendants(figure) if "label" in e.classes]


def test_gallery_shows_thumbnails_labels_and_counts(tmp_path):
    items = random_items(230)
    gallery = Gallery(tmp_path / "gallery")
    picture = Image.new("RGB", (60, 40), (200, 180, 40))
    for item in items[:150]:
        gallery.add_thumbnail(item.name, picture, np.kron(item.label_map, np.ones((7, 10), np.int32))[:40, :60])
    failures = [Failure("broken.jpg", "/data/broken.jpg", "cannot decode the image")]
    index = gallery.write(LABELS, items, failures, "test gallery")
    ordered = sorted(items, key=lambda i: (-i.uncertainty, i.name))

    page = parse(dump_dom(index.as_uri()))
    shown = figures(page)
    assert len(shown) == PAGE_SIZE
    assert [f.attrs["data-name"] for f in shown] == [i.name for i in ordered[:PAGE_SIZE]]  # most uncertain first
    uncertainties = [float(f.attrs["data-uncertainty"]) for f in shown]
    assert uncertainties == sorted(uncertainties, reverse=True)
    for figure, item in zip(shown, ordered, strict=False):
        assert labels_in(figure) == [LABELS[k] for k in item.present(LABELS)]
        images = [e for e in descendants(figure) if e.tag == "img"]
        with_thumb = items.index(item) < 150
        assert len(images) == with_thumb
        if with_thumb:
            assert (index.parent / images[0].attrs["src"]).is_file()
    counts = {row.attrs["data-label"]: int(row.attrs["data-images"]) for row in by_class(page, "label-count", "tr")}
    assert counts == {label: sum(k in i.present(LABELS) for i in items) for k, label in enumerate(LABELS)}
    assert counts["sofa"] < counts["cat"]
    assert "230 images" in next(e for e in page if e.attrs.get("id") == "totals").text
    assert [e.text for e in by_class(page, "failure")] == ["broken.jpg: cannot decode the image"]

    last = figures(parse(dump_dom(index.as_uri() + "#page=3")))
    assert [f.attrs["data-name"] for f in last] == [i.name for i in ordered[200:]]

    shot = screenshot(index.as_uri(), tmp_path / "gallery.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1000, 1280) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_ten_thousand_images_load_one_page_at_a_time(tmp_path):
    items = random_items(10_000, size=4)
    index = Gallery(tmp_path / "gallery").write(LABELS, items, [], "big")
    pages = sorted((tmp_path / "gallery" / "data").glob("page-*.js"))
    assert len(pages) == 100 and max(p.stat().st_size for p in pages) < 60_000
    assert index.stat().st_size < 20_000  # the page itself does not grow with the images
    first = parse(dump_dom(index.as_uri()))
    assert len(figures(first)) == PAGE_SIZE
    assert "10000 images" in next(e for e in first if e.attrs.get("id") == "totals").text
    where = next(e for e in first if e.attrs.get("id") == "where").text
    assert where == "page 1 of 100"
    last = parse(dump_dom(index.as_uri() + "#page=100"))
    ordered = sorted(items, key=lambda i: (-i.uncertainty, i.name))
    assert [f.attrs["data-name"] for f in figures(last)] == [i.name for i in ordered[-PAGE_SIZE:]]


def test_prelabel_gallery_shows_each_image_with_its_kept_labels(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["a.png", "b.png", "c.png", "d.png"]
    for name in names:
        (folder / name).write_bytes(image_bytes(name, (120, 90)))
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert prelabel.prelabel_images(folder, ["sky", "grass"], out, "brush", tiny_settings(), export="coco",
                                    gallery=True) == 0
    index = out / "gallery" / "index.html"
    page = parse(dump_dom(index.as_uri()))
    shown = figures(page)
    assert sorted(f.attrs["data-name"] for f in shown) == names
    lines = (out / ".car-export" / "journal.jsonl").read_text().splitlines()[1:]  # after the identity line
    items = [ExportItem.from_plain(json.loads(line)) for line in lines]
    kept = {i.name: [label for k, label in enumerate(["sky", "grass"]) if k in i.present(["sky", "grass"])]
            for i in items}
    assert {f.attrs["data-name"]: labels_in(f) for f in shown} == kept
    assert sum(len(v) for v in kept.values()) > 0
    for figure in shown:
        src = next(e for e in descendants(figure) if e.tag == "img").attrs["src"]
        assert (index.parent / src).is_file()
    assert [e.text.split(":")[0] for e in by_class(page, "failure")] == ["broken.png"]


def test_overlay_thumbnail_blends_the_label_colours():
    image = Image.new("RGB", (400, 200), (255, 255, 255))
    label_map = np.zeros((200, 400), np.int32)
    label_map[:, 200:] = 1
    thumb = np.asarray(Image.open(io.BytesIO(overlay_thumbnail(image, label_map))).convert("RGB")).astype(int)
    assert thumb.shape == (96, 192, 3)
    assert (np.abs(thumb[48, 10] - 255) < 6).all()  # background: the image as it is
    assert np.abs(thumb[48, 180] - [192, 128, 128]).max() < 8  # half white, half VOC red (128, 0, 0)


def test_an_empty_gallery_opens(tmp_path):
    index = Gallery(tmp_path / "g").write(LABELS, [], [], "empty")
    page = parse(dump_dom(index.as_uri()))
    assert figures(page) == [] and "0 images" in next(e for e in page if e.attrs.get("id") == "totals").text


def instance_items() -> list[ExportItem]:
    """Three images with known objects: two cats and a dog with a hole; one dog; nothing."""
    a = np.zeros((40, 56), np.int32)
    a[2:12, 2:12] = 1
    a[20:35, 30:50] = 1
    a[5:30, 15:28] = 2
    a[10:15, 18:22] = 0  # a hole in the dog
    b = np.zeros((40, 56), np.int32)
    b[10:30, 10:40] = 2
    return [ExportItem("a.png", "/data/a.png", a, {"cat": 0.9, "dog": 0.7}, 0.8, 0.9),
            ExportItem("b.png", "/data/b.png", b, {"dog": 0.6}, 0.6, 0.5),
            ExportItem("c.png", "/data/c.png", np.zeros((40, 56), np.int32), {}, None, 0.1)]


def outlines_of(figure):
    return [e for e in descendants(figure) if e.tag == "path" and "outline" in e.classes]


CLICK = """<script>
(function wait() {
  var frame = document.querySelector("figure.thumb .frame");
  if (!frame) { setTimeout(wait, 50); return; }
  frame.click();
  var viewer = document.getElementById("viewer");
  document.body.dataset.afterClick = viewer.className + "|" + viewer.dataset.overlay;
  document.getElementById("toggle-overlay").click();
  var select = document.getElementById("label-filter");
  select.value = "cat";
  select.dispatchEvent(new Event("change"));
})();
</script>
</body>"""


def test_gallery_draws_instance_outlines_filters_by_label_and_opens_a_large_view(tmp_path):
    items = instance_items()
    gallery = Gallery(tmp_path / "gallery")
    picture = Image.new("RGB", (560, 400), (90, 140, 200))  # the label maps are a tenth of the image
    for item in items:
        gallery.add_thumbnail(item.name, picture, item.label_map)
    index = gallery.write(LABELS, items, [], "instances")
    large = Image.open(index.parent / large_file("a.png"))
    assert large.size == (560, 400)  # under LARGE_SIDE: the image as it is, without the overlay
    assert np.abs(np.asarray(large, int) - [90, 140, 200]).max() < 8

    page = parse(dump_dom(index.as_uri()))
    shown = {f.attrs["data-name"]: f for f in figures(page)}
    for item in items:
        objects = item.instances_for(LABELS)
        paths = outlines_of(shown[item.name])
        assert [p.attrs["data-label"] for p in paths] == [LABELS[v - 1] for v in objects.labels]
        assert not any("hidden" in p.classes for p in paths)
    assert len(outlines_of(shown["a.png"])) == 3
    assert outlines_of(shown["a.png"])[2].attrs["d"].count("M") == 2  # the dog's outline and its hole
    viewer = next(e for e in page if e.attrs.get("id") == "viewer")
    assert "hidden" in viewer.classes  # closed until a thumbnail is clicked

    filtered = parse(dump_dom(index.as_uri() + "#page=1&label=cat"))
    shown = {f.attrs["data-name"]: f for f in figures(filtered)}
    assert ["filtered-out" in f.classes for f in shown.values()] == [False, True, True]  # a, b, c: only a has cat
    paths = outlines_of(shown["a.png"])
    assert [("hidden" in p.classes, p.attrs["data-label"]) for p in paths] == [
        (False, "cat"), (False, "cat"), (True, "dog")]

    clicked = index.parent / "clicked.html"
    clicked.write_text(index.read_text().replace("</body>", CLICK))
    page = parse(dump_dom(clicked.as_uri()))
    body = next(e for e in page if e.tag == "body")
    assert body.attrs["data-after-click"] == "|on"  # opened, with its overlay
    viewer = next(e for e in page if e.attrs.get("id") == "viewer")
    assert "hidden" not in viewer.classes and viewer.attrs["data-name"] == "a.png"
    assert viewer.attrs["data-overlay"] == "off"  # the toggle turned it off
    image = next(e for e in page if e.attrs.get("id") == "viewer-image")
    assert image.attrs["src"] == large_file("a.png")
    overlay = next(e for e in page if e.attrs.get("id") == "viewer-overlay")
    assert "hidden" in overlay.classes
    drawn = [e for e in descendants(overlay) if e.tag == "path"]
    assert [(p.attrs["data-label"], p.attrs.get("fill")) for p in drawn] == [
        ("cat", "#800000"), ("cat", "#800000"), ("dog", "#008000")]
    assert body.attrs["data-filter"] == "cat"  # the label filter, chosen in its menu
    assert "hidden" in drawn[2].classes and "hidden" not in drawn[0].classes
    assert ["filtered-out" in f.classes for f in figures(page)] == [False, True, True]
