"""Routing columns of mixture-of-experts layers and the per-expert table (THEORY §18.7), streamed.

Per MoE layer, over every calibration token: ``router_margin_min`` / ``router_margin_p05`` (the gap between the k-th
and (k+1)-th selection score, the scores plus any selection-only bias, with group-limited routing also the gap
between the last searched and the first skipped group's rank: how far the token sits from a routing switch, in
score units), ``expert_load_max`` / ``expert_load_cv`` (each expert's share of the token-slots: its largest value, and
its standard deviation over its mean), ``router_entropy_mean`` (entropy of the router distribution over all E
experts, nats; sigmoid scores normalized to sum 1), ``gate_theta_mean`` (the mean gate-map factor G of the local
bound: theta of the renormalized gates, or its bound theta_hi of the full router distribution) and ``moe_piecewise``
(the layer's bounds hold inside routing regions). Per (layer, expert): the spectral norms of the expert's matrices,
its tier-1 ball bound at the FFN input radius, and its share and count of token-slots.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from attnstab_cli.arch.spec import RouterScore
from attnstab_cli.distributed.group import Group
from attnstab_cli.metrics.layer_context import LayerContext
from attnstab_cli.metrics.lipschitz.layer import compute_ffn_reset_radius
from attnstab_cli.metrics.lipschitz.moe import MoENorms, compute_expert_balls, compute_gate_theta
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.model.blocks import group_ranks, limit_to_groups
from attnstab_cli.model.config import ModelConfig, MoEConfig
from attnstab_cli.model.traces import LayerTrace, MoETrace
from attnstab_cli.model.weights import MoEWeights

F64 = torch.float64
DENSE_LAYER = "dense FFN layer (no mixture of experts: mlp_only_layers, decoder_sparse_step or the first dense layers)"
DENSE_FAMILY = "every FFN of the model is dense (no mixture of experts)"
MOE_FFN = ("every FFN is a mixture of experts: the FFN weight columns are of one dense FFN (per-expert norms: "
           "experts.parquet, THEORY §18.7)")
NO_NF_TERM = "THEORY §13 has no fragility term for a mixture-of-experts FFN"
DENSE_FFN_COLUMNS = ("ffn_w1_norm", "ffn_w2_norm", "ffn_gate_norm", "ffn_up_norm", "ffn_gate_norm_2inf",
                     "ffn_up_norm_2inf", "kappa_eff")
MOE_LAYER_COLUMNS = ("router_margin_min", "router_margin_p05", "expert_load_max", "expert_load_cv",
                     "router_entropy_mean", "gate_theta_mean", "moe_piecewise")


def compute_selection_margin(route: MoETrace, w: MoEWeights, moe: MoEConfig) -> torch.Tensor:
    """Distance of each token ``[B, T]`` from a routing switch in selection-score units (module docstring); inf
    when every expert is chosen and no group is skipped."""
    select = route.scores.to(F64)
    if w.score_bias is not None:
        select = select + w.score_bias.to(F64).to(select.device)
    gap = torch.full(select.shape[:-1], math.inf, dtype=F64, device=select.device)
    candidates, terms = select.shape[-1], moe.selection.group_rank_terms
    if terms is not None and moe.topk_group < moe.n_group:
        rank = group_ranks(select, moe.n_group, terms).sort(dim=-1, descending=True).values
        gap = rank[..., moe.topk_group - 1] - rank[..., moe.topk_group]
        select = limit_to_groups(select, moe.n_group, moe.topk_group, terms)
        candidates = moe.topk_group * (select.shape[-1] // moe.n_group)
    if moe.top_k >= candidates:
        return gap
    top = select.topk(moe.top_k + 1, dim=-1).values
    return torch.minimum(top[..., -2] - top[..., -1], gap)


def compute_router_entropy(route: MoETrace, moe: MoEConfig) -> torch.Tensor:
    """Entropy (nats) of each token's router distribution over all E experts: ``[B, T]``."""
    p = route.scores.to(F64)
    if moe.score is RouterScore.SIGMOID:
        p = p / p.sum(dim=-1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)


