"""What ships: the wheel and the Docker image carry the product, never the harness of tests and benchmarks
(car_backend/testing), which the source checkout keeps for them."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = "car_backend/testing"


def build_wheel(tmp_path: Path) -> list[str]:
    """The member names of the wheel built from a copy of the checkout (a build in the checkout itself
    would leave build/ behind, whose stale files a later build would pack)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "car_backend", source / "car_backend",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("car_backend-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_wheel_has_the_product_and_not_the_test_harness(tmp_path):
    names = build_wheel(tmp_path)
    assert [n for n in names if n.startswith(HARNESS + "/")] == []
    assert "car_backend/cli.py" in names
    assert "car_backend/worker/process.py" in names
    assert "car_backend/engine/__init__.py" in names
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)


def dockerignore_patterns() -> list[str]:
    """The patterns of .dockerignore, in order (comments and blank lines dropped, "/" trimmed at both ends
    as Docker does)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the build context) out of the context: the last pattern
    matching it or one of its parent folders decides, a "!" pattern re-including. Covers the forms used
    here: plain paths, `*` globs and a leading `**/`."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append("*/" + pattern[3:])
            candidates.append(pattern[3:])
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates):
            excluded = not negated
    return excluded


def copied_sources() -> list[str]:
    """The sources of docker/Dockerfile's COPY lines (the only way files of the checkout enter the image)."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    sources = []
    for line in dockerfile.splitlines():
        match = re.match(r"\s*COPY\s+(?!--from)(.+)$", line)
        if match:
            sources.extend(match.group(1).split()[:-1])
    return sources


def test_the_docker_context_leaves_the_test_harness_out():
    patterns = dockerignore_patterns()
    harness = [p.relative_to(ROOT).as_posix() for p in (ROOT / HARNESS).rglob("*") if p.is_file()]
    assert harness and all(ignored(path, patterns) for path in harness)
    assert ignored(HARNESS, patterns)
    assert ignored("tests/conftest.py", patterns) and ignored(".git/HEAD", patterns)


def test_the_docker_context_keeps_what_the_dockerfile_copies():
    patterns = dockerignore_patterns()
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "car_backend", "label_config", "docker/healthcheck.py"} <= set(sources)
    assert [s for s in sources if ignored(s, patterns)] == []
    product = [p.relative_to(ROOT).as_posix() for p in (ROOT / "car_backend").rglob("*.py")]
    assert [p for p in product if ignored(p, patterns) and not p.startswith(HARNESS + "/")] == []
    assert not ignored("car_backend/worker/process.py", patterns)
