"""`car-backend eval`: score CaR on VOC, COCO-Object, Pascal Context or RefCOCO and compare with the paper."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from car_backend.engine.config import EngineConfig
from car_backend.evaluation.benchmarks import BENCHMARKS
from car_backend.evaluation.cache import PredictionCache, cache_folder, cache_identity
from car_backend.evaluation.datasets import DatasetError
from car_backend.evaluation.report import format_table, to_json
from car_backend.evaluation.runner import EvaluationError, SegmenterLike, evaluate
from car_backend.settings import Settings


def main(args: argparse.Namespace, settings: Settings) -> int:
    benchmark = BENCHMARKS[args.dataset]
    split = args.split or benchmark.default_split
    preset = args.preset or benchmark.preset
    root = Path(args.root).expanduser()
    if args.limit is not None and args.limit < 1:
        return _fail("--limit must be at least 1")
    try:
        samples = benchmark.read(root, split)
    except DatasetError as exc:
        return _fail(str(exc))
    samples = samples[: args.limit] if args.limit is not None else samples

    queries = [[p.queries, p.label_ids, p.background] for p in benchmark.passes]
    config = settings.engine_config()
    identity = cache_identity(config, benchmark.name, preset, queries)
    base = Path(args.cache).expanduser() if args.cache else root / ".car-eval-cache"
    try:
        cache = PredictionCache(cache_folder(base, benchmark.name, identity), identity)
    except OSError as exc:
        return _fail(f"cannot write the prediction cache under {base} ({exc}); choose a folder with --cache")

    try:
        report = evaluate(
            benchmark, samples, lambda: _load_engine(config), cache, split=split, preset=preset
        )
    except EvaluationError as exc:
        return _fail(str(exc))
    print(format_table(report))
    if args.json:
        print(json.dumps(to_json(report)))
    return 0


def _load_engine(config: EngineConfig) -> SegmenterLike:
    from car_backend.engine import Segmenter  # torch is imported only when an evaluation runs

    return Segmenter(config)


def _fail(message: str) -> int:
    print(f"car-backend eval: {message}", file=sys.stderr)
    return 2
