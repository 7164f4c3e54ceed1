"""The four benchmarks `car-backend eval` knows: reader, preset, queries, classes, the paper's figures."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from car_backend.evaluation import classnames as names
from car_backend.evaluation.datasets import (
    Sample,
    read_coco_object,
    read_context,
    read_refcoco,
    read_voc,
)


@dataclass(frozen=True)
class PaperFigure:
    value: float  # percent
    source: str


@dataclass(frozen=True)
class QueryPass:
    """One CaR run per image: `queries[i]` paints dataset label `label_ids[i]`.

    `background` replaces the preset's background words (None keeps them); `stuff` runs the pass with the
    preset's stuff-pass values (visual prompts, mask threshold). When a benchmark has several passes, each
    later pass overwrites the earlier ones wherever it found something.
    """

    queries: tuple[str, ...]
    label_ids: tuple[int, ...]
    background: tuple[str, ...] | None = None
    stuff: bool = False

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.label_ids):
            raise ValueError("every query needs exactly one label id")


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    mode: str  # "semantic" | "referring"
    preset: str
    default_split: str
    read: Callable[[Path, str], list[Sample]]
    labels: tuple[str, ...] = ()  # semantic: class names by label id, 0 = background
    passes: tuple[QueryPass, ...] = ()  # semantic only; referring queries are each sample's sentences
    paper: Mapping[str, PaperFigure] = field(default_factory=dict)  # by split
    paper_sam: Mapping[str, PaperFigure] = field(default_factory=dict)  # CaR+SAM rows, by split

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _single_pass(queries: tuple[str, ...]) -> tuple[QueryPass, ...]:
    return (QueryPass(queries, tuple(range(1, len(queries) + 1))),)


def _context_passes() -> tuple[QueryPass, ...]:
    """GR: evaluate.py `eval_semantic`: stuff classes first, with the thing names as background words and the
    stuff visual prompts, then the things with the usual background words; things overwrite stuff."""
    label_of = {q: i + 1 for i, q in enumerate(names.CONTEXT_QUERIES)}
    stuff = names.CONTEXT_STUFF_QUERIES
    things = names.CONTEXT_THING_QUERIES
    return (
        QueryPass(stuff, tuple(label_of[q] for q in stuff), background=things, stuff=True),
        QueryPass(things, tuple(label_of[q] for q in things)),
    )


_TABLE1 = "CaR paper (CVPR 2024) Table 1, CaR w/o SAM"
_TABLE1_SAM = "CaR paper (CVPR 2024) Table 1, CaR+SAM (HQ-SAM ViT-H, automatic masks matched by IoM)"
_TABLE7_PAPER = "CaR paper (CVPR 2024) Table 7"
_TABLE7 = f"{_TABLE7_PAPER}, RefCOCO (UNC)"

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="voc", title="Pascal VOC 2012 (VOC-21)", mode="semantic", preset="voc", default_split="val",
            read=read_voc, labels=names.VOC_LABELS, passes=_single_pass(names.VOC_QUERIES),
            paper={"val": PaperFigure(67.6, f"{_TABLE1}, VOC-21 mIoU")},
            paper_sam={"val": PaperFigure(70.2, f"{_TABLE1_SAM}, VOC-21 mIoU")},
        ),
        Benchmark(
            name="coco-object", title="COCO-Object (81 classes)", mode="semantic", preset="coco",
            default_split="val", read=read_coco_object, labels=names.COCO_OBJECT_LABELS,
            passes=_single_pass(names.COCO_OBJECT_QUERIES),
            paper={"val": PaperFigure(36.6, f"{_TABLE1}, COCO-Object mIoU")},
            paper_sam={"val": PaperFigure(37.6, f"{_TABLE1_SAM}, COCO-Object mIoU")},
        ),
        Benchmark(
            name="context", title="Pascal Context (PC-60)", mode="semantic", preset="context", default_split="val",
            read=read_context, labels=names.CONTEXT_LABELS, passes=_context_passes(),
            paper={"val": PaperFigure(30.5, f"{_TABLE1}, PC-60 mIoU")},
            paper_sam={"val": PaperFigure(31.1, f"{_TABLE1_SAM}, PC-60 mIoU")},
        ),
        Benchmark(
            name="refcoco", title="RefCOCO (UNC split)", mode="referring", preset="refcoco", default_split="val",
            read=read_refcoco,
            paper={
                "val": PaperFigure(33.57, f"{_TABLE7}, val mIoU"),
                "testA": PaperFigure(35.36, f"{_TABLE7}, testA mIoU"),
                "testB": PaperFigure(30.51, f"{_TABLE7}, testB mIoU"),
            },
        ),
        Benchmark(
            name="refcoco+", title="RefCOCO+ (UNC split)", mode="referring", preset="refcoco+", default_split="val",
            read=partial(read_refcoco, dataset="refcoco+", split_by="unc"),
            paper={
                "val": PaperFigure(34.22, f"{_TABLE7_PAPER}, RefCOCO+ (UNC) val mIoU"),
                "testA": PaperFigure(36.03, f"{_TABLE7_PAPER}, RefCOCO+ (UNC) testA mIoU"),
                "testB": PaperFigure(31.02, f"{_TABLE7_PAPER}, RefCOCO+ (UNC) testB mIoU"),
            },
        ),
        Benchmark(
            name="refcocog", title="RefCOCOg (UMD split)", mode="referring", preset="refcocog", default_split="val",
            read=partial(read_refcoco, dataset="refcocog", split_by="umd"),
            paper={
                "val": PaperFigure(36.67, f"{_TABLE7_PAPER}, RefCOCOg val(U) mIoU"),
                "test": PaperFigure(36.57, f"{_TABLE7_PAPER}, RefCOCOg test(U) mIoU"),
            },
        ),
    )
}
