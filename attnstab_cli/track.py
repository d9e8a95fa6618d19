"""Track a training run: scan each checkpoint on the same tokens, cache every scan by weight fingerprint, and keep one
long-format time series ``(step, checkpoint, layer, head, metric, value)`` of every numeric report column.

This is the view behind the paper's claim that θ̄ stays near 1 while the projection norms grow after warmup: with the
sensitivity proxy S = 2 s θ̄ R² Π (THEORY §12) and θ̄ ≈ 1, the change of S over training splits between Π and R².

* Steps: the integer in the checkpoint's name (``checkpoint-<N>``, ``step<N>``, ``*-step<N>``, ``*_step<N>``), else
  ``global_step`` of its ``trainer_state.json`` (Hugging Face Trainer), else, when no checkpoint has either, the
  argument order (0, 1, ...); explicit ``steps`` override all. Duplicate steps are a usage error.
* Tokens: the first checkpoint's calibration (lowest step) is used for every checkpoint (``scan_checkpoint(calib=)``,
  which checks the ids against each vocabulary).
* Cache: ``OUT/cache/<key>/`` is a full report (``write_report``); ``key`` hashes the weight fingerprint with every
  setting that changes the numbers (:func:`compute_scan_settings`), so a re-run scans only new checkpoints.
* Output: ``OUT/track.parquet`` (:data:`TRACK_SCHEMA`) and ``OUT/track.json``, each replaced atomically. A re-run into
  a previous track with the same tokens and settings extends it: steps not given again are kept (their checkpoints
  may have been rotated away), a step given again is replaced. ``force`` starts afresh (the cache is kept).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attnstab_cli.bounded_json import JsonRefused, loads_strict
from attnstab_cli import __version__
from attnstab_cli.calibration.build import build_calibration
from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.checkpoints.containment import CheckpointFolder
from attnstab_cli.checkpoints.fingerprint import compute_fingerprint
from attnstab_cli.checkpoints.resolve import DIRECTORY_LABEL
from attnstab_cli.errors import InputError, ScanFailure, UsageError
from attnstab_cli.input_files import regular_file_present, require_regular_file
from attnstab_cli.kernel_dispatch import resolve_kernel
from attnstab_cli.model.load import open_model
from attnstab_cli.report.destination import TRACK_KIND, check_not_input, check_writable
from attnstab_cli.report.read import Report, is_report_dir, load_report
from attnstab_cli.report.schema import SCHEMA_VERSION, TABLES
from attnstab_cli.report.write import replace_file, write_report
from attnstab_cli.scan import ScanRequest, resolve_device, scan_checkpoint

TRACK_VERSION = 1
TRACK_FILE, TRACK_JSON, CACHE_DIR = "track.parquet", "track.json", "cache"
KEY_CHARS = 20                                     # 80 bits of the sha256: no collision among a run's checkpoints
CACHE_KEY = re.compile(f"[0-9a-f]{{{KEY_CHARS}}}")
STEP_SOURCES = ("name", "trainer_state", "order", "given")
STEP_NAME = re.compile(r"^(?:checkpoint-(\d+)|(?:.*[-_])?step[-_]?(\d+))$", re.IGNORECASE)
VIEW_METRICS = ("theta_bar", "proj_product_layer", "r_ln_mean")   # θ̄, Π, R of S = 2 s θ̄ R² Π (THEORY §12)
TRACK_SCHEMA = pa.schema([
    pa.field("step", pa.int64(), nullable=False), pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("layer", pa.int64()), pa.field("head", pa.int64()),      # null: a model-level / layer-level metric
    pa.field("metric", pa.string(), nullable=False), pa.field("value", pa.float64()),
])
# Every int64/float64 report column except the key columns (unit "index": layer, head, kv_head).
NUMERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    grain: tuple(c.name for c in cols if c.type in (pa.int64(), pa.float64()) and c.unit != "index")
    for grain, cols in TABLES.items()}

ScanFn = Callable[[ScanRequest, CalibrationSet], Report]


@dataclass(frozen=True)
class TrackPoint:
    """One checkpoint of the series; ``step_source`` is ``name``, ``trainer_state``, ``order`` or ``given``."""

    checkpoint: str
    step: int
    step_source: str


@dataclass
class TrackEntry:
    """A point with its weight fingerprint and cache key; ``status`` ends as ``cached``, ``scanned`` or ``kept``."""

    point: TrackPoint
    fingerprint: str
    key: str
    status: str = "pending"


@dataclass
class TrackResult:
    """What :func:`run_track` wrote: the long table, the ``track.json`` document, the entries and notes."""

    table: pa.Table
    manifest: dict[str, Any]
    entries: list[TrackEntry]
    notes: list[str]


def step_from_name(checkpoint: str) -> int | None:
    """The step in a checkpoint's name: ``checkpoint-500``, ``step500``, ``run-step500``, ``model_step500.safetensors``
    (a ``config.json``/index argument names its directory)."""
    path = Path(checkpoint)
    name = path.parent.name if path.suffix == ".json" else path.stem if path.suffix == ".safetensors" else path.name
    match = STEP_NAME.match(name)
    return None if match is None else int(match.group(1) or match.group(2))


def step_from_trainer_state(checkpoint: str) -> int | None:
    """``global_step`` of the Hugging Face Trainer's ``trainer_state.json`` next to the weights, if there is one."""
    path = Path(checkpoint)
    directory = path if path.is_dir() else path.parent if path.suffix == ".json" else None
    state = None if directory is None else directory / "trainer_state.json"
    if state is None or not os.path.lexists(state):
        return None
    CheckpointFolder.at(directory, DIRECTORY_LABEL).file(state)
    try:
        step = loads_strict(state.read_text(), constants=True).get("global_step")
    except (OSError, UnicodeDecodeError, JsonRefused, AttributeError) as exc:
        raise InputError(f"unreadable trainer_state.json ({exc})", path=state) from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError(f"global_step is not a non-negative integer: {step!r}", path=state)
    return step


