"""The scan as a library call: stream calibration batches through a checkpoint and collect every metric pass's tables.

The CLI only parses options, calls :func:`run_scan` and renders; tests call it directly.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from attnstab_cli import __version__
from attnstab_cli.calibration.build import CalibrationRequest, build_calibration
from attnstab_cli.calibration.sources import CalibrationSet, check_seq_len, check_token_range
from attnstab_cli.checkpoints.fingerprint import HashMode, compute_fingerprint
from attnstab_cli.distributed.group import SOLO, Group
from attnstab_cli.distributed.shard import shard_sequences
from attnstab_cli.errors import UsageError
from attnstab_cli.kernel_dispatch import resolve_kernel
from attnstab_cli.metrics.curvature_scan import CurvatureOptions, check_fits, compute_curvature
from attnstab_cli.metrics.fragility import FragilityPass
from attnstab_cli.metrics.gradients import GradientFlow
from attnstab_cli.metrics.layer_context import LayerContexts
from attnstab_cli.metrics.lipschitz_scan import LipschitzPass
from attnstab_cli.metrics.magnitudes import MagnitudePass
from attnstab_cli.metrics.moe_scan import MoEPass
from attnstab_cli.metrics.passes import MetricPass, TableParts, Tables, order_passes
from attnstab_cli.metrics.sensitivity import SensitivityPass
from attnstab_cli.metrics.spectral import shared_spectra
from attnstab_cli.metrics.theta_scan import ThetaOptions, ThetaPass, resolve_paper_rows
from attnstab_cli.metrics.weights_scan import WeightPass
from attnstab_cli.model.load import OpenModel, open_model
from attnstab_cli.model.memory import check_resident_fits
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.model.weight_values import check_weight_values
from attnstab_cli.report.read import Report
from attnstab_cli.report.null_reasons import explain_nulls
from attnstab_cli.report.schema import SCHEMA_VERSION

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


# on_progress(stage, done, total): ``done`` of ``total`` steps of the named stage are finished (layers of the scan's
# stream, layers of each --grad stream, curvature blocks). A stage may report total = 0 when its size is unknown.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ScanOptions:
    device: str = "auto"
    dtype: str = "float32"
    kernel: str = "auto"                         # auto | torch | triton (resolved against the device)
    grad: bool = False                           # also the streamed gradient-flow pass
    curvature: CurvatureOptions | None = None    # also the per-block Hessian spectrum (all layers resident)
    empirical_seqs: int = 1                      # sequences per layer for the tier-3 empirical lower bound
    theta: ThetaOptions = field(default_factory=ThetaOptions)


@dataclass
class ScanResult:
    """Report tables (records per grain), final hidden states and run facts for the manifest."""

    tables: dict[str, list[dict[str, Any]]]
    final_hidden: list[torch.Tensor]
    timings: dict[str, float]
    facts: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r} (auto, cpu or cuda)")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_passes(model: OpenModel, calib: CalibrationSet, opts: ScanOptions, kernel: str,
                 device: torch.device, group: Group = SOLO) -> list[MetricPass]:
    """The metric passes of a calibrated scan of all of ``calib`` (of which this rank streams its share), in
    dependency order."""
    theta_opts = replace(opts.theta, kernel=kernel, paper_rows=resolve_paper_rows(opts.theta, device))
    return order_passes([
        MagnitudePass(),
        ThetaPass(model.cfg.n_heads, model.cfg.n_kv_heads, theta_opts),
        WeightPass(model.cfg, max_offset=max(calib.seq_len, 1),           # offsets present in the mask (§5.5)
                   rank=group.rank, world_size=group.world_size),
        SensitivityPass(),
        FragilityPass(model.cfg.d_model, n_sequences=calib.n_sequences, seed=opts.theta.seed),
        LipschitzPass(model.cfg, empirical_seqs=opts.empirical_seqs, seed=opts.theta.seed,
                      tokens_per_layer=calib.n_tokens),
        MoEPass(model.cfg),
    ])


def run_scan(model: OpenModel, calib: CalibrationSet, opts: ScanOptions,
             on_progress: ProgressFn | None = None, group: Group = SOLO) -> ScanResult:
    """Stream ``calib`` through ``model`` one layer at a time, every metric pass seeing every trace with its layer's
    shared context; ``on_progress`` hears of every finished layer, --grad stream step and curvature block.

    The model is streamed once; ``--grad`` keeps its checkpoint boundaries from this stream and re-streams only
    between them (:class:`GradientFlow`), and curvature holds the layers it needs itself (``compute_curvature``).
    Of several ranks (``group``), each streams every layer over its share of the sequences
    (:func:`~attnstab_cli.distributed.shard.shard_sequences`), the ranks meet after every layer, and the passes
    merge their aggregates before they finish: every rank returns the whole run's tables.
    """
    device, dtype = resolve_device(opts.device), resolve_dtype(opts.dtype)
    kernel = resolve_kernel(opts.kernel, device)
    if opts.curvature is not None:
        if group.world_size > 1:
            raise UsageError("--curvature runs in one process only (it keeps every layer resident and is not "
                             f"sharded), not under a world size of {group.world_size}",
                             hint="run the curvature scan without torchrun, or drop --curvature")
        check_fits(model, device, opts.curvature)                 # refuse before any work, not after the scan
    shard = shard_sequences(calib.batches, group.rank, group.world_size)
    passes = build_passes(model, calib, opts, kernel, device, group)
    spent = {p.name: 0.0 for p in passes}
    contexts = LayerContexts(model)
    flow = GradientFlow(model, shard.batches, device, dtype, opts.theta.seed, first_seqs=shard.first_seqs,
                        group=group) if opts.grad else None
    wanted = flow.checkpoint_layers() if flow is not None else set()
    kept: dict[int, list[torch.Tensor]] = {}      # --grad's checkpoint boundaries, taken from this stream
    t0 = time.perf_counter()
    last = len(shard.batches) - 1
    stream = LayerStream(model, shard.batches, device, dtype, first_seqs=shard.first_seqs)
    stream.embed()
    if 0 in wanted:
        kept[0] = list(stream.hidden)             # a copy of the list: the stream replaces its entries
    for trace in stream.layers():
        with shared_spectra():                    # the layer's weight norms are computed once for all passes
            t = time.perf_counter()
            ctx = contexts.for_trace(trace)
            spent["context"] = spent.get("context", 0.0) + time.perf_counter() - t
            for p in passes:
                t = time.perf_counter()
                p.observe(trace, ctx)
                spent[p.name] += time.perf_counter() - t
        if trace.batch == last:
            contexts.release()                    # the layer is done: drop its weights before the next loads
        if trace.layer + 1 in wanted:             # traces come layer-major, batch-minor
            kept.setdefault(trace.layer + 1, []).append(trace.resid_out.detach())
        if trace.batch == last:
            t = time.perf_counter()
            group.checkpoint(f"layer {trace.layer}")
            spent["ranks_wait"] = spent.get("ranks_wait", 0.0) + time.perf_counter() - t
            if on_progress:
                on_progress("scan: layers", trace.layer + 1, model.cfg.n_layers)
        del trace, ctx  # hold nothing while the stream loads the next layer: one layer's weights resident
    final = stream.final_hidden()
    t = time.perf_counter()
    group.checkpoint("the merge of the aggregates")
    for p in passes:
        p.merge_ranks(group)
    spent["merge"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    timings = {"total_s": total, "forward_s": total - sum(spent.values()),
               **{f"{name}_s": s for name, s in spent.items()}}
    tables = Tables()
    for p in passes:
        tables.add(p.finish(tables))
    facts = {"device": str(device), "dtype": opts.dtype, "kernel": kernel, **tables.facts,
             "peak_resident_weight_bytes": model.reader.peak_live_bytes,
             "distributed": {"world_size": group.world_size, "backend": group.backend,
                             "sequences_per_rank": shard.counts}}
    if flow is not None:
        t = time.perf_counter()
        flow.on_layer = on_progress
        grad_layers, grad_model = flow.run(kept)
        del kept
        timings["grad_s"] = time.perf_counter() - t
        facts["grad"] = {"checkpoint_every": flow.checkpoint_every, "streams": flow.streams,
                         "layer_loads": flow.layer_loads, "peak_boundaries": flow.peak_boundaries}
        tables.add(TableParts(layers=grad_layers, model=grad_model))
    out = {"layers": tables.layers, "heads": tables.heads, "model": [tables.model]}
    if model.cfg.moe is not None:
        out["experts"] = tables.experts
    if opts.curvature is not None:
        t = time.perf_counter()
        blocks = iter(range(1, 1 << 30))

        def on_block(layer: int | None, block: str) -> None:
            if on_progress:
                on_progress("curvature: blocks", next(blocks), 0)

        out["curvature"], facts["curvature"] = compute_curvature(model, list(calib.batches), device, opts.curvature,
                                                                 on_block)
        timings["curvature_s"] = time.perf_counter() - t
    facts["null_columns"] = explain_nulls(out, tables.nulls)
    return ScanResult(out, final, timings, facts)


def run_weights_only(model: OpenModel, opts: ScanOptions,
                     on_progress: ProgressFn | None = None) -> ScanResult:
    """``scan --weights-only``: the weight metrics of every layer, one layer resident at a time, no text."""
    device, dtype = resolve_device(opts.device), resolve_dtype(opts.dtype)
    weights = WeightPass(model.cfg)
    loader = model.loader(device, dtype)
    t0 = time.perf_counter()
    for layer in range(model.cfg.n_layers):
        weights.observe_weights(loader.layer(layer))
        if on_progress:
            on_progress("weights: layers", layer + 1, model.cfg.n_layers)
    timings = {"total_s": time.perf_counter() - t0}
    tables = Tables()
    tables.add(weights.finish(tables))
    out = {"layers": tables.layers, "heads": tables.heads, "model": [tables.model]}
    facts = {"device": str(device), "dtype": opts.dtype, "weights_only": True,
             "null_columns": explain_nulls(out, tables.nulls, calibrated=False),
             "peak_resident_weight_bytes": model.reader.peak_live_bytes}
    return ScanResult(out, [], timings, facts)


def build_manifest(model: OpenModel, calib: CalibrationSet | None, result: ScanResult, seed: int,
                   fingerprint: str | None = None) -> dict[str, Any]:
    """Everything needed to reproduce or compare a report (STYLE.md, "Reports")."""
    from attnstab_cli.model.describe import describe_checkpoint

    config_hash = hashlib.sha256(json.dumps(model.hf_config, sort_keys=True).encode()).hexdigest() \
        if model.hf_config is not None else None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "attnstab", "version": __version__},
        "checkpoint": {**describe_checkpoint(model, resolve_dtype(result.facts["dtype"])),
                       "config_sha256": config_hash, "fingerprint": fingerprint},
        "calibration": None if calib is None else {
            "source": calib.source, "source_sha256": calib.source_hash, "token_sha256": calib.token_hash,
            "n_tokens": calib.n_tokens,
            "n_sequences": calib.n_sequences, "n_sequences_requested": calib.requested, "seq_len": calib.seq_len,
            "seed": seed,
            "batch_sizes": [int(b.shape[0]) for b in calib.batches]},
        "run": {**result.facts, "timings": result.timings, "torch": torch.__version__, "triton": triton_version,
                "python": platform.python_version()},
    }


@dataclass(frozen=True)
class ScanRequest:
    """One checkpoint scan as the commands ask for it (``scan``, and ``compare``/``gate``/``track`` on checkpoints)."""

    checkpoint: str
    calibration: CalibrationRequest = field(default_factory=CalibrationRequest)
    options: ScanOptions = field(default_factory=ScanOptions)
    weights_only: bool = False
    hash_mode: HashMode = "sampled"
    arch: str | None = None
    overrides: dict[str, Any] | None = None


def scan_checkpoint(req: ScanRequest, calib: CalibrationSet | None = None,
                    on_progress: ProgressFn | None = None,
                    on_warning: Callable[[str], None] | None = None,
                    group: Group = SOLO) -> tuple[Report, CalibrationSet | None]:
    """Open, check the weight values of, fingerprint and scan ``req.checkpoint``; returns the report (not yet
    written) and the tokens it used.

    A model whose largest layer (or embedding table) cannot fit the device's free memory is refused first
    (:func:`~attnstab_cli.model.memory.check_resident_fits`). The value check
    (:func:`~attnstab_cli.model.weight_values.check_weight_values`) streams every weight once
    before any other work, so no pass (``--grad``, ``--curvature``, a gate) runs on broken weights;
    ``on_warning`` hears of what it warns about. ``calib`` reuses another scan's tokens exactly (compare, track),
    checked against this model's vocabulary and context. ``on_progress(stage, done, total)`` reports each finished
    step of each stage. Stage timings (open, value check, fingerprint, calibration, the scan's own stages) land in
    the manifest. Of several ranks (``group``), every rank opens, checks and calibrates alike and the scan is
    sharded by sequence (:func:`run_scan`); ``--weights-only`` is not sharded.
    """
    if group.world_size > 1:
        req = replace(req, options=replace(req.options, device=group.device_name(req.options.device)))
    stages: dict[str, float] = {}
    t = time.perf_counter()
    model = open_model(req.checkpoint, req.arch, req.overrides)
    stages["open_s"] = time.perf_counter() - t
    check_resident_fits(model, resolve_device(req.options.device), resolve_dtype(req.options.dtype),
                        head=req.options.grad and not req.weights_only)
    t = time.perf_counter()
    for text in check_weight_values(model, resolve_dtype(req.options.dtype)):
        if on_warning:
            on_warning(text)
    stages["weight_values_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fingerprint = compute_fingerprint(model.files.weight_files, req.hash_mode)
    stages["fingerprint_s"] = time.perf_counter() - t
    if req.weights_only:
        result = run_weights_only(model, req.options, on_progress)
    else:
        t = time.perf_counter()
        if calib is None:
            calib = build_calibration(req.calibration, model.cfg.vocab_size, model.cfg.max_seq_len,
                                      model.tokenizer_path, req.checkpoint)
        else:
            check_seq_len(calib.seq_len, model.cfg.max_seq_len)
            for batch in calib.batches:
                check_token_range(batch, model.cfg.vocab_size, f"calibration tokens ({calib.source})")
        stages["calibration_s"] = time.perf_counter() - t
        result = run_scan(model, calib, req.options, on_progress, group)
    result.timings = {**stages, **result.timings}
    manifest = build_manifest(model, calib, result, req.calibration.seed, fingerprint)
    manifest["run"]["hash_mode"] = req.hash_mode
    tokens = None if calib is None else torch.cat([b.to(torch.int64).cpu() for b in calib.batches]).numpy()
    return Report(manifest, result.tables, tokens=tokens), calib
