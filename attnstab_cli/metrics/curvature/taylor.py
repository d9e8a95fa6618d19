"""The Taylor account of a loss change between two checkpoints, per layer and block (issue 6, item 3).

With w_A, w_B the layer parameters of A and B, Δw = w_B − w_A, g = ∇L(w_A), H = ∇²L(w_A) (one Hessian-vector product
H Δw) and the same at B:

* ``first_order``   = gᵀΔw
* ``second_order``  = gᵀΔw + ½ ΔwᵀHΔw                                  (expansion at A; error O(‖Δw‖³))
* ``symmetric``     = ½(g_A + g_B)ᵀΔw + (1/12) Δwᵀ(H_A − H_B)Δw      (error O(‖Δw‖⁵))

The symmetric form uses A and B alike: ΔL = ∫₀¹ f(s) ds with f(s) = ∇L(w_A + sΔw)ᵀΔw and f'(s) = ΔwᵀH(s)Δw, and the
Euler–Maclaurin (Hermite-corrected trapezoid) rule ∫₀¹ f = ½(f(0) + f(1)) − (1/12)(f'(1) − f'(0)) + O(‖Δw‖⁵). The
plain mean of the two second-order expansions (at A, and at B back to A) would be ½(g_A + g_B)ᵀΔw + ¼ Δwᵀ(H_A − H_B)Δw:
its third-order terms add rather than cancel, so it is no better than the expansion at A.

Per block b each prediction is split by restricting the outer Δw to the block — e.g. Δw_bᵀ(g_b + ½(HΔw)_b) — so the
block terms sum exactly to the total (cross-block curvature is shared by the two blocks it couples, through HΔw). The
loss is evaluated with A's embeddings and head throughout; the change that B's own embeddings/head add is reported
apart (``embeddings_and_head`` = L(B) − L_A(w_B)), outside the expansion. ``residual`` = actual − prediction.
"""
from __future__ import annotations

from typing import Any

import torch

from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.curvature.loss import ModelLoss
from attnstab_cli.metrics.curvature.spectrum import gradient, hvp

PREDICTIONS = ("first_order", "second_order", "symmetric")


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in names)


def compute_taylor(loss_a: ModelLoss, loss_b: ModelLoss) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-block rows (layer, block, and each prediction's term) and the totals with the actual changes."""
    wa, wb = loss_a.params, loss_b.params
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        raise UsageError("--loss needs two checkpoints of the same architecture (their layer parameters differ in "
                         "names or shapes)")
    if loss_a.cfg != loss_b.cfg:
        diff = [f for f in loss_a.cfg.__dataclass_fields__ if getattr(loss_a.cfg, f) != getattr(loss_b.cfg, f)]
        raise UsageError(f"--loss needs two checkpoints of the same architecture; their configs differ in "
                         f"{', '.join(diff)}")
    if loss_a.kind != loss_b.kind:
        raise UsageError(f"--loss: A's loss is {loss_a.kind}, B's is {loss_b.kind}")
    dw = {k: wb[k] - wa[k] for k in wa}
    ga, gb = gradient(loss_a, wa), gradient(loss_a, wb)
    ha, hb = hvp(loss_a, wa, dw), hvp(loss_a, wb, dw)
    rows = []
    for (layer, block), names in loss_a.blocks().items():
        first = _dot(ga, dw, names)
        quad_a, quad_b = _dot(ha, dw, names), _dot(hb, dw, names)
        rows.append({"layer": layer, "block": block,
                     "dw_norm": _dot(dw, dw, names) ** 0.5, "first_order": first,
                     "second_order": first + 0.5 * quad_a,
                     "symmetric": 0.5 * (first + _dot(gb, dw, names)) + (quad_a - quad_b) / 12.0})
    l_a, l_ab, l_b = float(loss_a().detach()), float(loss_a(wb).detach()), float(loss_b().detach())
    totals: dict[str, Any] = {"loss_a": l_a, "loss_b": l_b, "delta_loss": l_b - l_a, "delta_loss_layers": l_ab - l_a,
                              "embeddings_and_head": l_b - l_ab, "loss_kind": loss_a.kind,
                              "dw_norm": sum(r["dw_norm"] ** 2 for r in rows) ** 0.5}
    for p in PREDICTIONS:
        totals[p] = sum(r[p] for r in rows)
        totals[f"residual_{p}"] = totals["delta_loss_layers"] - totals[p]
    return rows, totals
