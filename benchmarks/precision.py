"""Agreement of the engine's bf16 answers with its fp32 answers: the README's "Precision" table.

    python benchmarks/precision.py [--scenes 6] [--scene-size 192x256] [--default-models --default-scenes 3]

Random weights only (no pretrained ones here), with sharpened attention (car_backend/engine/synthetic.py).
For each variant (`auto`: a bf16 classifier, the fp32 proposal model, what CAR_PRECISION=auto runs on a
CPU with native bf16; `bf16`: both models in bf16) against fp32 on the same weights: the parity cases
(tests/engine/test_parity.py, tiny CLIPs) and `--scenes` generated scenes with 20 queries (tiny CLIPs), and
with `--default-models` `--default-scenes` scenes at 384x512 with the default models (ViT-B/16 proposals,
ViT-L/14 classifier; slow on a CPU). Per set: in how many cases the kept labels are equal, the largest
step-score difference, and the pixel agreement of the label maps (car_backend/testing/precision.py). The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from car_backend.engine.models import cpu_has_native_bf16  # noqa: E402
from car_backend.engine.synthetic import random_clip  # noqa: E402
from car_backend.testing.precision import PARITY_CASES, agreement, scene_cases, segmenter_pair  # noqa: E402
from car_backend.testing.settings import TINY_CLIP_CONFIG  # noqa: E402

VARIANTS = {"auto": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16, torch.bfloat16)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=6, help="generated scenes with the tiny CLIPs")
    p.add_argument("--scene-size", default="192x256", help="HxW of the tiny CLIPs' generated scenes")
    p.add_argument("--default-models", action="store_true",
                   help="also the default models (ViT-B/16 + ViT-L/14) on --default-scenes scenes at 384x512")
    p.add_argument("--default-scenes", type=int, default=3)
    p.add_argument("--variants", default="auto,bf16", help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--no-tiny", action="store_true", help="only the default models' scenes")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.scene_size.lower().split("x"))
    print(f"cpu native bf16: {cpu_has_native_bf16()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads; random weights")
    sets = []
    if not args.no_tiny:
        tiny = random_clip(str(TINY_CLIP_CONFIG), seed=1) + random_clip(str(TINY_CLIP_CONFIG), seed=2)
        sets += [("parity cases", "tiny", tiny, PARITY_CASES),
                 (f"{args.scenes} scenes {width}x{height}, 20 queries", "tiny", tiny,
                  scene_cases(args.scenes, (height, width)))]
    if args.default_models:
        default = random_clip("ViT-B-16", seed=1) + random_clip("ViT-L-14", seed=2)
        sets.append((f"{args.default_scenes} scenes 512x384, 20 queries", "B/16 + L/14", default,
                     scene_cases(args.default_scenes, (384, 512))))
    report: dict = {"native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(), "rows": []}
    for variant in args.variants.split(","):
        for label, models, weights, cases in sets:
            start = time.perf_counter()
            reference, candidate = segmenter_pair(*weights, dtypes=VARIANTS[variant])
            figures = agreement(reference, candidate, cases)
            row = {"variant": variant, "set": label, "models": models, "cases": len(figures.cases),
                   "kept_equal": figures.kept_equal, "max_score_diff": figures.max_score_diff,
                   "min_mask_agreement": round(figures.min_mask_agreement, 5),
                   "mean_mask_agreement": round(figures.mean_mask_agreement, 5),
                   "seconds": round(time.perf_counter() - start, 1),
                   "per_case": [vars(c) for c in figures.cases]}
            report["rows"].append(row)
            print(f"{variant:>5} vs fp32, {label} ({models}): {figures.summary()}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
