"""A static review gallery of an export: open `gallery/index.html` from disk, no server.

Files: `index.html` (page, style and script in one file), `data/summary.js` (labels with colours and
counts, the page count, failures), `data/page-0001.js`, ... (the items of each page, most uncertain first,
with the outline of each instance as an SVG path for the images that have a thumbnail),
`thumbs/<id>.jpg` (the image with its label map blended in, at most `THUMB_SIDE` pixels a side) and
`large/<id>.jpg` (the image alone, at most `LARGE_SIDE` pixels a side). The page loads one page file at a
time with a <script> tag (file:// pages may not fetch()), and thumbnails load lazily, so 10,000 images stay
as light as a hundred. `#page=N` in the address opens page N, `&label=NAME` filters by a label (images
without it are hidden, and other labels' outlines); clicking a thumbnail opens the image large with its
instances drawn over it, and a button turns that overlay off and on.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from car_backend.exports.records import ExportItem, Failure, Items, write_atomic
from car_backend.exports.writers import instance_rings, voc_palette

THUMB_SIDE = 192
LARGE_SIDE = 1024
OUTLINE_DETAIL = 200  # outlines are simplified to about 1/OUTLINE_DETAIL of the image's longer side
PAGE_SIZE = 100
OVERLAY_ALPHA = 0.5
MAX_FAILURES_SHOWN = 1000  # failed.txt has them all


def thumb_file(name: str) -> str:
    """The thumbnail's path under the gallery folder for an item name."""
    return f"thumbs/{hashlib.sha1(name.encode()).hexdigest()[:20]}.jpg"


def large_file(name: str) -> str:
    """The large image's path under the gallery folder for an item name."""
    return f"large/{hashlib.sha1(name.encode()).hexdigest()[:20]}.jpg"


def outline_path(mask: np.ndarray, tolerance: float) -> str:
    """SVG path data of an (H, W) bool mask's outlines and holes, integer coordinates at pixel centres (the
    page's viewBox starts at -0.5, so a pixel's square is drawn where it is); "" for an empty mask."""
    return "".join("M" + "L".join(f"{int(x)} {int(y)}" for x, y in ring) + "Z"
                   for ring in instance_rings(mask, tolerance))


