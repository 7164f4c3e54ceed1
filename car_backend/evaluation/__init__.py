"""Evaluation harness: dataset readers, the paper's metrics, a resumable runner and `car-backend eval`.

Modules: `classnames` (the paper's query strings), `datasets` (standard layouts), `masks` (COCO polygons and
RLE), `benchmarks` (preset, classes and paper figures per dataset), `metrics`, `cache` (per-image predictions
on disk), `runner` (`evaluate`), `report` (table and JSON), `cli`.
"""
