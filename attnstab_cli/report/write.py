"""Write a report directory atomically: everything goes to a hidden sibling, then one rename publishes it.

An interrupted scan (exception, Ctrl-C) leaves no report at all; what may be replaced, and only with ``force``, is
decided by :mod:`attnstab_cli.report.destination`. Every publication is recorded there, so an interrupt can say what
is complete on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnstab_cli.report.destination import check_destination, record_published
from attnstab_cli.report.schema import ALL_TABLES, arrow_schema


def file_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The identity every table file carries in its metadata (STYLE.md, "Reports"), so one file alone says where it
    came from: tool version, checkpoint and its fingerprint, family, calibration id, seed, device, library versions."""
    ck, cal, run = manifest.get("checkpoint") or {}, manifest.get("calibration") or {}, manifest.get("run") or {}
    meta = {"tool_version": (manifest.get("tool") or {}).get("version"), "checkpoint": ck.get("checkpoint"),
            "checkpoint_fingerprint": ck.get("fingerprint"), "family": ck.get("family"),
            "calibration_token_sha256": cal.get("token_sha256"), "seed": cal.get("seed"), "device": run.get("device"),
            "dtype": run.get("dtype"), "torch": run.get("torch"), "triton": run.get("triton")}
    return {k: str(v) for k, v in meta.items() if v is not None}


def build_table(name: str, records: list[dict[str, Any]], metadata: dict[str, str] | None = None) -> pa.Table:
    """Records -> table with the documented schema; a record key outside the schema is a bug, not a column."""
    schema = arrow_schema(name, metadata)
    extra = {k for r in records for k in r} - set(schema.names)
    if extra:
        raise ValueError(f"records for {name!r} carry undocumented columns {sorted(extra)}")
    return pa.Table.from_pylist([{c.name: r.get(c.name) for c in ALL_TABLES[name]} for r in records], schema=schema)


def publish_directory(out: Path, fill: Callable[[Path], None], force: bool = False, kind: str = "report") -> Path:
    """Run ``fill(staging)`` in a hidden sibling of ``out`` and publish it with one rename: ``out`` appears complete
    or not at all (an exception or Ctrl-C removes the staging directory; a kill leaves only the hidden ``.partial``).
    An existing ``out`` is replaced only as :func:`check_destination` allows for ``kind``, checked again here."""
    check_destination(out, kind, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; a published report gets normal permissions
    try:
        fill(staging)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record_published(out)
    return out


def replace_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp)`` fill a hidden temporary sibling of ``path``, then ``os.replace`` it over ``path``: readers
    see the old file or the new one, never half of one (parents created; the temporary file removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; a published file gets normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record_published(path)
    return path


def write_file_atomic(path: Path, data: bytes | str) -> Path:
    """``data`` (text as UTF-8) to ``path`` through :func:`replace_file`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return replace_file(path, lambda tmp: tmp.write_bytes(raw))


def write_report(out: Path, tables: dict[str, list[dict[str, Any]]], manifest: dict[str, Any],
                 force: bool = False, tokens: np.ndarray | None = None) -> Path:
    """Publish ``<table>.parquet`` files, ``manifest.json`` and the calibration ``tokens.npy`` (so another checkpoint
    can be scanned on identical tokens) under ``out`` in one rename."""
    def fill(staging: Path) -> None:
        for name, records in tables.items():
            pq.write_table(build_table(name, records, file_metadata(manifest)), staging / f"{name}.parquet")
        if tokens is not None:
            np.save(staging / "tokens.npy", np.asarray(tokens, dtype=np.int64), allow_pickle=False)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    return publish_directory(out, fill, force)


def _publish(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is first renamed to a fresh hidden ``.replaced`` sibling
    (a new name, so no other file is ever removed) and deleted once the new one is in place."""
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
    os.rename(out, old)                     # a directory renames over the empty one just made
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
