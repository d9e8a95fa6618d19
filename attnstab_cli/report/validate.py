"""Checks that a report directory holds one scan: the manifest's fields have the types its readers rely on, and each
table carries the manifest's identity, the schema's column types and row keys inside the manifest's shape.

A table copied in from another report differs in its stored identity (the Parquet file metadata: schema version,
table name, checkpoint fingerprint, family, calibration token hash); a mismatch is bad input (exit 2), with the file
named. Rows missing from a consistent report are a scan that did not complete, left to the gate (exit 3).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from attnstab_cli.errors import InputError
from attnstab_cli.report.cells import MISSING
from attnstab_cli.report.schema import ALL_TABLES

Check = tuple[str, Callable[[Any], bool]]          # (what the value must be, in words; the test)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _count(x: Any) -> bool:
    return _integer(x) and x >= 1


def _natural(x: Any) -> bool:
    return _integer(x) and x >= 0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text(x: Any) -> bool:
    return isinstance(x, str)


def _maybe(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


COUNT, NATURAL, NUMBER, TEXT = ("a positive integer", _count), ("a non-negative integer", _natural), \
    ("a finite number", _number), ("a string", _text)
# Manifest fields and what each must be when present (a field left out shows as an em dash; a table's stored
# identity must then be absent too).
CHECKPOINT_FIELDS: dict[str, Check] = {
    "checkpoint": TEXT, "family": TEXT, "n_layers": COUNT, "d_model": COUNT, "n_heads": COUNT, "n_kv_heads": COUNT,
    "head_dim": COUNT, "norm": TEXT, "placement": TEXT, "fingerprint": ("a string or null", _maybe(_text)),
    "attn_input_normalized": ("true or false", lambda x: isinstance(x, bool)),
    "n_experts": ("a positive integer or null", _maybe(_count)),
}
CALIBRATION_FIELDS: dict[str, Check] = {
    "source": TEXT, "token_sha256": TEXT, "n_sequences": COUNT,
    "n_sequences_requested": ("a positive integer or null", _maybe(_count)), "seq_len": COUNT,
    "n_tokens": COUNT, "seed": ("an integer or null", _maybe(_integer)),
    "source_sha256": ("a string or null", _maybe(_text)),
    "batch_sizes": ("a list of positive integers", lambda x: isinstance(x, list) and all(_count(b) for b in x)),
}
RUN_FIELDS: dict[str, Check] = {"device": TEXT, "dtype": TEXT, "theta": ("an object", lambda x: isinstance(x, dict))}
THETA_FIELDS: dict[str, Check] = {"tol": NUMBER, "slack": NUMBER, "min_keys": COUNT, "refined_rows": NATURAL,
                                  "unrefined_rows": NATURAL}
ROW_KEYS = {"layers": ("layer",), "heads": ("layer", "head"), "model": (), "curvature": ("layer", "block"),
            "experts": ("layer", "expert")}


def check_manifest(manifest: dict[str, Any], file: Path) -> None:
    """Every field the readers use has its documented type (:data:`CHECKPOINT_FIELDS` and friends)."""
    tool = manifest.get("tool", {})
    if not isinstance(tool, dict) or not isinstance(tool.get("version", ""), str):
        raise InputError("tool must be an object with a string version", path=file)
    section = _section(manifest, "checkpoint", file, required=True)
    _fields(section, "checkpoint", CHECKPOINT_FIELDS, file)
    calibration = _section(manifest, "calibration", file, required=False)
    if calibration is not None:
        _fields(calibration, "calibration", CALIBRATION_FIELDS, file)
        sizes = calibration.get("batch_sizes")
        if sizes is not None and "n_sequences" in calibration and sum(sizes) != calibration["n_sequences"]:
            raise InputError(f"calibration.batch_sizes {sizes} do not add up to n_sequences "
                             f"{calibration['n_sequences']}", path=file)
    run = _section(manifest, "run", file, required=False)
    if run is not None:
        _fields(run, "run", RUN_FIELDS, file)
        if run.get("theta") is not None:
            _fields(run["theta"], "run.theta", THETA_FIELDS, file)


def _section(manifest: dict[str, Any], name: str, file: Path, required: bool) -> dict[str, Any] | None:
    value = manifest.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise InputError(f"{name} must be an object, got {_show(value)}", path=file)
    return value


def _fields(section: dict[str, Any], prefix: str, fields: dict[str, Check], file: Path) -> None:
    for key, (expected, ok) in fields.items():
        if key in section and not ok(section[key]):
            raise InputError(f"{prefix}.{key} must be {expected}, got {_show(section[key])}", path=file)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------------------------------------- tables

def table_identity(manifest: dict[str, Any]) -> dict[str, str]:
    """What every table file of this manifest's report stores in its metadata (``report/write.py``): the checkpoint
    fingerprint, family and calibration token hash ("" where the manifest has none)."""
    ck, cal = manifest.get("checkpoint") or {}, manifest.get("calibration") or {}
    return {"checkpoint_fingerprint": str(ck.get("fingerprint") or ""), "family": str(ck.get("family") or ""),
            "calibration_token_sha256": str(cal.get("token_sha256") or "")}


def check_table_identity(table: pa.Table, name: str, manifest: dict[str, Any], path: Path) -> None:
    """The table is ``name`` of this manifest's scan (schema version 2 on; version 1 files store no identity)."""
    meta = {k.decode(): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()
            if k != b"ARROW:schema"}
    stored = meta.get("table")
    if stored is not None and stored != name:
        raise InputError(f"holds the {stored} table, not {name}", path=path)
    if str(manifest.get("schema_version")) == "1":
        return
    for key, expected in table_identity(manifest).items():
        found = meta.get(key, "")
        if found != expected:
            what = key.replace("_", " ")
            raise InputError(f"{what} {_short(found)} disagrees with manifest.json ({_short(expected)}): the table "
                             "is from another scan", path=path)


