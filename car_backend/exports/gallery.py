"""A static review gallery of an export: open `gallery/index.html` from disk, no server.

Files: `index.html` (page, style and script in one file), `data/summary.js` (labels with colours and
counts, the page count, failures), `data/page-0001.js`, ... (the items of each page, most uncertain first)
and `thumbs/<id>.jpg` (the image with its label map blended in, at most `THUMB_SIDE` pixels a side). The
page loads one page file at a time with a <script> tag (file:// pages may not fetch()), and thumbnails
load lazily, so 10,000 images stay as light as a hundred. `#page=N` in the address opens page N.
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
from car_backend.exports.writers import voc_palette

THUMB_SIDE = 192
PAGE_SIZE = 100
OVERLAY_ALPHA = 0.5
MAX_FAILURES_SHOWN = 1000  # failed.txt has them all


def thumb_file(name: str) -> str:
    """The thumbnail's path under the gallery folder for an item name."""
    return f"thumbs/{hashlib.sha1(name.encode()).hexdigest()[:20]}.jpg"


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
        write_atomic(self.folder / thumb_file(name), overlay_thumbnail(image, label_map))

    def write(self, labels: Sequence[str], items: Items | Iterable[ExportItem], failures: Sequence[Failure],
              title: str, page_size: int = PAGE_SIZE) -> Path:
        """Write index.html and the data files for `items` (any order; shown most uncertain first).
        Returns the path of index.html."""
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
            rows.append({"n": item.name, "t": thumb_file(item.name) if self.has_thumbnail(item.name) else "",
                         "u": round(float(item.uncertainty), 4),
                         "s": None if item.score is None else round(float(item.score), 4),
                         "o": item.origin, "k": kept})
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
figure.thumb img { display: block; max-width: 192px; max-height: 192px; margin: auto; }
figure.thumb .missing { height: 96px; line-height: 96px; text-align: center; color: #999; background: #eee; }
figcaption { font-size: .8em; word-break: break-all; }
.label { display: inline-block; margin: 2px 2px 0 0; padding: 0 4px; border-radius: 3px; background: #eee; }
.name { font-weight: 600; }
#failures { margin-top: 1em; }
</style>
</head>
<body>
<h1 id="title">car-backend gallery</h1>
<div id="totals"></div>
<table id="label-counts"><thead><tr><th>label</th><th>images</th><th>pixels</th></tr></thead><tbody></tbody></table>
<div id="pager"><button id="prev">&larr; previous</button> <span id="where"></span>
 <button id="next">next &rarr;</button></div>
<div id="grid"></div>
<details id="failures"><summary></summary><ul></ul></details>
<script src="data/summary.js"></script>
<script>
(function () {
  "use strict";
  var G = window.CAR_GALLERY;
  var current = 0;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pageFromHash() {
    var m = /page=(\\d+)/.exec(location.hash);
    var n = m ? parseInt(m[1], 10) : 1;
    return Math.min(Math.max(n, 1), G.pages);
  }
  window.carGalleryPage = function (number, rows) {
    if (number !== current) return;
    var grid = document.getElementById("grid");
    grid.textContent = "";
    rows.forEach(function (row) {
      var fig = el("figure", "thumb");
      fig.dataset.name = row.n;
      fig.dataset.uncertainty = row.u;
      if (row.t) {
        var img = el("img");
        img.loading = "lazy";
        img.src = row.t;
        img.alt = row.n;
        fig.appendChild(img);
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
  });
  var failures = document.getElementById("failures");
  if (G.failed) {
    failures.querySelector("summary").textContent = G.failed + " images failed";
    G.failures.forEach(function (f) { failures.querySelector("ul").appendChild(el("li", "failure", f[0] + ": " + f[1])); });
  } else {
    failures.style.display = "none";
  }
  document.getElementById("prev").onclick = function () { location.hash = "page=" + (current - 1); };
  document.getElementById("next").onclick = function () { location.hash = "page=" + (current + 1); };
  window.addEventListener("hashchange", function () { show(pageFromHash()); });
  show(pageFromHash());
})();
</script>
</body>
</html>
"""
