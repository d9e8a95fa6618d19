"""The one message for a calibration set with fewer sequences than asked for (a text too short for ``--batches`` x
``--batch-size`` windows of ``--seq-len`` tokens), shown on stderr and in every view of the summary."""
from __future__ import annotations


def describe_shortfall(source: str, scanned: int, requested: int | None, seq_len: int) -> str | None:
    """None when ``scanned`` reaches ``requested`` (or nothing was asked: a token file is used as given)."""
    if requested is None or scanned >= requested:
        return None
    return (f"calibration cut short: {source} gives {scanned} of the {requested} sequences of {seq_len} tokens asked "
            f"for, so the scan saw {scanned * seq_len} tokens; give more text or lower --seq-len")


__all__ = ["describe_shortfall"]
