"""Strict JSON parsing of untrusted files with a nesting cap checked before ``json.loads``.

``json.loads`` recurses once per nesting level and raises ``RecursionError`` on deep input; it also accepts
``NaN``/``Infinity`` and silently keeps the last of duplicate keys. :func:`loads_strict` refuses all three, so a file
that parses here means one thing. The depth is counted on the text with strings removed, so brackets inside names
do not count.
"""
from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_CHUNK = 1 << 20


class JsonRefused(ValueError):
    """The text is not strict JSON within the nesting cap; the message says why."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (0 for a scalar), brackets inside strings excluded."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    steps = _STEP[np.frombuffer(brackets, dtype=np.uint8)]
    level = deepest = 0
    for i in range(0, steps.size, _CHUNK):
        running = np.cumsum(steps[i:i + _CHUNK], dtype=np.int64) + level
        deepest, level = max(deepest, int(running.max())), int(running[-1])
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonRefused(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not JSON")


def loads_strict(text: str, max_depth: int = MAX_DEPTH, *, constants: bool = False) -> Any:
    """Parse ``text``; :class:`JsonRefused` for nesting deeper than ``max_depth``, duplicate keys, ``NaN`` or
    ``Infinity`` (unless ``constants``: Python's own ``json.dumps`` writes them, e.g. into configs), and for any
    syntax error (with ``json``'s position)."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonRefused(f"nested {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=None if constants else _no_constant)
    except JsonRefused:
        raise
    except (ValueError, RecursionError) as exc:   # JSONDecodeError, and ValueError for ints over 4300 digits
        raise JsonRefused(str(exc)) from None


__all__ = ["MAX_DEPTH", "JsonRefused", "loads_strict", "nesting_depth"]
