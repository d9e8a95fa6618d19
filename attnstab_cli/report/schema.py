"""Explicit Parquet schemas of the report tables (STYLE.md, "Reports"): key columns first, units and descriptions
in each field's metadata, null for "not applicable". A schema change bumps ``SCHEMA_VERSION``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = "6"
# Columns each version added, per table (what a reader fills with null for an older report). Version 2 added no
# column: its manifest gained the weight fingerprint, the calibration source hash and per-stage timings, and each
# Parquet file's metadata the tool version, checkpoint fingerprint, family, calibration id, seed, device, versions.
# Version 3 added the optional curvature table (``scan --curvature``); older reports simply have none.
# Version 4 added no column: ``theta_paper_mean`` became the mean over a seeded sample of rows on the CPU (every row
# on CUDA; the manifest's run.theta.paper_rows says which), where it had been over every row.
# Version 5 added the logit bound and the q/k norm gains (THEORY §18.2), each layer's attention window and the
# branch-output norm columns (THEORY §18.3; null for families without such norms); the manifest's run.null_columns
# gives the reason for every column that is null in every row.
# Version 6 added the routing columns of mixture-of-experts layers (THEORY §18.7; null for dense layers and families)
# and the optional experts table (one row per (layer, expert) of a mixture-of-experts model).
SCHEMA_HISTORY: dict[str, dict[str, tuple[str, ...]]] = {
    "1": {}, "2": {}, "3": {}, "4": {},
    "5": {"layers": ("attn_window", "qnorm_gamma_max", "knorm_gamma_max", "logit_bound",
                     "norm1_out_min_var", "norm2_out_min_var", "norm1_out_gamma_max", "norm1_out_beta_norm",
                     "norm2_out_gamma_max", "norm2_out_beta_norm", "ln1_out_lip_global", "ln1_out_lip_local",
                     "ln2_out_lip_global", "ln2_out_lip_local")},
    "6": {"heads": ("sink_mass_mean",),
          "layers": ("router_margin_min", "router_margin_p05", "expert_load_max", "expert_load_cv",
                     "router_entropy_mean", "gate_theta_mean", "moe_piecewise")},
}


@dataclass(frozen=True)
class Column:
    """One report column. ``required`` columns (the row keys) are never null; every other column may be null, which
    means "not applicable" and renders as an em dash."""

    name: str
    type: pa.DataType
    unit: str
    description: str
    required: bool = False


I64, F64 = pa.int64(), pa.float64()

LAYER_COLUMNS: tuple[Column, ...] = (
    Column("layer", I64, "index", "0-based layer index", required=True),
    Column("r_resid_max", F64, "l2", "max token l2 norm of the residual stream h_l entering the layer"),
    Column("r_resid_mean", F64, "l2", "mean token l2 norm of h_l"),
    Column("r_ln_mean", F64, "l2", "mean token l2 norm at the attention input (N1(h_l) in pre-norm layers)"),
    Column("r2_in", F64, "l2", "max token l2 norm at the attention input (R_2 of THEORY §5.2)"),
    Column("r2_ffn_in", F64, "l2", "max token l2 norm at the FFN input"),
    Column("norm1_min_var", F64, "variance",
           "smallest per-token variance (LayerNorm) or mean square (RMSNorm) at the first norm's input"),
    Column("norm2_min_var", F64, "variance", "the same at the second norm's input"),
    Column("norm1_out_min_var", F64, "variance", "the same at the attention-output norm's input, i.e. the MHA "
           "output tokens (THEORY §18.3; null without branch-output norms)"),
    Column("norm2_out_min_var", F64, "variance", "the same at the FFN-output norm's input, i.e. the FFN output tokens "
           "(null without branch-output norms)"),
    Column("wq_full_norm", F64, "l2 operator", "spectral norm of the full W_Q [d, H*D]"),
    Column("wk_full_norm", F64, "l2 operator", "spectral norm of the full W_K [d, H_kv*D]"),
    Column("wv_full_norm", F64, "l2 operator", "spectral norm of the full W_V [d, H_kv*D]"),
    Column("wo_full_norm", F64, "l2 operator", "spectral norm of the full W_O [H*D, d]"),
    Column("proj_product_layer", F64, "1", "||W_Q|| ||W_K|| ||W_V|| ||W_O||, full matrices (THEORY §12)"),
    Column("alpha_geo", F64, "1", "geometric-mean projection norm proj_product_layer^(1/4) (THEORY §10)"),
    Column("kappa_eff", F64, "1", "kappa(W1) + kappa(W2) + kappa(W_O), kappa = s_max / (s_min + 1e-6) (THEORY §13); "
           "null for mixture-of-experts layers"),
    Column("ffn_w1_norm", F64, "l2 operator", "spectral norm of the FFN input matrix ([W_gate W_up] when gated); "
           "null for mixture-of-experts layers, as are the other FFN weight columns"),
    Column("ffn_w2_norm", F64, "l2 operator", "spectral norm of the FFN output matrix"),
    Column("ffn_gate_norm", F64, "l2 operator", "spectral norm of W_gate (gated FFN; null otherwise)"),
    Column("ffn_up_norm", F64, "l2 operator", "spectral norm of W_up (gated FFN; null otherwise)"),
    Column("ffn_gate_norm_2inf", F64, "2->inf", "largest column l2 norm of W_gate (THEORY §6.2; null if not gated)"),
    Column("ffn_up_norm_2inf", F64, "2->inf", "largest column l2 norm of W_up (THEORY §6.2; null if not gated)"),
    Column("norm1_gamma_max", F64, "1", "max |gamma| of the first norm"),
    Column("norm1_beta_norm", F64, "l2", "l2 norm of the first norm's beta (null for RMSNorm)"),
    Column("norm2_gamma_max", F64, "1", "max |gamma| of the second norm"),
    Column("norm2_beta_norm", F64, "l2", "l2 norm of the second norm's beta (null for RMSNorm)"),
    Column("norm1_out_gamma_max", F64, "1", "max |gamma| of the norm on the attention output (THEORY §18.3; null "
           "without branch-output norms); gamma = 1 + w where the model stores w (§18.6), as for every gamma column"),
    Column("norm1_out_beta_norm", F64, "l2", "l2 norm of that norm's beta (null for RMSNorm or without it)"),
    Column("norm2_out_gamma_max", F64, "1", "max |gamma| of the norm on the FFN output (null without it)"),
    Column("norm2_out_beta_norm", F64, "l2", "l2 norm of that norm's beta (null for RMSNorm or without it)"),
    Column("qnorm_gamma_max", F64, "1", "max |gamma| of the q norm on the projections (THEORY §18.2; null without)"),
    Column("knorm_gamma_max", F64, "1", "max |gamma| of the k norm on the projections (null without)"),
    Column("norm_eps", F64, "variance", "the norms' epsilon"),
    Column("attn_scale", F64, "1", "softmax scale s of the layer's logits s q.k"),
    Column("attn_window", I64, "tokens", "the layer's sliding attention window (local layers); null for global attention"),
    Column("theta_bar", F64, "1", "mean over heads of theta_mean (THEORY §12)"),
    Column("sens_proxy_resid", F64, "1", "2 s theta_bar r_resid_mean^2 proj_product_layer (THEORY §12)"),
    Column("sens_proxy_ln", F64, "1", "2 s theta_bar r_ln_mean^2 proj_product_layer (THEORY §12)"),
    Column("sens_log_theta", F64, "log", "log theta_bar: the θ term of log sens_proxy_*"),
    Column("sens_log_proj", F64, "log", "log proj_product_layer: the projection term of log sens_proxy_*"),
    Column("sens_log_r2_resid", F64, "log", "2 log r_resid_mean: the magnitude term of log sens_proxy_resid"),
    Column("sens_log_r2_ln", F64, "log", "2 log r_ln_mean: the magnitude term of log sens_proxy_ln"),
    Column("kappa_score", F64, "1", "max over (batch, head) of ||Q|| ||K|| / ||Q K^T|| (THEORY §13)"),
    Column("kappa_softmax", F64, "1",
           "max over 256 sampled rows of lambda_max(diag p - p p^T) ||s|| / ||p|| (lambda exact) (THEORY §13)"),
    Column("kappa_v", F64, "1", "max over (batch, KV head) of s_max(V) / (s_min(V) + 1e-6) (THEORY §13)"),
    Column("c_ln", F64, "1", "max over the layer's norms of s_med/sqrt(eps) + s2_med/eps + 1, s2_med the median "
                             "token variance (mean square for RMSNorm) of the norm input (THEORY §13)"),
    Column("rho_ln_fp32", F64, "1", "max over the layer's norms of (s2_med / eps) d eps_mach, fp32 eps_mach"),
    Column("rho_ln_bf16", F64, "1", "the same with bf16 eps_mach 2^-7"),
    Column("rho_ln_fp16", F64, "1", "the same with fp16 eps_mach 2^-10"),
    Column("ln_eps_suggested_bf16", F64, "variance",
           "epsilon the authors' LN mitigation picks for bf16 (rho* = 0.5, cap 1e-2); null unless 0.5 < rho_ln < 1"),
    Column("ln_eps_suggested_fp16", F64, "variance", "the same for fp16"),
    Column("nf_layer_term", F64, "1", "kappa_softmax (1 + kappa_score) kappa_v ||W_O|| + kappa_eff + c_ln"),
    Column("r2_in_reset", F64, "l2", "radius of the MHA input on every input: the magnitude-reset bound (THEORY §8.1)"),
    Column("ln1_lip_global", F64, "1", "Lipschitz constant of the first norm on all inputs (THEORY §4)"),
    Column("ln1_lip_local", F64, "1", "the same at the measured norm inputs (max over sequences)"),
    Column("ln2_lip_global", F64, "1", "second norm, all inputs"),
    Column("ln2_lip_local", F64, "1", "second norm, measured inputs (max over sequences)"),
    Column("ln1_out_lip_global", F64, "1", "norm on the attention output (N1b of THEORY §18.3), all inputs; null "
           "without branch-output norms"),
    Column("ln1_out_lip_local", F64, "1", "the same at the measured MHA output tokens (max over sequences)"),
    Column("ln2_out_lip_global", F64, "1", "norm on the FFN output (N2b), all inputs; null without it"),
    Column("ln2_out_lip_local", F64, "1", "the same at the measured FFN output tokens (max over sequences)"),
    Column("logit_bound", F64, "1",
           "tier 1 bound on every logit |s q.k|: max_h s M_Q M_K, the q/k norms' reset radii with q/k norms, else "
           "(||W_Q^h|| R + ||b_Q^h||)(||W_K^g|| R + ||b_K^g||) at R = r2_in_reset (THEORY §18.2)"),
    Column("lip_mha_weights", F64, "inf,2", "MHA bound, tier 1: theta = 1, radius r2_in_reset (THEORY §5.2, §8.1)"),
    Column("lip_mha_calibrated", F64, "inf,2", "MHA bound, tier 2: theta_tilde_hi per head, measured R2 (max over sequences)"),
    Column("lip_mha_refined", F64, "inf,2", "MHA bound, tier 2r: activation-norm form (THEORY §5.5; max over sequences)"),
    Column("mha_value_path", F64, "inf,2", "value-path part of lip_mha_calibrated"),
    Column("mha_attn_path", F64, "inf,2", "attention-path part of lip_mha_calibrated"),
    Column("lip_ffn_weights", F64, "inf,2", "FFN bound, tier 1 (THEORY §6)"),
    Column("lip_ffn_calibrated", F64, "inf,2", "FFN bound at the measured FFN inputs, tier 2 (max over sequences)"),
    Column("lip_layer_weights", F64, "inf,2", "layer bound, tier 1 (THEORY §7, §8.1)"),
    Column("lip_layer_calibrated", F64, "inf,2", "layer bound at each calibration sequence, tier 2 (max over sequences)"),
    Column("lip_layer_refined", F64, "inf,2", "layer bound, tier 2r (max over sequences)"),
    Column("lip_layer_empirical", F64, "inf,2",
           "certified lower bound of the layer's local Lipschitz constant, tier 3 (THEORY §8.3; max over sequences)"),
    Column("tightness", F64, "ratio", "lip_layer_empirical / lip_layer_calibrated per sequence, averaged (THEORY §8.4)"),
    Column("tightness_refined", F64, "ratio", "lip_layer_empirical / lip_layer_refined per sequence, averaged"),
    Column("router_margin_min", F64, "score", "mixture-of-experts layers (THEORY §18.7; null for dense FFN layers): "
           "smallest gap over calibration tokens between the k-th and (k+1)-th selection score (softmax probability "
           "or sigmoid score, plus any selection-only bias; group-limited routing: also the gap between the last "
           "searched and the first skipped group's rank), the token's distance to a routing switch"),
    Column("router_margin_p05", F64, "score", "5th percentile of that gap over the calibration tokens"),
    Column("expert_load_max", F64, "fraction", "largest share of the layer's token-slots (tokens x k) routed to one "
           "expert (1/E when balanced)"),
    Column("expert_load_cv", F64, "1", "standard deviation over mean of the experts' shares of token-slots"),
    Column("router_entropy_mean", F64, "nats", "mean entropy of the router distribution over all E experts (sigmoid "
           "scores normalized to sum 1)"),
    Column("gate_theta_mean", F64, "1", "mean over tokens of the gate map's inf->1 norm G of the local bound: theta "
           "of the renormalized gates (softmax over the selected logits), else theta_hi of the full router "
           "distribution, times the scaling factor; sigmoid gates by enumeration"),
    Column("moe_piecewise", pa.bool_(), "flag", "true for mixture-of-experts layers: the layer's Lipschitz columns "
           "bound the Jacobian inside a routing region (the map jumps where the selection switches); null for dense "
           "FFN layers. FFN weight columns, kappa_eff and nf_layer_term are null for these layers (per-expert norms: "
           "experts.parquet)"),
    Column("grad_h_in", F64, "l2", "--grad: ||dL/dh_l||_F over all calibration tokens (layer input)"),
    Column("grad_attn_params", F64, "l2", "--grad: l2 norm of the attention projections' gradients"),
    Column("grad_ffn_params", F64, "l2", "--grad: l2 norm of the FFN parameters' gradients"),
    Column("grad_norm_params", F64, "l2", "--grad: l2 norm of the norm layers' gradients (q/k norms included)"),
)

HEAD_COLUMNS: tuple[Column, ...] = (
    Column("layer", I64, "index", "0-based layer index", required=True),
    Column("head", I64, "index", "query head h", required=True),
    Column("kv_head", I64, "index", "key/value head g(h) = h // (H / H_kv)"),
    Column("n_rows", I64, "rows", "attention rows aggregated (n_keys >= min_keys)"),
    Column("n_rows_short", I64, "rows", "rows excluded from the descriptive aggregates (n_keys < min_keys)"),
    Column("theta_mean", F64, "1", "mean certified lower value theta_lo over aggregated rows"),
    Column("theta_hi_mean", F64, "1", "mean certified upper value theta_hi over aggregated rows"),
    Column("theta_lo_min", F64, "1", "smallest certified lower value"),
    Column("theta_p05", F64, "1", "5th percentile of theta_lo (histogram midpoint, error <= 0.001)"),
    Column("theta_p05_lo", F64, "1", "lower end of the bracket containing the 5th percentile"),
    Column("theta_p05_hi", F64, "1", "upper end of the bracket containing the 5th percentile"),
    Column("theta_p50", F64, "1", "median of theta_lo (histogram midpoint)"),
    Column("theta_p50_lo", F64, "1", "lower end of the bracket containing the median"),
    Column("theta_p50_hi", F64, "1", "upper end of the bracket containing the median"),
    Column("theta_width_max", F64, "1", "largest interval width theta_hi - theta_lo"),
    Column("theta_exact_frac", F64, "fraction", "fraction of rows with width <= 1e-12"),
    Column("theta_tilde_lo", F64, "1", "max over ALL rows of theta_lo (lower end of the bracket of max theta)"),
    Column("theta_tilde_hi", F64, "1", "max over ALL rows of theta_hi (used by the Lipschitz bounds)"),
    Column("theta_paper_mean", F64, "1", "mean of the paper's sorted-prefix estimate (not a bound; comparability): "
           "over every row on CUDA, over a seeded sample of 32 rows per head and sequence on the CPU "
           "(manifest run.theta.paper_rows)"),
    Column("pmax_mean", F64, "probability", "mean largest attention probability"),
    Column("pmax_max", F64, "probability", "largest attention probability of any aggregated row"),
    Column("peaked_frac", F64, "fraction", "fraction of rows with p_max >= 1/2 (theta exact there)"),
    Column("entropy_mean", F64, "nats", "mean row entropy (with an attention sink: over the keys and the sink)"),
    Column("sink_mass_mean", F64, "probability",
           "mean probability the head's sink logit takes from a row, 1 - sum_j p_j (THEORY §18.4; null without sinks)"),
    Column("theta_wide_rows", I64, "rows",
           "rows (of all) whose interval stayed wider than theta_tol: not refined within --theta-rows"),
    Column("wq_norm", F64, "l2 operator", "spectral norm of the head slice W_Q^h [d, D] (THEORY §5.1); latent "
           "attention: of the head's q up-projection block W_qb,h [r_q, D] (W_Q^h without a q rank, §18.8)"),
    Column("wk_norm", F64, "l2 operator", "spectral norm of W_K of the head's KV head; latent attention: of the "
           "head's key block W^nope_kvb,h [r_kv, nope] (§18.8)"),
    Column("wv_norm", F64, "l2 operator", "spectral norm of W_V of the head's KV head; latent attention: of the "
           "head's value block W^V_kvb,h [r_kv, D_v] (§18.8)"),
    Column("wo_norm", F64, "l2 operator", "spectral norm of the head's row block W_O^h [D, d]"),
    Column("bq_norm", F64, "l2", "l2 norm of the head's query bias (null without one)"),
    Column("bk_rot_norm", F64, "l2", "l2 norm of the rotary coordinates of the KV head's key bias (THEORY §5.4)"),
    Column("qk_norm", F64, "l2 operator",
           "||W_Q^h W_K^g^T||_2; with RoPE the max over the offsets the mask allows (THEORY §5.5); null where a "
           "norm sits between the projections and the logits (q/k norms, latent attention)"),
    Column("proj_product", F64, "1", "||W_Q^h|| ||W_K^g|| ||W_V^g|| ||W_O|| (full W_O, THEORY §5.2)"),
    Column("kappa_wq", F64, "1", "condition number s_max/s_min of W_Q^h (THEORY §14)"),
    Column("kappa_wk", F64, "1", "condition number of W_K^g"),
    Column("kappa_wv", F64, "1", "condition number of W_V^g"),
    Column("sigma_min_wq", F64, "l2", "smallest singular value of W_Q^h (of its min(d, D))"),
    Column("sigma_min_wk", F64, "l2", "smallest singular value of W_K^g"),
    Column("sigma_min_wv", F64, "l2", "smallest singular value of W_V^g"),
    Column("lambda_h", F64, "l2", "logit-sensitivity factor Lambda_h at the measured R2 (THEORY §5.2; max over sequences)"),
    Column("phi_h", F64, "l2", "the paper's Phi_h = Lambda_h ||W_V^g|| R2 / sqrt(d_k) (max over sequences)"),
    Column("head_term_calibrated", F64, "1",
           "c_h = L_V + s theta_tilde_h Lambda_h M_V (||W_V^g|| (1 + s theta_tilde_h Lambda_h R2) for linear maps, "
           "THEORY §18.1), the head's term of lip_mha_calibrated (max over sequences)"),
)

MODEL_COLUMNS: tuple[Column, ...] = (
    Column("n_layers", I64, "layers", "number of layers N"),
    Column("depth_budget", F64, "1", "N * max_l proj_product_layer (THEORY §10; a diagnostic, no threshold)"),
    Column("nf_rhs", F64, "1", "sum over layers of nf_layer_term (THEORY §13; times eps_mach vs a forward error)"),
    Column("nf_rhs_relaxed", F64, "1",
           "sum_l nf_layer_term_l prod_{m>l} (1 + min(0.9, ||W_O^m|| + ||W_2^m|| ||W_1^m||)) (THEORY §13)"),
    Column("lip_model_weights", F64, "inf,2", "product of lip_layer_weights over layers (THEORY §8; inf on overflow)"),
    Column("log_lip_model_weights", F64, "log", "sum over layers of log lip_layer_weights"),
    Column("lip_model_calibrated", F64, "inf,2",
           "max over calibration sequences of the product of the tier-2 layer bounds at that sequence (THEORY §8.2)"),
    Column("log_lip_model_calibrated", F64, "log", "log of lip_model_calibrated"),
    Column("grad_loss", F64, "nats", "--grad: the loss whose gradients are reported (see grad_loss_kind)"),
    Column("grad_loss_kind", pa.string(), "text", "--grad: which loss: next-token CE, masked-LM CE or the probe"),
    Column("identity_grad_path", pa.bool_(), "flag",
           "the wiring has an identity gradient path (pre-LN, parallel residual) rather than post-LN (THEORY §9)"),
)

TABLES: dict[str, tuple[Column, ...]] = {"layers": LAYER_COLUMNS, "heads": HEAD_COLUMNS, "model": MODEL_COLUMNS}

CURVATURE_COLUMNS: tuple[Column, ...] = (
    Column("layer", I64, "index", "0-based layer index (null for the whole-model row)"),
    Column("block", pa.string(), "text", "parameter block: attn_q, attn_k, attn_v, attn_out, ffn_in, ffn_out, "
           "norm_attn.gamma, norm_attn.beta, norm_ffn.gamma, norm_ffn.beta (norm_attn_out.*, norm_ffn_out.* with "
           "branch-output norms), or model (all blocks)", required=True),
    Column("n_params", I64, "count", "parameters in the block"),
    Column("lambda_max", F64, "loss / param^2",
           "largest eigenvalue of the block's Hessian diagonal block (Lanczos top Ritz value, never above it)"),
    Column("lambda_residual", F64, "loss / param^2", "||H y - lambda_max y|| of the Ritz vector y: an eigenvalue lies "
                                                    "within this of lambda_max"),
    Column("trace_est", F64, "loss / param^2", "Hutchinson estimate of the block's Hessian trace (Rademacher probes)"),
    Column("trace_se", F64, "loss / param^2", "standard error of trace_est (std of the probes / sqrt(probes))"),
    Column("grad_norm", F64, "loss / param", "l2 norm of the loss gradient over the block"),
    Column("iterations", I64, "count", "Lanczos steps (Hessian-vector products) for lambda_max"),
    Column("converged", pa.bool_(), "flag", "lambda_residual <= tol * |lambda_max|, or an invariant Krylov space"),
)
EXPERT_COLUMNS: tuple[Column, ...] = (
    Column("layer", I64, "index", "0-based index of a mixture-of-experts layer", required=True),
    Column("expert", I64, "index", "routed expert e of the layer", required=True),
    Column("gate_norm", F64, "l2 operator", "spectral norm of the expert's W_gate [d, m]"),
    Column("up_norm", F64, "l2 operator", "spectral norm of the expert's W_up [d, m]"),
    Column("out_norm", F64, "l2 operator", "spectral norm of the expert's W_down [m, d]"),
    Column("lip_expert_weights", F64, "inf,2", "the expert's tier-1 ball bound (THEORY §6.2) at the FFN input's "
           "reset radius"),
    Column("load_share", F64, "fraction", "the expert's share of the layer's token-slots on the calibration text "
           "(0: a dead expert)"),
    Column("token_slots", I64, "count", "token-slots routed to the expert on the calibration text"),
)
# Tables a report holds only when the scan was asked for them (curvature) or the model has them (experts).
OPTIONAL_TABLES: dict[str, tuple[Column, ...]] = {"curvature": CURVATURE_COLUMNS, "experts": EXPERT_COLUMNS}
ALL_TABLES: dict[str, tuple[Column, ...]] = {**TABLES, **OPTIONAL_TABLES}


def arrow_schema(table: str, file_metadata: dict[str, str] | None = None) -> pa.Schema:
    """The pyarrow schema of ``table`` with per-field unit/description metadata (plus ``file_metadata``)."""
    return pa.schema(
        [pa.field(c.name, c.type, nullable=True, metadata={"unit": c.unit, "description": c.description})
         for c in ALL_TABLES[table]],
        metadata={**(file_metadata or {}), "schema_version": SCHEMA_VERSION, "table": table},
    )
