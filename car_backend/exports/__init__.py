"""Exports of segmentations into training formats, and a static review gallery.

`records`: what one exported image is (`ExportItem`: its label map, scores, object instances and tags) and
the resumable journal of a run; `rle`: COCO's compressed RLE; `writers`: the `ls`, `coco`, `png` (VOC),
`yolo` and `yolo-detect` writers (one annotation, line or object per instance); `gallery`: overlay
thumbnails, instance outlines and the static HTML gallery; `project`: `car-backend export --project`, the
same from a Label Studio project's annotations and predictions (one instance per region).

Floor 2: imports engine and labelstudio (and settings); the service runs the engine into it
(`car_backend.service.prelabel`).
"""
