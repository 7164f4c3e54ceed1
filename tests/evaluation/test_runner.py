from pathlib import Path

import numpy as np
import pytest

from car_backend.evaluation import classnames
from car_backend.evaluation.benchmarks import BENCHMARKS
from car_backend.evaluation.cache import PredictionCache, cache_folder, cache_identity
from car_backend.evaluation.runner import EvaluationError, evaluate
from car_backend.settings import Settings
from tests.evaluation.fake_datasets import (
    OracleSegmenter,
    label_map,
    make_context,
    make_refcoco,
    make_voc,
)

VOC_LABEL_OF = {q: i + 1 for i, q in enumerate(classnames.VOC_QUERIES)}


def run(benchmark_name, root, segmenter, cache_dir, split="val"):
    benchmark = BENCHMARKS[benchmark_name]
    samples = benchmark.read(root, split)
    cache = PredictionCache(cache_dir, {"test": True})
    built = []

    def make():
        built.append(segmenter)
        return segmenter

    report = evaluate(benchmark, samples, make, cache, split=split, preset=benchmark.preset, progress=False)
    return report, built


@pytest.fixture
def voc_root(tmp_path):
    labels = {f"2007_{i:06d}": label_map(i, (15, 3 + i), ignore_border=True) for i in range(3)}
    make_voc(tmp_path / "data", labels)
    return tmp_path / "data"


def test_oracle_scores_100_and_calls_with_paper_queries(voc_root, tmp_path):
    oracle = OracleSegmenter(VOC_LABEL_OF)
    report, _ = run("voc", voc_root, oracle, tmp_path / "cache")
    assert report.metrics["mIoU"] == pytest.approx(1.0)
    assert report.images == report.computed == 3
    assert report.paper is not None and report.paper.value == 67.6
    present = {k for k, v in report.class_iou.items() if not np.isnan(v)}
    assert present == {"background", "person", "bird", "boat", "bottle"}
    assert len(oracle.calls) == 3
    assert all(c["queries"] == list(classnames.VOC_QUERIES) and c["preset"] == "voc" for c in oracle.calls)


def test_second_run_recomputes_nothing(voc_root, tmp_path):
    first, _ = run("voc", voc_root, OracleSegmenter(VOC_LABEL_OF), tmp_path / "cache")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.png")}
    assert len(stamps) == 3

    second_oracle = OracleSegmenter(VOC_LABEL_OF)
    second, built = run("voc", voc_root, second_oracle, tmp_path / "cache")
    assert built == [] and second_oracle.calls == []  # the engine is not even built
    assert second.computed == 0
    assert second.metrics == first.metrics
    assert second.seconds == pytest.approx(first.seconds)  # cached timings still give images/s
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.png")} == stamps


def test_interrupted_run_resumes(voc_root, tmp_path):
    cache_dir = tmp_path / "cache"
    run("voc", voc_root, OracleSegmenter(VOC_LABEL_OF), cache_dir)
    (cache_dir / "2007_000001.png").unlink()
    (cache_dir / "2007_000002.png").write_bytes(b"half a png")  # e.g. a disk that filled up
    oracle = OracleSegmenter(VOC_LABEL_OF)
    report, _ = run("voc", voc_root, oracle, cache_dir)
    assert report.computed == 2 and len(oracle.calls) == 2
    assert report.metrics["mIoU"] == pytest.approx(1.0)
    assert not list(cache_dir.glob("*.partial"))


class Crash(RuntimeError):
    pass


def test_crash_keeps_finished_images(voc_root, tmp_path):
    class CrashOnThird(OracleSegmenter):
        def segment(self, image, queries, **kwargs):
            if len(self.calls) == 2:
                raise Crash
            return super().segment(image, queries, **kwargs)

    with pytest.raises(Crash):
        run("voc", voc_root, CrashOnThird(VOC_LABEL_OF), tmp_path / "cache")
    oracle = OracleSegmenter(VOC_LABEL_OF)
    report, _ = run("voc", voc_root, oracle, tmp_path / "cache")
    assert report.computed == 1 and len(oracle.calls) == 1


def test_wrong_prediction_lowers_the_score_as_the_metric_says(voc_root, tmp_path):
    class AlwaysBackground(OracleSegmenter):
        def segment(self, image, queries, **kwargs):
            result = super().segment(image, queries, **kwargs)
            result.label_map[:] = 0
            return result

    report, _ = run("voc", voc_root, AlwaysBackground(VOC_LABEL_OF), tmp_path / "cache")
    # Only background has a non-zero IoU; it is averaged with four classes at 0.
    assert 0 < report.metrics["mIoU"] < 0.25
    assert report.class_iou["person"] == 0.0


