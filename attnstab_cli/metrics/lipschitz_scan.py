"""Lipschitz bounds of every layer in the three tiers, streamed (THEORY §7, §8).

Tier 1 and the head norms once per layer from the weights (θ = 1, global norm constants, the magnitude-reset radius);
tier 2 and 2r at every calibration sequence, with θ̃_h = max θ_hi over that sequence's rows (from the θ pass of the same
trace), the measured radius and the local norm constants; tier 3, the certified empirical lower bound by alternating
maximisation, on the first ``empirical_seqs`` sequences: searched in float32 on a causal prefix within about one forward
pass of the layer, certified by one float64 jvp (§8.3 "Budget"), with the tightness ratios of §8.4 (a ratio above 1 +
tolerance is an error: a bound used outside its hypotheses). Columns report the max over sequences; the model totals are
the products over layers (and their logs): tier 1, and max over sequences of the tier-2 product.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, replace
from typing import Any

import torch

from attnstab_cli.distributed.group import Group
from attnstab_cli.metrics.layer_context import LayerContext, to_cpu
from attnstab_cli.metrics.lipschitz import EmpiricalBudget, compute_layer_empirical_budgeted, compute_layer_lipschitz, \
    compute_mean_tightness
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.rope import compute_rope_cos_sin
from attnstab_cli.model.traces import LayerTrace

F64 = torch.float64


class LipschitzPass:
    """Per-layer tier columns; tier 2 reads the per-row θ_hi the θ pass published on the layer context."""

    name = "lipschitz"
    needs = ("theta",)

    def __init__(self, cfg: ModelConfig, empirical_seqs: int = 2, seed: int = 0, tokens_per_layer: int = 0) -> None:
        self.cfg = cfg
        self.empirical_seqs, self.seed, self.tokens_per_layer = empirical_seqs, seed, tokens_per_layer
        self.rows: dict[int, dict[str, Any]] = {}
        self.log_calibrated: dict[int, float] = {}                 # sequence -> Σ_l log lip_layer_calibrated
        self.tightness: dict[int, dict[str, list[float]]] = {}
        self.head_terms: dict[int, dict[str, torch.Tensor]] = {}   # layer -> column -> [H], max over sequences
        self.budgets: list[EmpiricalBudget] = []                   # tier 3, per searched sequence

    def observe(self, trace: LayerTrace, ctx: LayerContext) -> None:
        if trace.attn.q.device.type != "cpu":
            trace = to_cpu(replace(trace, weights=None))       # per-layer bound arithmetic is small: host it
        w, layer = ctx.weights, trace.layer
        assert ctx.theta_hi is not None, "the θ pass publishes θ_hi before the Lipschitz pass reads it"
        for b in range(trace.resid_in.shape[0]):
            result = compute_layer_lipschitz(w, self.cfg, ctx.r2_reset, trace, ctx.theta_hi[b], b,
                                             norms=ctx.norms, weights_tier=ctx.weights_tier, ffn_norms=ctx.ffn_norms)
            rec = asdict(result.record)
            row = self.rows.setdefault(layer, {})
            for key, value in rec.items():
                if key == "layer":
                    continue
                if value is None:                                # not applicable (no branch-output norms)
                    row.setdefault(key, None)
                    continue
                row[key] = value if row.get(key) is None else max(row[key], value)
            ct = result.calibrated_tier
            heads = self.head_terms.setdefault(layer, {})
            for name in ("lambda_h", "phi_h", "head_term_calibrated"):
                value = getattr(ct.mha, name).to(F64).cpu()
                heads[name] = value if name not in heads else torch.maximum(heads[name], value)
            seq = trace.first_seq + b
            self.log_calibrated[seq] = self.log_calibrated.get(seq, 0.0) + math.log(rec["lip_layer_calibrated"])
            if seq < self.empirical_seqs:
                self._empirical(trace, ctx, b, result)

    def _empirical(self, trace: LayerTrace, ctx: LayerContext, b: int, result: Any) -> None:
        """Tier 3 on sequence ``b`` of this trace under the budget of §8.3, the tier-2r row terms as scores."""
        rope_cfg, full = self.cfg.rope_at(trace.layer), trace.resid_in.shape[1]

        def rope(t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
            """The first ``t`` positions rotated as in the whole sequence (its length selects LongRoPE's factors)."""
            return None if rope_cfg is None else compute_rope_cos_sin(rope_cfg, torch.arange(t), dtype, seq_len=full)

        kpm = None if trace.attn.key_padding_mask is None else trace.attn.key_padding_mask[b:b + 1].cpu()
        ct = result.calibrated_tier
        scores = ct.refined.row_terms.cpu() if ct is not None else None
        tokens = self.tokens_per_layer or trace.resid_in.shape[0] * trace.resid_in.shape[1]
        w32, w64 = ctx.weights_in(torch.float32), ctx.weights_in(F64)
        emp, budget = compute_layer_empirical_budgeted(w32, w64, self.cfg, trace.layer, trace.resid_in[b].cpu(), rope,
                                                       kpm, scores, tokens, seed=self.seed)
        self.budgets.append(budget)
        acc = self.tightness.setdefault(trace.layer, {"seq": [], "lower": [], "b2": [], "b2r": []})
        acc["seq"].append(trace.first_seq + b)
        acc["lower"].append(emp.lip_layer_empirical)
        acc["b2"].append(ct.lip_layer_calibrated)
        acc["b2r"].append(ct.lip_layer_refined)

    def merge_ranks(self, group: Group) -> None:
        """Maxima over the ranks; the per-sequence products and the tier-3 results gathered, in sequence order."""
        ranks = group.all_gather((self.rows, self.head_terms, self.log_calibrated, self.tightness, self.budgets),
                                 "the Lipschitz columns")
        rows: dict[int, dict[str, Any]] = {}
        for rank_rows, *_ in ranks:
            for layer, rec in rank_rows.items():
                into = rows.setdefault(layer, {})
                for key, value in rec.items():
                    seen = into.get(key)
                    into[key] = value if seen is None else seen if value is None else max(seen, value)
        self.rows = dict(sorted(rows.items()))
        self.head_terms = {layer: {name: functools.reduce(torch.maximum, (r[1][layer][name] for r in ranks))
                                   for name in cols} for layer, cols in sorted(self.head_terms.items())}
        self.log_calibrated = dict(sorted((k, v) for r in ranks for k, v in r[2].items()))
        tightness: dict[int, dict[str, list[float]]] = {}
        for layer in sorted({layer for r in ranks for layer in r[3]}):
            order = sorted(((seq, r[3][layer], i) for r in ranks if layer in r[3]
                            for i, seq in enumerate(r[3][layer]["seq"])), key=lambda entry: entry[0])
            tightness[layer] = {name: [acc[name][i] for _, acc, i in order] for name in ("seq", "lower", "b2", "b2r")}
        self.tightness = tightness
        self.budgets = [b for r in ranks for b in r[4]]

    def budget_facts(self) -> dict[str, Any]:
        """Tier 3's prefix and budget for the manifest (§8.3 "Budget")."""
        if not self.budgets:
            return {"sequences": 0}
        first = self.budgets[0]
        return {"sequences": len(self.budgets), "search_dtype": first.search_dtype,
                "certificate_dtype": "float64", "prefix_tokens": max(x.prefix for x in self.budgets),
                "span": "whole sequence (bidirectional or short)" if first.whole_sequence else
                "causal prefix (exact for the rows inside it)",
                "lanes": first.lanes, "allowed_lane_iters_per_sequence": first.allowed_lane_iters,
                "used_lane_iters": sum(x.used_lane_iters for x in self.budgets)}

    def head_records(self) -> list[dict[str, Any]]:
        """Per (layer, head): Λ_h, Φ_h and the tier-2 head term c_h of §5.2, each the max over sequences."""
        return [{"layer": layer, "head": h, **{k: float(v[h]) for k, v in cols.items()}}
                for layer, cols in sorted(self.head_terms.items()) for h in range(self.cfg.n_heads)]

    def finish(self, tables: Tables) -> TableParts:
        layers, model = self.records()
        return TableParts(layers=layers, heads=self.head_records(), model=model, facts={"tier3": self.budget_facts()})

    def records(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-layer records (max over sequences) and the model totals."""
        out = []
        for layer in sorted(self.rows):
            row = {"layer": layer, **self.rows[layer]}
            acc = self.tightness.get(layer)
            if acc and acc["lower"]:
                row["lip_layer_empirical"] = max(acc["lower"])
                row["tightness"] = compute_mean_tightness(acc["lower"], acc["b2"], F64, "tightness")
                row["tightness_refined"] = compute_mean_tightness(acc["lower"], acc["b2r"], F64, "tightness_refined")
            out.append(row)
        log_w = sum(math.log(r["lip_layer_weights"]) for r in out)
        log_c = max(self.log_calibrated.values()) if self.log_calibrated else None
        return out, {"lip_model_weights": math.exp(log_w) if log_w < 700 else math.inf, "log_lip_model_weights": log_w,
                     "lip_model_calibrated": None if log_c is None else (math.exp(log_c) if log_c < 700 else math.inf),
                     "log_lip_model_calibrated": log_c}
