import numpy as np
import pytest

from car_backend.evaluation import classnames
from car_backend.evaluation.benchmarks import BENCHMARKS
from car_backend.evaluation.datasets import (
    DatasetError,
    read_coco_object,
    read_context,
    read_refcoco,
    read_voc,
)
from tests.evaluation.fake_datasets import (
    label_map,
    make_coco_object,
    make_context,
    make_refcoco,
    make_voc,
)


def test_voc_reader_from_every_root(tmp_path):
    labels = {"2007_000033": label_map(0, (15, 3), ignore_border=True), "2007_000042": label_map(1, (20,))}
    base = make_voc(tmp_path, labels)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        samples = read_voc(root, "val")
        assert [s.key for s in samples] == list(labels)
        for sample in samples:
            assert sample.image_path.is_file()
            label = sample.load_label()  # palette indices, not colours
            assert np.array_equal(label, labels[sample.key])
            assert 255 in label or sample.key == "2007_000042"


def test_voc_missing_split_and_missing_dataset(tmp_path):
    make_voc(tmp_path, {"a": label_map(0, (1,))})
    with pytest.raises(DatasetError, match="train.txt"):
        read_voc(tmp_path, "train")
    with pytest.raises(DatasetError, match="ImageSets/Segmentation"):
        read_voc(tmp_path / "elsewhere", "val")


def test_coco_object_reader_uses_instance_train_ids(tmp_path):
    labels = {"000000000139": label_map(2, (1, 80)), "000000000285": label_map(3, (23,))}
    make_coco_object(tmp_path, labels)
    samples = read_coco_object(tmp_path, "val")
    assert [s.key for s in samples] == sorted(labels)
    for sample in samples:
        assert sample.label_path.name.endswith("_instanceTrainIds.png")
        assert np.array_equal(sample.load_label(), labels[sample.key])


def test_coco_object_missing_label(tmp_path):
    make_coco_object(tmp_path, {"000000000139": label_map(2, (1,))})
    (tmp_path / "annotations/val2017/000000000139_instanceTrainIds.png").unlink()
    with pytest.raises(DatasetError, match="convert_coco_object"):
        read_coco_object(tmp_path, "val")


def test_context_reader(tmp_path):
    labels = {"2008_000002": label_map(4, (59, 1, 30)), "2008_000003": label_map(5, (0,))}
    make_context(tmp_path, labels)
    for root in (tmp_path, tmp_path / "VOCdevkit" / "VOC2010"):
        samples = read_context(root, "val")
        assert [s.key for s in samples] == list(labels)
        assert all(np.array_equal(s.load_label(), labels[s.key]) for s in samples)


def test_label_png_must_not_be_rgb(tmp_path):
    labels = {"a": label_map(0, (1,))}
    base = make_voc(tmp_path, labels)
    from PIL import Image

    Image.new("RGB", (64, 48)).save(base / "SegmentationClass" / "a.png")
    with pytest.raises(DatasetError, match="mode RGB"):
        read_voc(tmp_path, "val")[0].load_label()


def test_refcoco_reader(tmp_path):
    data, expected = make_refcoco(tmp_path)
    for root in (tmp_path, data):
        samples = read_refcoco(root, "val")
        assert [s.key for s in samples] == list(expected)
        for sample in samples:
            sentences, mask = expected[sample.key]
            assert sample.sentences == sentences
            assert sample.image_path.is_file()
            assert np.array_equal(sample.load_mask(), mask)
    assert [s.key for s in read_refcoco(tmp_path, "testA")] == ["9"]
    with pytest.raises(DatasetError, match="testA, train|testA, val"):
        read_refcoco(tmp_path, "testB")


def test_class_name_tables():
    assert len(classnames.VOC_QUERIES) == 20 and len(classnames.VOC_LABELS) == 21
    assert len(classnames.COCO_OBJECT_QUERIES) == 80 and len(classnames.COCO_OBJECT_LABELS) == 81
    assert len(classnames.CONTEXT_QUERIES) == 59 and len(classnames.CONTEXT_LABELS) == 60
    assert len(classnames.CONTEXT_STUFF_QUERIES) == 21 and len(classnames.CONTEXT_THING_QUERIES) == 38
    assert set(classnames.CONTEXT_STUFF_QUERIES) < set(classnames.CONTEXT_QUERIES)
    for name in ("bird avian", "tvmonitor screen", "person with clothes,people,human"):
        assert name in classnames.VOC_QUERIES
    for name in ("backpack,bag", "umbrella,parasol", "handbag,purse", "sknowboard", "dessertspoon",
                 "hairdrier,blowdrier"):
        assert name in classnames.COCO_OBJECT_QUERIES


def test_context_passes_cover_every_class_once():
    passes = BENCHMARKS["context"].passes
    ids = [i for p in passes for i in p.label_ids]
    assert sorted(ids) == list(range(1, 60))
    stuff, things = passes
    assert stuff.background == things.queries  # the stuff pass uses the thing names as background words
    assert things.background is None
    for query_pass in passes:
        for query, label in zip(query_pass.queries, query_pass.label_ids, strict=True):
            assert classnames.CONTEXT_QUERIES[label - 1] == query
