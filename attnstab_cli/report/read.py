"""Read a report directory back: manifest plus tables, across schema versions (issue 5, item 1).

A report of the current schema version reads as written. An older version reads too: each table is conformed to the
current schema (columns the old version did not have come back null, per :data:`SCHEMA_HISTORY`). A newer version,
a missing version, a manifest field of the wrong type, or a table or ``tokens.npy`` that disagrees with its manifest
(another scan's identity, a column of another type, keys outside the manifest's shape: ``validate.py``) is refused
with a message that names the file and says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import torch

from attnstab_cli.bounded_json import JsonRefused, loads_strict
from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.errors import InputError
from attnstab_cli.input_files import regular_file_present
from attnstab_cli.report.schema import OPTIONAL_TABLES, SCHEMA_HISTORY, SCHEMA_VERSION, arrow_schema
from attnstab_cli.report.validate import (
    check_column_types, check_manifest, check_rows, check_table_identity, check_tokens,
)

GRAINS = ("layers", "heads", "model")
TOKENS_FILE = "tokens.npy"


@dataclass
class Report:
    """One scan: its manifest and one list of records per grain (``layers``, ``heads``, ``model``)."""

    manifest: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]]
    path: Path | None = None
    notes: list[str] = field(default_factory=list)      # what reading it had to adapt (older schema)
    tokens: np.ndarray | None = None                    # [n_sequences, seq_len] int64 calibration ids, if kept

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.tables["layers"]

    @property
    def heads(self) -> list[dict[str, Any]]:
        return self.tables["heads"]

    @property
    def model(self) -> dict[str, Any]:
        return (self.tables.get("model") or [{}])[0]

    @property
    def calibrated(self) -> bool:
        return self.manifest.get("calibration") is not None


def is_report_dir(path: Path) -> bool:
    """A directory with a ``manifest.json`` (checkpoint directories have a ``config.json`` instead)."""
    return path.is_dir() and (path / "manifest.json").is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` of a report directory, checked to be a JSON object with a schema version."""
    file = path / "manifest.json"
    if not regular_file_present(file):
        raise InputError("not a report directory (no manifest.json)", path=path,
                         hint=f"scan it first: attnstab scan {path} --out REPORT_DIR")
    try:
        manifest = loads_strict(file.read_text(), constants=True)
    except (JsonRefused, UnicodeDecodeError) as exc:
        raise InputError(f"manifest.json is not valid JSON ({exc})", path=file) from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise InputError("manifest.json has no schema_version: not written by attnstab", path=file)
    if not isinstance(manifest["schema_version"], str):
        raise InputError(f"schema_version must be a string, got {manifest['schema_version']!r}", path=file)
    _check_version(manifest["schema_version"], file, manifest)
    check_manifest(manifest, file)
    return manifest


def _check_version(version: str, where: Path, manifest: dict[str, Any] | None = None) -> None:
    if version in SCHEMA_HISTORY:
        return
    info = (manifest or {}).get("tool")
    tool = info.get("version", "an unknown version") if isinstance(info, dict) else "an unknown version"
    known = ", ".join(SCHEMA_HISTORY)
    if version.isdigit() and int(version) > int(SCHEMA_VERSION):
        raise InputError(f"report schema version {version} (attnstab {tool}) is newer than this attnstab reads "
                         f"({known})", path=where, hint="upgrade attnstab to read it")
    raise InputError(f"unknown report schema version {version!r}; this attnstab reads {known}", path=where)


def read_table(report: Path, name: str, manifest: dict[str, Any] | None = None) -> tuple[pa.Table, list[str]]:
    """One table conformed to the current schema, and notes on what an older version lacked; with ``manifest``,
    checked to be that manifest's table (schema version and stored identity)."""
    path = report / f"{name}.parquet"
    if not regular_file_present(path):
        raise InputError(f"report has no {name}.parquet", path=report)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", path=path) from None
    version = (table.schema.metadata or {}).get(b"schema_version", b"").decode()
    if not version:
        raise InputError("no schema_version in the file metadata: not an attnstab report table", path=path)
    _check_version(version, path)
    if manifest is not None:
        if version != manifest["schema_version"]:
            raise InputError(f"table schema version {version} disagrees with manifest.json "
                             f"({manifest['schema_version']})", path=path)
        check_table_identity(table, name, manifest, path)
    check_column_types(table, name, path)
    return _conform(table, name, version, path)


