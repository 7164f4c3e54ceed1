"""Every Redis key car-backend writes is declared once, by its owner, and documented.

`car_backend.queue.keys.FAMILIES` collects each `KeyFamily` the owner classes declare; docs/architecture.md's
key table (section 4) must list exactly those templates with the same owner and lifetime, and no module
(product, tests, benchmarks) may build a `car:` key any other way than through a KeyFamily.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import car_backend
from car_backend.queue.keys import FAMILIES, KeyFamily

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\| `(car:[^`]+)` \| `([A-Za-z]+)` \| .* \| ([^|]+) \|$")


def all_families() -> dict[str, KeyFamily]:
    """FAMILIES once every car_backend module is imported (declaring a family registers it)."""
    for module in pkgutil.walk_packages(car_backend.__path__, "car_backend."):
        importlib.import_module(module.name)
    return dict(FAMILIES)


def documented() -> dict[str, tuple[str, str]]:
    """Template -> (owner, lifetime) of each row of the key table in docs/architecture.md."""
    text = DOCS.read_text()
    section = text[text.index("## 4. Redis keys"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line.strip())
        if match:
            template, owner, lifetime = match.groups()
            assert template not in rows, f"{template} is documented twice"
            rows[template] = (owner, lifetime.strip())
    return rows


def mismatches(families: dict[str, KeyFamily], rows: dict[str, tuple[str, str]]) -> list[str]:
    problems = [f"{t}: declared by {f.owner} but not in docs/architecture.md's key table"
                for t, f in families.items() if t not in rows]
    problems += [f"{t}: documented but declared by no KeyFamily" for t in rows if t not in families]
    for template, family in families.items():
        if template in rows and rows[template] != (family.owner, family.lifetime):
            problems.append(f"{template}: the docs say {rows[template]}, the code ({family.owner!r}, "
                            f"{family.lifetime!r})")
    return problems


def test_the_key_table_lists_every_key_family_with_its_owner_and_lifetime():
    assert mismatches(all_families(), documented()) == []


def test_a_key_added_without_documenting_it_is_caught():
    families = all_families()
    extra = object.__new__(KeyFamily)  # not registered: the real FAMILIES stays as it is
    object.__setattr__(extra, "template", "car:brand-new:<x>")
    object.__setattr__(extra, "owner", "Somebody")
    object.__setattr__(extra, "lifetime", "forever")
    problems = mismatches({**families, extra.template: extra}, documented())
    assert problems == ["car:brand-new:<x>: declared by Somebody but not in docs/architecture.md's key table"]


def test_a_family_builds_its_keys_and_refuses_a_wrong_number_of_parts():
    family = FAMILIES["car:review:<p>:corrections"]
    assert family.key("abc.3.-") == "car:review:abc.3.-:corrections"
    assert family.pattern() == "car:review:*:corrections"
    try:
        family.key()
    except ValueError as exc:
        assert "takes 1 parts" in str(exc)
    else:
        raise AssertionError("a key without its part was built")


def _key_literals(path: Path, root: Path = ROOT) -> list[str]:
    """`car:` string constants and f-strings of a source file that are not the template of a KeyFamily
    declaration (docstrings aside)."""
    tree = ast.parse(path.read_text())
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "KeyFamily" and node.args:
            allowed.add(id(node.args[0]))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                allowed.add(id(first.value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and str(head.value).startswith("car:"):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
            allowed.update(id(v) for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed \
                and re.match(r"car:[a-z]", node.value):
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_key_is_built_outside_its_family():
    sources = [*ROOT.joinpath("car_backend").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"),
               *ROOT.joinpath("benchmarks").glob("*.py")]
    found = [hit for path in sources if path != Path(__file__).resolve() for hit in _key_literals(path)]
    assert found == [], "build these keys with the KeyFamily that owns them: " + ", ".join(found)


def test_a_literal_key_is_caught(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""car:stats in a docstring is prose."""\nKEY = f"car:tasks:{1}"\nOTHER = "car:stats"\n'
                     'FAMILY = KeyFamily("car:own:<x>", "Owner", "forever")\n')
    assert _key_literals(probe, tmp_path) == ["probe.py:2", "probe.py:3"]
