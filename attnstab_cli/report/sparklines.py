"""Unicode sparklines (``▁▂▃▄▅▆▇█``) for metric series over training steps (``attnstab track``).

A series is a list of floats in step order; ``None``, NaN and ±inf are gaps and render as a blank, so a metric that a
checkpoint lacks never pretends to be a minimum. By default the bars span the series' own finite range (min-max); a
fixed ``lo``/``hi`` puts several series on one scale (θ on [0, 1], THEORY §2.1), where min-max scaling would blow a
change in the fifth decimal up to full height. A series whose range is zero (up to float rounding) is drawn at
mid height. Longer series than ``width`` are cut into ``width`` consecutive bins of nearly equal size, each drawn at
the mean of its finite values.
"""
from __future__ import annotations

import math
from typing import Sequence

BARS = "▁▂▃▄▅▆▇█"
GAP = " "
FLAT = BARS[3]                 # a constant series: mid height, neither "low" nor "high"
REL_FLAT = 1e-12               # ranges below this fraction of the magnitude are float noise


def clean_values(values: Sequence[float | None]) -> list[float | None]:
    """``values`` as floats, with ``None``, NaN and ±inf turned into ``None`` (a gap)."""
    out: list[float | None] = []
    for v in values:
        x = None if v is None else float(v)
        out.append(x if x is not None and math.isfinite(x) else None)
    return out


def resample_values(values: Sequence[float | None], width: int) -> list[float | None]:
    """At most ``width`` points: bin ``i`` covers ``values[i*n//width:(i+1)*n//width]`` and takes the mean of its
    finite values (``None`` when it has none). Series no longer than ``width`` come back unchanged."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    vals = clean_values(values)
    n = len(vals)
    if n <= width:
        return vals
    bins: list[float | None] = []
    for i in range(width):
        chunk = [v for v in vals[i * n // width:(i + 1) * n // width] if v is not None]
        bins.append(sum(chunk) / len(chunk) if chunk else None)
    return bins


def render_sparkline(values: Sequence[float | None], width: int | None = None, lo: float | None = None,
                     hi: float | None = None) -> str:
    """One character per value (per bin when longer than ``width``): ``▁`` at ``lo``, ``█`` at ``hi``.

    ``lo``/``hi`` default to the finite minimum/maximum of the series; values outside a fixed scale are clipped to
    its ends. Gaps (None, NaN, ±inf) are blanks; an empty series is an empty string.
    """
    vals = clean_values(values) if width is None else resample_values(values, width)
    finite = [v for v in vals if v is not None]
    if not finite:
        return GAP * len(vals)
    lo = min(finite) if lo is None else float(lo)
    hi = max(finite) if hi is None else float(hi)
    if hi - lo <= REL_FLAT * max(abs(lo), abs(hi)) or hi < lo:
        return "".join(GAP if v is None else FLAT for v in vals)
    top = len(BARS) - 1
    return "".join(GAP if v is None else BARS[min(top, max(0, round((v - lo) / (hi - lo) * top)))] for v in vals)


__all__ = ["BARS", "clean_values", "render_sparkline", "resample_values"]
