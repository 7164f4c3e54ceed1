"""Every Redis key car-backend writes besides RQ's: one `KeyFamily` per kind of key, declared by the class
that owns it (`OWNER.FAMILY.key(...)`, the way rq's `Job.key_for` builds a job's key).

A family names its template (`car:result:<K>`: each `<...>` is one part given to `key`), its owner class and
its lifetime in words. Declaring a family registers it in `FAMILIES`; docs/architecture.md's key table lists
the same templates (tests/test_keys.py compares them, and fails on a `car:` key built anywhere else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PREFIX = "car"
PROJECT_TTL_S = 90 * 24 * 3600  # per-project state (parameters, review, heads) after its last write

FAMILIES: dict[str, KeyFamily] = {}
_PLACEHOLDER = re.compile(r"<[^>]+>")


@dataclass(frozen=True)
class KeyFamily:
    """One kind of key: `template` (e.g. "car:late:<K>"), the `owner` class's name, and `lifetime` (how long
    a key lives, in words, as the docs table says it)."""

    template: str
    owner: str
    lifetime: str
    _parts: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.template.startswith(f"{PREFIX}:"):
            raise ValueError(f"a car-backend key starts with {PREFIX}: ({self.template})")
        if self.template in FAMILIES:
            raise ValueError(f"key family {self.template} is declared twice")
        object.__setattr__(self, "_parts", len(_PLACEHOLDER.findall(self.template)))
        FAMILIES[self.template] = self

    def key(self, *parts: object) -> str:
        """The key with each placeholder replaced by one of `parts`, in order; ValueError for a wrong count."""
        if len(parts) != self._parts:
            raise ValueError(f"{self.template} takes {self._parts} parts, not {len(parts)}")
        values = iter(str(p) for p in parts)
        return _PLACEHOLDER.sub(lambda _: next(values), self.template)

    def pattern(self) -> str:
        """A SCAN/KEYS pattern matching every key of the family."""
        return _PLACEHOLDER.sub("*", self.template)
