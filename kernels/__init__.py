"""Triton kernels for attnstab (installed as `attnstab_kernels`).

Importing the package never imports triton (a Linux-only dependency): `attn_row_stats` is loaded on first attribute
access (PEP 562), so callers can import the package anywhere and fall back to the torch reference.
"""
from __future__ import annotations

from typing import Any

__all__ = ["attn_row_stats"]


def __getattr__(name: str) -> Any:
    if name == "attn_row_stats":
        from .row_stats import attn_row_stats

        return attn_row_stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
