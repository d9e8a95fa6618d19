"""Lipschitz bounds of transformer layers (THEORY §4–§9): norm layers, MHA, FFN, per-layer tiers 1/2/2r, tier 3."""
from attnstab_cli.metrics.lipschitz.empirical import (Certificate, EmpiricalBudget, EmpiricalResult, TightnessError,
                                                      compute_empirical_lipschitz, compute_layer_empirical,
                                                      compute_layer_empirical_budgeted,
                                                      compute_mean_tightness, compute_tightness, evaluate_certificate,
                                                      make_layer_function, select_candidate_rows)
from attnstab_cli.metrics.lipschitz.layer import (CalibratedTier, LayerLipschitz, LayerLipschitzResult, WeightsTier,
                                                  advance_stream_radius, combine_layer_bound, compute_calibrated_tier,
                                                  compute_first_layer_radius, compute_layer_lipschitz,
                                                  compute_r2_in_reset, compute_weights_tier)
from attnstab_cli.metrics.lipschitz.mha import (HeadNorms, MHABound, RefinedMHABound, compute_head_norms,
                                                compute_layer_head_norms, compute_mha_bound, compute_mha_refined)

__all__ = [
    "Certificate", "EmpiricalBudget", "EmpiricalResult", "TightnessError", "compute_empirical_lipschitz",
    "compute_layer_empirical", "compute_layer_empirical_budgeted",
    "compute_mean_tightness", "compute_tightness", "evaluate_certificate", "make_layer_function",
    "select_candidate_rows", "CalibratedTier", "LayerLipschitz", "LayerLipschitzResult", "WeightsTier",
    "advance_stream_radius", "combine_layer_bound", "compute_calibrated_tier", "compute_first_layer_radius", "compute_layer_lipschitz",
    "compute_r2_in_reset", "compute_weights_tier", "HeadNorms", "MHABound", "RefinedMHABound", "compute_head_norms",
    "compute_layer_head_norms", "compute_mha_bound", "compute_mha_refined",
]
