"""Numerical-fragility diagnostics of arXiv 2510.21770, v1 definitions (THEORY §13; issue 4, item 5).

Per layer: ``kappa_score`` = max over (batch, head) of ‖Q‖‖K‖/‖QKᵀ‖ (spectral norms; exact, from the R factors of Q
and K, so no n × n matrix), ``kappa_softmax`` = max over sampled rows of λ_max(diag p − ppᵀ)·‖s‖/‖p‖ (λ_max exact, by
bisection on the secular equation, where the authors run 7 power iterations that can only underestimate it; with a
sink logit p are the model's key probabilities, which sum to m < 1, THEORY §18.4),
``kappa_v`` = max over (batch, KV head) of σ_max(V)/(σ_min(V) + 1e-6), ``c_ln`` and ``rho_ln_<precision>`` from the
median token variance (mean square for RMSNorm) of each norm input, the LN-ε the authors' mitigation would choose,
and the layer term T_ℓ = κ_softmax(1 + κ_score)κ(V)‖W_O‖₂ + κ_eff + C_LN. Per model: Σ T_ℓ and its relaxed form.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attnstab_cli.distributed.group import Group
from attnstab_cli.metrics.seeding import sequence_generator
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.metrics.threads import single_threaded
from attnstab_cli.model.traces import LayerTrace
from attnstab_cli.reference.attention_rows import compute_masked_softmax, compute_row_logits

F64 = torch.float64
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KAPPA_V_RIDGE = 1e-6
SOFTMAX_ROWS = 256           # rows sampled per layer for kappa_softmax (THEORY §13)
RHO_TARGET = 0.5             # ρ⋆ of the LN-ε mitigation (the authors try 0.5, 0.6, 0.7)
EPS_FLOOR, EPS_CAP = 1e-6, 1e-2
_BISECTIONS = 64            # halvings of (p_(2), p_(1)): below float64 resolution


def compute_kappa_score(q: Tensor, k: Tensor) -> Tensor:
    """‖Q‖₂‖K‖₂/‖QKᵀ‖₂ per (batch, head) of q ``[B, H, T, D]``, k ``[B, H_kv, T, D]`` (the scale cancels), float64
    ``[B, H]``; inf where QKᵀ = 0. With Q = U_Q R_Q and K = U_K R_K, ‖QKᵀ‖ = ‖R_Q R_Kᵀ‖."""
    group = q.shape[1] // k.shape[1]
    with single_threaded():
        r_q = torch.linalg.qr(q.to(F64), mode="r").R                           # [B, H, r, D]
        r_k = torch.linalg.qr(k.to(F64), mode="r").R.repeat_interleave(group, 1)   # [B, H, r, D]
        n_q = torch.linalg.matrix_norm(r_q, ord=2)
        n_k = torch.linalg.matrix_norm(r_k, ord=2)
        n_s = torch.linalg.matrix_norm(r_q @ r_k.transpose(-1, -2), ord=2)
    return torch.where(n_s > 0, n_q * n_k / n_s.clamp_min(torch.finfo(F64).tiny), math.inf)


def compute_softmax_lambda_max(p: Tensor) -> Tensor:
    """λ_max(diag p − ppᵀ) of rows p ``[R, n]`` (float64 ``[R]``), exactly: the largest root of Σ p_j²/(p_j − λ) = 1,
    which lies in (p_(2), p_(1)); a repeated top value is itself the largest eigenvalue."""
    p = p.to(F64)
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values                           # [R, ≤2]
    hi = top2[:, 0]
    lo = top2[:, 1] if p.shape[-1] > 1 else torch.zeros_like(hi)
    a, b = lo.clone(), hi.clone()
    for _ in range(_BISECTIONS):
        mid = (a + b) / 2
        denom = p - mid[:, None]
        g = torch.where(p > 0, p * p / torch.where(denom == 0, torch.finfo(F64).tiny, denom), 0.0).sum(-1)
        above = g > 1.0                                                      # g increases: the root is below mid
        b, a = torch.where(above, mid, b), torch.where(above, a, mid)
    return torch.where(hi > lo, (a + b) / 2, hi)


def compute_kappa_v(v: Tensor) -> Tensor:
    """σ_max(V)/(σ_min(V) + 1e-6) per (batch, KV head) of v ``[B, H_kv, T, D]`` (float64 ``[B, H_kv]``)."""
    with single_threaded():
        s = torch.linalg.svdvals(v.to(F64))                                    # [B, H_kv, min(T, D)]
    return s[..., 0] / (s[..., -1] + KAPPA_V_RIDGE)


def compute_norm_constants(median_stat: float, eps: float, d_model: int) -> dict[str, float | None]:
    """C_LN, ρ_LN per precision and the suggested ε per low precision for one norm (THEORY §13)."""
    out: dict[str, float | None] = {
        "c_ln": math.sqrt(median_stat) / math.sqrt(eps) + median_stat / eps + 1.0}
    for name, dtype in PRECISIONS.items():
        mach = torch.finfo(dtype).eps
        rho = median_stat / eps * d_model * mach
        out[f"rho_ln_{name}"] = rho
        if name != "fp32":
            new = min(max(median_stat * d_model * mach / RHO_TARGET, EPS_FLOOR), EPS_CAP)
            out[f"ln_eps_suggested_{name}"] = max(eps, new) if RHO_TARGET < rho < 1.0 else None
    return out


class FragilityPass:
    """Per-layer NF columns from streamed traces; weights-derived terms are joined in :meth:`records`."""

    name = "fragility"
    needs = ("weights",)

    def __init__(self, d_model: int, n_sequences: int = 1, seed: int = 0) -> None:
        self.d_model, self.seed = d_model, seed
        self.rows_per_seq = -(-SOFTMAX_ROWS // max(1, n_sequences))
        self.kappa_score: dict[int, float] = {}
        self.kappa_v: dict[int, float] = {}
        self.softmax_rows: dict[int, list[float]] = {}
        self.stats: dict[int, dict[str, list[Tensor]]] = {}
        self.eps: dict[int, dict[str, float]] = {}

    def observe(self, trace: LayerTrace, ctx: Any = None) -> None:
        a, layer = trace.attn, trace.layer
        self.kappa_score[layer] = max(self.kappa_score.get(layer, 0.0), float(compute_kappa_score(a.q, a.k).max()))
        self.kappa_v[layer] = max(self.kappa_v.get(layer, 0.0), float(compute_kappa_v(a.v).max()))
        self.softmax_rows.setdefault(layer, []).extend(self._softmax_terms(trace))
        for name, norm in trace.norms.items():
            if norm.stat is None:                       # an identity in place of a norm
                continue
            self.stats.setdefault(layer, {}).setdefault(name, []).append(norm.stat.detach().reshape(-1).cpu().double())
            self.eps.setdefault(layer, {})[name] = norm.eps

    def _softmax_terms(self, trace: LayerTrace) -> list[float]:
        """λ_max·‖s‖/‖p‖ of this batch's share of the SOFTMAX_ROWS rows sampled per layer: ⌈SOFTMAX_ROWS / n⌉ of
        each of the n sequences (over head and query, seeded per layer and sequence); masked keys excluded."""
        a = trace.attn
        b, h, t = a.q.shape[:3]
        picks = torch.cat([torch.randperm(h * t, generator=sequence_generator(self.seed, "kappa_softmax",
                                                                             trace.first_seq + s, trace.layer))
                           [:min(self.rows_per_seq, h * t)] + s * h * t for s in range(b)])
        bi, hi, ti = picks // (h * t), picks // t % h, picks % t
        s, allowed = compute_row_logits(a.q, a.k, a.scale, bi, hi, ti, causal=a.causal, window=a.window,
                                        key_padding_mask=a.key_padding_mask, logit_cap=a.logit_cap)  # [r, T_k]
        keep = allowed.any(-1)
        sink = None if a.sinks is None else a.sinks.to(s.device)[hi.to(s.device)][keep]   # §18.4: rows sum to m
        p = compute_masked_softmax(s[keep], allowed[keep], sink)                       # [r', T_k]
        lam = compute_softmax_lambda_max(p)
        s_norm = torch.where(allowed[keep], s[keep], 0.0).norm(dim=-1)
        return (lam * s_norm / p.norm(dim=-1)).cpu().tolist()

    def merge_ranks(self, group: Group) -> None:
        """Maxima over the ranks; the sampled rows' terms and the norm statistics (for the medians) gathered."""
        ranks = group.all_gather((self.kappa_score, self.kappa_v, self.softmax_rows, self.stats),
                                 "the fragility columns")
        layers = sorted(self.kappa_score)
        self.kappa_score = {i: max(r[0][i] for r in ranks) for i in layers}
        self.kappa_v = {i: max(r[1][i] for r in ranks) for i in layers}
        self.softmax_rows = {i: [x for r in ranks for x in r[2][i]] for i in layers}
        self.stats = {i: {name: [t for r in ranks for t in r[3][i][name]] for name in self.stats[i]}
                      for i in self.stats}

    def finish(self, tables: Tables) -> TableParts:
        layers, model = self.records(tables.layers)
        return TableParts(layers=layers, model=model)

    def records(self, layers: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-layer NF records (needs ``wo_full_norm``, ``kappa_eff``, ``ffn_w1_norm``, ``ffn_w2_norm`` of
        ``layers``) and the model totals ``nf_rhs``, ``nf_rhs_relaxed``."""
        out, terms, rho_hat = [], [], []
        for rec in layers:
            layer = rec["layer"]
            norms = {name: compute_norm_constants(float(torch.cat(st).median()), self.eps[layer][name],
                                                  self.d_model) for name, st in self.stats[layer].items()}
            worst = max(norms.values(), key=lambda c: c["rho_ln_bf16"])
            row: dict[str, Any] = {"layer": layer, "kappa_score": self.kappa_score[layer],
                                   "kappa_softmax": max(self.softmax_rows[layer], default=0.0),
                                   "kappa_v": self.kappa_v[layer], "c_ln": max(c["c_ln"] for c in norms.values())}
            for name in PRECISIONS:
                row[f"rho_ln_{name}"] = worst[f"rho_ln_{name}"]
            for name in ("bf16", "fp16"):
                row[f"ln_eps_suggested_{name}"] = worst[f"ln_eps_suggested_{name}"]
            out.append(row)
            if rec.get("kappa_eff") is None:           # a mixture-of-experts FFN: §13 has no term for it
                row["nf_layer_term"] = None
                terms.append(None)
                continue
            term = (row["kappa_softmax"] * (1.0 + row["kappa_score"]) * row["kappa_v"] * rec["wo_full_norm"]
                    + rec["kappa_eff"] + row["c_ln"])
            row["nf_layer_term"] = term
            terms.append(term)
            rho_hat.append(min(0.9, rec["wo_full_norm"] + rec["ffn_w2_norm"] * rec["ffn_w1_norm"]))
        if any(t is None for t in terms):
            return out, {"nf_rhs": None, "nf_rhs_relaxed": None}
        relaxed = sum(t * math.prod(1.0 + r for r in rho_hat[i + 1:]) for i, t in enumerate(terms))
        return out, {"nf_rhs": sum(terms), "nf_rhs_relaxed": relaxed}
