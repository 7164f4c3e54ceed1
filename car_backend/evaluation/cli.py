"""`car-backend eval`: score CaR on VOC, COCO-Object, Pascal Context or RefCOCO and compare with the paper."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from car_backend.engine.config import HQ_SAM_TYPES, SAM2_TYPES, EngineConfig
from car_backend.evaluation.benchmarks import BENCHMARKS, Benchmark
from car_backend.evaluation.cache import PredictionCache, cache_folder, cache_identity
from car_backend.evaluation.datasets import DatasetError
from car_backend.evaluation.report import format_table, to_json
from car_backend.evaluation.runner import EvaluationError, SegmenterLike, evaluate
from car_backend.settings import Settings, SettingsError


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

    try:
        settings = _with_engine_flags(settings, args)
    except SettingsError as exc:
        return _fail(str(exc))
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
    used = engine_setting(config)
    print(setting_line(used, benchmark, split))
    if args.json:
        summary = to_json(report)
        summary["engine_setting"] = used
        sam_figure = benchmark.paper_sam.get(split)
        summary["paper_sam"] = None if sam_figure is None else {"mIoU": sam_figure.value, "source": sam_figure.source}
        print(json.dumps(summary))
    return 0


def _with_engine_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings with --sam-model-type / --sam-checkpoint / --sam-mode / --proposals / --compat applied."""
    flags = {"sam_model_type": getattr(args, "sam_model_type", None),
             "sam_checkpoint": getattr(args, "sam_checkpoint", None),
             "sam_mode": getattr(args, "sam_mode", None), "proposals": getattr(args, "proposals", None),
             "compat": getattr(args, "compat", None)}
    return dataclasses.replace(settings, **{k: v for k, v in flags.items() if v is not None})


def engine_setting(config: EngineConfig) -> dict:
    """Which refiner and proposal mode the engine ran with."""
    refiner = None
    if config.sam_checkpoint:
        family = sam_family(config.sam_model_type)
        refiner = {"family": family, "model_type": config.sam_model_type, "mode": config.sam_mode,
                   "checkpoint": Path(config.sam_checkpoint).name}
    return {"refiner": refiner, "proposals": config.proposals, "compat": config.compat}


def sam_family(model_type: str) -> str:
    """The SAM family of a CAR_SAM_MODEL_TYPE (torch-free, unlike engine.refiners.SamSpec)."""
    if model_type in HQ_SAM_TYPES:
        return "HQ-SAM"
    if model_type in SAM2_TYPES:
        return "SAM 2"
    return "SAM"


def setting_line(used: dict, benchmark: Benchmark, split: str) -> str:
    """One line naming the refiner and proposal mode next to the paper's figure for that setting."""
    refiner = used["refiner"]
    ran = ("refiner: none" if refiner is None else
           f"refiner: {refiner['family']} {refiner['model_type']} ({refiner['mode']}, {refiner['checkpoint']})")
    ran += f"; proposals: {used['proposals']}; compat: {used['compat']}"
    figure = benchmark.paper_sam.get(split) if refiner or used["proposals"] == "sam" else benchmark.paper.get(split)
    if figure is None:
        return f"setting: {ran}; the paper reports no figure for this setting"
    same = refiner is not None and refiner["model_type"] == "hq_vit_h" and refiner["mode"] == "automatic" and (
        used["proposals"] == "car")
    note = "" if refiner is None and used["proposals"] == "car" else (
        " (the paper's setting)" if same else " (the paper's SAM setting differs: HQ-SAM ViT-H, automatic, CaR's masks)")
    return f"setting: {ran}; paper for it: {figure.value:.2f} ({figure.source}){note}"


def _load_engine(config: EngineConfig) -> SegmenterLike:
    from car_backend.engine import Segmenter  # torch is imported only when an evaluation runs

    return Segmenter(config)


def _fail(message: str) -> int:
    print(f"car-backend eval: {message}", file=sys.stderr)
    return 2