def overlay_thumbnail(image: Image.Image, label_map: np.ndarray, max_side: int = THUMB_SIDE) -> bytes:
    """JPEG bytes of `image` scaled to at most `max_side` on its longer side, each labelled pixel blended
    with its label's VOC colour. `label_map` is (H, W) at the image's size (or any size: it is resized)."""
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pixels = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), np.float32)
    labels = np.asarray(Image.fromarray(np.asarray(label_map, np.int32)).resize(size, Image.NEAREST))
    colours = voc_palette(256)[np.clip(labels, 0, 255)].astype(np.float32)
    labelled = (labels > 0)[..., None]
    blended = np.where(labelled, (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colours, pixels)
    buf = io.BytesIO()
    Image.fromarray(blended.round().astype(np.uint8)).save(buf, "JPEG", quality=82)
    return buf.getvalue()


class Gallery:
    """The gallery folder of one export. `add_thumbnail` as images are segmented; `write` at the end."""

    def __init__(self, folder: Path):
        self.folder = folder

    def has_thumbnail(self, name: str) -> bool:
        return (self.folder / thumb_file(name)).is_file()

    def add_thumbnail(self, name: str, image: Image.Image, label_map: np.ndarray) -> None:
        """Write the item's overlay thumbnail and its large image (the image alone; the page draws the
        overlay)."""
        write_atomic(self.folder / thumb_file(name), overlay_thumbnail(image, label_map))
        width, height = image.size
        scale = min(1.0, LARGE_SIDE / max(width, height))
        large = image.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                            Image.BILINEAR)
        buf = io.BytesIO()
        large.save(buf, "JPEG", quality=85)
        write_atomic(self.folder / large_file(name), buf.getvalue())

    def write(self, labels: Sequence[str], items: Items | Iterable[ExportItem], failures: Sequence[Failure],
              title: str, page_size: int = PAGE_SIZE) -> Path:
        """Write index.html and the data files for `items` (any order; shown most uncertain first); the
        outlines are those of `ExportItem.instances_for(labels)`. Returns the path of index.html."""
        images_with = [0] * len(labels)
        pixels = [0] * len(labels)
        rows = []
        for item in items:  # one label map at a time; a row is a few numbers
            counts = np.bincount(item.label_map.ravel(), minlength=len(labels) + 1)
            kept = []
            for k in item.present(labels):
                images_with[k] += 1
                pixels[k] += int(counts[k + 1])
                kept.append([k, round(float(item.scores.get(labels[k], 0.0)), 4),
                             round(float(counts[k + 1]) / item.label_map.size, 4)])
            row = {"n": item.name, "t": "", "u": round(float(item.uncertainty), 4),
                   "s": None if item.score is None else round(float(item.score), 4), "o": item.origin, "k": kept}
            if self.has_thumbnail(item.name):
                row.update(self._drawing(item, labels))
            rows.append(row)
        rows.sort(key=lambda r: (-r["u"], r["n"]))
        data = self.folder / "data"
        if data.exists():
            shutil.rmtree(data)  # pages of an earlier, longer run must not linger
        data.mkdir(parents=True)
        pages = max(1, -(-len(rows) // page_size))
        for number in range(pages):
            chunk = rows[number * page_size:(number + 1) * page_size]
            write_atomic(data / f"page-{number + 1:04d}.js", f"carGalleryPage({number + 1}, {json.dumps(chunk)});\n")
        palette = voc_palette(len(labels) + 1)
        summary = {
            "title": title, "total": len(rows), "pages": pages, "pageSize": page_size,
            "labels": [{"name": label, "color": "#" + bytes(palette[k + 1].tolist()).hex(),
                        "images": images_with[k], "pixels": pixels[k]} for k, label in enumerate(labels)],
            "failed": len(failures),
            "failures": [[f.name, f.reason] for f in failures[:MAX_FAILURES_SHOWN]],
        }
        write_atomic(data / "summary.js", f"var CAR_GALLERY = {json.dumps(summary)};\n")
        index = self.folder / "index.html"
        write_atomic(index, INDEX_HTML)
        return index

    def _drawing(self, item: ExportItem, labels: Sequence[str]) -> dict:
        """What the page draws of an item with a thumbnail: `t` the thumbnail, `L` the large image ("" when
        an earlier gallery made none), `w`/`h` the label map's size (the outlines' viewBox) and `p` one
        [label index, score, SVG path] per instance."""
        instances = item.instances_for(labels)
        tolerance = max(item.width, item.height) / OUTLINE_DETAIL
        outlines = [[int(v) - 1, round(float(score), 4), path]
                    for j, (v, score) in enumerate(zip(instances.labels, instances.scores, strict=True))
                    if (path := outline_path(instances.mask(j), tolerance))]
        large = large_file(item.name)
        return {"t": thumb_file(item.name), "L": large if (self.folder / large).is_file() else "",
                "w": item.width, "h": item.height, "p": outlines}


INDEX_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>car-backend gallery</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1em; background: #fafafa; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .4em 0; }
#label-counts { border-collapse: collapse; margin: .5em 0 1em 0; }
#label-counts td, #label-counts th { padding: .15em .6em; border-bottom: 1px solid #ddd; text-align: left; }
.swatch { display: inline-block; width: .9em; height: .9em; border: 1px solid #555; vertical-align: middle; }
#pager { margin: .6em 0; }
#pager button { padding: .2em .8em; }
#grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure.thumb { margin: 0; width: 200px; background: #fff; border: 1px solid #ccc; padding: 4px; }
figure.thumb .frame { position: relative; width: fit-content; margin: auto; cursor: zoom-in; }
figure.thumb img { display: block; max-width: 192px; max-height: 192px; }
svg.outlines { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
svg.outlines path { stroke-width: 1.5px; vector-effect: non-scaling-stroke; }
#viewer-overlay path { fill-opacity: .45; fill-rule: evenodd; stroke-width: 2px; vector-effect: non-scaling-stroke; }
.hidden, figure.thumb.filtered-out { display: none; }
figure.thumb .missing { height: 96px; line-height: 96px; text-align: center; color: #999; background: #eee; }
figcaption { font-size: .8em; word-break: break-all; }
.label { display: inline-block; margin: 2px 2px 0 0; padding: 0 4px; border-radius: 3px; background: #eee; }
.name { font-weight: 600; }
#failures { margin-top: 1em; }
#viewer { position: fixed; inset: 0; background: rgba(0, 0, 0, .85); color: #fff; padding: 1em; overflow: auto; }
#viewer .bar { margin-bottom: .5em; }
#viewer .stage { position: relative; width: fit-content; margin: auto; }
#viewer-image { display: block; max-width: 95vw; max-height: 85vh; }
</style>
</head>
<body>
<h1 id="title">car-backend gallery</h1>
<div id="totals"></div>
<table id="label-counts"><thead><tr><th>label</th><th>images</th><th>pixels</th></tr></thead><tbody></tbody></table>
<label>show <select id="label-filter"><option value="">all labels</option></select></label>
<div id="pager"><button id="prev">&larr; previous</button> <span id="where"></span>
 <button id="next">next &rarr;</button></div>
<div id="grid"></div>
<details id="failures"><summary></summary><ul></ul></details>
<div id="viewer" class="hidden" data-overlay="on">
 <div class="bar"><button id="toggle-overlay">hide overlay</button> <button id="close-viewer">close</button>
  <span id="viewer-name"></span></div>
 <div class="stage"><img id="viewer-image" alt="">
  <svg id="viewer-overlay" class="outlines" xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="none"></svg></div>
</div>
<script src="data/summary.js"></script>
<script>
(function () {
  "use strict";
  var G = window.CAR_GALLERY;
  var SVG = "http://www.w3.org/2000/svg";
  var current = 0;
  var filter = "";
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fromHash() {
    var page = /page=(\\d+)/.exec(location.hash);
    var label = /label=([^&]*)/.exec(location.hash);
    var n = page ? parseInt(page[1], 10) : 1;
    var name = "";
    try { name = label ? decodeURIComponent(label[1]) : ""; } catch (e) { name = ""; }  // a mangled address
    return {page: Math.min(Math.max(n, 1), G.pages), label: name};
  }
  function setHash(page) {
    location.hash = "page=" + page + (filter ? "&label=" + encodeURIComponent(filter) : "");
  }
  function outlines(svg, row, fill) {
    svg.textContent = "";
    svg.setAttribute("viewBox", "-0.5 -0.5 " + row.w + " " + row.h);
    (row.p || []).forEach(function (inst) {
      var label = G.labels[inst[0]];
      var path = document.createElementNS(SVG, "path");
      path.setAttribute("d", inst[2]);
      path.setAttribute("class", "outline");
      path.setAttribute("data-label", label.name);
      path.setAttribute("stroke", label.color);
      path.setAttribute("fill", fill ? label.color : "none");
      var title = document.createElementNS(SVG, "title");
      title.textContent = label.name + " " + inst[1].toFixed(2);
      path.appendChild(title);
      svg.appendChild(path);
    });
  }
  function applyFilter() {
    document.getElementById("label-filter").value = filter;
    document.body.dataset.filter = filter;
    document.querySelectorAll("path.outline").forEach(function (path) {
      path.classList.toggle("hidden", filter !== "" && path.getAttribute("data-label") !== filter);
    });
    document.querySelectorAll("figure.thumb").forEach(function (fig) {
      var labels = fig.dataset.labels ? fig.dataset.labels.split("\\n") : [];
      fig.classList.toggle("filtered-out", filter !== "" && labels.indexOf(filter) < 0);
    });
  }
  function openViewer(row) {
    var viewer = document.getElementById("viewer");
    document.getElementById("viewer-image").src = row.L || row.t;
    document.getElementById("viewer-name").textContent = row.n;
    outlines(document.getElementById("viewer-overlay"), row, true);
    viewer.dataset.name = row.n;
    setOverlay(true);
    viewer.classList.remove("hidden");
    applyFilter();
  }
  function setOverlay(on) {
    var viewer = document.getElementById("viewer");
    viewer.dataset.overlay = on ? "on" : "off";
    document.getElementById("viewer-overlay").classList.toggle("hidden", !on);
    document.getElementById("toggle-overlay").textContent = on ? "hide overlay" : "show overlay";
  }
  window.carGalleryPage = function (number, rows) {
    if (number !== current) return;
    var grid = document.getElementById("grid");
    grid.textContent = "";
    rows.forEach(function (row) {
      var fig = el("figure", "thumb");
      fig.dataset.name = row.n;
      fig.dataset.uncertainty = row.u;
      fig.dataset.labels = row.k.map(function (kept) { return G.labels[kept[0]].name; }).join("\\n");
      if (row.t) {
        var frame = el("div", "frame");
        var img = el("img");
        img.loading = "lazy";
        img.src = row.t;
        img.alt = row.n;
        frame.appendChild(img);
        var svg = document.createElementNS(SVG, "svg");
        svg.setAttribute("class", "outlines");
        svg.setAttribute("preserveAspectRatio", "none");
        outlines(svg, row, false);
        frame.appendChild(svg);
        frame.onclick = function () { openViewer(row); };
        fig.appendChild(frame);
      } else {
        fig.appendChild(el("div", "missing", "no thumbnail"));
      }
      var cap = el("figcaption");
      cap.appendChild(el("div", "name", row.n));
      cap.appendChild(el("div", "uncertainty", "uncertainty " + row.u.toFixed(3) +
        (row.s === null ? "" : " \\u00b7 score " + row.s.toFixed(2)) + (row.o === "annotation" ? " \\u00b7 annotated" : "")));
      if (!row.k.length) cap.appendChild(el("div", "nolabel", "no label kept"));
      row.k.forEach(function (kept) {
        var label = G.labels[kept[0]];
        var span = el("span", "label", label.name + " " + kept[1].toFixed(2));
        span.dataset.label = label.name;
        span.style.borderLeft = "6px solid " + label.color;
        span.title = (100 * kept[2]).toFixed(1) + "% of the image";
        cap.appendChild(span);
      });
      fig.appendChild(cap);
      grid.appendChild(fig);
    });
    document.getElementById("where").textContent = "page " + number + " of " + G.pages;
    document.getElementById("prev").disabled = number <= 1;
    document.getElementById("next").disabled = number >= G.pages;
    document.body.dataset.page = number;
    applyFilter();
  };
  function show(number) {
    current = number;
    var old = document.getElementById("page-data");
    if (old) old.parentNode.removeChild(old);
    var s = document.createElement("script");
    s.id = "page-data";
    s.src = "data/page-" + ("000" + number).slice(-4) + ".js";
    document.body.appendChild(s);
    window.scrollTo(0, 0);
  }
  document.getElementById("title").textContent = G.title;
  document.title = G.title;
  document.getElementById("totals").textContent = G.total + " images, most uncertain first" +
    (G.failed ? "; " + G.failed + " failed (failed.txt)" : "");
  var body = document.querySelector("#label-counts tbody");
  var select = document.getElementById("label-filter");
  G.labels.forEach(function (label) {
    var tr = el("tr", "label-count");
    tr.dataset.label = label.name;
    tr.dataset.images = label.images;
    var name = el("td");
    var sw = el("span", "swatch");
    sw.style.background = label.color;
    name.appendChild(sw);
    name.appendChild(document.createTextNode(" " + label.name));
    tr.appendChild(name);
    tr.appendChild(el("td", "images", String(label.images)));
    tr.appendChild(el("td", "pixels", String(label.pixels)));
    body.appendChild(tr);
    var option = el("option", "", label.name);
    option.value = label.name;
    select.appendChild(option);
  });
  var failures = document.getElementById("failures");
  if (G.failed) {
    failures.querySelector("summary").textContent = G.failed + " images failed";
    G.failures.forEach(function (f) { failures.querySelector("ul").appendChild(el("li", "failure", f[0] + ": " + f[1])); });
  } else {
    failures.style.display = "none";
  }
  select.onchange = function () { filter = select.value; setHash(current); };
  document.getElementById("toggle-overlay").onclick = function () {
    setOverlay(document.getElementById("viewer").dataset.overlay !== "on");
  };
  document.getElementById("close-viewer").onclick = function () {
    document.getElementById("viewer").classList.add("hidden");
  };
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") document.getElementById("viewer").classList.add("hidden");
  });
  document.getElementById("prev").onclick = function () { setHash(current - 1); };
  document.getElementById("next").onclick = function () { setHash(current + 1); };
  function route() {
    var want = fromHash();
    filter = want.label;
    if (want.page !== current) show(want.page); else applyFilter();
  }
  window.addEventListener("hashchange", route);
  route();
})();
</script>
</body>
</html>
"""
