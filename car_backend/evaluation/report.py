"""An EvalReport as a readable table and as one JSON object (figures in percent, like the paper)."""

from __future__ import annotations

import math

from car_backend.evaluation.runner import EvalReport


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100 * value, 2)


def format_table(report: EvalReport) -> str:
    unit = "images" if report.mode == "semantic" else "refs"
    lines = [
        f"CaR on {report.title}, split {report.split}, preset {report.preset}: {report.images} {unit} "
        f"({report.computed} segmented now, {report.images - report.computed} from the cache)",
    ]
    if report.class_iou:
        width = max(len(name) for name in report.class_iou)
        lines.append(f"  {'class':<{width}}  IoU %")
        for name, iou in report.class_iou.items():
            shown = "    -" if math.isnan(iou) else f"{100 * iou:5.1f}"
            lines.append(f"  {name:<{width}}  {shown}")
    for name, value in report.metrics.items():
        shown = "-" if math.isnan(value) else f"{100 * value:.2f}"
        line = f"{name:>16}: {shown}"
        if name == "mIoU" and report.paper is not None:
            line += f"   paper: {report.paper.value:.2f} ({report.paper.source})"
            if not math.isnan(value):
                line += f"   ours - paper: {100 * value - report.paper.value:+.2f}"
        lines.append(line)
    if report.seconds > 0:
        lines.append(f"{unit + '/s':>16}: {report.images_per_second:.3f} "
                     f"({report.seconds:.1f} s of segmentation in all)")
    lines.append(f"{'cache':>16}: {report.cache_folder}")
    return "\n".join(lines)


def to_json(report: EvalReport) -> dict:
    miou = _percent(report.metrics["mIoU"])
    paper = None
    if report.paper is not None:
        paper = {"mIoU": report.paper.value, "source": report.paper.source,
                 "delta": None if miou is None else round(miou - report.paper.value, 2)}
    return {
        "dataset": report.benchmark,
        "split": report.split,
        "preset": report.preset,
        "images": report.images,
        "computed": report.computed,
        "cached": report.images - report.computed,
        "seconds": round(report.seconds, 3),
        "images_per_s": None if report.seconds <= 0 else round(report.images_per_second, 4),
        "metrics": {name: _percent(value) for name, value in report.metrics.items()},
        "class_iou": {name: _percent(value) for name, value in report.class_iou.items()},
        "paper": paper,
        "cache": str(report.cache_folder),
    }
