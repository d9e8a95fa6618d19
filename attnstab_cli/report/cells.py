"""One cell of any report view: a null ("not applicable", STYLE.md "Reports") is an em dash, in every format."""
from __future__ import annotations

from typing import Any

MISSING = "—"


def format_value(x: Any, spec: str = ".4g") -> str:
    """:data:`MISSING` for None, else ``x`` formatted with ``spec``."""
    return MISSING if x is None else format(x, spec)


__all__ = ["MISSING", "format_value"]