def list_run_checkpoints(directory: Path) -> list[str]:
    """The step-named subfolders (``checkpoint-<N>``, ``step<N>``, ``*-step<N>``) of a training run's directory."""
    if not directory.is_dir():
        return []
    return sorted((str(p) for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and STEP_NAME.match(p.name)), key=lambda p: step_from_name(p) or 0)


def discover_checkpoints(targets: Sequence[str]) -> list[str]:
    """A single directory holding step-named subfolders stands for them (a Trainer ``output_dir``, whose top-level
    final save is then left out); anything else is a list of checkpoints, returned unchanged."""
    if not targets:
        raise UsageError("give one or more checkpoints, or a directory of checkpoint-<step> folders")
    if len(targets) == 1:
        found = list_run_checkpoints(Path(targets[0]))
        if found:
            return found
    return list(targets)


def resolve_steps(checkpoints: Sequence[str], steps: Sequence[int] | None = None) -> list[TrackPoint]:
    """Each checkpoint's step (module docstring), ordered by step; duplicate steps are a :class:`UsageError`."""
    if steps is not None:
        if len(steps) != len(checkpoints):
            raise UsageError(f"--steps gives {len(steps)} steps for {len(checkpoints)} checkpoints")
        points = [TrackPoint(c, int(s), "given") for c, s in zip(checkpoints, steps)]
    else:
        found = []
        for c in checkpoints:
            named = step_from_name(c)
            found.append((named, "name") if named is not None else (step_from_trainer_state(c), "trainer_state"))
        missing = [c for c, (s, _) in zip(checkpoints, found) if s is None]
        if len(missing) == len(checkpoints):
            points = [TrackPoint(c, i, "order") for i, c in enumerate(checkpoints)]
        elif missing:
            raise UsageError(f"no step in the name or trainer_state.json of {', '.join(missing)}",
                             hint="name the steps in argument order, e.g. --steps 100,200,300")
        else:
            points = [TrackPoint(c, s, src) for c, (s, src) in zip(checkpoints, found)]
    by_step: dict[int, list[str]] = {}
    for p in points:
        by_step.setdefault(p.step, []).append(p.checkpoint)
    dupes = {s: cs for s, cs in by_step.items() if len(cs) > 1}
    if dupes:
        listed = "; ".join(f"step {s}: {', '.join(cs)}" for s, cs in sorted(dupes.items()))
        raise UsageError(f"duplicate steps ({listed})", hint="track each step once, or name the steps with --steps")
    return sorted(points, key=lambda p: p.step)


