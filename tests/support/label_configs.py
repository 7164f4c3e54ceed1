"""The label configs shipped in <repo>/label_config."""

from __future__ import annotations

from pathlib import Path

LABEL_CONFIGS = Path(__file__).resolve().parents[2] / "label_config"


def label_config(name: str) -> str:
    """The text of label_config/<name>.xml."""
    return (LABEL_CONFIGS / f"{name}.xml").read_text()


def read_config(name: str) -> str:
    """The text of label_config/<name> (the file name, with its extension)."""
    return (LABEL_CONFIGS / name).read_text()
