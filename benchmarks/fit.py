"""Mask-head benchmark: training time per epoch, and held-out mIoU before and after, for 10/30/100 corrections.

    python benchmarks/fit.py [--quick] [--device cpu|cuda] [--tasks 10,30,100] [--held-out 20] [--epochs 20]
                             [--width 192] [--depth 2] [--size 128] [--vocabulary all|present]

Corrected tasks are generated scenes (car_backend.testing.scenes: four classes of shapes, each with its own
colour and texture, 1-3 objects per scene, known masks). The proposal and classifier CLIPs have random weights
(the tiny test architecture by default, `--model` for another open_clip name), so CaR's Grad-CAM proposals are
noise and the head must learn the classes from the corrections alone. For each training-set size the script
trains a head (`review.fit.judge_head`, as the fit job does) and prints: the median seconds per epoch and per
training example, and the held-out mIoU and mean agreement of CaR alone (the baseline, measured in the same
run) and with the head. `--vocabulary present` queries only each scene's labels (as CAR_TASK_LABELS_KEY
would), so that the random classifier's presence decisions do not mask what the head does to mask quality.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from car_backend.engine import ClipModel, EngineConfig, Segmenter  # noqa: E402
from car_backend.engine.head import HeadConfig  # noqa: E402
from car_backend.engine.synthetic import random_clip  # noqa: E402
from car_backend.labelstudio.config import parse_label_config  # noqa: E402
from car_backend.pipeline.planning import plan_task  # noqa: E402
from car_backend.pipeline.spec import Project  # noqa: E402
from car_backend.review.fit import FitItem, judge_head, mean_iou  # noqa: E402
from car_backend.testing.scenes import SceneClass, labelled_scene  # noqa: E402
from car_backend.testing.settings import TINY_CLIP_CONFIG, tiny_settings  # noqa: E402

CLASSES = (SceneClass("red", (220, 40, 40), "flat", "ellipse"), SceneClass("yellow", (230, 220, 40), "stripes", "rectangle"),
           SceneClass("green", (40, 200, 60), "checks", "ellipse"), SceneClass("blue", (40, 60, 220), "dots", "rectangle"))
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                + "".join(f'<Label value="{c.name}"/>' for c in CLASSES) + "</BrushLabels></View>")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 and 30 tasks, 8 held out, 8 epochs, width 64")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default=str(TINY_CLIP_CONFIG), help="open_clip name or config JSON for both CLIPs")
    p.add_argument("--tasks", default="10,30,100", help="comma-separated numbers of corrected tasks")
    p.add_argument("--held-out", type=int, default=20)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="side of the square generated scenes")
    p.add_argument("--vocabulary", default="present", choices=("all", "present"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.held_out, args.epochs, args.width = "10,30", 8, 8, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    proposal, tokenizer = random_clip(args.model, seed=1)
    classifier, classifier_tokenizer = random_clip(args.model, seed=2)
    segmenter = Segmenter(EngineConfig(device=args.device, max_steps=3),
                          proposal_model=ClipModel(proposal.to(device), tokenizer, "bench-proposal"),
                          classifier_model=ClipModel(classifier.to(device), classifier_tokenizer, "bench-classifier"))
    settings = tiny_settings(task_labels_key="labels" if args.vocabulary == "present" else "")
    project = Project(parse_label_config(LABEL_CONFIG), "bench")

    def items(seeds: range) -> list[FitItem]:
        out = []
        for seed in seeds:
            scene = labelled_scene(seed, CLASSES, (args.size, args.size))
            task = {"id": seed, "data": {"image": "http://127.0.0.1/x.png", "labels": list(scene.masks)}}
            runs = plan_task(task, project, settings).specs[0].runs
            out.append(FitItem(seed, scene.masks, [(runs, segmenter.prepare(scene.image))]))
        return out

    held = items(range(100_000, 100_000 + args.held_out))
    config = HeadConfig.for_clip(segmenter.proposal_clip, width=args.width, depth=args.depth)
    rows = []
    stamps: list[float] = []  # when each epoch ended
    for count in (int(n) for n in args.tasks.split(",")):
        train = items(range(count))
        stamps.clear()
        started = time.perf_counter()
        judged = judge_head(segmenter, train, held, config, args.epochs, args.seed,
                            on_epoch=lambda _state: stamps.append(time.perf_counter()))
        per_epoch = statistics.median(b - a for a, b in zip([started, *stamps[:-1]], stamps, strict=True))
        row = {
            "tasks": count, "epochs": judged.state.epochs, "seconds_per_epoch": round(per_epoch, 4),
            "seconds_per_example": round(per_epoch / (2 * count), 5),
            "miou_car": round(mean_iou(judged.before) or 0.0, 4), "miou_head": round(mean_iou(judged.after) or 0.0, 4),
            "agreement_car": round(judged.before.mean_score or 0.0, 4),
            "agreement_head": round(judged.after.mean_score or 0.0, 4),
            "adopted": judged.adopt, "final_loss": round(judged.state.losses[-1], 5),
        }
        rows.append(row)
        print(f"{count:>4} tasks: {row['seconds_per_epoch']:.3f} s/epoch, held-out mIoU {row['miou_car']:.3f} (CaR) "
              f"-> {row['miou_head']:.3f} (head), agreement {row['agreement_car']:.3f} -> {row['agreement_head']:.3f}"
              f"{'' if row['adopted'] else ' (not adopted)'}", flush=True)
    print(json.dumps({"benchmark": "fit", "device": args.device, "model": Path(args.model).stem,
                      "size": args.size, "held_out": args.held_out, "width": args.width, "depth": args.depth,
                      "vocabulary": args.vocabulary, "head_mb": round(judged.state.head.megabytes, 3),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
