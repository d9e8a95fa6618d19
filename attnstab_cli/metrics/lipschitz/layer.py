"""Per-layer Lipschitz bounds for the three residual wirings and the three tiers (THEORY §7, §8).

| wiring   | bound                                           |
|----------|-------------------------------------------------|
| pre      | ``(1 + L_N1 L_MHA)(1 + L_N2 L_FFN)``            |
| sandwich | ``(1 + L_N1b L_MHA L_N1a)(1 + L_N2b L_FFN L_N2a)`` (§18.3) |
| output_norm | ``(1 + L_N1b L_MHA)(1 + L_N2b L_FFN)`` (§18.3: N1a, N2a are identities, L = 1) |
| post     | ``L_N2 (1 + L_FFN) L_N1 (1 + L_MHA)``           |
| parallel | ``1 + L_N1 L_MHA + L_N2 L_FFN``                 |

Branch-output norms (``N1b``, ``N2b``; columns ``ln1_out_*``, ``ln2_out_*``) are evaluated, in tier 2, at the branch
output tokens they read; the MHA and FFN radii are the resets of the input norms ``N1a``, ``N2a`` as in pre-norm.
Without input norms (``output_norm``) the MHA reads the residual stream ``h_l``, whose radius grows with depth: every
earlier branch output is reset, so ``||h_l|| <= R_emb + sum_{m<l} (R(N1b^m) + R(N2b^m))`` (:func:`advance_stream_radius`),
and the FFN reads ``h' = h + N1b(.)`` within that plus ``R(N1b^l)``.

Tier 1 (§8.1): weights only, ``theta = 1``, global norm constants, MHA radius ``r2_in_reset``. Tier 2 (§8.2): at one
sequence, each factor at its actual input; ``theta_tilde_h = max_i theta_hi`` over that sequence's rows. Tier 2r
replaces ``L_MHA`` by the activation-norm form (§5.5). By monotonicity ``B(2r) <= B(2) <= B(1)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnstab_cli.arch.spec import NormKind, Residual
from attnstab_cli.metrics.lipschitz.ffn import compute_ffn_bound_tokens, compute_ffn_bound_weights, compute_ffn_norms
from attnstab_cli.metrics.lipschitz.moe import MoENorms, compute_moe_ball, compute_moe_local_tokens, compute_moe_norms
from attnstab_cli.metrics.lipschitz.mha import (HeadNorms, MHABound, QKStats, RefinedMHABound,
                                                compute_attention_allowed, compute_layer_head_norms,
                                                compute_mha_bound, compute_mha_refined)
from attnstab_cli.metrics.lipschitz.norms import (compute_embedding_radius, compute_reset_radius, norm_lip_global,
                                                  norm_lip_local)
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.traces import LayerTrace
from attnstab_cli.model.weights import LayerWeights, NormWeights


@dataclass(frozen=True)
class LayerLipschitz:
    """One layer's row of Lipschitz columns (§0.3) at one sequence; None where a tier was not evaluated."""

    layer: int
    ln1_lip_global: float
    ln1_lip_local: float | None
    ln2_lip_global: float
    ln2_lip_local: float | None
    lip_mha_weights: float
    lip_mha_calibrated: float | None
    lip_mha_refined: float | None
    mha_value_path: float | None
    mha_attn_path: float | None
    lip_ffn_weights: float
    lip_ffn_calibrated: float | None
    lip_layer_weights: float
    lip_layer_calibrated: float | None
    lip_layer_refined: float | None
    r2_in_reset: float
    logit_bound: float                 # tier 1: max_h s M_Q M_K, a bound on every |s q.k| (THEORY §18.2)
    ln1_out_lip_global: float | None = None     # branch-output norms (§18.3); None without them
    ln1_out_lip_local: float | None = None
    ln2_out_lip_global: float | None = None
    ln2_out_lip_local: float | None = None


def combine_layer_bound(residual: Residual, ln1: float, mha: float, ln2: float, ffn: float,
                        ln1_out: float = 1.0, ln2_out: float = 1.0) -> float:
    """The tables of §7 and §18.3 for one set of factor bounds; ``ln1_out``, ``ln2_out`` are the branch-output
    norms' constants (1 where the wiring has none)."""
    if residual.serial:
        return (1.0 + ln1_out * mha * ln1) * (1.0 + ln2_out * ffn * ln2)
    if residual is Residual.POST:
        return ln2 * (1.0 + ffn) * ln1 * (1.0 + mha)
    return 1.0 + ln1 * mha + ln2 * ffn