def compute_scan_settings(req: ScanRequest, calib: CalibrationSet) -> dict[str, Any]:
    """Everything besides the weights that changes a scan's numbers: the tokens (hash and batch shapes, which the hash
    alone does not pin down), dtype, device type, kernel, grad, tier-3 sequences, θ options, hash mode, arch and
    config overrides, and the tool and schema versions (a new version may compute differently)."""
    opts, device = req.options, resolve_device(req.options.device)
    theta = {k: v for k, v in asdict(opts.theta).items() if k != "kernel"}    # kernel: resolved below
    return {"token_sha256": calib.token_hash, "token_shapes": [list(b.shape) for b in calib.batches],
            "dtype": opts.dtype, "device_type": device.type, "kernel": resolve_kernel(opts.kernel, device),
            "grad": opts.grad, "empirical_seqs": opts.empirical_seqs, "theta": theta, "hash_mode": req.hash_mode,
            "arch": req.arch, "overrides": req.overrides, "tool_version": __version__,
            "schema_version": SCHEMA_VERSION}


def compute_cache_key(fingerprint: str, settings: dict[str, Any]) -> str:
    """The first :data:`KEY_CHARS` hex digits of sha256 over the fingerprint and the settings (canonical JSON)."""
    blob = json.dumps({"fingerprint": fingerprint, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def plan_track(points: Sequence[TrackPoint], req: ScanRequest) -> tuple[list[TrackEntry], CalibrationSet,
                                                                           dict[str, Any]]:
    """Open and fingerprint every checkpoint (headers and sampled blocks only) and build the tokens from the first;
    returns the entries with their cache keys, the tokens and the settings."""
    calib, pending = None, []
    for p in points:
        model = open_model(p.checkpoint, req.arch, req.overrides)
        if calib is None:
            calib = build_calibration(req.calibration, model.cfg.vocab_size, model.cfg.max_seq_len,
                                      model.tokenizer_path, p.checkpoint)
        pending.append((p, compute_fingerprint(model.files.weight_files, req.hash_mode)))
    if calib is None:
        raise UsageError("no checkpoints to track")
    settings = compute_scan_settings(req, calib)
    return [TrackEntry(p, fp, compute_cache_key(fp, settings)) for p, fp in pending], calib, settings


def load_cached_report(path: Path, fingerprint: str, token_hash: str) -> tuple[Report | None, str | None]:
    """The cached report at ``path`` if it is readable and of these weights and tokens; else None and why it cannot
    be used (None when there is no entry at all). An unusable entry is a cache miss: the checkpoint is scanned
    again and the entry replaced."""
    if not os.path.lexists(path):
        return None, None
    if path.is_symlink() or not is_report_dir(path):
        return None, "not a report directory"
    try:
        report = load_report(path)
    except InputError as exc:
        return None, f"unreadable ({exc.message})"
    same = (report.manifest.get("checkpoint") or {}).get("fingerprint") == fingerprint and \
        (report.manifest.get("calibration") or {}).get("token_sha256") == token_hash
    return (report, None) if same else (None, "a scan of other weights or tokens")


def discard_cache_entry(path: Path) -> None:
    """Remove an unusable entry of the track's own cache (a symlink is removed, never followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def report_to_long(report: Report) -> list[tuple[int | None, int | None, str, float]]:
    """``(layer, head, metric, value)`` for every non-null numeric column of the layers, heads and model tables, in
    table and column order; null ("not applicable") cells are left out, NaN and ±inf kept."""
    rows = []
    for grain in ("layers", "heads", "model"):
        for rec in report.tables.get(grain) or []:
            layer = None if grain == "model" else rec["layer"]
            head = rec["head"] if grain == "heads" else None
            rows.extend((layer, head, m, float(rec[m])) for m in NUMERIC_COLUMNS[grain] if rec.get(m) is not None)
    return rows


def build_long_table(point: TrackPoint, report: Report) -> pa.Table:
    """One checkpoint's part of ``track.parquet``."""
    rows = report_to_long(report)
    layer, head, metric, value = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
    return pa.Table.from_arrays([pa.array([point.step] * len(rows), pa.int64()),
                                 pa.array([point.checkpoint] * len(rows), pa.string()), pa.array(layer, pa.int64()),
                                 pa.array(head, pa.int64()), pa.array(metric, pa.string()),
                                 pa.array(value, pa.float64())], schema=TRACK_SCHEMA)


def read_track_manifest(out: Path, force: bool, checkpoints: Sequence[str] = ()) -> dict[str, Any] | None:
    """Check ``out`` before any work: writable and clear of the checkpoints (:mod:`~attnstab_cli.report.destination`),
    and a new or empty directory, an interrupted first run (only ``cache/``), or a previous track (returned, to
    extend; ``force`` starts it afresh). Any other directory is refused, with or without ``force``."""
    check_writable(out)
    check_not_input(out, checkpoints)
    if not out.exists():
        return None
    if not out.is_dir():
        raise UsageError("exists and is not a directory", path=out)
    manifest = None
    regular_file_present(out / TRACK_JSON)
    try:
        manifest = loads_strict((out / TRACK_JSON).read_text(), constants=True)
    except (OSError, UnicodeDecodeError, JsonRefused):
        pass
    if isinstance(manifest, dict) and manifest.get("kind") == TRACK_KIND:
        return None if force else manifest
    # cache/ alone is an interrupted first run: resume it (hidden names are temporary files)
    if any(p.name != CACHE_DIR and not p.name.startswith(".") for p in out.iterdir()):
        raise UsageError("exists and is not an attnstab track output; refused, with or without --force (a track is "
                         "written only into a new or empty directory or a previous track)", path=out,
                         hint="choose another --out")
    return None


def carry_over(out: Path, previous: dict[str, Any] | None, entries: Sequence[TrackEntry],
               settings: dict[str, Any]) -> tuple[list[TrackEntry], list[pa.Table], list[str]]:
    """The previous track's steps that this run does not give again (entries marked ``kept``, their rows), and notes.
    Refuses (:class:`UsageError`) a previous track made with other tokens or settings."""
    if previous is None:
        return [], [], []
    check_track_manifest(previous, out / TRACK_JSON)
    now, before = json.loads(json.dumps(settings, default=str)), previous.get("settings") or {}
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        raise UsageError(f"{out} tracks another calibration or scan settings (differs in {', '.join(changed)})",
                         hint="pass --force to start the track afresh (cached scans are kept), or use another --out")
    listed = previous["checkpoints"]
    if "order" in {e.point.step_source for e in entries} | {c.get("step_source") for c in listed}:
        return [], [], ["steps from argument order: the previous track is replaced, not extended"]
    steps, notes = {e.point.step: e for e in entries}, []
    for c in listed:
        if c["step"] in steps and steps[c["step"]].fingerprint != c["fingerprint"]:
            notes.append(f"step {c['step']}: other weights than the previous track's ({c['checkpoint']}); replaced")
    old = [c for c in listed if c["step"] not in steps]
    if not old:
        return [], [], notes
    regular_file_present(out / TRACK_FILE)
    try:
        table = pq.read_table(out / TRACK_FILE, schema=TRACK_SCHEMA)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read the previous track ({exc})", path=out / TRACK_FILE,
                         hint="pass --force to start the track afresh") from None
    kept = [TrackEntry(TrackPoint(c["checkpoint"], c["step"], c.get("step_source", "name")), c["fingerprint"],
                       c["cache_key"], "kept") for c in old]
    parts = [table.filter(pc.equal(table["step"], e.point.step)) for e in kept]
    return kept, parts, notes


# track.json's checkpoints entries: key -> (what it must be, the test)
LISTED_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "step": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "checkpoint": ("a string", lambda v: isinstance(v, str)),
    "fingerprint": ("a string", lambda v: isinstance(v, str)),
    "cache_key": (f"{KEY_CHARS} hex digits", lambda v: isinstance(v, str) and CACHE_KEY.fullmatch(v) is not None),
}


