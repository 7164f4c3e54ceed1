"""Prometheus metrics for /metrics.

The HTTP process counts what it sees (requests, cache hits, entries, deliveries); what happens in worker
processes (job outcomes and durations, API deliveries) is counted in Redis (`car:stats`) and read at
scrape time, together with queue depths and live workers. The review figures (a report per project, work
that grows with the corrected tasks) are rebuilt at most every REVIEW_CACHE_S seconds, by one scrape at a
time; /health never reads them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import RedisError

from car_backend.queue.stats import DURATION_BUCKETS, CounterFamily, DeliveryOutcome, JobOutcome, TextLookup
from car_backend.review.report import ProjectReport
from car_backend.review.webhook import WebhookOutcome

if TYPE_CHECKING:
    from car_backend.service.backend import Snapshot

log = logging.getLogger(__name__)

REVIEW_CACHE_S = 30.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("car_http_requests", "HTTP requests served.", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("car_http_request_seconds", "HTTP request durations.", ["endpoint"],
                                         registry=r)
        self.predict_seconds = Histogram(
            "car_predict_seconds", "Time /predict spent on one call, waiting for jobs included.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 90), registry=r)
        self.entries = Counter("car_predict_entries", "/predict entries by kind (result, empty, pending).",
                               ["kind"], registry=r)
        self.cache = Counter("car_result_cache", "Result-cache lookups by /predict.", ["outcome"], registry=r)
        self.jobs = Counter("car_jobs_submitted", "Jobs /predict asked for: enqueued or joined an existing one.",
                            ["outcome"], registry=r)
        self.deliveries = Counter("car_predict_deliveries", "Predictions returned by /predict.", registry=r)
        self.redis_errors = Counter("car_redis_errors", "Requests that found Redis unavailable.", registry=r)

    def watch(self, snapshot: Callable[[], Snapshot],
              review_reports: Callable[[], list[ProjectReport]] | None = None) -> None:
        """Add the Redis-side figures; `snapshot()` (service.backend.Backend.snapshot) raises RedisError when
        Redis is down; `review_reports()` the per-project reports of review.report (cached REVIEW_CACHE_S)."""
        self.registry.register(_RedisCollector(snapshot, _CachedReports(review_reports or list)))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CachedReports:
    """`reports()` called at most every REVIEW_CACHE_S seconds, by one caller at a time (the others get the
    previous answer meanwhile; only the first call waits). Raises what `reports()` raises."""

    def __init__(self, reports: Callable[[], list[ProjectReport]]):
        self._reports = reports
        self._lock = threading.Lock()
        self._value: list[ProjectReport] | None = None
        self._at = float("-inf")

    def get(self) -> list[ProjectReport]:
        if time.monotonic() - self._at < REVIEW_CACHE_S:
            return self._value or []
        if not self._lock.acquire(blocking=self._value is None):
            return self._value or []  # another scrape is rebuilding them
        try:
            if time.monotonic() - self._at >= REVIEW_CACHE_S:
                self._value = self._reports()
                self._at = time.monotonic()
            return self._value
        finally:
            self._lock.release()


class _RedisCollector:
    def __init__(self, snapshot: Callable[[], Snapshot], reports: _CachedReports):
        self._snapshot = snapshot
        self._reports = reports

    def describe(self) -> list:
        return []  # no fixed description: the families depend on what Redis holds

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("car_redis_up", "1 when the job queue's Redis answers.")
        try:
            snap = self._snapshot()
            reviews = self._reports.get()
        except RedisError as exc:
            log.warning("/metrics: Redis is unavailable (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("car_queue_depth", "Jobs waiting, per queue.", labels=["queue"])
        depth.add_metric(["interactive"], snap.depth.interactive)
        depth.add_metric(["batch"], snap.depth.batch)
        yield depth
        yield GaugeMetricFamily("car_jobs_running", "Jobs being executed.", value=snap.depth.started)
        yield GaugeMetricFamily("car_jobs_failed_registry", "Jobs in RQ's failed registries.",
                                value=snap.depth.failed)
        yield GaugeMetricFamily("car_workers", "Workers with a recent heartbeat.", value=snap.workers)
        stats = snap.counters
        outcomes = CounterMetricFamily("car_jobs", "Job attempts by outcome (worker side): ok, failed "
                                       "(permanent, e.g. undecodable image), error (transient, retried).",
                                       labels=["outcome"])
        for outcome in JobOutcome:
            outcomes.add_metric([outcome.value], stats.get(CounterFamily.JOBS, outcome))
        yield outcomes
        text = CounterMetricFamily("car_text_cache", "Text-embedding lookups in the shared Redis cache (workers).",
                                   labels=["outcome"])
        for lookup in TextLookup:
            text.add_metric([lookup.value], stats.get(CounterFamily.TEXT, lookup))
        yield text
        yield CounterMetricFamily("car_api_deliveries", "Predictions written into Label Studio by workers.",
                                  value=stats.get(CounterFamily.DELIVERIES, DeliveryOutcome.API))
        webhook = CounterMetricFamily("car_webhook_annotations", "Annotation events by how their review job ended: "
                                      "reviewed (read back from Label Studio and used), or ignored: unknown (no "
                                      "such annotation or project), mismatch, cancelled, config_changed, "
                                      "too_large, unreadable.", labels=["outcome"])
        for event in WebhookOutcome:
            webhook.add_metric([event.value], stats.get(CounterFamily.WEBHOOK, event))
        yield webhook
        for delivery, meaning in ((DeliveryOutcome.REFUSED, "Late predictions not written: the task read back from Label Studio is "
                                  "of another project or holds another image than the one predicted."),
                                 (DeliveryOutcome.DROPPED, "Late predictions not written: refused, task gone or results expired ("
                                  "given-up ones are counted apart)."),
                                 (DeliveryOutcome.ABANDONED, "Late predictions given up after CAR_DELIVERY_WINDOW of failed writes.")):
            yield CounterMetricFamily(f"car_api_deliveries_{delivery.value}", meaning,
                                      value=stats.get(CounterFamily.DELIVERIES, delivery))
        yield from _review_families(reviews)
        buckets = [(str(b), stats.buckets.get(b, 0.0)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", stats.seconds_count))
        yield HistogramMetricFamily("car_job_seconds", "Job durations (fetch + segmentation), worker side.",
                                    buckets=buckets, sum_value=stats.seconds_sum)


def _review_families(reports: list[ProjectReport]) -> Iterator:
    """The active-learning figures of `car-backend report`, per project (car_backend.review.report)."""
    tasks = GaugeMetricFamily("car_review_tasks", "Corrected tasks compared with our prediction, per model_version.",
                              labels=["project", "model_version"])
    agreement = GaugeMetricFamily("car_review_agreement", "Mean agreement (per-task mean label IoU) of our "
                                  "predictions with the annotations submitted on them.",
                                  labels=["project", "model_version"])
    label_iou = GaugeMetricFamily("car_review_label_iou", "IoU of one label's predicted and annotated masks, "
                                  "summed over corrected tasks.", labels=["project", "model_version", "label"])
    threshold = GaugeMetricFamily("car_calibration_threshold", "A project's calibrated threshold.",
                                  labels=["project", "threshold", "stage"])
    calibrated = GaugeMetricFamily("car_calibration_agreement", "Agreement on the corrected tasks with the "
                                   "thresholds before and after calibration.", labels=["project", "stage"])
    generation = GaugeMetricFamily("car_calibration_generation", "Calibrations that changed a project's "
                                   "thresholds (its model_version ends in -cal<generation>).", labels=["project"])
    for report in reports:
        project = str(report.project)
        for entry in report.versions:
            tasks.add_metric([project, entry.model_version], entry.tasks)
            agreement.add_metric([project, entry.model_version], entry.mean_agreement)
            for row in entry.labels:
                label_iou.add_metric([project, entry.model_version, row.label], row.iou)
        calibration = report.calibration
        if calibration is not None:
            for name, value in calibration.thresholds.items():
                threshold.add_metric([project, name, "after"], value)
                threshold.add_metric([project, name, "before"], calibration.previous.get(name, value))
            calibrated.add_metric([project, "before"], calibration.before)
            calibrated.add_metric([project, "after"], calibration.after)
            generation.add_metric([project], calibration.generation)
    yield from (tasks, agreement, label_iou, threshold, calibrated, generation)
    yield from _fit_families(reports)


def _fit_families(reports: list[ProjectReport]) -> Iterator:
    """The mask-head figures of `car-backend report` (review.store.FitStatus), per project."""
    fit_generation = GaugeMetricFamily("car_fit_generation", "Adopted mask heads of a project (its model_version "
                                       "ends in -fit<generation>).", labels=["project"])
    fit_agreement = GaugeMetricFamily("car_fit_agreement", "Held-out agreement of the last mask-head training: the "
                                      "model in use (before) and the trained head (after).", labels=["project", "stage"])
    fit_miou = GaugeMetricFamily("car_fit_miou", "Held-out mIoU of the last mask-head training, before and after.",
                                 labels=["project", "stage"])
    fit_epochs = GaugeMetricFamily("car_fit_epochs", "Epochs the last mask-head training ran.", labels=["project"])
    fit_seconds = GaugeMetricFamily("car_fit_seconds_per_epoch", "Seconds per epoch of the last mask-head training.",
                                    labels=["project"])
    for report in reports:
        fit = report.fit
        if fit is None:
            continue
        project = str(report.project)
        fit_generation.add_metric([project], fit.generation)
        fit_epochs.add_metric([project], fit.epochs)
        fit_seconds.add_metric([project], fit.seconds_per_epoch)
        for stage, agreement, miou in (("before", fit.before, fit.miou_before), ("after", fit.after, fit.miou_after)):
            if agreement is not None:
                fit_agreement.add_metric([project, stage], agreement)
            if miou is not None:
                fit_miou.add_metric([project, stage], miou)
    yield from (fit_generation, fit_agreement, fit_miou, fit_epochs, fit_seconds)