def compute_first_layer_radius(kind: NormKind, embed_norm: NormWeights | None, tok: torch.Tensor | None = None,
                               pos: torch.Tensor | None = None, types: torch.Tensor | None = None,
                               tok_scale: float = 1.0) -> float:
    """Radius of ``h_0`` (§8.1, post-LN layer 1): the embedding norm's reset bound, else the embedding row norms."""
    if embed_norm is not None:
        return compute_reset_radius(embed_norm, kind)
    if tok is None:
        raise ValueError("without an embedding norm the token embedding table is needed for the layer-1 radius")
    return compute_embedding_radius(tok, pos, types, tok_scale)


def compute_r2_in_reset(cfg: ModelConfig, weights: LayerWeights, prev_norm_ffn: NormWeights | None = None,
                        first_layer_radius: float | None = None, stream_radius: float | None = None) -> float:
    """``r2_in_reset`` (§8.1): pre/parallel the reset of this layer's N1; post-LN the previous layer's LN2 (pass
    ``prev_norm_ffn``) or, for layer 1, ``first_layer_radius`` (:func:`compute_first_layer_radius`); a pre-norm layer
    whose N1 is the identity (layer 0 after an embedding norm) also takes ``first_layer_radius``. Without input norms
    (§18.3) the MHA reads ``h_l`` itself: pass its radius ``stream_radius`` (:func:`advance_stream_radius`)."""
    kind = cfg.layout.norm
    if not cfg.layout.residual.input_norms:
        if stream_radius is None:
            raise ValueError(f"layer {weights.layer}: no norm before the MHA; give the radius of h_l")
        return stream_radius
    if cfg.layout.residual is not Residual.POST and weights.norm_attn.identity:
        if first_layer_radius is None:                 # layer 0 reads h_0: the embedding norm's reset bound
            raise ValueError(f"layer {weights.layer}: N1 is the identity; give the embedding norm's radius")
        return first_layer_radius
    if cfg.layout.residual is not Residual.POST:
        return compute_reset_radius(weights.norm_attn, kind)
    if prev_norm_ffn is not None:
        return compute_reset_radius(prev_norm_ffn, kind)
    if first_layer_radius is None:
        raise ValueError(f"post-LN layer {weights.layer}: give the previous LN2 or the first-layer radius")
    return first_layer_radius


def compute_ffn_reset_radius(cfg: ModelConfig, weights: LayerWeights, r2_in_reset: float | None = None) -> float:
    """Radius of the FFN input on every input (§8.1): the reset of N2 (pre/parallel) or of LN1 (post-LN); without
    input norms (§18.3) the FFN reads ``h' = h + N1b(MHA h)``: ``r2_in_reset`` (the radius of ``h``) plus N1b's
    reset."""
    if not cfg.layout.residual.input_norms:
        if r2_in_reset is None or weights.norm_attn_out is None:
            raise ValueError(f"layer {weights.layer}: no norm before the FFN; give the radius of h_l")
        return r2_in_reset + compute_reset_radius(weights.norm_attn_out, cfg.layout.norm)
    norm = weights.norm_attn if cfg.layout.residual is Residual.POST else weights.norm_ffn
    return compute_reset_radius(norm, cfg.layout.norm)


def advance_stream_radius(cfg: ModelConfig, weights: LayerWeights, radius: float) -> float:
    """Radius of ``h_{l+1}`` from that of ``h_l`` in a layer whose branch outputs are normalized (§18.3): each branch
    adds at most its output norm's reset, ``||gamma_b||_inf sqrt(d)`` for RMSNorm."""
    if weights.norm_attn_out is None or weights.norm_ffn_out is None:
        raise ValueError(f"layer {weights.layer}: the stream radius needs norms on both branch outputs")
    kind = cfg.layout.norm
    return radius + compute_reset_radius(weights.norm_attn_out, kind) + compute_reset_radius(weights.norm_ffn_out, kind)


FFNNorms = dict[str, float] | MoENorms


def compute_layer_ffn_norms(weights: LayerWeights) -> FFNNorms:
    """The FFN's weight norms (once per layer): the dense matrices', or the experts', router's and shared experts'."""
    return compute_ffn_norms(weights.ffn) if weights.moe is None else compute_moe_norms(weights.moe)


def compute_layer_ffn_ball(weights: LayerWeights, cfg: ModelConfig, r2: float, norms: FFNNorms | None = None) -> float:
    """Tier-1 FFN bound at input radius ``r2``: §6 for a dense FFN, §18.7 inside a routing region for experts."""
    if weights.moe is None:
        return compute_ffn_bound_weights(weights.ffn, cfg.layout.ffn, cfg.activation, r2)
    assert cfg.moe is not None
    return compute_moe_ball(r2, weights.moe, cfg.moe, cfg.activation, norms if isinstance(norms, MoENorms) else None)