def check_track_manifest(manifest: dict[str, Any], file: Path) -> None:
    """A previous ``track.json`` has the types a re-run relies on: ``settings`` an object, ``checkpoints`` a list of
    entries with :data:`LISTED_FIELDS` (and a known ``step_source``); otherwise an :class:`InputError` naming the
    field."""
    hint = "pass --force to start the track afresh"
    if not isinstance(manifest.get("settings", {}), dict):
        raise InputError("malformed track.json: settings must be an object", path=file, hint=hint)
    listed = manifest.get("checkpoints")
    if not isinstance(listed, list):
        raise InputError("malformed track.json (its checkpoints list): checkpoints must be a list", path=file,
                         hint=hint)
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise InputError(f"malformed track.json (its checkpoints list): checkpoints[{i}] must be an object",
                             path=file, hint=hint)
        for key, (expected, ok) in LISTED_FIELDS.items():
            if key not in entry or not ok(entry[key]):
                got = "missing" if key not in entry else f"got {entry[key]!r}"[:60]
                raise InputError(f"malformed track.json (its checkpoints list): checkpoints[{i}].{key} must be "
                                 f"{expected}, {got}", path=file, hint=hint)
        if entry.get("step_source", "name") not in STEP_SOURCES:
            raise InputError(f"malformed track.json: checkpoints[{i}].step_source must be one of "
                             f"{', '.join(STEP_SOURCES)}", path=file, hint=hint)