class MoEPass:
    """The routing columns of MoE layers and the ``experts`` table; dense layers' columns are null."""

    name = "moe"
    needs: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.margins: dict[int, list[torch.Tensor]] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.entropy: dict[int, list[torch.Tensor]] = {}
        self.gate_theta: dict[int, list[torch.Tensor]] = {}
        self.experts: dict[int, list[dict[str, Any]]] = {}

    def observe(self, trace: LayerTrace, ctx: LayerContext) -> None:
        moe, layer = self.cfg.moe, trace.layer
        if moe is None or trace.moe is None:
            return
        route, w = trace.moe, ctx.weights.moe
        self.margins.setdefault(layer, []).append(compute_selection_margin(route, w, moe).flatten().cpu())
        self.entropy.setdefault(layer, []).append(compute_router_entropy(route, moe).flatten().cpu())
        for b in range(route.selected.shape[0]):
            self.gate_theta.setdefault(layer, []).append(compute_gate_theta(moe, route, b))
        counts = torch.bincount(route.selected.flatten().cpu(), minlength=moe.n_experts)
        self.counts[layer] = counts if layer not in self.counts else self.counts[layer] + counts
        if layer not in self.experts:
            self.experts[layer] = self._expert_rows(ctx)

    def merge_ranks(self, group: Group) -> None:
        """Expert counts summed over the ranks; the per-token margins, entropies and gate factors gathered in rank
        (so sequence) order for the quantile and the means. The expert weight rows are the same on every rank."""
        for layer in sorted(self.counts):
            group.all_reduce(self.counts[layer], "sum", "the routing columns")
        ranks = group.all_gather((self.margins, self.entropy, self.gate_theta), "the routing columns")
        self.margins, self.entropy, self.gate_theta = (
            {layer: [t for r in ranks for t in r[i][layer]] for layer in sorted(ranks[0][i])} for i in range(3))

    def _expert_rows(self, ctx: LayerContext) -> list[dict[str, Any]]:
        """Weight columns of each expert (once per layer)."""
        norms = ctx.ffn_norms
        assert isinstance(norms, MoENorms)
        radius = compute_ffn_reset_radius(self.cfg, ctx.weights, ctx.r2_reset)
        lips, _ = compute_expert_balls(radius, ctx.weights.moe, self.cfg.activation, norms, self.cfg.moe)
        return [{"layer": ctx.layer, "expert": e, "gate_norm": float(norms.gate[e]), "up_norm": float(norms.up[e]),
                 "out_norm": float(norms.out[e]), "lip_expert_weights": float(lips[e])}
                for e in range(len(lips))]

    def finish(self, tables: Tables) -> TableParts:
        if self.cfg.moe is None:
            return TableParts(layers=[{"layer": i, **dict.fromkeys(MOE_LAYER_COLUMNS)} for i in range(self.cfg.n_layers)],
                              nulls=dict.fromkeys(MOE_LAYER_COLUMNS, DENSE_FAMILY))
        layers, experts = [], []
        for layer in range(self.cfg.n_layers):
            if layer not in self.counts:
                layers.append({"layer": layer, **dict.fromkeys(MOE_LAYER_COLUMNS)})
                continue
            counts = self.counts[layer].to(F64)
            share = counts / counts.sum()
            margins = torch.cat(self.margins[layer])
            finite = margins[torch.isfinite(margins)]
            layers.append({
                "layer": layer,
                "router_margin_min": float(finite.min()) if finite.numel() else None,
                "router_margin_p05": float(torch.quantile(finite, 0.05)) if finite.numel() else None,
                "expert_load_max": float(share.max()),
                "expert_load_cv": float(share.std(unbiased=False) / share.mean()),
                "router_entropy_mean": float(torch.cat(self.entropy[layer]).mean()),
                "gate_theta_mean": float(torch.cat(self.gate_theta[layer]).mean()),
                "moe_piecewise": True,
            })
            for row in self.experts[layer]:
                e = row["expert"]
                experts.append({**row, "load_share": float(share[e]), "token_slots": int(self.counts[layer][e])})
        moe_layers = [self.cfg.is_moe(i) for i in range(self.cfg.n_layers)]
        nulls = {} if any(moe_layers) else dict.fromkeys(MOE_LAYER_COLUMNS, DENSE_LAYER)
        if any(moe_layers):
            nulls.update(dict.fromkeys(("nf_layer_term", "nf_rhs", "nf_rhs_relaxed"), NO_NF_TERM))
        if all(moe_layers):
            nulls.update(dict.fromkeys(DENSE_FFN_COLUMNS, MOE_FFN))
        return TableParts(layers=layers, experts=experts, nulls=nulls)
