"""Curvature (issue 6, items 1-2): Hessian-vector products against dense Hessians and finite differences of the
gradient, Lanczos against eigvalsh, Hutchinson against the exact trace, the loss against the --grad pass."""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.metrics.curvature.loss import ModelLoss, block_of, split_name
from attnstab_cli.metrics.curvature.spectrum import (flat_operator, gradient, hutchinson_trace, hvp,
                                                     lanczos_top)
from attnstab_cli.metrics.curvature_scan import CurvatureOptions, compute_curvature
from attnstab_cli.metrics.gradients import GradientFlow
from attnstab_cli.model.load import open_model

F64 = torch.float64


@pytest.fixture(scope="module",
                params=["gpt2", "llama", "bert", "gptj", "gemma2", "olmo2", "qwen3", "deepseek_v3"])
def loss(request, tiny_checkpoints) -> ModelLoss:
    model = open_model(tiny_checkpoints[request.param][0])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    return ModelLoss(model, [ids], "cpu", F64)


def _subset(loss: ModelLoss, *suffixes: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in loss.params.items() if k.endswith(suffixes)}


def _gammas(loss: ModelLoss) -> tuple[str, str]:
    """The two norms' γ of every layer: the input norms, or the branch-output norms where the input ones are
    identities (OLMo 2, THEORY §18.3)."""
    if loss.cfg.layout.residual.input_norms:
        return "norm_attn.weight", "norm_ffn.weight"
    return "norm_attn_out.weight", "norm_ffn_out.weight"


def _dense(loss: ModelLoss, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The Hessian over ``params`` (flattened in insertion order) by reverse-over-reverse autograd: an independent
    route from the forward-over-reverse products under test. (Not torch.func.hessian: its vmapped jacfwd(jacrev)
    returned cross-layer entries off by ~10% on these models in torch 2.13, while each column computed on its own
    agrees with autograd to 1e-17.)"""
    names, sizes = list(params), [v.numel() for v in params.values()]
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def f(x: torch.Tensor) -> torch.Tensor:
        return loss({k: p.reshape(params[k].shape) for k, p in zip(names, torch.split(x, sizes))})

    return torch.autograd.functional.hessian(f, flat)


def test_names_split_into_layer_block_and_field(loss: ModelLoss) -> None:
    blocks = loss.blocks()
    expected = {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_in", "ffn_out", "norm_attn.gamma", "norm_ffn.gamma"}
    if loss.cfg.layout.residual.shared_norm:             # one norm feeds both branches: one parameter, one block
        expected.remove("norm_ffn.gamma")
        assert not any(b.startswith("norm_ffn") for _, b in blocks)
    if loss.cfg.layout.residual.output_norms:             # Gemma 2's branch-output norms are blocks of their own
        expected |= {"norm_attn_out.gamma", "norm_ffn_out.gamma"}
    if loss.cfg.layout.qk_norm is not None:              # q/k norms on the projections (Qwen3, OLMo 2)
        expected |= {"q_norm.gamma", "k_norm.gamma"}
    if not loss.cfg.layout.residual.input_norms:          # OLMo 2: identity input norms have no parameters
        expected -= {"norm_attn.gamma", "norm_ffn.gamma"}
        assert not any(b in ("norm_attn.gamma", "norm_ffn.gamma") for _, b in blocks)
    assert {b for _, b in blocks} >= expected
    assert split_name("1.norm_attn.gamma.norm_attn.weight") == (1, "norm_attn.gamma", "norm_attn.weight")
    assert block_of("0.ffn_in.ffn.w_gate") == (0, "ffn_in")
    assert sum(v.numel() for v in loss.params.values()) == sum(
        loss.params[k].numel() for names in blocks.values() for k in names)



def test_hvp_matches_the_dense_hessian_across_layers(loss: ModelLoss) -> None:
    params = _subset(loss, *_gammas(loss))                            # every γ of every layer: 256 parameters or more
    dense = _dense(loss, params)
    op, n = flat_operator(loss, params)
    assert dense.shape == (n, n) and torch.allclose(dense, dense.T, atol=1e-12)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert torch.allclose(op(v), dense @ v, rtol=1e-9, atol=1e-12 * float(dense.abs().max()))
    cross = dense[:64, -64:]                                            # layer 0 γ1 vs the last layer's γ2: coupled
    assert float(cross.abs().max()) > 1e-6


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_qk_norm_gammas_are_blocks_whose_hvp_matches_the_dense_hessian(family: str, tiny_checkpoints) -> None:
    """The q/k norms' γ (THEORY §18.2) are parameters of the loss: the product on them equals the dense Hessian."""
    model = open_model(tiny_checkpoints[family][0])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    loss = ModelLoss(model, [ids], "cpu", F64)
    params = _subset(loss, "q_norm.weight", "k_norm.weight")
    assert params
    dense = _dense(loss, params)
    op, n = flat_operator(loss, params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert float(dense.abs().max()) > 0
    assert torch.allclose(op(v), dense @ v, rtol=1e-9, atol=1e-12 * float(dense.abs().max()))


def test_hvp_on_a_matrix_block_matches_finite_differences_of_the_gradient(loss: ModelLoss) -> None:
    """W_Q, W_K, W_V of layer 1 (thousands of parameters, no dense Hessian): central differences of the gradient along v
    agree with H v to O(h²)."""
    params = {k: v for k, v in loss.params.items() if block_of(k) in {(1, "attn_q"), (1, "attn_k"), (1, "attn_v")}}
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in params.items()}
    scale = math.sqrt(sum(float(t.pow(2).sum()) for t in v.values()))
    v = {k: t / scale for k, t in v.items()}                               # a unit direction: the step is h
    hv = hvp(loss, params, v)
    h = 1e-4
    plus = gradient(loss, {k: p + h * v[k] for k, p in params.items()})
    minus = gradient(loss, {k: p - h * v[k] for k, p in params.items()})
    biggest = max(float(t.abs().max()) for t in hv.values())
    for k in params:                    # (b_K only shifts every logit of a row: its rows of H are ~0, hence the atol)
        fd = (plus[k] - minus[k]) / (2 * h)
        assert torch.allclose(hv[k], fd, rtol=1e-6, atol=1e-8 * biggest), k


def test_lanczos_top_eigenvalue_matches_eigvalsh(loss: ModelLoss) -> None:
    for suffixes in ((_gammas(loss)[0],), (".bq", ".bk", ".bv", ".bo", "norm_ffn.bias")):
        params = _subset(loss, *suffixes)
        if not params:
            continue
        exact = float(torch.linalg.eigvalsh(_dense(loss, params))[-1])
        op, n = flat_operator(loss, params)
        top = lanczos_top(op, n, max_iter=n, tol=1e-10)
        assert top.converged and top.value <= exact + 1e-9 * abs(exact)
        assert top.value == pytest.approx(exact, rel=1e-6), suffixes


def test_hutchinson_is_within_its_error_of_the_exact_trace(loss: ModelLoss) -> None:
    params = _subset(loss, *_gammas(loss))
    exact = float(torch.trace(_dense(loss, params)))
    op, n = flat_operator(loss, params)
    est = hutchinson_trace(op, n, probes=64, seed=4)
    assert est.stderr > 0 and abs(est.value - exact) <= 4 * est.stderr


def test_spectrum_helpers_on_known_matrices() -> None:
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=F64))
    evals = torch.linspace(-3.0, 2.0, 60, dtype=F64)
    a = q @ torch.diag(evals) @ q.T
    top = lanczos_top(lambda x: a @ x, 60, max_iter=60, tol=1e-12)
    assert top.converged and top.value == pytest.approx(2.0, rel=1e-10)       # largest algebraic, not |λ| = 3
    short = lanczos_top(lambda x: a @ x, 60, max_iter=3, tol=1e-12)
    assert not short.converged and short.value <= 2.0 + 1e-12
    assert float((evals - short.value).abs().min()) <= short.residual + 1e-12   # an eigenvalue within the residual
    d = torch.diag(torch.arange(1.0, 11.0, dtype=F64))
    exact_diag = hutchinson_trace(lambda x: d @ x, 10, probes=3)              # zᵀDz = tr D for every ±1 probe
    assert exact_diag.value == pytest.approx(55.0, abs=1e-12) and exact_diag.stderr == pytest.approx(0.0, abs=1e-12)


