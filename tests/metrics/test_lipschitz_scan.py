"""Lipschitz tiers in the scan (issue 4, item 2): tier 3 ≤ tier 2r ≤ tier 2 ≤ tier 1 on every layer of every family,
on calibration text and on adversarial inputs, in float64; model totals are the products of the layer bounds."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.layer_context import LayerContexts
from attnstab_cli.metrics.lipschitz_scan import LipschitzPass
from attnstab_cli.metrics.theta_scan import ThetaOptions, ThetaPass
from attnstab_cli.model.blocks import run_layer
from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.scan import ScanOptions, run_scan
from tiny_models import FAMILIES

REL = 1e-9


def assert_tiers_ordered(row: dict, in_tier1_ball: bool = True, ffn_in_tier1_ball: bool = True) -> None:
    """Tier 3 ≤ 2r ≤ 2 always; ≤ tier 1 when the MHA input lies in tier 1's ball of radius r2_in_reset (a post-LN
    layer fed an arbitrary input is outside the set tier 1 speaks about); the FFN's tier 2 ≤ tier 1 when its input
    lies in its tier-1 ball (always behind a norm; without norms before the branches only inside the MHA's ball)."""
    lower, b2r, b2, b1 = (row[k] for k in ("lip_layer_empirical", "lip_layer_refined", "lip_layer_calibrated",
                                          "lip_layer_weights"))
    assert 0 < lower <= b2r * (1 + REL) and b2r <= b2 * (1 + REL), row
    assert 0 < row["tightness"] <= 1 + 1e-6 and 0 < row["tightness_refined"] <= 1 + 1e-6
    assert row["lip_mha_refined"] <= row["lip_mha_calibrated"] * (1 + REL)
    assert row["ln1_lip_local"] <= row["ln1_lip_global"] * (1 + REL)
    assert row["ln2_lip_local"] <= row["ln2_lip_global"] * (1 + REL)
    if ffn_in_tier1_ball:
        assert row["lip_ffn_calibrated"] <= row["lip_ffn_weights"] * (1 + REL)
    if in_tier1_ball:
        assert b2 <= b1 * (1 + REL) and row["lip_mha_calibrated"] <= row["lip_mha_weights"] * (1 + REL), row


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiers_on_calibration_text(family: str, tiny_checkpoints: dict) -> None:
    path, _ = tiny_checkpoints[family]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=12),
                      ScanOptions(device="cpu", dtype="float64", empirical_seqs=1)).tables
    for row in tables["layers"]:
        assert_tiers_ordered(row)
    for table in ("layers", "heads", "model"):                  # T26: every reported number is finite
        for row in tables[table]:
            bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
            assert not bad, (table, bad)
    m = tables["model"][0]
    logs = [math.log(r["lip_layer_weights"]) for r in tables["layers"]]
    assert m["log_lip_model_weights"] == pytest.approx(sum(logs), rel=1e-12)
    assert m["lip_model_weights"] == pytest.approx(math.exp(sum(logs)), rel=1e-9)
    assert m["log_lip_model_calibrated"] <= sum(math.log(r["lip_layer_calibrated"]) for r in tables["layers"]) + 1e-9
    assert m["lip_model_calibrated"] <= m["lip_model_weights"] * (1 + REL)


