"""Weight columns of the scan report (issue 4, item 1) against the ``transformers`` model's own parameters.

The reference slices each head out of the HF parameter tensors directly (their own layouts: Linear [out, in], GPT-2
Conv1D [in, out]) and takes ``torch.linalg.matrix_norm(ord=2)`` / ``svdvals`` in float64; the RoPE bilinear norm is
rebuilt from explicit rotation matrices for every offset of the calibration window.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.theta_scan import ThetaOptions
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import ScanOptions, run_scan, run_weights_only

T = 12   # calibration length: RoPE offsets 0 .. T − 1


def spec(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.double(), ord=2))


def kappa(w: torch.Tensor) -> float:
    s = torch.linalg.svdvals(w.double())
    return float(s[0] / s[-1])


def hf_projections(family: str, ref, layer: int) -> dict[str, torch.Tensor]:
    """W_Q, W_K, W_V as [d, out] (x @ W), W_O as [H·D, d], FFN in/out as [d, m] / [m, d], norm γs; from HF params."""
    if family == "gpt2":
        blk = ref.transformer.h[layer]
        wq, wk, wv = blk.attn.c_attn.weight.detach().split(ref.config.n_embd, dim=1)
        return dict(wq=wq, wk=wk, wv=wv, wo=blk.attn.c_proj.weight.detach(), w1=blk.mlp.c_fc.weight.detach(),
                    w2=blk.mlp.c_proj.weight.detach(), g1=blk.ln_1.weight.detach(), g2=blk.ln_2.weight.detach())
    if family == "llama":
        blk = ref.model.layers[layer]
        a, m = blk.self_attn, blk.mlp
        return dict(wq=a.q_proj.weight.detach().T, wk=a.k_proj.weight.detach().T, wv=a.v_proj.weight.detach().T,
                    wo=a.o_proj.weight.detach().T, w1=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().T,
                    w2=m.down_proj.weight.detach().T, g1=blk.input_layernorm.weight.detach(),
                    g2=blk.post_attention_layernorm.weight.detach())
    if family == "distilbert":
        blk = ref.distilbert.transformer.layer[layer]
        a = blk.attention
        return dict(wq=a.q_lin.weight.detach().T, wk=a.k_lin.weight.detach().T, wv=a.v_lin.weight.detach().T,
                    wo=a.out_lin.weight.detach().T, w1=blk.ffn.lin1.weight.detach().T,
                    w2=blk.ffn.lin2.weight.detach().T, g1=blk.sa_layer_norm.weight.detach(),
                    g2=blk.output_layer_norm.weight.detach())
    blk = ref.base_model.encoder.layer[layer]          # the BERT layout: bert, roberta, xlm_roberta
    a = blk.attention
    return dict(wq=a.self.query.weight.detach().T, wk=a.self.key.weight.detach().T,
                wv=a.self.value.weight.detach().T, wo=a.output.dense.weight.detach().T,
                w1=blk.intermediate.dense.weight.detach().T, w2=blk.output.dense.weight.detach().T,
                g1=a.output.LayerNorm.weight.detach(), g2=blk.output.LayerNorm.weight.detach())


def rope_rotation(t: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """R(t) with q_rot = R(t) q for the rotate-half convention: [[C, −S], [S, C]]."""
    c, s = torch.diag(torch.cos(t * inv_freq)), torch.diag(torch.sin(t * inv_freq))
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


def qk_reference(wq_h: torch.Tensor, wk_g: torch.Tensor, inv_freq: torch.Tensor | None) -> float:
    """max over Δ = i − j ∈ [0, T) of ‖W_Q^h R(j − i) W_K^gᵀ‖₂ (q_i·k_j = xᵀ W_Q R(i)ᵀR(j) W_Kᵀ y); no RoPE: Δ-free."""
    if inv_freq is None:
        return spec(wq_h.double() @ wk_g.double().T)
    return max(spec(wq_h.double() @ rope_rotation(-float(d), inv_freq) @ wk_g.double().T) for d in range(T))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "distilbert", "roberta"])
def test_weight_columns_match_hf_parameters(family: str, tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints[family]
    model = open_model(path)
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    result = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=T),
                      ScanOptions(device="cpu", kernel="torch", theta=ThetaOptions(min_keys=2)))
    heads, layers = result.tables["heads"], result.tables["layers"]
    H, D, group = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    inv_freq = None
    if family == "llama":
        inv_freq = 1.0 / (ref.config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pis = []
    for layer in range(cfg.n_layers):
        w = hf_projections(family, ref, layer)
        lay = layers[layer]
        full = {k: spec(w[k]) for k in ("wq", "wk", "wv", "wo")}
        for k in ("wq", "wk", "wv", "wo"):
            assert lay[f"{k}_full_norm"] == pytest.approx(full[k], rel=1e-6)
        pi = full["wq"] * full["wk"] * full["wv"] * full["wo"]
        pis.append(pi)
        assert lay["proj_product_layer"] == pytest.approx(pi, rel=1e-6)
        assert lay["alpha_geo"] == pytest.approx(pi ** 0.25, rel=1e-6)
        assert lay["ffn_w1_norm"] == pytest.approx(spec(w["w1"]), rel=1e-6)
        assert lay["ffn_w2_norm"] == pytest.approx(spec(w["w2"]), rel=1e-6)
        assert lay["norm1_gamma_max"] == pytest.approx(float(w["g1"].abs().max()), rel=1e-7)
        assert lay["norm2_gamma_max"] == pytest.approx(float(w["g2"].abs().max()), rel=1e-7)
        for h in range(H):
            g = h // group
            r = heads[layer * H + h]
            assert (r["layer"], r["head"], r["kv_head"]) == (layer, h, g)
            wq_h, wk_g = w["wq"][:, h * D:(h + 1) * D], w["wk"][:, g * D:(g + 1) * D]
            wv_g, wo_h = w["wv"][:, g * D:(g + 1) * D], w["wo"][h * D:(h + 1) * D]
            assert r["wq_norm"] == pytest.approx(spec(wq_h), rel=1e-6)
            assert r["wk_norm"] == pytest.approx(spec(wk_g), rel=1e-6)
            assert r["wv_norm"] == pytest.approx(spec(wv_g), rel=1e-6)
            assert r["wo_norm"] == pytest.approx(spec(wo_h), rel=1e-6)
            assert r["kappa_wq"] == pytest.approx(kappa(wq_h), rel=1e-5)
            assert r["kappa_wv"] == pytest.approx(kappa(wv_g), rel=1e-5)
            assert r["sigma_min_wq"] == pytest.approx(float(torch.linalg.svdvals(wq_h.double())[-1]), rel=1e-5)
            assert r["sigma_min_wk"] == pytest.approx(float(torch.linalg.svdvals(wk_g.double())[-1]), rel=1e-5)
            assert r["proj_product"] == pytest.approx(spec(wq_h) * spec(wk_g) * spec(wv_g) * full["wo"], rel=1e-6)
            assert r["qk_norm"] == pytest.approx(qk_reference(wq_h, wk_g, inv_freq), rel=1e-6)
            assert r["qk_norm"] <= r["wq_norm"] * r["wk_norm"] * (1 + 1e-9)
    assert result.tables["model"][0]["depth_budget"] == pytest.approx(cfg.n_layers * max(pis), rel=1e-6)


def test_weights_only_scan_needs_no_text(tiny_checkpoints: dict) -> None:
    """--weights-only gives the same weight columns (RoPE offsets over the model's maximum positions instead)."""
    path, _ = tiny_checkpoints["gpt2"]
    model = open_model(path)
    wo = run_weights_only(model, ScanOptions(device="cpu"))
    ids = torch.randint(0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    full = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=T), ScanOptions(device="cpu"))
    for a, b in zip(wo.tables["heads"], full.tables["heads"]):
        assert a.items() <= b.items()
    assert not math.isnan(wo.tables["model"][0]["depth_budget"])
