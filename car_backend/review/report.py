"""`car-backend report --project ID`: agreement with annotators' corrections, and the calibration.

The same figures are exported at /metrics (car_review_* and car_calibration_*), built by `project_report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redis import RedisError

from car_backend.queue.connection import redis_client
from car_backend.review.store import ReviewStore
from car_backend.settings import Settings


def project_report(review: ReviewStore, project: str) -> dict[str, Any]:
    """Plain data: per model_version agreement (labels sorted) and the calibration, if any."""
    versions = []
    for version, totals in sorted(review.agreement(project).items()):
        versions.append({"model_version": version, "tasks": totals.tasks,
                         "mean_agreement": round(totals.mean_score or 0.0, 6),
                         "labels": [{**row, "iou": round(row["iou"], 6)} for row in totals.summary()]})
    calibration = review.calibration(project)
    return {"project": project, "versions": versions,
            "calibration": json.loads(calibration.to_json()) if calibration else None}


def render(report: dict[str, Any]) -> str:
    lines = [f"project {report['project']}"]
    if not report["versions"]:
        lines.append("  no corrected task compared with our predictions yet (annotation webhooks feed this)")
    for entry in report["versions"]:
        lines.append(f"  {entry['model_version']}: {entry['tasks']} corrected tasks, "
                     f"mean agreement {entry['mean_agreement']:.3f}")
        lines.append(f"    {'label':<24} {'IoU':>6} {'tasks':>6} {'missed':>7} {'added':>6}")
        for row in entry["labels"]:
            lines.append(f"    {row['label']:<24} {row['iou']:>6.3f} {row['tasks']:>6} {row['missed']:>7} "
                         f"{row['added']:>6}")
    calibration = report["calibration"]
    if calibration is None:
        lines.append("  not calibrated (thresholds are the preset's)")
        return "\n".join(lines)
    lines.append(f"  calibration generation {calibration['generation']} on {calibration['tasks']} corrected tasks "
                 f"({calibration['evaluations']} threshold sets tried, {calibration['seconds']:.1f} s)")
    for name, value in sorted(calibration["thresholds"].items()):
        lines.append(f"    {name:<22} {calibration['previous'].get(name, value):.3f} -> {value:.3f}")
    lines.append(f"    agreement on the corrected tasks: {calibration['before']:.3f} -> {calibration['after']:.3f}")
    lines.append(f"    {'label':<24} {'before':>7} {'after':>7}")
    for label in sorted(set(calibration["labels_before"]) | set(calibration["labels_after"])):
        lines.append(f"    {label:<24} {calibration['labels_before'].get(label, 0.0):>7.3f} "
                     f"{calibration['labels_after'].get(label, 0.0):>7.3f}")
    return "\n".join(lines)


def main(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print("car-backend report: set REDIS_URL to the backend's Redis (an embedded one is private to "
              "`car-backend serve`; its figures are at /metrics)", file=sys.stderr)
        return 2
    redis = redis_client(settings.redis_url, "cli")
    try:
        report = project_report(ReviewStore(redis), str(args.project))
    except RedisError as exc:
        print(f"car-backend report: Redis at REDIS_URL is unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        redis.close()
    print(json.dumps(report, sort_keys=True) if args.json else render(report))
    return 0