def _short(value: str) -> str:
    """A hash as its first 12 hex digits (after any ``sampled-sha256:`` style prefix); "(none)" when absent."""
    digits = value.split(":")[-1]
    return (digits[:12] + "…" if len(digits) > 12 else digits) if value else "(none)"


def check_column_types(table: pa.Table, name: str, path: Path) -> None:
    """Each column present has the schema's type (an all-null column may be untyped)."""
    for column in ALL_TABLES[name]:
        if column.name not in table.schema.names:
            continue
        found = table.schema.field(column.name).type
        if found != column.type and not pa.types.is_null(found):
            raise InputError(f"column {column.name} is {found}, the schema says {column.type}", path=path)


def check_rows(tables: dict[str, list[dict[str, Any]]], manifest: dict[str, Any], report: Path) -> None:
    """Key columns present, unique and inside the manifest's shape; the model row's depth agrees with the manifest.

    A dimension the manifest does not give is bounded by the table's row count, so no key can make a reader build a
    grid larger than the table itself."""
    ck = manifest.get("checkpoint") or {}
    limits = {"layer": ck.get("n_layers"), "head": ck.get("n_heads"), "kv_head": ck.get("n_kv_heads"),
              "expert": ck.get("n_experts")}
    for name, rows in tables.items():
        path = report / f"{name}.parquet"
        required = [c.name for c in ALL_TABLES[name] if c.required]
        keys = ROW_KEYS[name]
        for column in required:
            if any(r.get(column) is None for r in rows):
                raise InputError(f"column {column} has nulls: every row needs it", path=path)
        for column, limit in limits.items():
            values = [r[column] for r in rows if column in r and r[column] is not None]
            bound = limit if isinstance(limit, int) else len(rows)
            bad = [v for v in values if not 0 <= v < bound]
            if bad:
                source = f"the manifest's {limit} {column}s" if isinstance(limit, int) else f"{len(rows)} rows"
                raise InputError(f"{column} index {bad[0]} is outside 0..{bound - 1} ({source})", path=path)
        if keys:
            seen = [tuple(r[k] for k in keys) for r in rows]
            if len(set(seen)) != len(seen):
                raise InputError(f"duplicate rows for the same {' and '.join(keys)}", path=path)
    model = tables.get("model") or []
    if len(model) > 1:
        raise InputError(f"{len(model)} rows: the model table has one", path=report / "model.parquet")
    depth = model[0].get("n_layers") if model else None
    if depth is not None and isinstance(limits["layer"], int) and depth != limits["layer"]:
        raise InputError(f"n_layers {depth} disagrees with manifest.json ({limits['layer']})",
                         path=report / "model.parquet")


def check_tokens(tokens: np.ndarray, manifest: dict[str, Any], file: Path) -> None:
    """``tokens.npy`` is the manifest's calibration: integer ids of its shape and token hash."""
    cal = manifest.get("calibration")
    if cal is None:
        raise InputError("a weights-only report has no calibration tokens, but this one has", path=file)
    rows = cal.get("n_sequences", sum(cal.get("batch_sizes") or []) or None)
    shape = [rows, cal.get("seq_len")]
    if tokens.dtype.kind not in "iu" or tokens.ndim != 2 or any(
            want is not None and got != want for got, want in zip(tokens.shape, shape)):
        raise InputError(f"{tokens.dtype} array of shape {list(tokens.shape)}, the manifest says integer ids of "
                         f"shape {[MISSING if n is None else n for n in shape]}", path=file)
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()
    if digest != cal.get("token_sha256"):
        raise InputError("does not match the manifest's token hash: the tokens are from another scan", path=file)


__all__ = ["check_column_types", "check_manifest", "check_rows", "check_table_identity", "check_tokens",
           "table_identity"]