def test_size_mismatch_is_reported(voc_root, tmp_path):
    cache = tmp_path / "cache"
    run("voc", voc_root, OracleSegmenter(VOC_LABEL_OF), cache)
    PredictionCache(cache, {}).save("2007_000000", np.zeros((5, 5), np.uint8), 0.1)
    with pytest.raises(EvaluationError, match="2007_000000"):
        run("voc", voc_root, OracleSegmenter(VOC_LABEL_OF), cache)


def test_context_runs_stuff_then_things(tmp_path):
    # wall (stuff, 55) under a person (thing, 36) and a bottle (thing, 10)
    labels = {"2008_000001": label_map(9, (55, 36, 10)), "2008_000002": label_map(10, (29, 53))}
    make_context(tmp_path / "data", labels)
    oracle = OracleSegmenter({q: i + 1 for i, q in enumerate(classnames.CONTEXT_QUERIES)})
    report, _ = run("context", tmp_path / "data", oracle, tmp_path / "cache")
    assert report.metrics["mIoU"] == pytest.approx(1.0)
    assert len(oracle.calls) == 4
    stuff_call, thing_call = oracle.calls[:2]
    assert stuff_call["queries"] == list(classnames.CONTEXT_STUFF_QUERIES)
    assert stuff_call["background"] == list(classnames.CONTEXT_THING_QUERIES)
    assert stuff_call["preset"].name == "context"
    assert stuff_call["preset"].visual_prompts == ("blur", "gray") and stuff_call["preset"].mask_threshold == 0.6
    assert thing_call["queries"] == list(classnames.CONTEXT_THING_QUERIES)
    assert thing_call["background"] is None and thing_call["preset"] == "context"


def test_things_overwrite_stuff(tmp_path):
    class Overlapping(OracleSegmenter):
        """Every pass claims the whole image for its first query."""

        def segment(self, image, queries, **kwargs):
            result = super().segment(image, queries, **kwargs)
            result.label_map[:] = 1
            return result

    make_context(tmp_path / "data", {"x": label_map(0, (1,))})
    label_of = {q: i + 1 for i, q in enumerate(classnames.CONTEXT_QUERIES)}
    run("context", tmp_path / "data", Overlapping(label_of), tmp_path / "cache")
    predicted = PredictionCache(tmp_path / "cache", {}).load("x").labels
    first_thing = classnames.CONTEXT_QUERIES.index(classnames.CONTEXT_THING_QUERIES[0]) + 1
    assert (predicted == first_thing).all()


def test_refcoco_runs_referring_mode(tmp_path):
    make_refcoco(tmp_path / "data")
    oracle = OracleSegmenter()
    report, _ = run("refcoco", tmp_path / "data", oracle, tmp_path / "cache")
    assert report.metrics["mIoU"] == pytest.approx(1.0)
    assert report.metrics["oIoU"] == pytest.approx(1.0)
    assert report.metrics["P@0.9"] == pytest.approx(1.0)
    assert [c["mode"] for c in oracle.calls] == ["referring", "referring"]
    assert oracle.calls[0]["queries"] == ["the left box", "redblue square"]
    assert oracle.calls[0]["preset"] == "refcoco"
    assert report.paper.value == 33.57


def test_cache_folder_depends_on_engine_settings():
    base = Settings(proposal_model="a:random", classifier_model="b:random", device="cpu").engine_config()
    folder = cache_folder(Path("/"), "voc", cache_identity(base, "voc", "voc", ["q"]))
    assert folder.name.startswith("voc-")
    same = Settings(proposal_model="a:random", classifier_model="b:random", device="cuda", port=1).engine_config()
    assert cache_folder(Path("/"), "voc", cache_identity(same, "voc", "voc", ["q"])) == folder
    other = Settings(proposal_model="a:random", classifier_model="c:random").engine_config()
    assert cache_folder(Path("/"), "voc", cache_identity(other, "voc", "voc", ["q"])) != folder
    assert cache_folder(Path("/"), "voc", cache_identity(base, "voc", "coco", ["q"])) != folder
    assert cache_identity(base, "voc", "voc", ["q"])["preset"]["confidence_threshold"] == 0.6
    assert cache_folder(Path("/"), "voc", cache_identity(base, "voc", "voc", ["r"])) != folder
