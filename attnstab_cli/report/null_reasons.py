"""Why a report column is null: the manifest's ``run.null_columns`` names a reason for every column that is null in
every row of its table.

Null means "not applicable" (STYLE.md, "Reports"). A column null in only some rows is conditional on the row's own
values and its schema description says when (``ln_eps_suggested_*``: only inside the mitigation's range); a column null
everywhere is a fact about the family or the options, stated here once. A pass that knows a more specific reason
(the family's layout) gives it in its :class:`~attnstab_cli.metrics.passes.TableParts` and it takes precedence.
"""
from __future__ import annotations

from typing import Any

from attnstab_cli.report.schema import TABLES

NULL_REASONS: dict[str, str] = {
    "bq_norm": "the family's attention has no query bias",
    "bk_rot_norm": "the family's attention has no key bias",
    "norm1_beta_norm": "RMSNorm has no beta",
    "norm2_beta_norm": "RMSNorm has no beta",
    "ffn_gate_norm": "the FFN is not gated",
    "ffn_up_norm": "the FFN is not gated",
    "ffn_gate_norm_2inf": "the FFN is not gated",
    "ffn_up_norm_2inf": "the FFN is not gated",
    "qnorm_gamma_max": "no q/k norm on the projections in this family",
    "knorm_gamma_max": "no q/k norm on the projections in this family",
    "attn_window": "every layer attends globally (no sliding window)",
    "sink_mass_mean": "the family's attention has no sink logit (rows sum to 1, THEORY §18.4)",
    "norm1_out_beta_norm": "no LayerNorm on the attention output (RMSNorm has no beta)",
    "norm2_out_beta_norm": "no LayerNorm on the FFN output (RMSNorm has no beta)",
    **dict.fromkeys(("norm1_out_gamma_max", "norm2_out_gamma_max", "norm1_out_min_var", "norm2_out_min_var",
                     "ln1_out_lip_global", "ln1_out_lip_local", "ln2_out_lip_global", "ln2_out_lip_local"),
                    "no norms on the branch outputs in this family"),
    "ln_eps_suggested_bf16": "no norm has rho_LN inside the mitigation's range (0.5, 1) in bf16 (THEORY §13)",
    "ln_eps_suggested_fp16": "no norm has rho_LN inside the mitigation's range (0.5, 1) in fp16 (THEORY §13)",
    "grad_h_in": "--grad was not given",
    "grad_attn_params": "--grad was not given",
    "grad_ffn_params": "--grad was not given",
    "grad_norm_params": "--grad was not given",
    "grad_loss": "--grad was not given",
    "grad_loss_kind": "--grad was not given",
    "identity_grad_path": "--grad was not given",
    **dict.fromkeys(("router_margin_min", "router_margin_p05", "expert_load_max", "expert_load_cv",
                     "router_entropy_mean", "gate_theta_mean", "moe_piecewise"),
                    "every FFN of the model is dense (no mixture of experts)"),
    "lip_layer_empirical": "tier 3 was not run (--empirical-seqs 0)",
    "tightness": "tier 3 was not run (--empirical-seqs 0)",
    "tightness_refined": "tier 3 was not run (--empirical-seqs 0)",
}
SHORT_ROWS = ("every attention row is short (n_keys < min_keys: a causal prefix, or a sliding window narrower than "
              "min_keys); the descriptive θ statistics skip short rows (THEORY §3.8)")
for _column in ("theta_mean", "theta_hi_mean", "theta_lo_min", "theta_p05", "theta_p05_lo", "theta_p05_hi",
                "theta_p50", "theta_p50_lo", "theta_p50_hi", "theta_width_max", "theta_exact_frac", "theta_paper_mean",
                "pmax_mean", "pmax_max", "peaked_frac", "entropy_mean", "theta_bar", "sens_proxy_resid",
                "sens_proxy_ln", "sens_log_theta"):
    NULL_REASONS[_column] = SHORT_ROWS
NO_TEXT = "no calibration text (--weights-only)"


def explain_nulls(tables: dict[str, list[dict[str, Any]]], given: dict[str, str],
                  calibrated: bool = True) -> dict[str, str]:
    """``column -> reason`` for every column null in every row of its table (``given`` first, then
    :data:`NULL_REASONS`; a weights-only scan's columns that need text say so); a column with no known reason is
    omitted, which the family tests treat as a defect."""
    out: dict[str, str] = {}
    for name, columns in TABLES.items():
        rows = tables.get(name) or []
        for column in (c.name for c in columns if not c.required):
            if all(r.get(column) is None for r in rows):
                unmeasured = not calibrated and not any(column in r for r in rows)
                reason = given.get(column) or (NO_TEXT if unmeasured else NULL_REASONS.get(column))
                if reason is not None:
                    out[column] = reason
    return out