def compute_layer_ffn_tokens(trace: LayerTrace, cfg: ModelConfig, batch: int,
                             norms: FFNNorms | None = None) -> torch.Tensor:
    """Tier-2 FFN bound per token of sequence ``batch`` at its FFN inputs: ``[T]`` (experts: routing fixed)."""
    w = trace.weights
    if w.moe is None:
        return compute_ffn_bound_tokens(w.ffn, cfg.layout.ffn, cfg.activation, trace.ffn_in[batch],
                                        norms if isinstance(norms, dict) and norms else compute_ffn_norms(w.ffn))
    assert cfg.moe is not None and trace.moe is not None
    return compute_moe_local_tokens(trace.ffn_in[batch], w.moe, cfg.moe, trace.moe, batch, cfg.activation,
                                    norms if isinstance(norms, MoENorms) else None)


@dataclass(frozen=True)
class WeightsTier:
    """Tier-1 factors (§8.1)."""

    ln1_lip_global: float
    ln2_lip_global: float
    mha: MHABound
    lip_ffn_weights: float
    lip_layer_weights: float
    r2_in_reset: float
    ln1_out_lip_global: float | None = None
    ln2_out_lip_global: float | None = None


def _factors(*constants: float | None) -> tuple[float, ...]:
    """Branch-output norm constants as bound factors: 1 where the layer has no such norm."""
    return tuple(1.0 if c is None else c for c in constants)


def _cpu_head_norms(weights: LayerWeights, cfg: ModelConfig, norms: HeadNorms | None) -> HeadNorms:
    """Head norms with every tensor on the CPU: the per-head bound arithmetic mixes them with CPU ``theta`` tensors
    (and missing biases become CPU zeros), so weights resident on an accelerator would otherwise fail."""
    return (norms or compute_layer_head_norms(weights, cfg)).to("cpu")


def compute_weights_tier(weights: LayerWeights, cfg: ModelConfig, r2_in_reset: float,
                         norms: HeadNorms | None = None, ffn_norms: FFNNorms | None = None) -> WeightsTier:
    """Weights-only bound of one layer at MHA radius ``r2_in_reset`` (theta = 1, global norm constants)."""
    norms = _cpu_head_norms(weights, cfg, norms)
    ln1 = norm_lip_global(weights.norm_attn, cfg.norm_eps)
    ln2 = norm_lip_global(weights.norm_ffn, cfg.norm_eps)
    mha = compute_mha_bound(norms, 1.0, r2_in_reset, cfg.attn_scale(weights.layer))
    ffn = compute_layer_ffn_ball(weights, cfg, compute_ffn_reset_radius(cfg, weights, r2_in_reset), ffn_norms)
    ln1o, ln2o = (None if n is None else norm_lip_global(n, cfg.norm_eps)
                  for n in (weights.norm_attn_out, weights.norm_ffn_out))
    layer = combine_layer_bound(cfg.layout.residual, ln1, mha.lip_mha, ln2, ffn, *_factors(ln1o, ln2o))
    return WeightsTier(ln1, ln2, mha, ffn, layer, r2_in_reset, ln1o, ln2o)


@dataclass(frozen=True)
class CalibratedTier:
    """Tier-2 and tier-2r factors at one sequence (§8.2)."""

    ln1_lip_local: float
    ln2_lip_local: float
    r2_in: float                   # measured max token l2 norm at the MHA input
    theta_tilde: torch.Tensor      # [H] max_i theta_hi over this sequence's rows
    mha: MHABound
    refined: RefinedMHABound
    lip_ffn_calibrated: float
    lip_layer_calibrated: float
    lip_layer_refined: float
    ln1_out_lip_local: float | None = None     # at the MHA output tokens (branch-output norm, §18.3)
    ln2_out_lip_local: float | None = None     # at the FFN output tokens


def qk_stats(trace: LayerTrace, batch: int) -> QKStats | None:
    """Sequence ``batch``'s smallest q/k norm statistics (§18.2): per head ``[H]`` / ``[H_kv]`` (the statistic is
    ``[B, T, heads]``), or scalars for a full-width norm (``[B, T]``); None without q/k norms."""
    a = trace.attn
    latent = trace.weights is not None and trace.weights.latent       # MLA: the latents' statistics, q's optional
    if a.k_norm_stat is None or (a.q_norm_stat is None and not latent):
        return None
    lo = lambda stat: None if stat is None else stat[batch].to(torch.float64).cpu().amin(dim=0)
    return QKStats(lo(a.q_norm_stat), lo(a.k_norm_stat))