def _adversarial_inputs(d: int, t: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    base = torch.randn(1, t, d, generator=gen, dtype=torch.float64)
    tok = torch.randn(1, 1, d, generator=gen, dtype=torch.float64)
    return {
        "large_magnitude": 300.0 * base,
        "near_constant_tokens": tok.expand(1, t, d) + 1e-6 * base,   # tiny per-token variance after centring
        "near_zero": 1e-8 * base,                                       # the norms' ε dominates
    }


def _scale_queries(w, factor: float):
    """The layer with its queries times ``factor``: W_Q, or under latent attention with a q rank W_qb."""
    return replace(w, wq=factor * w.wq) if w.wq is not None else replace(w, wq_b=factor * w.wq_b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiers_on_adversarial_inputs(family: str, tiny_checkpoints: dict) -> None:
    """Large-magnitude tokens, near-constant tokens (tiny norm variance), near-zero input, and near-one-hot or
    near-uniform attention (W_Q scaled by 60 or by 1e-6): the ordering holds on every layer."""
    path, _ = tiny_checkpoints[family]
    model = open_model(path)
    cfg, t = model.cfg, 10
    loader = model.loader("cpu", torch.float64)
    stream = LayerStream(model, [torch.zeros(1, t, dtype=torch.long)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    for layer in (cfg.n_layers - 1,):              # one layer per family keeps CI short; post-LN needs layer > 0 here
        w0 = loader.layer(layer)
        variants = {"as_is": w0, "one_hot_attention": _scale_queries(w0, 60.0),
                    "uniform_attention": _scale_queries(w0, 1e-6)}
        for wname, w in variants.items():
            for xname, h in _adversarial_inputs(cfg.d_model, t, gen).items():
                theta = ThetaPass(cfg.n_heads, cfg.n_kv_heads, ThetaOptions(kernel="torch", min_keys=1,
                                                                           rows_per_head=None))
                lip = LipschitzPass(cfg, empirical_seqs=1)
                contexts = LayerContexts(model)
                contexts.start_at(layer)            # post-LN: the previous LN2; output norms: the radius of h_l
                trace = run_layer(h, w, cfg, layer, 0, stream.rope(t, layer), None)
                ctx = contexts.for_trace(trace)
                theta.observe(trace, ctx)
                lip.observe(trace, ctx)
                rows, _ = lip.records()
                r2 = float(trace.attn.x.double().norm(dim=-1).max())
                try:
                    inside = r2 <= rows[0]["r2_in_reset"] * (1 + REL)
                    assert_tiers_ordered(rows[0], in_tier1_ball=inside,
                                         ffn_in_tier1_ball=inside or cfg.layout.residual.input_norms)
                except AssertionError as exc:
                    raise AssertionError(f"layer {layer}, weights {wname}, input {xname}: {exc}") from None


def test_head_terms_recombine_from_report_columns(tiny_checkpoints: dict) -> None:
    """With one sequence, c_h = ‖W_V^g‖(1 + s θ̃_h Λ_h R2) from the report's own columns and
    lip_mha_calibrated = ‖W_O‖ Σ_h c_h (THEORY §5.2); Λ_h from the weight columns and R2."""
    path, _ = tiny_checkpoints["qwen2"]                     # biases, GQA, RoPE
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=12),
                      ScanOptions(device="cpu", dtype="float64", empirical_seqs=0)).tables
    for row in tables["layers"]:
        heads = [h for h in tables["heads"] if h["layer"] == row["layer"]]
        r2, s = row["r2_in"], row["attn_scale"]
        total = 0.0
        for h in heads:
            lam = h["wq_norm"] * (h["wk_norm"] * r2 + h["bk_rot_norm"]) + h["wk_norm"] * (h["wq_norm"] * r2 + h["bq_norm"])
            assert h["lambda_h"] == pytest.approx(lam, rel=1e-9)
            c = h["wv_norm"] * (1 + s * h["theta_tilde_hi"] * lam * r2)
            assert h["head_term_calibrated"] == pytest.approx(c, rel=1e-9)
            assert h["phi_h"] == pytest.approx(lam * h["wv_norm"] * r2 / math.sqrt(model.cfg.head_dim), rel=1e-9)
            total += c
        assert row["lip_mha_calibrated"] == pytest.approx(row["wo_full_norm"] * total, rel=1e-9)


def test_post_ln_reset_radius_uses_previous_layer_with_several_batches(tiny_checkpoints: dict, monkeypatch) -> None:
    """Post-LN: every batch of layer l ≥ 1 gets the reset radius of layer l−1's LN2 (§8.1), not layer l's own —
    the layer context is built from layer l's weights before its later batches arrive."""
    from attnstab_cli.metrics import lipschitz_scan
    from attnstab_cli.metrics.lipschitz.norms import compute_reset_radius

    path, _ = tiny_checkpoints["bert"]
    model = open_model(path)
    seen: dict[int, list[float]] = {}
    original = lipschitz_scan.compute_layer_lipschitz

    def spy(weights, cfg, r2_in_reset, *args, **kwargs):
        seen.setdefault(weights.layer, []).append(r2_in_reset)
        return original(weights, cfg, r2_in_reset, *args, **kwargs)

    monkeypatch.setattr(lipschitz_scan, "compute_layer_lipschitz", spy)
    gen = torch.Generator().manual_seed(3)
    batches = tuple(torch.randint(0, model.cfg.vocab_size, (1, 8), generator=gen) for _ in range(3))
    run_scan(model, CalibrationSet(batches=batches, source="test", seq_len=8),
             ScanOptions(device="cpu", dtype="float64", empirical_seqs=0))
    loader = model.loader("cpu", torch.float64)
    assert sorted(seen) == list(range(model.cfg.n_layers))
    for layer in range(1, model.cfg.n_layers):
        expected = compute_reset_radius(loader.layer(layer - 1).norm_ffn, model.cfg.layout.norm)
        own = compute_reset_radius(loader.layer(layer).norm_ffn, model.cfg.layout.norm)
        assert own != pytest.approx(expected, rel=1e-9)        # the test can tell the two apart
        assert seen[layer] == pytest.approx([expected] * 3, rel=1e-12), layer
    assert len(set(seen[0])) == 1


def test_output_norm_radius_grows_linearly_and_bounds_the_stream(tiny_checkpoints: dict) -> None:
    """T32 (§18.3): without norms before the branches, r2_in_reset of layer l is max_t ||E_t|| plus the output norms'
    resets (||gamma_1b|| + ||gamma_2b||)_inf sqrt(d) of layers < l, recomputed here from the transformers model's own
    tensors; it is never below the measured ||h_l|| (r_resid_max, = r2_in: the MHA reads h_l), and the FFN input
    stays within it plus ||gamma_1b^l||_inf sqrt(d)."""
    path, ref = tiny_checkpoints["olmo2"]
    model = open_model(path)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=gen)
    rows = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=16),
                    ScanOptions(device="cpu", dtype="float64", empirical_seqs=0)).tables["layers"]
    sqrt_d = math.sqrt(model.cfg.d_model)
    radius = float(ref.model.embed_tokens.weight.detach().double().norm(dim=-1).max())
    traces = list(LayerStream(model, [ids], dtype=torch.float64).layers())
    for row, layer, trace in zip(rows, ref.model.layers, traces):
        g1 = float(layer.post_attention_layernorm.weight.detach().double().abs().max())
        g2 = float(layer.post_feedforward_layernorm.weight.detach().double().abs().max())
        assert (row["norm1_out_gamma_max"], row["norm2_out_gamma_max"]) == pytest.approx((g1, g2), rel=1e-6)
        assert row["norm1_gamma_max"] is None and row["norm2_gamma_max"] is None
        gq = float(layer.self_attn.q_norm.weight.detach().double().abs().max())
        gk = float(layer.self_attn.k_norm.weight.detach().double().abs().max())
        assert row["qnorm_gamma_max"] == pytest.approx(gq, rel=1e-6)
        a = trace.attn                         # T31 full width: s ||g_q|| sqrt(H D) ||g_k|| sqrt(H_kv D) >= |s q.k|
        s_ = a.scale
        d_q, d_k = model.cfg.n_heads * model.cfg.head_dim, model.cfg.n_kv_heads * model.cfg.head_dim
        assert row["logit_bound"] == pytest.approx(s_ * gq * math.sqrt(d_q) * gk * math.sqrt(d_k), rel=1e-6)
        logits = s_ * a.q @ a.k.repeat_interleave(model.cfg.n_heads // model.cfg.n_kv_heads, 1).transpose(-1, -2)
        assert float(logits.abs().max()) <= row["logit_bound"]
        assert row["r2_in_reset"] == pytest.approx(radius, rel=1e-12), row["layer"]
        assert row["r_resid_max"] == pytest.approx(row["r2_in"], rel=1e-12)
        assert row["r_resid_max"] <= row["r2_in_reset"]
        assert row["r2_ffn_in"] <= row["r2_in_reset"] + g1 * sqrt_d
        radius += (g1 + g2) * sqrt_d
    assert rows[-1]["r2_in_reset"] > rows[0]["r2_in_reset"]
    contexts = LayerContexts(model)                       # a one-layer scan starts from the same radius
    contexts.start_at(len(rows) - 1)
    assert contexts.stream_radius == pytest.approx(rows[-1]["r2_in_reset"], rel=1e-6)    # float32 loader
