"""Scans that are compared must see the same tokens. Two questions, answered here for ``compare``, ``gate
--baseline`` and ``track``: which tokens a checkpoint is scanned on so that it compares with a reference report
(:func:`tokens_for`), and whether two scans saw the same ones (:func:`check_same_tokens`).
"""
from __future__ import annotations

from typing import Any, Mapping

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.errors import UsageError
from attnstab_cli.report.read import Report, load_calibration


def tokens_for(reference: Report | None, explicit_flags: bool = False, what: str = "the checkpoint",
               reference_name: str = "the reference") -> tuple[CalibrationSet | None, str | None]:
    """The tokens to scan ``what`` on so it compares with ``reference``: the reference's own (``tokens.npy``),
    unless calibration flags were given explicitly or the reference has none. None means "build them from the scan
    flags". Returns them and a note saying which, or no note when there is no calibrated reference."""
    if reference is None or reference.manifest.get("calibration") is None:
        return None, None
    if explicit_flags:
        return None, f"calibration flags given: {what} is scanned on them, not on {reference_name}'s tokens"
    if reference.tokens is None:
        return None, f"{reference_name} kept no tokens.npy: {what} is scanned on the scan flags' tokens"
    return load_calibration(reference), f"{what} is scanned on {reference_name}'s calibration tokens"


def same_tokens(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two manifests' ``calibration`` sections name the same token ids (both calibrated)."""
    return a is not None and b is not None and a.get("token_sha256") == b.get("token_sha256")


def check_same_tokens(a: Report, b: Report, allow_different: bool, names: str = "the reports",
                      consequence: str = "deltas mix model and data changes") -> list[str]:
    """Refuse two calibrated scans of different tokens unless ``allow_different`` (then a note says what that
    means); weights-only reports are the caller's question. Returns the notes."""
    ca, cb = a.manifest.get("calibration"), b.manifest.get("calibration")
    if ca is None or cb is None or same_tokens(ca, cb):
        return []
    if not allow_different:
        raise UsageError(f"{names} were scanned on different calibration tokens "
                         f"({str(ca.get('token_sha256'))[:12]} vs {str(cb.get('token_sha256'))[:12]}): {consequence}",
                         hint="rescan on the same tokens (the same --tokens), or pass --allow-different-calibration")
    return [f"calibration tokens differ (--allow-different-calibration): {consequence}"]