def compute_calibrated_tier(trace: LayerTrace, cfg: ModelConfig, theta_hi: torch.Tensor, batch: int = 0,
                            norms: HeadNorms | None = None,
                            ffn_norms: FFNNorms | None = None) -> CalibratedTier:
    """Tier 2 / 2r of sequence ``batch`` of ``trace``; ``theta_hi [H, T]`` are certified per-row upper values;
    ``norms`` and ``ffn_norms`` (weights alone) are computed here when not given."""
    w, a, b = trace.weights, trace.attn, batch
    norms = _cpu_head_norms(w, cfg, norms)
    stats = qk_stats(trace, b)
    n1, n2 = trace.norms["norm_attn"], trace.norms["norm_ffn"]
    ln1 = norm_lip_local(w.norm_attn, None if n1.stat is None else n1.stat[b], n1.eps)
    ln2 = norm_lip_local(w.norm_ffn, None if n2.stat is None else n2.stat[b], n2.eps)
    r2 = float(torch.linalg.vector_norm(a.x[b].to(torch.float64), dim=-1).max())
    theta_hi = theta_hi.to(torch.float64)
    theta_tilde = theta_hi.amax(dim=-1).cpu()                                            # [H]
    mha = compute_mha_bound(norms, theta_tilde, r2, a.scale, stats)
    kpm = None if a.key_padding_mask is None else a.key_padding_mask[b].cpu()           # the mask is built on the CPU
    allowed = compute_attention_allowed(a.x.shape[1], a.causal, a.window, kpm)           # [T, T]
    refined = compute_mha_refined(norms, a.q[b], a.k[b], a.v[b], a.scale, allowed, theta_hi, stats=stats)
    ffn = float(compute_layer_ffn_tokens(trace, cfg, b, ffn_norms).max())
    residual = cfg.layout.residual
    ln1o, ln2o = (None if norm is None else norm_lip_local(norm, trace.norms[role].stat[b], trace.norms[role].eps)
                  for role, norm in (("norm_attn_out", w.norm_attn_out), ("norm_ffn_out", w.norm_ffn_out)))
    outs = _factors(ln1o, ln2o)
    return CalibratedTier(
        ln1, ln2, r2, theta_tilde, mha, refined, ffn,
        combine_layer_bound(residual, ln1, mha.lip_mha, ln2, ffn, *outs),
        combine_layer_bound(residual, ln1, refined.lip_mha_refined, ln2, ffn, *outs), ln1o, ln2o,
    )


@dataclass(frozen=True)
class LayerLipschitzResult:
    """The record plus the per-head and per-row detail behind it."""

    record: LayerLipschitz
    weights_tier: WeightsTier
    calibrated_tier: CalibratedTier | None


def compute_layer_lipschitz(weights: LayerWeights, cfg: ModelConfig, r2_in_reset: float,
                            trace: LayerTrace | None = None, theta_hi: torch.Tensor | None = None,
                            batch: int = 0, norms: HeadNorms | None = None,
                            weights_tier: WeightsTier | None = None,
                            ffn_norms: FFNNorms | None = None) -> LayerLipschitzResult:
    """All tiers of one layer; tiers 2/2r only when ``trace`` and ``theta_hi [H, T]`` (sequence ``batch``) are given.

    ``norms``, ``weights_tier`` and ``ffn_norms`` depend on the weights alone: a scan computes them once per layer
    and passes them for every sequence.
    """
    norms = _cpu_head_norms(weights, cfg, norms)
    wt = weights_tier or compute_weights_tier(weights, cfg, r2_in_reset, norms)
    ct = None
    if trace is not None and theta_hi is not None:
        ct = compute_calibrated_tier(trace, cfg, theta_hi, batch, norms, ffn_norms)
    record = LayerLipschitz(
        layer=weights.layer, ln1_lip_global=wt.ln1_lip_global, ln1_lip_local=ct and ct.ln1_lip_local,
        ln2_lip_global=wt.ln2_lip_global, ln2_lip_local=ct and ct.ln2_lip_local, lip_mha_weights=wt.mha.lip_mha,
        lip_mha_calibrated=ct and ct.mha.lip_mha, lip_mha_refined=ct and ct.refined.lip_mha_refined,
        mha_value_path=ct and ct.mha.mha_value_path, mha_attn_path=ct and ct.mha.mha_attn_path,
        lip_ffn_weights=wt.lip_ffn_weights, lip_ffn_calibrated=ct and ct.lip_ffn_calibrated,
        lip_layer_weights=wt.lip_layer_weights, lip_layer_calibrated=ct and ct.lip_layer_calibrated,
        lip_layer_refined=ct and ct.lip_layer_refined, r2_in_reset=r2_in_reset, logit_bound=wt.mha.logit_bound,
        ln1_out_lip_global=wt.ln1_out_lip_global, ln1_out_lip_local=ct and ct.ln1_out_lip_local,
        ln2_out_lip_global=wt.ln2_out_lip_global, ln2_out_lip_local=ct and ct.ln2_out_lip_local,
    )
    return LayerLipschitzResult(record, wt, ct)
