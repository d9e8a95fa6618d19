"""``scan --curvature``: where the loss surface is sharpest, per layer and parameter block (issue 6, item 1).

For every diagonal block H_bb of the Hessian of the calibration loss (the ``--grad`` loss; blocks in
``curvature/loss.py``): the largest eigenvalue by Lanczos on Hessian-vector products, a Hutchinson estimate of its
trace with its standard error, and the block's gradient norm; then the same top eigenvalue for the whole Hessian
over every block (the model row; its trace is the sum of the block traces, which is exact for the trace of the full
Hessian, with the standard errors added in quadrature — each block draws its own probes).

All layers are resident at once (Hessian-vector products couple every layer), in float64 by default; a model whose
parameters and autograd graph would not fit is refused before any work with the size it needs.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from attnstab_cli.errors import UnsupportedError, UsageError
from attnstab_cli.metrics.curvature.loss import ModelLoss
from attnstab_cli.metrics.curvature.spectrum import flat_operator, gradient, hutchinson_trace, lanczos_top
from attnstab_cli.model.load import OpenModel

GRAPH_FACTOR = 12          # bytes resident per parameter byte: weights, gradient, tangents, saved activations (rough)


@dataclass(frozen=True)
class CurvatureOptions:
    max_iter: int = 40              # Lanczos steps per block (Hessian-vector products)
    tol: float = 1e-4               # stop when the residual is <= tol * |lambda|
    probes: int = 16                # Hutchinson probes per block
    dtype: str = "float64"
    whole_model: bool = True        # also lambda_max of the full Hessian over every block
    seed: int = 0


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: physical memory), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_curvature_dtype(opts: CurvatureOptions) -> torch.dtype:
    dtype = {"float64": torch.float64, "float32": torch.float32}.get(opts.dtype)
    if dtype is None:
        raise UsageError(f"--curvature-dtype must be float64 or float32, got {opts.dtype!r}")
    return dtype


def check_fits(model: OpenModel, device: torch.device, opts: CurvatureOptions) -> int:
    """Refuse (exit 2) a model whose resident parameters and graph would not fit; returns the estimate in bytes."""
    if model.cfg.moe is not None:
        raise UnsupportedError("--curvature is not supported for mixture-of-experts models: the parameter blocks of "
                               "routed experts are not defined (THEORY §18.7)", hint="scan without --curvature")
    dtype = resolve_curvature_dtype(opts)
    n = sum(math.prod(info.shape) for info in model.reader.infos.values())
    need = n * torch.finfo(dtype).bits // 8 * GRAPH_FACTOR
    have = available_memory_bytes(device)
    if have is not None and need > have:
        raise UsageError(f"--curvature keeps every layer resident: about {need / 2**30:.1f} GiB for {n:,} parameters "
                         f"in {dtype} with the autograd graph, more than the {have / 2**30:.1f} GiB available on "
                         f"{device}", hint="use a GPU or --curvature-dtype float32; a streaming variant does not "
                                           "exist yet (README, Curvature)")
    return need


def compute_curvature(model: OpenModel, batches: list[torch.Tensor], device: torch.device, opts: CurvatureOptions,
                      on_block: Callable[[int | None, str], None] | None = None) -> tuple[list[dict[str, Any]],
                                                                                         dict[str, Any]]:
    """Curvature records (one per (layer, block), then the model row) and the facts for the manifest."""
    dtype = resolve_curvature_dtype(opts)
    need = check_fits(model, device, opts)
    loss = ModelLoss(model, batches, device, dtype, opts.seed)
    records = _blocks_and_model(loss, device, dtype, opts, on_block)
    facts = {**asdict(opts), "loss": loss.kind, "loss_value": float(loss().detach()),
             "memory_estimate_bytes": need, "method": "Lanczos (full reorthogonalisation) and Hutchinson "
                                                     "(Rademacher) on forward-over-reverse Hessian-vector products"}
    return records, facts


def _blocks_and_model(loss: ModelLoss, device: torch.device, dtype: torch.dtype, opts: CurvatureOptions,
                      on_block: Callable[[int | None, str], None] | None) -> list[dict[str, Any]]:
    grads = gradient(loss, loss.params)
    records, traces, ses = [], 0.0, 0.0
    for i, ((layer, block), names) in enumerate(loss.blocks().items()):
        sub = {k: loss.params[k] for k in names}
        op, n = flat_operator(loss, sub)
        top = lanczos_top(op, n, max_iter=opts.max_iter, tol=opts.tol, seed=opts.seed + i, dtype=dtype,
                          device=device)
        tr = hutchinson_trace(op, n, probes=opts.probes, seed=opts.seed + 10_000 + i, dtype=dtype, device=device)
        traces, ses = traces + tr.value, ses + tr.stderr ** 2
        records.append({"layer": layer, "block": block, "n_params": n, "lambda_max": top.value,
                        "lambda_residual": top.residual, "trace_est": tr.value, "trace_se": tr.stderr,
                        "grad_norm": math.sqrt(sum(float(grads[k].double().pow(2).sum()) for k in names)),
                        "iterations": top.iterations, "converged": top.converged})
        if on_block:
            on_block(layer, block)
    model_row: dict[str, Any] = {"layer": None, "block": "model", "n_params": sum(r["n_params"] for r in records),
                                 "trace_est": traces, "trace_se": math.sqrt(ses),
                                 "grad_norm": math.sqrt(sum(r["grad_norm"] ** 2 for r in records))}
    if opts.whole_model:
        op, n = flat_operator(loss, loss.params)
        top = lanczos_top(op, n, max_iter=opts.max_iter, tol=opts.tol, seed=opts.seed - 1, dtype=dtype, device=device)
        model_row.update(lambda_max=top.value, lambda_residual=top.residual, iterations=top.iterations,
                         converged=top.converged)
        if on_block:
            on_block(None, "model")
    records.append(model_row)
    return records
