"""Which project a piece of state belongs to: Label Studio's project id is not enough.

Label Studio numbers projects from 1 in each database. A Label Studio whose database was reset, or a second
Label Studio served from the same Redis, reuses the same ids; calibrations, mask heads, delivery claims and
outboxes keyed by the id alone would carry over between them. A `ProjectId` adds the Label Studio instance
(a digest of the origin this backend talks to, `LABEL_STUDIO_URL`) and the project's creation stamp, which
Label Studio sends with the id on the wire (`"<id>.<int(created_at.timestamp())>"`, protocol spec §1) and
returns as `created_at` from its API and in webhook payloads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

NO_INSTANCE = "local"  # LABEL_STUDIO_URL unset: the only Label Studio this backend hears from
MAX_ID = 2**63 - 1


def instance_of(label_studio_url: str) -> str:
    """12 hex digits naming a Label Studio by its origin (scheme, host, port; path and case ignored);
    NO_INSTANCE for an empty URL."""
    if not label_studio_url:
        return NO_INSTANCE
    parts = urlsplit(label_studio_url.strip())
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    origin = f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"
    return hashlib.sha256(origin.encode()).hexdigest()[:12]


@dataclass(frozen=True, order=True)
class ProjectId:
    """One project of one Label Studio: `instance` (instance_of its URL), `id` (Label Studio's integer id)
    and `created` (unix seconds of its creation; None when the caller did not say)."""

    instance: str
    id: int
    created: int | None = None

    @property
    def key(self) -> str:
        """The project's part of Redis keys: `<instance>.<id>.<created or ->`."""
        return f"{self.instance}.{self.id}.{'-' if self.created is None else self.created}"

    def __str__(self) -> str:
        return str(self.id)  # what people and Label Studio call it

    @classmethod
    def from_key(cls, key: str) -> ProjectId:
        """The inverse of `key`; ValueError for anything else."""
        instance, pid, created = key.split(".")
        return cls(instance, _id(pid), None if created == "-" else int(created))

    @classmethod
    def from_wire(cls, raw: Any, instance: str) -> ProjectId | None:
        """From /setup's or /predict's `project` ("<id>.<created>", or a bare id); None when it names no
        project (missing, empty, not an integer id)."""
        if raw is None or isinstance(raw, bool):
            return None
        pid, _, created = str(raw).strip().partition(".")
        try:
            return cls(instance, _id(pid), int(created) if created.isdigit() else None)
        except ValueError:
            return None

    @classmethod
    def from_api(cls, project: dict, instance: str) -> ProjectId | None:
        """From a project object of Label Studio's API or a webhook payload (`id`, `created_at` ISO 8601); the
        stamp is computed the way Label Studio computes the wire form. None without an integer id."""
        raw = project.get("id")
        if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= MAX_ID:
            return None
        return cls(instance, raw, created_stamp(project.get("created_at")))


def created_stamp(created_at: Any) -> int | None:
    """`int(created_at.timestamp())` of an ISO 8601 time ("2026-12-06T04:53:26.123456Z"); None when absent or
    unreadable."""
    if not isinstance(created_at, str) or not created_at:
        return None
    try:
        moment = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(moment.timestamp()) if moment.tzinfo is not None else None


def _id(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_ID:
        raise ValueError(f"not a project id: {text[:40]!r}")
    return int(text)
