"""The layering of car_backend, read from every module's imports (ast), function-level imports included.

Order (a package may import only packages on lower floors; packages on one floor never import each other):

    floor 0: engine            CaR only; EngineConfig and the error vocabulary
    floor 1: labelstudio       Label Studio formats, media, REST client
             settings          the environment -> Settings and the engine's config
    floor 2: pipeline          job specs, planning, computing, versions
             evaluation        the paper's benchmarks
             exports           COCO / PNG / YOLO / Label Studio exports, the review gallery
    floor 3: queue             Redis and RQ: key owners, results, delivery ledger, job queue, delivery
    floor 4: review            webhook events, corrections, calibration, mask-head training, review store
    floor 5: service           Flask app, predictor, projects, metrics, server (waitress), prelabel, embedded worker
             worker            the worker process: its context (composition root), RQ entry points
    floor 6: cli, bench        entry points
             testing           the harness of tests and benchmarks (fake Label Studio, Redis, workers)

The root package (`car_backend/__init__.py`, the version) imports nothing and may be imported by anyone.
Nothing outside car_backend.testing imports it (the product never needs it), and the benchmarks import
nothing from the tests tree.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "car_backend"
BENCHMARKS = PACKAGE.parent / "benchmarks"

FLOORS = {
    "engine": 0,
    "labelstudio": 1, "settings": 1,
    "pipeline": 2, "evaluation": 2, "exports": 2,
    "queue": 3,
    "review": 4,
    "service": 5, "worker": 5,
    "cli": 6, "bench": 6, "testing": 6,
}
MAX_FLOORS = 7


def layer_of(module: str) -> str | None:
    """`car_backend.queue.ledger` -> "queue"; the root package -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Every car_backend module `path` (the module `module`, by default the one at that path in the package)
    imports, at any depth of the file: functions and TYPE_CHECKING blocks count too."""
    module = module or module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("car_backend"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("car_backend"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
    found.discard(module)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against FLOORS, as "importer -> imported" lines."""
    wrong = []
    for module, targets in graph.items():
        own = layer_of(module)
        if own is None:
            wrong.extend(f"{module} -> {t} (the root package imports nothing)" for t in targets)
            continue
        for target in sorted(targets):
            other = layer_of(target)
            if other is None or other == own:
                continue
            if own not in FLOORS or other not in FLOORS:
                wrong.append(f"{module} -> {target} (a layer missing from FLOORS)")
            elif FLOORS[other] >= FLOORS[own]:
                wrong.append(f"{module} -> {target} ({own} is on floor {FLOORS[own]}, {other} on {FLOORS[other]})")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level import cycles (each as a path that comes back to its start)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def floor_count(graph: dict[str, set[str]]) -> int:
    """The longest chain of imports between layers (packages and top-level modules), counted in layers."""
    layers: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        own = layer_of(module) or "<root>"
        layers[own].update((layer_of(t) or "<root>") for t in targets)
        layers[own].discard(own)
    depth: dict[str, int] = {}

    def floors(layer: str, seen: frozenset) -> int:
        if layer in depth:
            return depth[layer]
        below = [floors(x, seen | {layer}) for x in layers.get(layer, ()) if x not in seen]
        depth[layer] = 1 + max(below, default=0)
        return depth[layer]

    return max(floors(layer, frozenset()) for layer in layers)


def test_every_import_follows_the_layer_order():
    assert violations(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_at_most_seven_floors():
    assert floor_count(import_graph()) <= MAX_FLOORS


def harness_importers(graph: dict[str, set[str]]) -> list[str]:
    """Modules outside car_backend.testing that import it, as "importer -> imported" lines."""
    return [f"{module} -> {target}" for module, targets in graph.items() if layer_of(module) != "testing"
            for target in sorted(targets) if layer_of(target) == "testing"]


def top_level_imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in `path`, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_harness_imports_the_harness():
    assert harness_importers(import_graph()) == []


def test_an_import_of_the_harness_is_caught():
    graph = import_graph()
    graph["car_backend.cli"] = graph["car_backend.cli"] | {"car_backend.testing.fake_label_studio"}
    assert harness_importers(graph) == ["car_backend.cli -> car_backend.testing.fake_label_studio"]


def test_benchmarks_import_nothing_from_the_tests():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts
    assert [p.name for p in scripts if "tests" in top_level_imports(p)] == []


def test_every_layer_is_listed():
    layers = {layer_of(m) for m in import_graph()} - {None}
    assert layers <= set(FLOORS), f"add {sorted(layers - set(FLOORS))} to FLOORS and the docstring"


@pytest.mark.parametrize("importer, imported", [
    ("car_backend.engine.segmenter", "car_backend.service.app"),
    ("car_backend.engine.models", "car_backend.settings"),
    ("car_backend.labelstudio.media", "car_backend.settings"),
    ("car_backend.queue.ledger", "car_backend.review.store"),
    ("car_backend.review.corrections", "car_backend.worker.context"),
    ("car_backend.worker.tasks", "car_backend.service.backend"),
])
def test_an_import_against_the_order_is_caught(importer, imported):
    graph = import_graph()
    graph[importer] = graph[importer] | {imported}
    assert any(line.startswith(f"{importer} -> {imported}") for line in violations(graph))


def test_a_cycle_is_caught():
    graph = import_graph()
    graph["car_backend.queue.results"] = graph["car_backend.queue.results"] | {"car_backend.queue.jobqueue"}
    assert cycles(graph)


def test_an_engine_module_importing_the_service_is_caught_from_its_source(tmp_path):
    source = (PACKAGE / "engine" / "result.py").read_text()
    edited = tmp_path / "result.py"
    edited.write_text(source + "\n\ndef late():\n    from car_backend.service.app import create_app\n")
    graph = {"car_backend.engine.result": imports_of(edited, "car_backend.engine.result")}
    assert violations(graph) == ["car_backend.engine.result -> car_backend.service.app "
                                 "(engine is on floor 0, service on 5)"]