def test_compute_curvature_records(tiny_checkpoints) -> None:
    model = open_model(tiny_checkpoints["llama"][0])
    ids = torch.randint(0, model.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(6))
    records, facts = compute_curvature(model, [ids], torch.device("cpu"), CurvatureOptions(max_iter=60, tol=1e-8,
                                                                                          probes=8))
    blocks = [r for r in records if r["layer"] is not None]
    assert {r["block"] for r in blocks} == {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_in", "ffn_out", "norm_attn.gamma",
                                            "norm_ffn.gamma"}                  # RMSNorm: no β blocks
    model_row = records[-1]
    assert model_row["block"] == "model" and model_row["n_params"] == sum(r["n_params"] for r in blocks)
    assert all(r["converged"] for r in records)
    # λ_max of the whole Hessian bounds every diagonal block's (Cauchy interlacing)
    assert model_row["lambda_max"] >= max(r["lambda_max"] for r in blocks) * (1 - 1e-6)
    assert model_row["trace_est"] == pytest.approx(sum(r["trace_est"] for r in blocks), rel=1e-12)
    flow = GradientFlow(model, [ids], torch.device("cpu"), F64)
    layers, model_rec = flow.run()
    assert facts["loss_value"] == pytest.approx(model_rec["grad_loss"], rel=1e-10)
    for rec in layers:                                  # block gradient norms recombine to the --grad columns
        mine = {r["block"]: r["grad_norm"] for r in blocks if r["layer"] == rec["layer"]}
        attn = math.hypot(mine["attn_q"], mine["attn_k"], mine["attn_v"], mine["attn_out"])
        ffn = math.hypot(mine["ffn_in"], mine["ffn_out"])
        assert attn == pytest.approx(rec["grad_attn_params"], rel=1e-9)
        assert ffn == pytest.approx(rec["grad_ffn_params"], rel=1e-9)
