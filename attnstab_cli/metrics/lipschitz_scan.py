"""Lipschitz bounds of every layer in the three tiers, streamed (THEORY §7, §8; issue 4, item 2).

Tier 1 once per layer from the weights (θ = 1, global norm constants, the magnitude-reset radius); tier 2 and 2r at
every calibration sequence, with θ̃_h = max θ_hi over that sequence's rows (from the θ pass of the same trace), the
measured radius and the local norm constants; tier 3, the certified empirical lower bound by alternating
maximisation, on the first ``empirical_seqs`` sequences in float64, with the tightness ratios of §8.4 (a ratio above
1 + tolerance is an error: a bound used outside its hypotheses). Columns report the max over sequences; the model
totals are the products over layers (and their logs): tier 1, and max over sequences of the tier-2 product.
"""
from __future__ import annotations

import math
from dataclasses import asdict, fields, is_dataclass, replace
from typing import Any

import torch

from attnstab_cli.arch.spec import Residual
from attnstab_cli.metrics.lipschitz import (compute_first_layer_radius, compute_layer_empirical,
                                            compute_layer_lipschitz, compute_mean_tightness, compute_r2_in_reset)
from attnstab_cli.metrics.theta_scan import ThetaObserver
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.rope import compute_rope_cos_sin
from attnstab_cli.model.traces import LayerTrace
from attnstab_cli.model.weights import LayerWeights, NormWeights

F64 = torch.float64


def to_cpu(obj: Any) -> Any:
    """A CPU copy of a trace, its weights and everything in them (the bound arithmetic runs on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: to_cpu(getattr(obj, f.name)) for f in fields(obj) if f.init})
    return obj


def to_float64(w: LayerWeights) -> LayerWeights:
    """A float64 CPU copy of one layer's weights (tier 3 runs the layer in float64, THEORY §8.3)."""
    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to("cpu", F64)
        if isinstance(value, NormWeights):
            return NormWeights(cast(value.weight), None if value.bias is None else cast(value.bias))
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value
    return replace(w, **{f.name: cast(getattr(w, f.name)) for f in fields(w)})


class LipschitzObserver:
    """Per-layer tier columns; reads the per-row θ_hi the :class:`ThetaObserver` kept for the same trace."""

    def __init__(self, model: OpenModel, theta: ThetaObserver, empirical_seqs: int = 2, seed: int = 0) -> None:
        self.model, self.cfg, self.theta = model, model.cfg, theta
        self.empirical_seqs, self.seed = empirical_seqs, seed
        self.first_radius: float | None = None
        self.prev_norm_ffn: NormWeights | None = None              # layer l-1's LN2 while layer l is observed
        self.r2_reset: dict[int, float] = {}                       # layer -> magnitude-reset radius (per layer)
        self.rows: dict[int, dict[str, Any]] = {}
        self.log_calibrated: dict[tuple[int, int], float] = {}     # (batch, seq) -> Σ_l log lip_layer_calibrated
        self.tightness: dict[int, dict[str, list[float]]] = {}
        self.head_terms: dict[int, dict[str, torch.Tensor]] = {}   # layer -> column -> [H], max over sequences

    def _r2_in_reset(self, w: LayerWeights) -> float:
        if self.cfg.layout.residual is Residual.POST and w.layer == 0 and self.first_radius is None:
            loader, names = self.model.loader(), self.model.names
            norm = loader.norm("embed_norm") if names.find("embed_norm.weight") else None
            tok = loader.tensor("embed_tokens.weight") if norm is None else None
            pos = loader.tensor("embed_positions.weight") if norm is None and names.find("embed_positions.weight") \
                else None
            self.first_radius = compute_first_layer_radius(self.cfg.layout.norm, norm, tok, pos)
        return compute_r2_in_reset(self.cfg, w, self.prev_norm_ffn, self.first_radius)

    def observe(self, trace: LayerTrace) -> None:
        if trace.attn.q.device.type != "cpu":
            trace = to_cpu(trace)                              # per-layer bound arithmetic is small: host it
        w, layer = trace.weights, trace.layer
        assert w is not None, "the layer stream hands every trace its weights"
        if layer not in self.r2_reset:                         # first batch of this layer: the previous layer's LN2
            self.r2_reset[layer] = self._r2_in_reset(w)
            self.prev_norm_ffn = NormWeights(w.norm_ffn.weight.detach().clone(),
                                             None if w.norm_ffn.bias is None else w.norm_ffn.bias.detach().clone())
        r2_reset = self.r2_reset[layer]
        for b in range(trace.resid_in.shape[0]):
            result = compute_layer_lipschitz(w, self.cfg, r2_reset, trace, self.theta.last_theta_hi[b], b)
            rec = asdict(result.record)
            row = self.rows.setdefault(layer, {})
            for key, value in rec.items():
                if value is None or key == "layer":
                    continue
                row[key] = value if key not in row else max(row[key], value)
            ct = result.calibrated_tier
            heads = self.head_terms.setdefault(layer, {})
            for name in ("lambda_h", "phi_h", "head_term_calibrated"):
                value = getattr(ct.mha, name).to(F64).cpu()
                heads[name] = value if name not in heads else torch.maximum(heads[name], value)
            key = (trace.batch, b)
            self.log_calibrated[key] = self.log_calibrated.get(key, 0.0) + math.log(rec["lip_layer_calibrated"])
            done = len(self.tightness.get(layer, {}).get("lower", []))
            if done < self.empirical_seqs:
                self._empirical(trace, w, b, result)

    def _empirical(self, trace: LayerTrace, w: LayerWeights, b: int, result: Any) -> None:
        """Tier 3 on sequence ``b`` of this trace, with the tier-2r row terms as candidate scores (§8.3)."""
        t = trace.resid_in.shape[1]
        rope = None if self.cfg.rope is None else compute_rope_cos_sin(self.cfg.rope, torch.arange(t), F64)
        kpm = None if trace.attn.key_padding_mask is None else trace.attn.key_padding_mask[b:b + 1].cpu()
        scores = result.calibrated_tier.refined.row_terms.cpu() if result.calibrated_tier is not None else None
        emp = compute_layer_empirical(to_float64(w), self.cfg, trace.layer, trace.resid_in[b].to(F64).cpu(),
                                      rope, kpm, scores=scores, seed=self.seed)
        ct = result.calibrated_tier
        acc = self.tightness.setdefault(trace.layer, {"lower": [], "b2": [], "b2r": []})
        acc["lower"].append(emp.lip_layer_empirical)
        acc["b2"].append(ct.lip_layer_calibrated)
        acc["b2r"].append(ct.lip_layer_refined)

    def head_records(self) -> list[dict[str, Any]]:
        """Per (layer, head): Λ_h, Φ_h and the tier-2 head term c_h of §5.2, each the max over sequences."""
        return [{"layer": layer, "head": h, **{k: float(v[h]) for k, v in cols.items()}}
                for layer, cols in sorted(self.head_terms.items()) for h in range(self.cfg.n_heads)]

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
