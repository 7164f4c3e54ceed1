"""JSON-ready forms of the pipeline's dataclasses: what goes into Redis instead of pickles.

`to_plain(obj)` turns a dataclass (nested dataclasses, tuples, dicts, None, numbers, strings) into dicts,
lists and scalars; `from_plain(cls, data)` rebuilds it from its type annotations, tuples included, so that a
round trip gives an equal object (and an equal `JobSpec.key`). Only what the annotations declare is read:
unknown fields are ignored, missing ones take their defaults, and a value of the wrong shape raises
PlainError (a CarError, not retryable) naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

from car_backend.engine.errors import CarError

T = TypeVar("T")


class PlainError(CarError):
    """Stored data does not fit the dataclass it is read into."""


def to_plain(obj: Any) -> Any:
    """dataclass -> dict, tuple/list -> list, dict -> dict (string keys); other values as they are."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(cls: type[T], data: Any) -> T:
    """Rebuild a `cls` (a dataclass) from `to_plain`'s output."""
    return _build(cls, data, cls.__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(kind: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, data, where)
            except PlainError as exc:
                errors.append(str(exc))
        raise PlainError(f"{where}: {data!r:.80} fits none of {kind}")
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise PlainError(f"{where}: expected an object for {kind.__name__}, got {type(data).__name__}")
        hints = _hints(kind)
        values = {f.name: _build(hints[f.name], data[f.name], f"{where}.{f.name}")
                  for f in dataclasses.fields(kind) if f.init and f.name in data}
        try:
            return kind(**values)
        except TypeError as exc:
            raise PlainError(f"{where}: {exc}") from None
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(data, list | tuple):
            raise PlainError(f"{where}: expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise PlainError(f"{where}: expected {len(args)} items, got {len(data)}")
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True)))
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        if not isinstance(data, list):
            raise PlainError(f"{where}: expected a list, got {type(data).__name__}")
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        _, value = typing.get_args(kind) or (str, Any)
        if not isinstance(data, dict):
            raise PlainError(f"{where}: expected an object, got {type(data).__name__}")
        return {k: _build(value, v, f"{where}[{k!r}]") for k, v in data.items()}
    if kind in (dict, list):  # unparameterised: JSON values taken as they are (e.g. Label Studio regions)
        if not isinstance(data, kind):
            raise PlainError(f"{where}: expected {'an object' if kind is dict else 'a list'}, got {type(data).__name__}")
        return data
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise PlainError(f"{where}: expected a number, got {data!r:.40}")
        return data  # an int stays an int: JSON keeps 2 and 2.0 apart, and so does JobSpec.key
    if kind in (int, str, bool):
        if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
            raise PlainError(f"{where}: expected {kind.__name__}, got {data!r:.40}")
        return data
    raise PlainError(f"{where}: cannot read values of type {kind}")
