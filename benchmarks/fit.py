"""Mask-head benchmark: training time per epoch, and held-out mIoU before and after, for 10/30/100 corrections;
with --memory, the memory of the training job on 200 corrections of 1024 x 1024 images.

    python benchmarks/fit.py [--quick] [--device cpu|cuda] [--tasks 10,30,100] [--held-out 20] [--epochs 20]
                             [--width 192] [--depth 2] [--size 128] [--vocabulary all|present]
    python benchmarks/fit.py --memory [--corrections 200] [--held-out 4] [--size 1024] [--epochs 2]
                             [--model ViT-B-16] [--fit-memory-mb 1024] [--device cpu|cuda]

Corrected tasks are generated scenes (car_backend.testing.scenes: four classes of shapes, each with its own
colour and texture, 1-3 objects per scene, known masks). The proposal and classifier CLIPs have random weights
(the tiny test architecture by default, `--model` for another open_clip name), so CaR's Grad-CAM proposals are
noise and the head must learn the classes from the corrections alone. For each training-set size the script
trains a head (`review.fit.judge_head`, as the fit job does) and prints: the median seconds per epoch and per
training example, and the held-out mIoU and mean agreement of CaR alone (the baseline, measured in the same
run) and with the head. `--vocabulary present` queries only each scene's labels (as CAR_TASK_LABELS_KEY
would), so that the random classifier's presence decisions do not mask what the head does to mask quality.
The last line is one JSON object.

--memory runs the training job itself (`review.fit.fit_project`, as a worker does: corrections in a claimed
Redis database, images served by the fake Label Studio, CAR_FIT_MEMORY_MB at its default unless given) on
`--corrections` corrected tasks of the training split plus `--held-out` of the held-out split, generated
scenes of `--size` px, random weights of `--model` (default: the tiny test architecture; ViT-B-16 is the
default proposal CLIP's). It prints the models' own memory (their parameters), the peak memory of the
training over what the process held before it (RSS from getrusage on CPU, torch.cuda.max_memory_allocated
on a GPU), the bound it must stay under (models + 3 GiB), the seconds, and the baseline of the same run: what
one image held before (a prepared image: block L's attention and the N x N affinity) against now (its dense
features), measured on one image, and the former total (every corrected image prepared at once).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from car_backend.engine import ClipModel, EngineConfig, Segmenter  # noqa: E402
from car_backend.engine.head import HeadConfig  # noqa: E402
from car_backend.engine.synthetic import random_clip  # noqa: E402
from car_backend.labelstudio.config import parse_label_config  # noqa: E402
from car_backend.pipeline.planning import plan_task  # noqa: E402
from car_backend.pipeline.spec import Project  # noqa: E402
from car_backend.review.fit import FitItem, judge_head, mean_iou  # noqa: E402
from car_backend.testing.scenes import SceneClass, labelled_scene  # noqa: E402
from car_backend.testing.settings import TINY_CLIP_CONFIG, TINY_MODEL, tiny_settings  # noqa: E402

BOUND_GIB = 3.0  # the training job may hold this much beyond the models

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
    p.add_argument("--memory", action="store_true", help="the training job's memory on large images (see above)")
    p.add_argument("--corrections", type=int, default=200, help="--memory: corrected tasks of the training split")
    p.add_argument("--fit-memory-mb", type=int, help="--memory: CAR_FIT_MEMORY_MB (default: the setting's)")
    args = p.parse_args(argv)
    if args.memory:
        defaults = {"held_out": (20, 4), "epochs": (20, 2), "size": (128, 1024), "model": (str(TINY_CLIP_CONFIG), "")}
        for name, (plain, memory) in defaults.items():
            if getattr(args, name) == plain:
                setattr(args, name, memory)
    if args.quick:
        args.tasks, args.held_out, args.epochs, args.width = "10,30", 8, 8, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return memory_main(args)
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



def _rss_mb() -> float:
    """This process's resident memory now (MB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2 ** 20