def collect_reports(entries: Sequence[TrackEntry], calib: CalibrationSet, req: ScanRequest, out: Path,
                    scan: ScanFn | None = None,
                    on_entry: Callable[[TrackEntry], None] | None = None) -> tuple[list[pa.Table], list[str]]:
    """Each entry's long rows, from its cached report or from a fresh scan on ``calib`` (then cached), and a note for
    each cache entry that could not be used and was replaced; ``on_entry`` is called once an entry is ``cached`` or
    ``scanned``."""
    scan = scan or (lambda r, c: scan_checkpoint(r, c)[0])
    parts, notes = [], []
    for e in entries:
        cache = out / CACHE_DIR / e.key
        report, unusable = load_cached_report(cache, e.fingerprint, calib.token_hash)
        e.status = "cached"
        if unusable is not None:
            discard_cache_entry(cache)
            notes.append(f"step {e.point.step}: cache entry {CACHE_DIR}/{e.key} was {unusable}; scanned again")
        if report is None:
            fresh = scan(replace(req, checkpoint=e.point.checkpoint), calib)
            if fresh.manifest["checkpoint"]["fingerprint"] != e.fingerprint:
                raise ScanFailure(f"{e.point.checkpoint}: the weights changed while tracking (fingerprint differs)")
            write_report(cache, fresh.tables, fresh.manifest, force=True, tokens=fresh.tokens)
            report, e.status = load_report(cache), "scanned"
        parts.append(build_long_table(e.point, report))
        if on_entry:
            on_entry(e)
    return parts, notes


def build_track_manifest(entries: Sequence[TrackEntry], calib: CalibrationSet,
                         settings: dict[str, Any]) -> dict[str, Any]:
    """The ``track.json`` document; cache paths are relative to the track directory."""
    return {"kind": TRACK_KIND, "track_version": TRACK_VERSION, "tool": {"name": "attnstab", "version": __version__},
            "calibration": {"token_sha256": calib.token_hash, "source": calib.source, "seq_len": calib.seq_len,
                            "n_sequences": calib.n_sequences, "batch_sizes": [int(b.shape[0]) for b in calib.batches]},
            "settings": settings, "columns": TRACK_SCHEMA.names,
            "checkpoints": [{"step": e.point.step, "step_source": e.point.step_source,
                             "checkpoint": e.point.checkpoint, "fingerprint": e.fingerprint, "cache_key": e.key,
                             "cache": f"{CACHE_DIR}/{e.key}", "status": e.status} for e in entries]}


