"""Headless Chromium (Debian's `chromium`): the DOM of a page after its scripts ran, and screenshots."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                  "--virtual-time-budget=10000"]
TIMEOUT_S = 120


def chromium() -> str:
    """The chromium binary; the test is skipped where none is installed (.ci/run installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=True)


def dump_dom(url: str) -> str:
    """The page's DOM as HTML after its scripts ran (file:// URLs open from disk)."""
    return _run(["--dump-dom", url]).stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1280, 1000)) -> Path:
    _run([f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url])
    assert path.is_file() and path.stat().st_size > 0
    return path


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    classes: set[str]
    text: str = ""
    children: list[Element] = field(default_factory=list)


class _Tree(HTMLParser):
    VOID = {"img", "br", "meta", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.root = Element("root", {}, set())
        self.stack = [self.root]
        self.all: list[Element] = []

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        element = Element(tag, attrs, set(attrs.get("class", "").split()))
        self.stack[-1].children.append(element)
        self.all.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        for element in self.stack[1:]:
            element.text += data


def parse(html: str) -> list[Element]:
    """Every element of the document, in document order."""
    tree = _Tree()
    tree.feed(html)
    return tree.all


def by_class(elements: list[Element], cls: str, tag: str | None = None) -> list[Element]:
    return [e for e in elements if cls in e.classes and (tag is None or e.tag == tag)]


def descendants(element: Element) -> list[Element]:
    out = []
    for child in element.children:
        out.append(child)
        out.extend(descendants(child))
    return out
