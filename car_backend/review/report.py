"""`car-backend report --project ID`: agreement with annotators' corrections, the calibration and the mask
head; `car-backend fit --project ID`: queue a training of the project's mask head.

The same figures are exported at /metrics (car_review_*, car_calibration_* and car_fit_*), built by
`project_report`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

from redis import Redis, RedisError

from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.queue.connection import redis_client
from car_backend.queue.jobqueue import JobQueue
from car_backend.queue.projects import ProjectRegistry
from car_backend.queue.state import RedisState
from car_backend.review.store import Calibration, FitState, FitStatus, ReviewStore
from car_backend.review.triggers import fit_timeout, queue_fit
from car_backend.settings import Settings


@dataclass(frozen=True)
class LabelFigures:
    label: str
    iou: float
    tasks: int
    missed: int
    added: int


@dataclass(frozen=True)
class VersionAgreement:
    """How the corrected tasks predicted with one model_version agree with their annotations."""

    model_version: str
    tasks: int
    mean_agreement: float
    labels: tuple[LabelFigures, ...] = ()


@dataclass(frozen=True)
class ProjectReport:
    """A project's review figures: agreement per model_version, the calibration and the mask head's status."""

    project: ProjectId
    versions: tuple[VersionAgreement, ...] = ()
    calibration: Calibration | None = None
    fit: FitStatus | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["project"] = str(self.project)
        return data


def project_report(review: ReviewStore, project: ProjectId) -> ProjectReport:
    """The report of one project (labels sorted). Raises RedisError."""
    versions = []
    for version, totals in sorted(review.agreement(project).items()):
        labels = tuple(LabelFigures(row["label"], round(row["iou"], 6), row["tasks"], row["missed"], row["added"])
                       for row in totals.summary())
        versions.append(VersionAgreement(version, totals.tasks, round(totals.mean_score or 0.0, 6), labels))
    return ProjectReport(project, tuple(versions), review.calibration(project), review.fit_status(project))


def render(report: ProjectReport) -> str:
    lines = [f"project {report.project}"]
    if not report.versions:
        lines.append("  no corrected task compared with our predictions yet (annotation webhooks feed this)")
    for entry in report.versions:
        lines.append(f"  {entry.model_version}: {entry.tasks} corrected tasks, "
                     f"mean agreement {entry.mean_agreement:.3f}")
        lines.append(f"    {'label':<24} {'IoU':>6} {'tasks':>6} {'missed':>7} {'added':>6}")
        for row in entry.labels:
            lines.append(f"    {row.label:<24} {row.iou:>6.3f} {row.tasks:>6} {row.missed:>7} {row.added:>6}")
    lines.extend(render_fit(report.fit))
    calibration = report.calibration
    if calibration is None:
        lines.append("  not calibrated (thresholds are the preset's)")
        return "\n".join(lines)
    lines.append(f"  calibration generation {calibration.generation} on {calibration.tasks} corrected tasks "
                 f"({calibration.evaluations} threshold sets tried, {calibration.seconds:.1f} s)")
    for name, value in sorted(calibration.thresholds.items()):
        lines.append(f"    {name:<22} {calibration.previous.get(name, value):.3f} -> {value:.3f}")
    lines.append(f"    agreement on the corrected tasks: {calibration.before:.3f} -> {calibration.after:.3f}")
    lines.append(f"    {'label':<24} {'before':>7} {'after':>7}")
    for label in sorted(set(calibration.labels_before) | set(calibration.labels_after)):
        lines.append(f"    {label:<24} {calibration.labels_before.get(label, 0.0):>7.3f} "
                     f"{calibration.labels_after.get(label, 0.0):>7.3f}")
    return "\n".join(lines)


def render_fit(fit: FitStatus | None) -> list[str]:
    if fit is None:
        return ["  no mask head trained (Start Training, CAR_FIT_AFTER or `car-backend fit` start one)"]
    adopted = f"generation {fit.generation} in use" if fit.generation else "none in use"
    lines = [f"  mask head: {adopted}; last training {fit.state.value} on {fit.train_tasks} corrected tasks "
             f"({fit.held_out_tasks} held out), {fit.epochs}/{fit.epochs_planned} epochs, "
             f"{fit.seconds_per_epoch:.2f} s per epoch"]
    if fit.before is not None:
        lines.append(f"    held-out agreement {fit.before:.3f} -> {fit.after or 0.0:.3f}, mIoU "
                     f"{fit.miou_before or 0.0:.3f} -> {fit.miou_after or 0.0:.3f}: "
                     f"{'adopted' if fit.adopted else 'not adopted'}")
    if fit.reason:
        lines.append(f"    {fit.reason}")
    return lines


def cli_project(redis: Redis, settings: Settings, project: int) -> ProjectId:
    """The project a command line names by Label Studio's id: this deployment's Label Studio, with the
    creation stamp last seen for the id (queue.projects.ProjectRegistry.resolve)."""
    return ProjectRegistry(redis).resolve(ProjectId(instance_of(settings.label_studio_url), project))


def fit_main(args: argparse.Namespace, settings: Settings) -> int:
    """`car-backend fit --project ID [--wait]`: 0 when queued (and, with --wait, when it ended done)."""
    if not settings.redis_url:
        print("car-backend fit: set REDIS_URL to the backend's Redis (its workers train the head)", file=sys.stderr)
        return 2
    redis = redis_client(settings.redis_url, "cli")
    try:
        project = cli_project(redis, settings, args.project)
        state = RedisState.on(redis, settings)
        review = ReviewStore(redis)
        job = queue_fit(JobQueue(settings, redis, state.locks), review, project, "cli", settings)
        print(f"project {project}: mask-head training {'queued as job ' + job if job else 'already queued or running'}")
        if not args.wait:
            return 0
        deadline = time.monotonic() + fit_timeout(settings)
        status = review.fit_status(project)
        while status is not None and status.state in (FitState.QUEUED, FitState.TRAINING) \
                and time.monotonic() < deadline:
            time.sleep(1.0)
            status = review.fit_status(project)
    except RedisError as exc:
        print(f"car-backend fit: Redis at REDIS_URL is unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        redis.close()
    print("\n".join(render_fit(status)))
    return 0 if status is not None and status.state is FitState.DONE else 1


def main(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print("car-backend report: set REDIS_URL to the backend's Redis (an embedded one is private to "
              "`car-backend serve`; its figures are at /metrics)", file=sys.stderr)
        return 2
    redis = redis_client(settings.redis_url, "cli")
    try:
        report = project_report(ReviewStore(redis), cli_project(redis, settings, args.project))
    except RedisError as exc:
        print(f"car-backend report: Redis at REDIS_URL is unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        redis.close()
    print(json.dumps(report.to_dict(), sort_keys=True, default=str) if args.json else render(report))
    return 0