def _conform(table: pa.Table, name: str, version: str, path: Path) -> tuple[pa.Table, list[str]]:
    """Cast ``table`` to the current schema: missing columns (added after ``version``) become null."""
    schema, notes = arrow_schema(name), []
    present = set(table.schema.names)
    missing = [f.name for f in schema if f.name not in present]
    unknown = sorted(present - set(schema.names))
    if unknown:
        raise InputError(f"columns {unknown} are not in schema version {version}", path=path)
    added_since = {c for v, cols in SCHEMA_HISTORY.items() if int(v) > int(version) for c in cols.get(name, ())}
    unexplained = [c for c in missing if c not in added_since]
    if unexplained:
        raise InputError(f"schema version {version} table lacks columns {unexplained}", path=path)
    if missing:
        notes.append(f"{name}: schema {version} predates {', '.join(missing)} (read as null)")
    columns = [table.column(f.name).cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema), notes


def load_report(path: Path) -> Report:
    """Manifest and every table of a report directory (older schema versions conformed, see the module)."""
    manifest = read_manifest(path)
    tables, notes = {}, []
    for name in GRAINS:
        table, more = read_table(path, name, manifest)
        tables[name], notes = table.to_pylist(), notes + more
    for name in OPTIONAL_TABLES:
        if regular_file_present(path / f"{name}.parquet"):
            tables[name] = read_table(path, name, manifest)[0].to_pylist()
    check_rows(tables, manifest, path)
    tokens = None
    if regular_file_present(path / TOKENS_FILE):
        try:
            tokens = np.load(path / TOKENS_FILE, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"unreadable calibration tokens ({exc})", path=path / TOKENS_FILE) from None
        if not isinstance(tokens, np.ndarray):
            raise InputError("not a single .npy array", path=path / TOKENS_FILE)
        check_tokens(tokens, manifest, path / TOKENS_FILE)
    return Report(manifest, tables, path, notes, tokens)


def load_calibration(report: Report) -> CalibrationSet:
    """The exact token batches a calibrated report was scanned on (``tokens.npy``, split as the manifest says), so
    another checkpoint can be scanned on identical tokens; checked against the manifest's token hash."""
    cal = report.manifest.get("calibration")
    where = report.path or "report"
    if cal is None:
        raise InputError("a weights-only report has no calibration tokens", path=where)
    if report.tokens is None:
        raise InputError(f"report keeps no {TOKENS_FILE} (written before schema 2)", path=where,
                         hint="rescan with --tokens, or give the same --calib options")
    missing = [k for k in ("source", "seq_len", "token_sha256") if cal.get(k) is None]
    if missing:
        raise InputError(f"manifest.json lacks calibration.{missing[0]}: its tokens cannot be reused", path=where)
    ids = torch.from_numpy(np.ascontiguousarray(report.tokens)).to(torch.int64)
    sizes = cal.get("batch_sizes") or [ids.shape[0]]
    batches = tuple(torch.split(ids, list(sizes)))
    calib = CalibrationSet(batches, cal["source"], int(cal["seq_len"]), cal.get("source_sha256"),
                           requested=cal.get("n_sequences_requested"))
    if calib.token_hash != cal["token_sha256"]:
        raise InputError(f"{TOKENS_FILE} does not match the manifest's token hash", path=where)
    return calib


__all__ = ["GRAINS", "TOKENS_FILE", "Report", "is_report_dir", "load_calibration", "load_report", "read_manifest",
           "read_table"]
