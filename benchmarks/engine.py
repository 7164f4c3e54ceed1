"""Engine benchmark: the fast CaR engine against the literal official-order implementation, same run.

    python benchmarks/engine.py [--quick] [--device cpu|cuda] [--precision auto|fp32|fp16|bf16]
                                [--baseline fp32] [--classifier ViT-B-16|ViT-L-14] [--queries 5,10,20] [--images 3]
    python benchmarks/engine.py --memory [--memory-labels 100] [--memory-size 4000x3000] [--before-source DIR]
    python benchmarks/engine.py --refiners [--refiner-types vit_b,hq_vit_b,sam2.1_hiera_t] [--size 320x240]

Both models have random weights (no network here), with sharpened attention (see car_backend/engine/synthetic.py).
For each query count: the fast engine segments one warm-up image (its first call: cold text cache), then
`--images` fresh images (trunk included, text cache warm: the steady state of a worker); the literal
implementation segments the first measured image once. `--precision auto` resolves per model as the engine
does (engine.models.resolve_precision: on a CPU with native bf16, a bf16 classifier and an fp32 proposal
model); `--baseline fp32` runs the fp32 engine on the same images, interleaved, and prints the ratio and how
far the two answers are apart. The literal code runs one precision: the fast engine's where both models
share one, else fp32 (the official code's on a CPU). Prints per-stage medians, peak memory, the speed-up and
parity figures; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from car_backend.engine import ClipModel, EngineConfig, Segmenter, get_preset  # noqa: E402
from car_backend.engine.config import PRECISIONS  # noqa: E402
from car_backend.engine.models import resolve_precision  # noqa: E402
from car_backend.engine.reference import LiteralCaR  # noqa: E402
from car_backend.engine.synthetic import random_clip, scene  # noqa: E402

log = logging.getLogger("benchmarks.engine")

VOCABULARY = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
)
STAGES = ("trunk", "text", "cam", "refine", "prompts", "classify", "crf", "total")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small images, 5 and 20 queries, one image (a few minutes)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="CAR_PRECISION of the fast engine (auto: resolved per model as the engine does)")
    p.add_argument("--baseline", choices=PRECISIONS,
                   help="also run the fast engine at this precision (e.g. fp32), interleaved image by image in "
                        "the same process, and print the ratio of the medians (peak RSS then covers both)")
    p.add_argument("--proposal", default="ViT-B-16", help="open_clip name of the proposal CLIP")
    p.add_argument("--classifier", default="ViT-B-16",
                   help="open_clip name of the classifier CLIP (the official one is ViT-L-14; B-16 keeps the "
                        "CPU literal run to minutes)")
    p.add_argument("--queries", default="5,10,20", help="comma-separated query counts")
    p.add_argument("--images", type=int, default=3, help="measured images per query count")
    p.add_argument("--size", default="512x384", help="WxH of the generated images")
    p.add_argument("--preset", default="coco")
    p.add_argument("--no-literal", action="store_true", help="skip the literal implementation")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--refiners", action="store_true",
                   help="only the refiner section: per-image SAM time per family and mode, random weights")
    p.add_argument("--refiner-types", default="vit_b,hq_vit_b,sam2.1_hiera_t",
                   help="CAR_SAM_MODEL_TYPEs of the refiner section (each family's smallest config)")
    p.add_argument("--points-per-side", type=int, default=64,
                   help="refiner section: the automatic generator's grid (64 = the official 4096 points; on a "
                        "CPU a smaller grid finishes in minutes, the cost grows with its square)")
    p.add_argument("--memory", action="store_true",
                   help="only the memory section: peak RSS of one job, before/after the survivor-only masks")
    p.add_argument("--memory-labels", type=int, default=100)
    p.add_argument("--memory-size", default="4000x3000", help="WxH of the memory section's image")
    p.add_argument("--memory-theta", type=float, default=0.3,
                   help="theta of the memory section (coco preset otherwise; 0 keeps every label)")
    p.add_argument("--before-source", help="memory section: a checkout of the version before, run for 'before'")
    p.add_argument("--memory-child", choices=("before", "after"), help=argparse.SUPPRESS)
    p.add_argument("--before-source-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.images, args.size = "5,20", 1, "320x240"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    if args.memory:
        report = memory_section(args)
        print(json.dumps(report))
        return 0
    if args.refiners:
        report = refiner_section(args)
        print(json.dumps(report))
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    counts = [int(q) for q in args.queries.split(",")]
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    proposal_fp32, proposal_tokenizer = random_clip(args.proposal, seed=1)
    classifier_fp32, classifier_tokenizer = random_clip(args.classifier, seed=2)
    variants = [args.precision] + ([args.baseline] if args.baseline and args.baseline != args.precision else [])
    # precision -> (proposal, classifier), each in what the engine resolves it to (one copy per distinct dtype)
    per_role = []
    for role, model in (("proposal", proposal_fp32), ("classifier", classifier_fp32)):
        dtypes = {precision: DTYPES[resolve_precision(precision, device, role)] for precision in variants}
        per_role.append(converted(model, device, dtypes))
    models = {precision: (per_role[0][precision], per_role[1][precision]) for precision in variants}
    del proposal_fp32, classifier_fp32, per_role
    proposal, classifier = models[args.precision]
    if args.classifier != "ViT-L-14":
        print(f"note: classifier {args.classifier} (the official CaR classifier is ViT-L-14; pass "
              "--classifier ViT-L-14 to use it)")
    print(f"device {device} precision {describe(args.precision, models)} ({torch.get_num_threads()} threads), "
          f"proposal {args.proposal}, classifier {args.classifier}, images {width}x{height}, preset {preset.name}, "
          f"random weights" + (f"; baseline {describe(args.baseline, models)}, interleaved" if len(variants) > 1
                               else ""))
    images = [scene(seed, height, width) for seed in range(args.images + 1)]
    report: dict = {"device": str(device), "precision": args.precision, "dtype": describe(args.precision, models),
                    "threads": torch.get_num_threads(), "proposal": args.proposal, "classifier": args.classifier,
                    "image_size": [width, height], "preset": preset.name, "queries": {}}
    # Fast runs for every query count first, so that their peak memory is measured before the literal's.
    fast_runs = {}
    for count in counts:
        segmenters = [Segmenter(EngineConfig(device=args.device, precision=precision),
                                proposal_model=ClipModel(models[precision][0], proposal_tokenizer,
                                                         name=f"{args.proposal}:random"),
                                classifier_model=ClipModel(models[precision][1], classifier_tokenizer,
                                                           name=f"{args.classifier}:random"))
                      for precision in variants]
        entries, runs = measure_fast(segmenters, images, list(VOCABULARY[:count]), preset)
        entry, fast_runs[count] = entries[0], runs
        if len(variants) > 1:
            baseline = entries[1]
            entry["baseline"] = {"precision": describe(args.baseline, models), **baseline}
            entry["speedup_over_baseline"] = round(baseline["fast_median_s"] / entry["fast_median_s"], 2)
            entry["agreement_with_baseline"] = [agree(a, b) for a, b in zip(runs[0], runs[1], strict=True)]
        report["queries"][str(count)] = entry
    report["peak_rss_mb_fast"] = peak_rss_mb()
    if device.type == "cuda":
        report["cuda_peak_mb_fast"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    parity = None
    if not args.no_literal:
        if proposal.visual.conv1.weight.dtype != classifier.visual.conv1.weight.dtype:
            # The literal code runs one precision (the official code's own on a CPU is fp32): fresh fp32
            # copies of the same seeded weights, built after the fast runs' peak memory was read.
            proposal = random_clip(args.proposal, seed=1)[0].to(device)
            classifier = random_clip(args.classifier, seed=2)[0].to(device)
        report["literal_dtype"] = str(classifier.visual.conv1.weight.dtype).removeprefix("torch.")
        literal = LiteralCaR(proposal, proposal_tokenizer, classifier, classifier_tokenizer, preset)
        for count in counts:
            entry = report["queries"][str(count)]
            start = time.perf_counter()
            reference = literal.segment(images[1], list(VOCABULARY[:count]))
            entry["literal_s"] = round(time.perf_counter() - start, 3)
            entry["literal_dtype"] = report["literal_dtype"]
            entry["speedup"] = round(entry["literal_s"] / entry["fast_median_s"], 2)
            entry["speedup_first_call"] = round(entry["literal_s"] / entry["fast_first_call_s"], 2)
            entry["parity"] = compare(fast_runs[count][0][0], reference)
            if "baseline" in entry:
                entry["baseline"]["speedup"] = round(entry["literal_s"] / entry["baseline"]["fast_median_s"], 2)
                entry["baseline"]["parity"] = compare(fast_runs[count][1][0], reference)
        parity = {
            "kept_equal": all(e["parity"]["kept_equal"] for e in report["queries"].values()),
            "steps_equal": all(e["parity"]["steps_equal"] for e in report["queries"].values()),
            "max_score_diff": max(e["parity"]["max_score_diff"] for e in report["queries"].values()),
            "min_mask_agreement": min(e["parity"]["mask_agreement"] for e in report["queries"].values()),
        }
    for count in counts:
        print_entry(count, report["queries"][str(count)])
        report[f"speedup_at_{count}_queries"] = report["queries"][str(count)].get("speedup")
    report.setdefault("speedup_at_20_queries", None)
    report["parity"] = parity
    report["peak_rss_mb"] = peak_rss_mb()
    print(f"peak memory: fast runs {report['peak_rss_mb_fast']} MB RSS"
          + (f" ({report['cuda_peak_mb_fast']} MB CUDA)" if "cuda_peak_mb_fast" in report else "")
          + f", whole run {report['peak_rss_mb']} MB RSS")
    print(json.dumps(report))
    return 0


def measure_fast(segmenters: list[Segmenter], images: list[np.ndarray], queries: list[str], preset
                 ) -> tuple[list[dict], list[list]]:
    """Per segmenter: one first call (cold text cache) on images[0], then one call per further image (trunk
    included); the segmenters take turns on each image, so that a load from other processes hits them alike."""
    colds = []
    for segmenter in segmenters:
        start = time.perf_counter()
        segmenter.segment(images[0], queries, preset=preset)
        colds.append(time.perf_counter() - start)
    runs: list[list] = [[] for _ in segmenters]
    for image in images[1:]:
        for segmenter, done in zip(segmenters, runs, strict=True):
            done.append(segmenter.segment(image, queries, preset=preset))
    entries = []
    for cold, done in zip(colds, runs, strict=True):
        medians = {s: statistics.median(r.timings.get(s, 0.0) for r in done) for s in STAGES}
        entries.append({"fast_first_call_s": round(cold, 3), "fast_median_s": round(medians["total"], 3),
                        "stage_medians_s": {s: round(v, 4) for s, v in medians.items()},
                        "steps": [r.steps for r in done], "kept": [len(r.kept) for r in done]})
    return entries, runs


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def converted(model: torch.nn.Module, device: torch.device, dtypes: dict[str, torch.dtype]
              ) -> dict[str, torch.nn.Module]:
    """The float32 CPU `model` in each precision's dtype: one module per distinct dtype, the last one converted
    in place (so that a single precision's peak RSS is that of its own models)."""
    distinct = list(dict.fromkeys(dtypes.values()))
    if device.type == "cpu" and torch.float32 in distinct:  # the original serves float32; convert copies first
        distinct.remove(torch.float32)
        distinct.append(torch.float32)
    modules = {}
    for i, dtype in enumerate(distinct):
        last = i == len(distinct) - 1
        modules[dtype] = (model if last else copy.deepcopy(model)).to(device, dtype)
    return {precision: modules[dtype] for precision, dtype in dtypes.items()}


def describe(precision: str, models: dict) -> str:
    """`auto (proposal fp32, classifier bf16)`: a precision with what it resolved to per model."""
    proposal, classifier = (str(next(m.parameters()).dtype).removeprefix("torch.") for m in models[precision])
    resolved = proposal if proposal == classifier else f"proposal {proposal}, classifier {classifier}"
    return precision if resolved == precision else f"{precision} ({resolved})"


def refiner_section(args: argparse.Namespace) -> dict:
    """Per-image refiner time (`sam` stage) for each family's model with random weights, in each mode:
    automatic (the official 64 x 64 point grid), prompted (one decoder call per kept label) and the two-stage
    proposals (automatic masks, then one classifier pass over them). CaR itself runs on the tiny random CLIPs
    with theta lowered so that several labels are kept; its own time is reported apart."""
    import dataclasses
    import importlib

    from car_backend.engine.postprocess import SamRefiner
    from car_backend.engine.refiners import SAM_GENERATOR_SETTINGS, SamModel, SamSpec
    from car_backend.testing.settings import TINY_CLIP_CONFIG

    width, height = (int(v) for v in args.size.lower().split("x"))
    image = scene(0, height, width)
    queries = list(VOCABULARY[:10])
    preset = dataclasses.replace(get_preset("coco"), confidence_threshold=0.02)
    proposal, proposal_tokenizer = random_clip(str(TINY_CLIP_CONFIG), seed=1)
    classifier, classifier_tokenizer = random_clip(str(TINY_CLIP_CONFIG), seed=2)
    clips = ClipModel(proposal, proposal_tokenizer, "p"), ClipModel(classifier, classifier_tokenizer, "c")
    settings = dict(SAM_GENERATOR_SETTINGS, points_per_side=args.points_per_side)
    report: dict = {"image_size": [width, height], "queries": len(queries), "device": "cpu",
                    "threads": torch.get_num_threads(), "points_per_side": args.points_per_side, "families": {}}
    for model_type in args.refiner_types.split(","):
        spec = SamSpec.parse(model_type)
        try:
            importlib.import_module(spec.module)
        except ImportError:
            report["families"][model_type] = {"skipped": f"{spec.package} not installed"}
            print(f"{model_type}: skipped ({spec.package} not installed)")
            continue
        sam = SamModel(model_type, "random", generator_settings=settings)
        sam.load()
        entry: dict = {"family": spec.family}
        for mode, proposals in (("automatic", "car"), ("prompted", "car"), ("automatic", "sam")):
            segmenter = Segmenter(EngineConfig(device="cpu", proposals=proposals), proposal_model=clips[0],
                                  classifier_model=clips[1],
                                  sam_refiner=SamRefiner("random", model_type, "cpu", mode=mode, sam=sam))
            result = segmenter.segment(image, queries, preset=preset)
            name = "two_stage" if proposals == "sam" else mode
            entry[f"{name}_s"] = round(result.timings.get("sam", 0.0), 2)
            entry[f"{name}_total_s"] = round(result.timings["total"], 2)
            entry[f"{name}_kept"] = len(result.kept)
        entry["automatic_over_prompted"] = round(entry["automatic_s"] / max(entry["prompted_s"], 1e-9), 2)
        report["families"][model_type] = entry
        print(f"{model_type}: automatic {entry['automatic_s']:.1f} s, prompted {entry['prompted_s']:.1f} s "
              f"({entry['prompted_kept']} labels) -> x{entry['automatic_over_prompted']}; two-stage "
              f"{entry['two_stage_s']:.1f} s (SAM stage), {entry['two_stage_total_s']:.1f} s in all")
    return report


def memory_section(args: argparse.Namespace) -> dict:
    """Memory of one job (`--memory-labels` labels on a `--memory-size` image), each variant in its own
    process (ru_maxrss is a per-process high-water mark): the peak RSS during `segment` and what the result
    still holds afterwards, both above the process's RSS before the call.

    after: this checkout (masks only for the kept labels, at working resolution; the label map is the only
    full-resolution array). before, with `--before-source DIR` (a checkout of the version before, e.g.
    `git worktree add DIR add4876`): the same child run on that code, which returns full-resolution
    (labels, H, W) masks; pipeline.compute.restrict's copy of them is included in both. Without it,
    before is this checkout with that full array built from its result (`np.asarray(result.masks)`).
    """
    import subprocess

    report: dict = {"labels": args.memory_labels, "image_size": args.memory_size, "theta": args.memory_theta,
                    "models": "tiny random CLIPs (mask memory does not depend on the model size)",
                    "before_source": args.before_source or "emulated"}
    for variant in ("before", "after"):
        script = Path(__file__).resolve()
        if variant == "before" and args.before_source:
            source = Path(args.before_source).resolve()
            target = source / "benchmarks" / "_engine_memory_child.py"
            target.write_text(script.read_text())  # this file's child, importing that checkout's car_backend
            script = target
        command = [sys.executable, str(script), "--memory-child", variant, "--memory-labels",
                   str(args.memory_labels), "--memory-size", args.memory_size, "--memory-theta",
                   str(args.memory_theta), "--threads", str(args.threads or 1)]
        if variant == "before" and args.before_source:
            command.append("--before-source-child")
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode:
            raise SystemExit(f"memory child {variant} failed: {done.stderr[-2000:]}")
        report[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = report["before"], report["after"]
    report["peak_ratio_before_after"] = round(before["job_peak_mb"] / after["job_peak_mb"], 2)
    report["held_ratio_before_after"] = round(before["held_mb"] / max(after["held_mb"], 1.0), 2)
    print(f"memory, {args.memory_labels} labels on {args.memory_size} ({report['before_source']} before): "
          f"peak above baseline before {before['job_peak_mb']:.0f} MB, after {after['job_peak_mb']:.0f} MB "
          f"(x{report['peak_ratio_before_after']}); held by the result before {before['held_mb']:.0f} MB, after "
          f"{after['held_mb']:.0f} MB (x{report['held_ratio_before_after']}); kept {before['kept']} / {after['kept']}")
    return report


def memory_child(args: argparse.Namespace) -> dict:
    import dataclasses

    import cv2

    from car_backend.testing.settings import TINY_CLIP_CONFIG

    width, height = (int(v) for v in args.memory_size.lower().split("x"))
    proposal, proposal_tokenizer = random_clip(str(TINY_CLIP_CONFIG), seed=1)
    classifier, classifier_tokenizer = random_clip(str(TINY_CLIP_CONFIG), seed=2)
    segmenter = Segmenter(EngineConfig(device="cpu"), proposal_model=ClipModel(proposal, proposal_tokenizer, "p"),
                          classifier_model=ClipModel(classifier, classifier_tokenizer, "c"))
    # A small scene blown up: generating a 12-megapixel scene directly would set the high-water mark itself.
    image = cv2.resize(scene(0, 750, 1000), (width, height), interpolation=cv2.INTER_NEAREST)
    queries = [f"{VOCABULARY[i % len(VOCABULARY)]} {i}" for i in range(args.memory_labels)]
    preset = dataclasses.replace(get_preset("coco"), confidence_threshold=args.memory_theta)
    baseline, baseline_now = peak_rss_mb(), current_rss_mb()
    start = time.perf_counter()
    result = segmenter.segment(image, queries, preset=preset)
    held = [result, result.masks[list(range(len(queries)))]]  # what restrict() keeps
    if args.memory_child == "before" and not args.before_source_child:
        held.append(np.asarray(result.masks))
    seconds = time.perf_counter() - start
    segmenter._prepared.clear()  # the prepared-image cache is the worker's, not the job's
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "job_peak_mb": round(peak_rss_mb() - baseline, 1),
            "held_mb": round(current_rss_mb() - baseline_now, 1), "kept": len(result.kept), "steps": result.steps,
            "seconds": round(seconds, 1), "masks_type": type(result.masks).__name__, "objects_held": len(held)}


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return round(int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20, 1)


def compare(fast, reference) -> dict:
    return {
        "kept_equal": fast.kept == reference.kept,
        "steps_equal": fast.steps == reference.steps,
        "max_score_diff": float(np.abs(fast.scores - reference.scores).max()),
        "mask_agreement": float((fast.masks == reference.masks).mean()),
    }


def agree(fast, baseline) -> dict:
    """Two engine answers (Segmentation) on one image: kept labels, steps, final scores, label maps."""
    return {
        "kept_equal": fast.kept == baseline.kept,
        "steps_equal": fast.steps == baseline.steps,
        "max_score_diff": float(np.abs(fast.scores - baseline.scores).max()),
        "mask_agreement": float((fast.label_map == baseline.label_map).mean()),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_entry(count: int, entry: dict) -> None:
    stages = "  ".join(f"{s} {v * 1000:.0f}" for s, v in entry["stage_medians_s"].items())
    print(f"{count:>3} queries: fast median {entry['fast_median_s'] * 1000:.0f} ms "
          f"(first call {entry['fast_first_call_s'] * 1000:.0f} ms), steps {entry['steps']}, kept {entry['kept']}")
    print(f"    stage medians (ms): {stages}")
    if "baseline" in entry:
        base = entry["baseline"]
        stages = "  ".join(f"{s} {v * 1000:.0f}" for s, v in base["stage_medians_s"].items())
        agreement = entry["agreement_with_baseline"]
        print(f"    baseline {base['precision']}: median {base['fast_median_s'] * 1000:.0f} ms (first call "
              f"{base['fast_first_call_s'] * 1000:.0f} ms) -> x{entry['speedup_over_baseline']}; kept equal "
              f"{sum(a['kept_equal'] for a in agreement)}/{len(agreement)}, max score diff "
              f"{max(a['max_score_diff'] for a in agreement):.2e}, mask agreement "
              f"{min(a['mask_agreement'] for a in agreement):.4f}")
        print(f"    baseline stage medians (ms): {stages}")
        if "parity" in base:
            p = base["parity"]
            print(f"    literal against the baseline: speed-up x{base['speedup']}; parity: kept {p['kept_equal']}, "
                  f"steps {p['steps_equal']}, max score diff {p['max_score_diff']:.2e}, "
                  f"mask agreement {p['mask_agreement']:.4f}")
    if "literal_s" in entry:
        p = entry["parity"]
        print(f"    literal ({entry.get('literal_dtype', '')}) {entry['literal_s']:.1f} s -> speed-up x{entry['speedup']} "
              f"(x{entry['speedup_first_call']} against the fast first call); parity: kept {p['kept_equal']}, "
              f"steps {p['steps_equal']}, max score diff {p['max_score_diff']:.2e}, "
              f"mask agreement {p['mask_agreement']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
