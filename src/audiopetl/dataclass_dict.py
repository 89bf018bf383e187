"""Typed config dataclasses from plain dicts (YAML, JSON, file metadata), refusing unknown keys.

A misspelt option must fail at start-up with the list of valid names, never be dropped
silently or surface as a bare ``TypeError`` from ``__init__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], values: Mapping[str, Any], what: str | None = None) -> T:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__ + ' keys'} {unknown}; valid keys: {valid}")
    return cls(**values)
