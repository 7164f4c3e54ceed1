"""`car-backend serve|worker|segment|prelabel|export|bench|eval|report|status|fit`: one entry point, settings from the environment.

Each sub-command imports its module only when it runs, so `--help` is instant and never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from car_backend import __version__
from car_backend.engine.config import COMPAT_MODES, PROPOSAL_MODES, SAM_MODEL_TYPES, SAM_MODES
from car_backend.settings import PRESETS, Settings, SettingsError, settings_table

log = logging.getLogger("car_backend")


def _settings_epilog() -> str:
    lines = ["settings (environment variables):"]
    lines += [f"  {env:<24} {meaning} [default: {default or 'unset'}]" for env, default, meaning in settings_table()]
    return "\n".join(lines)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the Label Studio ML backend HTTP server (waitress)",
        description="Serve the ML backend protocol (/health, /setup, /predict, /webhook, /versions, /metrics,"
        " /status) with waitress. Without REDIS_URL, jobs run on an embedded worker process with an embedded "
        "Redis; with REDIS_URL, they go to the queue that `car-backend worker` processes serve.",
    )
    p.add_argument("--host", help="address to bind (default: HOST or 127.0.0.1; another address needs BASIC_AUTH_USER/PASS)")
    p.add_argument("--port", type=int, help="port to listen on (default: PORT or 9090)")
    p.set_defaults(handler=_run("car_backend.service.server", "main"))


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run an RQ worker that loads the models once and executes segmentation, review, calibration and "
        "training jobs",
        description="Pull jobs from the Redis queue at REDIS_URL and run CaR on them in this process "
        "(models load once, no fork per job). Start any number of workers on any number of machines; "
        "interactive jobs are always served before batch jobs, and by a second process of each worker that "
        "serves only them (CAR_INTERACTIVE_LANE), so they never wait for a running batch job.",
    )
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--name", help="worker name (default: host and process id)")
    p.add_argument("--check", action="store_true",
                   help="do not run a worker: exit 0 when this host's worker (or --name) has a recent heartbeat in "
                   "Redis, 1 otherwise (a container health check)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # the embedded worker exits with its server
    p.add_argument("--lane", action="store_true", help=argparse.SUPPRESS)  # a worker's interactive lane (worker.process.Lane)
    p.set_defaults(handler=_run("car_backend.worker.health", "worker_command"))


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment one image with CaR and write a label map / overlay / JSON summary",
        description="Run CaR on IMAGE with the given vocabulary and print the kept labels, their scores, "
        "the number of recurrent steps and the stage timings.",
    )
    p.add_argument("image", help="path to an image file")
    p.add_argument("--labels", required=True, help='comma-separated vocabulary, e.g. "cat,dog,sofa"')
    p.add_argument("--preset", choices=PRESETS, help="thresholds and visual prompts (default: CAR_PRESET)")
    p.add_argument("--referring", action="store_true", help="treat the labels as sentences describing one object")
    p.add_argument("--out", help="write the label map as a PNG (pixel value = label index + 1, 0 = background)")
    p.add_argument("--overlay", help="write a colour overlay of the masks on the image as a PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=_run("car_backend.engine.cli", "segment_command", engine_only=True))


def _add_prelabel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prelabel",
        help="pre-label a whole Label Studio project, or an image folder into an import file",
        description="With --project: enqueue every task of the project that lacks a prediction for the current "
        "model version and write predictions through the Label Studio API (resumable). With --images: segment "
        "a folder offline and write a Label Studio import file with predictions (or, with --export, COCO, "
        "PNG label maps or YOLO).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--project", type=int, help="Label Studio project id (needs LABEL_STUDIO_URL and _API_KEY)")
    src.add_argument("--images", help="folder of images to pre-label offline")
    p.add_argument("--labels", help='vocabulary for --images, e.g. "cat,dog"')
    p.add_argument("--out", help="import file to write for --images (JSON)")
    p.add_argument("--format", choices=("brush", "polygon"), default="brush", help="region type for --images")
    p.add_argument("--url-prefix", default="",
                   help="for --images: write each image as PREFIX + its path under the folder (e.g. "
                   "'/data/local-files/?d=dataset/' or 'https://bucket.example/dataset/') instead of its absolute "
                   "path, so Label Studio can open it")
    p.add_argument("--export", choices=("ls", "coco", "png", "yolo", "yolo-detect"),
                   help="for --images: what to write at --out: ls (a Label Studio import file, the default), coco "
                   "(a folder with annotations.json, one compressed RLE mask per object), png (a folder of "
                   "VOC-style palette class and object maps, labels.json), yolo (a folder of YOLO segmentation "
                   "txt files, one polygon with its holes per object, data.yaml), yolo-detect (YOLO boxes); an "
                   "interrupted run continues where it stopped")
    p.add_argument("--gallery", action="store_true",
                   help="for --images: also write a static HTML review gallery next to the export (overlay "
                   "thumbnails, most uncertain first)")
    p.set_defaults(handler=_run("car_backend.service.prelabel", "main"))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a Label Studio project's annotations (else predictions) as COCO, PNG label maps or YOLO",
        description="Read every task of the project with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; each task's "
        "latest annotation is exported, or its latest prediction when it has no annotation: each brush, polygon "
        "or rectangle region is one object, choices are image tags. Tasks that cannot be read (an image that "
        "cannot be fetched, a region larger than CAR_MAX_IMAGE_PIXELS) are listed in failed.txt.",
    )
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--format", required=True, choices=("coco", "png", "yolo", "yolo-detect"),
                   help="what to write (yolo-detect: YOLO boxes, one per object)")
    p.add_argument("--out", required=True, help="folder to write the export into")
    p.add_argument("--gallery", action="store_true", help="also write a static HTML review gallery")
    p.set_defaults(handler=_run("car_backend.exports.project", "main"))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark (engine, service, calibration or fit) and print figures; the last line is one "
        "JSON object",
        description="Benchmarks print per-stage medians and ratios against a baseline measured in the same run.",
    )
    p.add_argument("which", choices=("engine", "service", "calibration", "fit"), help="what to measure")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see its --help)")
    p.set_defaults(handler=_run("car_backend.bench", "main"))


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="print a project's agreement with annotators' corrections, its calibrated thresholds and its "
        "mask head",
        description="Per model_version, how the predictions compare with the annotations submitted on them (IoU "
        "per label, labels missed, labels added), and the project's calibration: the thresholds before and "
        "after, and the agreement they give on the corrected tasks; and the mask head's last training. Reads "
        "the backend's Redis (REDIS_URL).",
    )
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(handler=_run("car_backend.review.report", "main"))


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="a project's tasks: queued, running, done, failed (with reasons), delivered, waiting to be written",
        description="Where a project's tasks are (the JSON GET /status?project=ID answers). Needs REDIS_URL.",
    )
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--task", type=int, help="only this task")
    p.set_defaults(handler=_run("car_backend.service.status", "main"))


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="train a project's mask head from its corrected tasks (on the backend's workers)",
        description="Queue a training of the project's mask head on the batch queue, as Label Studio's Start "
        "Training does. A worker trains it on the corrected tasks (CAR_FIT_EPOCHS, CAR_FIT_SECONDS) and adopts it "
        "only if it beats the model in use on held-out corrected tasks. Reads the backend's Redis (REDIS_URL).",
    )
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--wait", action="store_true", help="wait for the training to end and print its figures")
    p.set_defaults(handler=_run("car_backend.review.report", "fit_main"))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure mIoU on a standard dataset and compare with the paper's figures",
        description="Run CaR with the dataset's preset and the paper's class names over a standard dataset layout "
        "(VOC2012, COCO-Object, Pascal Context, RefCOCO, RefCOCO+, RefCOCOg) and print mIoU (and oIoU for referring), per-class IoU, "
        "images/s and the paper's number beside ours. Per-image results are cached on disk, so an interrupted "
        "run resumes.",
    )
    p.add_argument("--dataset", required=True, choices=("voc", "coco-object", "context", "refcoco", "refcoco+",
                                                              "refcocog"))
    p.add_argument("--root", required=True, help="dataset folder (or the folder holding VOCdevkit/)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--preset", choices=PRESETS, help="override the dataset's preset")
    p.add_argument("--split", help="dataset split (default: val)")
    p.add_argument("--cache", help="folder for per-image results (default: <root>/.car-eval-cache)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--sam-model-type", choices=SAM_MODEL_TYPES, help="SAM refiner family and model "
                   "(CAR_SAM_MODEL_TYPE); with --sam-checkpoint")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint (CAR_SAM_CHECKPOINT): refine with SAM")
    p.add_argument("--sam-mode", choices=SAM_MODES, help="automatic (the paper's) or prompted (CAR_SAM_MODE)")
    p.add_argument("--proposals", choices=PROPOSAL_MODES, help="car, or sam for two-stage (CAR_PROPOSALS)")
    p.add_argument("--compat", choices=COMPAT_MODES, help="fixed or official (CAR_COMPAT)")
    p.set_defaults(handler=_run("car_backend.evaluation.cli", "main"))


def _run(module: str, function: str, engine_only: bool = False) -> Callable[[argparse.Namespace, Settings], int]:
    """A handler that imports `module` when it runs and calls `function(args, settings)`, or
    `function(args, settings.engine_config())` for engine commands (the engine never sees Settings)."""

    def handler(args: argparse.Namespace, settings: Settings) -> int:
        import importlib
        import importlib.util

        if importlib.util.find_spec(module) is None:
            print(f"car-backend {args.command}: not implemented yet ({module} is not in this build)", file=sys.stderr)
            return 2
        target = getattr(importlib.import_module(module), function)
        return int(target(args, settings.engine_config() if engine_only else settings) or 0)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="car-backend",
        description="Label Studio ML backend: open-vocabulary segmentation pre-labels with CaR (CLIP as RNN).",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"car-backend {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_serve, _add_worker, _add_segment, _add_prelabel, _add_export, _add_bench, _add_eval, _add_report,
                _add_status, _add_fit):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"car-backend: bad setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return args.handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
