"""Calibration benchmark: what re-choosing a project's thresholds costs, with and without reuse.

    python benchmarks/calibration.py [--quick] [--device cpu|cuda] [--images 4] [--queries 10] [--size 320x240]

A calibration evaluates many threshold sets on the same corrected images. This measures one sweep of the keep
threshold (9 values, the calibration grid) and one of the mask threshold (7 values) over `--images` images:

- baseline: every candidate segments the raw image (trunk, all recurrent steps), as re-running the engine
  per candidate would;
- reuse: each image is prepared once (CLIP trunk and last block, affinity) and the engine reuses the first
  recurrent step across keep-threshold values, as `car_backend.feedback` does.

Both use the same Segmenter models (random ViT-B-16 weights, sharpened attention, as the engine benchmark)
with the text-embedding cache warm. Prints per-sweep medians over images and the speed-up; checks that both
give identical label maps. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from car_backend.engine import ClipModel, EngineConfig, Segmenter, get_preset  # noqa: E402
from car_backend.engine.synthetic import random_clip, scene  # noqa: E402
from car_backend.review.store import THRESHOLD_BOUNDS  # noqa: E402

VOCABULARY = ("person", "bicycle", "car", "motorcycle", "bus", "train", "truck", "boat", "bird", "cat",
              "dog", "horse", "sheep", "cow", "bench", "traffic light", "stop sign", "airplane", "elephant", "tree")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images of 224x160, 5 queries")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="ViT-B-16", help="open_clip name used for both CLIPs")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--size", default="320x240", help="WxH of the generated images")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.queries, args.size = 2, 5, "224x160"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    proposal, proposal_tokenizer = random_clip(args.model, seed=3)
    classifier, classifier_tokenizer = random_clip(args.model, seed=4)
    proposal_clip = ClipModel(proposal.to(args.device), proposal_tokenizer, name=f"{args.model}:random")
    classifier_clip = ClipModel(classifier.to(args.device), classifier_tokenizer, name=f"{args.model}:random#2")
    queries = list(VOCABULARY[:args.queries])
    base = get_preset("coco")
    grids = {b.name: b.grid() for b in THRESHOLD_BOUNDS if b.name in ("confidence_threshold", "mask_threshold")}
    images = [scene(100 + i, height, width) for i in range(args.images)]
    print(f"calibration benchmark: {args.images} images {width}x{height}, {len(queries)} queries, {args.model} "
          f"random, {args.device}, torch threads {torch.get_num_threads()}")

    def segmenter() -> Segmenter:
        return Segmenter(EngineConfig(device=args.device), proposal_model=proposal_clip, classifier_model=classifier_clip)

    segmenter().segment(images[0], queries, preset=base)  # warm the text cache (both paths share the models)
    figures: dict[str, dict] = {}
    identical = True
    for name, grid in grids.items():
        presets = [dataclasses.replace(base, **{name: value}) for value in grid]
        baseline, reuse = [], []
        for image in images:
            started = time.perf_counter()
            plain = [segmenter().segment(image, queries, preset=p).label_map for p in presets]
            baseline.append(time.perf_counter() - started)
            started = time.perf_counter()
            engine = segmenter()
            prepared = engine.prepare(image)
            reused = [engine.segment(prepared, queries, preset=p).label_map for p in presets]
            reuse.append(time.perf_counter() - started)
            identical &= all(np.array_equal(a, b) for a, b in zip(plain, reused, strict=True))
        entry = {"candidates": len(grid), "baseline_s": statistics.median(baseline),
                 "reuse_s": statistics.median(reuse)}
        entry["speedup"] = entry["baseline_s"] / entry["reuse_s"]
        figures[name] = entry
        print(f"  sweep of {name} ({len(grid)} values) per image: baseline median {entry['baseline_s']:.2f} s, "
              f"with reuse {entry['reuse_s']:.2f} s, x{entry['speedup']:.1f}")
    print(f"  label maps identical with and without reuse: {identical}")
    print(json.dumps({"benchmark": "calibration", "images": args.images, "queries": len(queries),
                      "size": [width, height], "model": args.model, "device": args.device,
                      "sweeps": figures, "identical": identical}))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