def _peak_rss_mb() -> float:
    """The peak resident memory of this process so far (MB; getrusage gives kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_main(args: argparse.Namespace) -> int:
    """--memory (see the module docstring)."""
    from redis import Redis

    from car_backend.labelstudio.regions import shrink
    from car_backend.pipeline.identity import ProjectId, instance_of
    from car_backend.review.fit import fit_project, held_out
    from car_backend.review.store import Correction, FitState
    from car_backend.testing.fake_label_studio import FakeLabelStudio, Reply
    from car_backend.testing.redis import claim_redis_db
    from car_backend.worker.context import WorkerContext

    cuda = args.device == "cuda"
    model = f"{args.model}:random" if args.model else TINY_MODEL
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(contextlib.contextmanager(claim_redis_db)())
        fake = stack.enter_context(FakeLabelStudio())
        extra = {"fit_memory_mb": args.fit_memory_mb} if args.fit_memory_mb else {}
        settings = tiny_settings(redis_url=url, label_studio_url=fake.url, label_studio_api_key=fake.api_key,
                                 proposal_model=model, classifier_model=model, device=args.device,
                                 fit_epochs=args.epochs, head_width=args.width, head_depth=args.depth,
                                 fit_after=0, calibrate_after=0, fit_seconds=3600.0, **extra)
        redis = stack.enter_context(contextlib.closing(Redis.from_url(url)))
        ctx = WorkerContext(settings, redis, name="bench")
        segmenter = ctx.segmenter()
        models_mb = sum(p.numel() * p.element_size() for clip in (segmenter.proposal_clip, segmenter.classifier_clip)
                        for p in clip.model.parameters()) / 2 ** 20
        project = ProjectId(instance_of(settings.label_studio_url), 1)
        planned = Project(parse_label_config(LABEL_CONFIG), "bench")
        wanted = {False: args.corrections, True: args.held_out}
        task, stored = 0, 0
        while wanted[False] or wanted[True]:
            task += 1
            if not wanted[held_out(task)]:
                continue
            wanted[held_out(task)] -= 1
            scene = labelled_scene(task, CLASSES, (args.size, args.size))
            png = io.BytesIO()
            Image.fromarray(scene.image).save(png, format="PNG", compress_level=1)
            fake.routes[f"/scene/{task}.png"] = Reply(body=png.getvalue(), headers={"Content-Type": "image/png"})
            spec_task = {"id": task, "data": {"image": f"{fake.url}/scene/{task}.png"}}
            specs = tuple(plan_task(spec_task, planned, settings).specs)
            ctx.review.put_correction(project, Correction(task, specs, shrink(scene.masks), annotated=float(task)))
            stored += 1
        print(f"fit memory benchmark: {stored} corrected tasks ({args.corrections} training, {args.held_out} held "
              f"out) of {args.size}x{args.size} px, {args.model or 'tiny'} random, {args.device}, "
              f"CAR_FIT_MEMORY_MB={settings.fit_memory_mb}, {args.epochs} epochs, torch threads "
              f"{torch.get_num_threads()}", flush=True)

        # the job, measured from what the process holds now (models, Redis client, served PNGs)
        before = torch.cuda.memory_allocated() / 2 ** 20 if cuda else _rss_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        status = fit_project(project, ctx.review_runtime)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _peak_rss_mb()
        job_mb = peak - before

        # the baseline: one image prepared (as every corrected image was, all held at once) against its features
        image = labelled_scene(1, CLASSES, (args.size, args.size)).image
        features_mb = segmenter.dense_features(image).features.numel() * 4 / 2 ** 20
        prepared_mb = segmenter.prepare(image, cache=False).held_bytes() / 2 ** 20
    bound_mb = BOUND_GIB * 1024
    within = job_mb <= bound_mb
    kind = "CUDA max_memory_allocated" if cuda else "RSS"
    print(f"  models' parameters {models_mb:.0f} MB; {kind} before the training {before:.0f} MB, peak "
          f"{peak:.0f} MB: the training held {job_mb:.0f} MB beyond (bound {bound_mb:.0f} MB: "
          f"{'within' if within else 'EXCEEDED'})")
    print(f"  the job: {status.state.value}, {status.train_tasks} training tasks used, {status.left_out} left out "
          f"by CAR_FIT_MEMORY_MB, features {status.features_mb:.0f} MB, {status.epochs} epochs, "
          f"{status.seconds_per_epoch:.1f} s/epoch, {seconds:.0f} s in all")
    print(f"  baseline, per image: prepared {prepared_mb:.1f} MB (before) vs dense features {features_mb:.1f} MB "
          f"(now); before, the {stored} images were held prepared at once: {stored * prepared_mb / 1024:.1f} GiB")
    print(json.dumps({"benchmark": "fit-memory", "device": args.device, "model": args.model or "tiny",
                      "size": args.size, "corrections": args.corrections, "held_out": args.held_out,
                      "fit_memory_mb": settings.fit_memory_mb, "epochs": status.epochs,
                      "models_mb": round(models_mb, 1), "before_mb": round(before, 1), "peak_mb": round(peak, 1),
                      "job_mb": round(job_mb, 1), "bound_mb": bound_mb, "within": within,
                      "state": status.state.value, "train_tasks": status.train_tasks, "left_out": status.left_out,
                      "features_mb": status.features_mb, "seconds": round(seconds, 1),
                      "seconds_per_epoch": status.seconds_per_epoch,
                      "per_image_prepared_mb": round(prepared_mb, 1), "per_image_features_mb": round(features_mb, 2),
                      "before_total_gib": round(stored * prepared_mb / 1024, 1)}))
    return 0 if within and status.state is FitState.DONE else 1


if __name__ == "__main__":
    sys.exit(main())