def write_track(out: Path, table: pa.Table, manifest: dict[str, Any]) -> None:
    """``track.parquet`` then ``track.json``, each replaced atomically; the Parquet metadata repeats the identity."""
    meta = {"kind": TRACK_KIND, "track_version": str(TRACK_VERSION), "tool_version": __version__,
            "calibration_token_sha256": manifest["calibration"]["token_sha256"]}
    table = table.replace_schema_metadata(meta)
    replace_file(out / TRACK_FILE, lambda p: pq.write_table(table, p))
    replace_file(out / TRACK_JSON, lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n"))


def run_track(points: Sequence[TrackPoint], req: ScanRequest, out: Path, force: bool = False,
              scan: ScanFn | None = None, on_entry: Callable[[TrackEntry], None] | None = None) -> TrackResult:
    """Plan, reuse or scan each checkpoint, merge with a previous track in ``out`` and write (module docstring)."""
    previous = read_track_manifest(out, force, [p.checkpoint for p in points])
    entries, calib, settings = plan_track(points, req)
    kept, kept_parts, notes = carry_over(out, previous, entries, settings)
    (out / CACHE_DIR).mkdir(parents=True, exist_ok=True)
    parts, rescanned = collect_reports(entries, calib, req, out, scan, on_entry)
    notes += rescanned
    ordered = sorted(zip([*entries, *kept], [*parts, *kept_parts]), key=lambda ep: ep[0].point.step)
    table = pa.concat_tables([t for _, t in ordered]) if ordered else TRACK_SCHEMA.empty_table()
    manifest = build_track_manifest([e for e, _ in ordered], calib, settings)
    write_track(out, table, manifest)
    return TrackResult(table, manifest, [e for e, _ in ordered], notes)


def load_track(path: str | Path) -> pd.DataFrame:
    """``track.parquet`` (or the directory holding it) as a DataFrame with the columns step (int64), checkpoint,
    layer (Int64, <NA> for model metrics), head (Int64, <NA> unless per head), metric, value (float64)."""
    path = Path(path)
    file = path / TRACK_FILE if path.is_dir() else path
    require_regular_file(file, missing="no such track file")
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"not a readable track ({exc})", path=file,
                         hint="write one with: attnstab track CHECKPOINT... --out DIR") from None
    if (table.schema.metadata or {}).get(b"kind") != TRACK_KIND.encode() or table.schema.names != TRACK_SCHEMA.names:
        raise InputError("not an attnstab track (written by attnstab track)", path=file)
    return track_frame(table)


def track_frame(table: pa.Table) -> pd.DataFrame:
    """A long track table as a DataFrame; layer and head as nullable Int64 (not float64 with NaN)."""
    df = table.to_pandas()
    for col in ("layer", "head"):
        df[col] = df[col].astype("Int64")
    return df


def compute_layer_series(df: pd.DataFrame, metrics: Sequence[str] = VIEW_METRICS) -> tuple[list[int], dict[
        int, dict[str, list[float | None]]]]:
    """The steps in order and, per layer, each layer-level metric's values over them (None where missing)."""
    steps = sorted(int(s) for s in df["step"].unique())
    rows = df[df["head"].isna() & df["layer"].notna() & df["metric"].isin(list(metrics))]
    series: dict[int, dict[str, list[float | None]]] = {}
    for layer in sorted(int(x) for x in rows["layer"].unique()):
        at = rows[rows["layer"] == layer]
        series[layer] = {}
        for m in metrics:
            by_step = dict(zip(at.loc[at["metric"] == m, "step"].astype(int), at.loc[at["metric"] == m, "value"]))
            series[layer][m] = [None if s not in by_step else float(by_step[s]) for s in steps]
    return steps, series


def track_records(table: pa.Table) -> list[dict[str, Any]]:
    """The long table as JSON-ready records: NaN and ±inf become null (JSON has neither)."""
    return [{**r, "value": r["value"] if r["value"] is not None and math.isfinite(r["value"]) else None}
            for r in table.to_pylist()]


__all__ = ["NUMERIC_COLUMNS", "TRACK_SCHEMA", "TrackEntry", "TrackPoint", "TrackResult", "VIEW_METRICS",
           "build_long_table", "compute_cache_key", "compute_layer_series", "compute_scan_settings",
           "discover_checkpoints", "load_track", "report_to_long", "resolve_steps", "run_track", "step_from_name",
           "step_from_trainer_state", "track_frame", "track_records"]
