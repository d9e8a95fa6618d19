"""Sensitivity proxy S = 2 s θ̄ R² Π and its log terms (THEORY §12; issue 4, item 3)."""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.sensitivity import compute_sensitivity, describe_depth_rule
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import ScanOptions, run_scan


def test_hand_computed_case() -> None:
    layers = [{"layer": 0, "proj_product_layer": 3.0, "r_resid_mean": 2.0, "r_ln_mean": 0.5}]
    heads = [{"layer": 0, "theta_mean": 0.5}, {"layer": 0, "theta_mean": 1.0}, {"layer": 0, "theta_mean": None}]
    (row,) = compute_sensitivity(layers, heads, {0: 0.25})
    assert row["theta_bar"] == 0.75                                   # heads without aggregated rows are skipped
    assert row["sens_proxy_resid"] == pytest.approx(2 * 0.25 * 0.75 * 4.0 * 3.0)
    assert row["sens_proxy_ln"] == pytest.approx(2 * 0.25 * 0.75 * 0.25 * 3.0)
    parts = math.log(2 * 0.25) + row["sens_log_theta"] + row["sens_log_proj"]
    assert parts + row["sens_log_r2_resid"] == pytest.approx(math.log(row["sens_proxy_resid"]))
    assert parts + row["sens_log_r2_ln"] == pytest.approx(math.log(row["sens_proxy_ln"]))
    (empty,) = compute_sensitivity(layers, [{"layer": 0, "theta_mean": None}], {0: 0.25})
    assert empty["theta_bar"] is None and empty["sens_proxy_resid"] is None


def test_scan_columns_use_the_layer_scale(tiny_checkpoints: dict) -> None:
    """GPT-2 with scale_attn_by_inverse_layer_idx: s = 1/(√D (l + 1)) from the HF config, not from our code."""
    path, ref = tiny_checkpoints["gpt2_scaled"]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=24), ScanOptions(device="cpu")).tables
    d_head = ref.config.n_embd // ref.config.n_head
    for row in tables["layers"]:
        s = 1.0 / (math.sqrt(d_head) * (row["layer"] + 1))
        assert row["attn_scale"] == pytest.approx(s, rel=1e-12)
        thetas = [h["theta_mean"] for h in tables["heads"] if h["layer"] == row["layer"]]
        theta_bar = sum(thetas) / len(thetas)
        assert row["theta_bar"] == pytest.approx(theta_bar, rel=1e-12)
        expected = 2 * s * theta_bar * row["r_resid_mean"] ** 2 * row["proj_product_layer"]
        assert row["sens_proxy_resid"] == pytest.approx(expected, rel=1e-12)
    text = describe_depth_rule(model.cfg.n_layers, [r["alpha_geo"] for r in tables["layers"]],
                               tables["model"][0]["depth_budget"])
    assert "not a pass/fail threshold" in text and "E7" in text
