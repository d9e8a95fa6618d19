"""THEORY T21 (per-layer tiers on GPT-2-, LLaMA-, Qwen2-, NeoX- and BERT-like layers), T32 (the same on Gemma-2-like
sandwich layers: branch-output norms, GeGLU, soft-capped logits; and on OLMo-2-like output-norm layers, whose MHA and
FFN read the residual stream unnormalized), T23 (gradient-flow structure), the §7 / §18.3
tables by hand and the §8.1 radii.

Every layer exists twice (``lip_helpers.make_random_layer``): as the package's weights and config, run by
``run_layer``, and as a plain reference built on ``heads_mha``; the two are checked equal and the certified lower bound
is the dense alternating maximisation of the reference's exact Jacobian. Factor values are recomputed independently
at the reference's intermediate points, so a factor read at the wrong point or wired into the wrong formula fails even
where the (loose) bound would still exceed the lower bound.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.arch.spec import NormKind, Residual
from attnstab_cli.metrics.lipschitz.ffn import compute_swiglu_ball
from attnstab_cli.metrics.lipschitz.layer import (advance_stream_radius, combine_layer_bound, compute_calibrated_tier,
                                                  compute_ffn_reset_radius, compute_first_layer_radius,
                                                  compute_layer_lipschitz, compute_r2_in_reset, compute_weights_tier)
from attnstab_cli.metrics.lipschitz.mha import compute_head_norms, compute_mha_bound, compute_mha_refined
from attnstab_cli.model.blocks import run_layer
from attnstab_cli.model.weights import NormWeights
from lip_helpers import (FAMILY_SHAPES, GATES, capped, dense_alternating_max, heads_probabilities, heads_qkv,
                         jacobian_blocks, make_random_layer, row_theta)

F64 = torch.float64
T = 6
EPS = (1e-5, 1e-2, 1.0, 10.0)


def _spec(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def _block_lower(f, x: torch.Tensor) -> float:
    """Certified lower bound of ``||J_f(x)||_{inf,2}``: dense alternating maximisation over every output row."""
    lower, _ = dense_alternating_max(jacobian_blocks(f, x), list(range(x.shape[0])), restarts=2, seed=0)
    return lower


def _token_max(f, x: torch.Tensor) -> float:
    """``max_t ||J_f(x_t)||_2`` for a tokenwise ``f`` (exact per-token Jacobians)."""
    return max(_spec(torch.autograd.functional.jacobian(f, xt)) for xt in x)


def _hidden(layer, seed: int, scale: float = 2.0) -> torch.Tensor:
    """Layer input; for post-LN, the output of a random embedding LayerNorm (so it lies in its reset ball)."""
    g = torch.Generator().manual_seed(seed)
    h = scale * torch.randn(T, layer.cfg.d_model, generator=g, dtype=F64) + 0.5
    if layer.residual == "post":
        emb = _embedding_norm(layer)
        c = h - h.mean(-1, keepdim=True)
        h = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + layer.eps) * emb.weight + emb.bias
    return h


def _embedding_norm(layer) -> NormWeights:
    g = torch.Generator().manual_seed(99)
    d = layer.cfg.d_model
    return NormWeights(1 + 0.3 * torch.randn(d, generator=g, dtype=F64), 0.2 * torch.randn(d, generator=g, dtype=F64))


def _reset(norm: NormWeights, kind: str) -> float:
    r = float(norm.weight.abs().max()) * math.sqrt(norm.weight.shape[0])
    return r + float(torch.linalg.vector_norm(norm.bias)) if kind == "layernorm" and norm.bias is not None else r


def _stat(x: torch.Tensor, kind: str) -> torch.Tensor:
    return x.var(-1, unbiased=False) if kind == "layernorm" else x.pow(2).mean(-1)


def _ffn_local(layer, x: torch.Tensor) -> float:
    """§6.1 / §6.2 local FFN bound at the tokens ``x``, with slopes from autograd of the reference activations."""
    f, sn = layer.ffn, _spec
    if "w_gate" in f:
        gate = GATES[layer.activation]
        a, b = x @ f["w_gate"], x @ f["w_up"]
        ds = torch.autograd.functional.jacobian(lambda u: gate(u).sum(), a)
        terms = sn(f["w_gate"]) * (ds * b).abs().amax(-1) + sn(f["w_up"]) * gate(a).abs().amax(-1)
        return float(sn(f["w_out"]) * terms.max())
    act = {"gelu": torch.nn.functional.gelu, "gelu_new": lambda u: torch.nn.functional.gelu(u, approximate="tanh")}
    a = x @ f["w_in"] + f["b_in"]
    slope = torch.autograd.functional.jacobian(lambda u: act[layer.activation](u).sum(), a)
    return sn(f["w_in"]) * float(slope.abs().max()) * sn(f["w_out"])


def _combine(residual: str, ln1: float, mha: float, ln2: float, ffn: float, ln1o: float = 1.0,
             ln2o: float = 1.0) -> float:
    return {"pre": (1 + ln1 * mha) * (1 + ln2 * ffn), "post": ln2 * (1 + ffn) * ln1 * (1 + mha),
            "sandwich": (1 + ln1o * mha * ln1) * (1 + ln2o * ffn * ln2),          # THEORY §18.3
            "output_norm": (1 + ln1o * mha) * (1 + ln2o * ffn),                   # §18.3, no N1a / N2a
            "parallel": 1 + ln1 * mha + ln2 * ffn,
            "parallel_shared": 1 + ln1 * (mha + ffn)}[residual]      # J = I + (J_MHA + J_FFN) J_N (THEORY §18.6)


def _norms(layer):
    m = layer.heads
    return compute_head_norms(m.wq, m.wk, m.wv, m.wo, m.bq, m.bk, m.bv, m.n_heads, m.n_kv_heads, m.rotary_dim,
                              m.logit_cap, sinks=m.sinks is not None)


def _setup(family: str, eps: float, seed: int):
    layer = make_random_layer(family, T, eps, seed)
    h = _hidden(layer, seed)
    kpm = None if layer.key_padding_mask is None else layer.key_padding_mask[None]
    trace = run_layer(h[None], layer.weights, layer.cfg, layer.layer, 0, layer.rope_cs, kpm)
    mid = layer.intermediates(h)
    torch.testing.assert_close(trace.resid_out[0], mid["out"], rtol=1e-12, atol=1e-12)
    theta = row_theta(heads_probabilities(mid["mha_in"], layer.heads), layer.heads.sinks)  # [H, T]
    if layer.residual == "post":
        r2_reset = compute_first_layer_radius(NormKind.LAYERNORM, _embedding_norm(layer))
        r2_reset = compute_r2_in_reset(layer.cfg, layer.weights, first_layer_radius=r2_reset)
    elif layer.residual == "output_norm":             # the MHA reads h: a radius of the inputs considered
        r2_reset = compute_r2_in_reset(layer.cfg, layer.weights, stream_radius=_stream_radius(h))
    else:
        r2_reset = compute_r2_in_reset(layer.cfg, layer.weights)
    return layer, h, trace, mid, theta, r2_reset


def _stream_radius(h: torch.Tensor) -> float:
    """A radius of ``h [T, d]`` with room to spare (what the stream would certify for h_l, §18.3)."""
    return 1.5 * float(torch.linalg.vector_norm(h, dim=-1).max())


def _lip_local(norm: NormWeights, x: torch.Tensor, kind: str, eps: float) -> float:
    """§4 local constant of ``norm`` at the tokens ``x``; 1 for the identity."""
    if norm.weight is None:
        return 1.0
    return float(norm.weight.abs().max()) / math.sqrt(float(_stat(x, kind).min()) + eps)


def _lip_global(norm: NormWeights, eps: float) -> float:
    return 1.0 if norm.weight is None else float(norm.weight.abs().max()) / math.sqrt(eps)


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
@pytest.mark.parametrize("eps", EPS)
def test_layer_tiers_dominate_lower_bound(family: str, eps: float) -> None:
    """T21 / T32: ``LB <= B(2r) <= B(2) <= B(1)`` (ratios >= 1 - 1e-9), with every factor equal to its independent
    value; sandwich layers add the branch-output norms, each local at the branch output it reads (§18.3)."""
    layer, h, trace, mid, theta, r2_reset = _setup(family, eps, seed=len(family) + int(-math.log10(eps) * 7))
    rec = compute_layer_lipschitz(layer.weights, layer.cfg, r2_reset, trace, theta).record
    lower = _block_lower(layer.reference, h)
    assert lower > 0
    assert rec.lip_layer_refined / lower >= 1 - 1e-9
    assert rec.lip_layer_refined <= rec.lip_layer_calibrated * (1 + 1e-12)
    assert rec.lip_layer_calibrated <= rec.lip_layer_weights * (1 + 1e-12)
    # tier 2 factors, recomputed at the reference's intermediate points
    kind, w = layer.norm_kind, layer.weights
    ln1, ln2 = _lip_local(w.norm_attn, mid["n1_in"], kind, eps), _lip_local(w.norm_ffn, mid["n2_in"], kind, eps)
    assert rec.ln1_lip_local == pytest.approx(ln1, rel=1e-12)
    assert rec.ln2_lip_local == pytest.approx(ln2, rel=1e-12)
    ln1o = ln2o = 1.0
    if layer.residual in ("sandwich", "output_norm"):
        ln1o = float(w.norm_attn_out.weight.abs().max()) / math.sqrt(float(_stat(mid["n1o_in"], kind).min()) + eps)
        ln2o = float(w.norm_ffn_out.weight.abs().max()) / math.sqrt(float(_stat(mid["n2o_in"], kind).min()) + eps)
        assert rec.ln1_out_lip_local == pytest.approx(ln1o, rel=1e-12)
        assert rec.ln2_out_lip_local == pytest.approx(ln2o, rel=1e-12)
        assert rec.ln1_out_lip_global == pytest.approx(float(w.norm_attn_out.weight.abs().max()) / math.sqrt(eps))
        assert rec.ln2_out_lip_global == pytest.approx(float(w.norm_ffn_out.weight.abs().max()) / math.sqrt(eps))
    else:
        assert rec.ln1_out_lip_local is None and rec.ln2_out_lip_global is None
    r2 = float(torch.linalg.vector_norm(mid["mha_in"], dim=-1).max())
    norms, scale = _norms(layer), layer.heads.scale
    mha = compute_mha_bound(norms, theta.amax(-1), r2, scale)
    assert rec.lip_mha_calibrated == pytest.approx(mha.lip_mha, rel=1e-12)
    assert rec.mha_value_path == pytest.approx(mha.mha_value_path, rel=1e-12)
    assert rec.mha_attn_path == pytest.approx(mha.mha_attn_path, rel=1e-12)
    q, k, v = heads_qkv(mid["mha_in"], layer.heads)
    refined = compute_mha_refined(norms, q, k, v, scale, layer.heads.allowed, theta).lip_mha_refined
    assert rec.lip_mha_refined == pytest.approx(refined, rel=1e-10)
    ffn = _ffn_local(layer, mid["ffn_in"])
    assert rec.lip_ffn_calibrated == pytest.approx(ffn, rel=1e-12)
    assert rec.lip_layer_calibrated == pytest.approx(_combine(layer.residual, ln1, mha.lip_mha, ln2, ffn, ln1o, ln2o),
                                                     rel=1e-12)
    assert rec.lip_layer_refined == pytest.approx(_combine(layer.residual, ln1, refined, ln2, ffn, ln1o, ln2o),
                                                  rel=1e-10)
    # tier 1 factors
    assert rec.ln1_lip_global == pytest.approx(_lip_global(w.norm_attn, eps), rel=1e-14)
    assert rec.ln2_lip_global == pytest.approx(_lip_global(w.norm_ffn, eps), rel=1e-14)
    assert rec.lip_mha_weights == pytest.approx(compute_mha_bound(norms, 1.0, r2_reset, scale).lip_mha, rel=1e-12)
    if layer.residual == "output_norm":                        # the FFN reads h + N1b(.): radius of h plus N1b's
        ffn_radius = r2_reset + _reset(w.norm_attn_out, kind)
        assert float(torch.linalg.vector_norm(mid["ffn_in"], dim=-1).max()) <= ffn_radius
    else:
        ffn_radius = _reset(w.norm_attn if layer.residual == "post" else w.norm_ffn, kind)
    if "w_gate" in layer.ffn:
        ffn_w = compute_swiglu_ball(ffn_radius, layer.ffn["w_gate"], layer.ffn["w_up"], layer.ffn["w_out"],
                                    activation=layer.activation)
    else:
        ffn_w = 1.129 * _spec(layer.ffn["w_in"]) * _spec(layer.ffn["w_out"])
    assert rec.lip_ffn_weights == pytest.approx(ffn_w, rel=1e-12)
    outs = (rec.ln1_out_lip_global or 1.0, rec.ln2_out_lip_global or 1.0)
    assert rec.lip_layer_weights == pytest.approx(
        _combine(layer.residual, rec.ln1_lip_global, rec.lip_mha_weights, rec.ln2_lip_global, ffn_w, *outs), rel=1e-12)


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_layer_factors_dominate_their_lower_bounds(family: str) -> None:
    """Each factor is itself a valid bound at its own input: norms (local <= global) >= max_t ||J_N||; MHA tiers 2, 2r
    and 1 >= LB of the MHA at its input (inside the reset ball); FFN tiers 2 and 1 >= max_t ||J_FFN|| at its input."""
    layer, h, trace, mid, theta, r2_reset = _setup(family, 1e-2, seed=5)
    rec = compute_layer_lipschitz(layer.weights, layer.cfg, r2_reset, trace, theta).record
    factors = [("norm_attn", "n1_in", rec.ln1_lip_local, rec.ln1_lip_global),
               ("norm_ffn", "n2_in", rec.ln2_lip_local, rec.ln2_lip_global)]
    if layer.residual in ("sandwich", "output_norm"):
        factors += [("norm_attn_out", "n1o_in", rec.ln1_out_lip_local, rec.ln1_out_lip_global),
                    ("norm_ffn_out", "n2o_in", rec.ln2_out_lip_local, rec.ln2_out_lip_global)]
    for which, point, local, glob in factors:
        exact = _token_max(lambda u: layer.norm(u, which), mid[point])
        assert exact <= local * (1 + 1e-12) and local <= glob
    assert float(torch.linalg.vector_norm(mid["mha_in"], dim=-1).max()) <= r2_reset
    mha_lower = _block_lower(layer.mha, mid["mha_in"])
    for value in (rec.lip_mha_refined, rec.lip_mha_calibrated, rec.lip_mha_weights):
        assert value / mha_lower >= 1 - 1e-9
    ffn_exact = _token_max(layer.ffn_map, mid["ffn_in"])
    assert ffn_exact <= rec.lip_ffn_calibrated * (1 + 1e-12) <= rec.lip_ffn_weights * (1 + 2e-12)


def test_batch_index_selects_the_sequence() -> None:
    """``batch = b`` evaluates tier 2 at sequence b of a batched trace (equal to the single-sequence trace)."""
    layer, h, _, _, theta, r2_reset = _setup("qwen2", 1e-2, seed=3)
    other = 0.3 * h.flip(0)
    both = torch.stack([other, h])
    trace = run_layer(both, layer.weights, layer.cfg, layer.layer, 0, layer.rope_cs)
    single = run_layer(h[None], layer.weights, layer.cfg, layer.layer, 0, layer.rope_cs)
    ct = compute_calibrated_tier(trace, layer.cfg, theta, batch=1)
    ref = compute_calibrated_tier(single, layer.cfg, theta, batch=0)
    assert ct.lip_layer_calibrated == pytest.approx(ref.lip_layer_calibrated, rel=1e-12)
    assert ct.lip_layer_refined == pytest.approx(ref.lip_layer_refined, rel=1e-12)
    assert ct.ln2_lip_local == pytest.approx(ref.ln2_lip_local, rel=1e-12)
    assert compute_calibrated_tier(trace, layer.cfg, theta, batch=0).ln1_lip_local != pytest.approx(ct.ln1_lip_local)


def test_weights_tier_without_trace() -> None:
    """Without a trace only tier 1 is filled (tier-2 columns None) and equals :func:`compute_weights_tier`."""
    layer = make_random_layer("llama", T, 1e-5, seed=1)
    r2 = compute_r2_in_reset(layer.cfg, layer.weights)
    res = compute_layer_lipschitz(layer.weights, layer.cfg, r2)
    assert res.calibrated_tier is None
    assert res.record.lip_layer_calibrated is None and res.record.ln1_lip_local is None
    assert res.record.lip_layer_weights == compute_weights_tier(layer.weights, layer.cfg, r2).lip_layer_weights


def test_combine_layer_bound_by_hand() -> None:
    """§7 with L_N1 = 2, L_MHA = 3, L_N2 = 5, L_FFN = 7: pre (1 + 6)(1 + 35) = 252; post 5 (1 + 7) 2 (1 + 3) = 320;
    parallel 1 + 6 + 35 = 42 (additive, not a product)."""
    assert combine_layer_bound(Residual.PRE, 2.0, 3.0, 5.0, 7.0) == 252.0
    assert combine_layer_bound(Residual.POST, 2.0, 3.0, 5.0, 7.0) == 320.0
    assert combine_layer_bound(Residual.PARALLEL, 2.0, 3.0, 5.0, 7.0) == 42.0
    # §18.3 sandwich with L_N1b = 11, L_N2b = 13: (1 + 11·3·2)(1 + 13·7·5) = 67 · 456
    assert combine_layer_bound(Residual.SANDWICH, 2.0, 3.0, 5.0, 7.0, 11.0, 13.0) == 67.0 * 456.0
    assert combine_layer_bound(Residual.SANDWICH, 2.0, 3.0, 5.0, 7.0) == 252.0
    # output norms only: L_N1a = L_N2a = 1, (1 + 11·3)(1 + 13·7) = 34 · 92
    assert combine_layer_bound(Residual.OUTPUT_NORM, 1.0, 3.0, 1.0, 7.0, 11.0, 13.0) == 34.0 * 92.0


def test_sandwich_layer_logits_exceed_the_cap() -> None:
    """The Gemma-2-like random layers of T32 / T34 are soft-capped where it matters: raw logits beyond the cap."""
    layer, h, _, mid, _, _ = _setup("gemma2", 1e-2, seed=5)
    q, k, _ = heads_qkv(mid["mha_in"], layer.heads)
    raw = layer.heads.scale * q @ k.repeat_interleave(2, 0).transpose(-1, -2)
    assert float(raw.abs().max()) > 2 * layer.heads.logit_cap
    assert not torch.allclose(capped(raw, layer.heads.logit_cap), raw)


def test_reset_radii_by_hand() -> None:
    """§8.1: pre/parallel use N1's reset (gamma = (1, -2, 0.5, 1), beta = (0, 3, 4, 0): 2 * 2 + 5 = 9 for LN,
    4 for RMSNorm); post-LN uses the previous LN2 or the first-layer radius; without an embedding norm the first-layer
    radius is max ||E_tok|| + max ||E_pos|| (5 + 2)."""
    gamma, beta = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=F64), torch.tensor([0.0, 3.0, 4.0, 0.0], dtype=F64)
    small = NormWeights(0.5 * torch.ones(4, dtype=F64), None)
    for family, expected in (("gpt2", 9.0), ("neox", 9.0), ("llama", 4.0)):
        layer = make_random_layer(family, T, 1e-5, seed=0)
        layer.weights.norm_attn = NormWeights(gamma, beta if layer.norm_kind == "layernorm" else None)
        layer.weights.norm_ffn = small
        assert compute_r2_in_reset(layer.cfg, layer.weights, prev_norm_ffn=small) == pytest.approx(expected)
    bert = make_random_layer("bert", T, 1e-5, seed=0)
    assert compute_r2_in_reset(bert.cfg, bert.weights, prev_norm_ffn=NormWeights(gamma, beta)) == pytest.approx(9.0)
    assert compute_r2_in_reset(bert.cfg, bert.weights, first_layer_radius=3.5) == 3.5
    with pytest.raises(ValueError):
        compute_r2_in_reset(bert.cfg, bert.weights)
    tok = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=F64)
    pos = torch.tensor([[0.0, 2.0], [0.0, 1.0]], dtype=F64)
    assert compute_first_layer_radius(NormKind.LAYERNORM, None, tok, pos) == pytest.approx(7.0)
    assert compute_first_layer_radius(NormKind.LAYERNORM, None, tok, pos, tok_scale=8.0) == pytest.approx(42.0)
    assert compute_first_layer_radius(NormKind.LAYERNORM, NormWeights(gamma, beta)) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        compute_first_layer_radius(NormKind.LAYERNORM, None)


def test_output_norm_stream_radius_by_hand() -> None:
    """§18.3 without input norms: r2_in_reset is the radius of h_l (given, never a reset of N1), and each layer adds
    its output norms' resets: gamma_1b = (1, -2, 0.5, 1, ...), gamma_2b = 0.5 in d = 8 add (2 + 0.5) sqrt 8."""
    layer = make_random_layer("olmo2", T, 1e-5, seed=0)
    w = layer.weights
    assert w.norm_attn.identity and w.norm_ffn.identity
    with pytest.raises(ValueError):
        compute_r2_in_reset(layer.cfg, w)
    assert compute_r2_in_reset(layer.cfg, w, stream_radius=3.5) == 3.5
    w.norm_attn_out = NormWeights(torch.tensor([1.0, -2.0, 0.5, 1.0] * 2, dtype=F64), None)
    w.norm_ffn_out = NormWeights(torch.full((8,), 0.5, dtype=F64), None)
    assert advance_stream_radius(layer.cfg, w, 3.5) == pytest.approx(3.5 + 2.5 * math.sqrt(8), rel=1e-15)
    gemma = make_random_layer("gemma2", T, 1e-5, seed=0)              # a sandwich layer keeps N1a's reset
    assert compute_r2_in_reset(gemma.cfg, gemma.weights, stream_radius=3.5) == pytest.approx(
        _reset(gemma.weights.norm_attn, "rmsnorm"))


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_ffn_reset_radius_reads_the_norm_before_the_ffn(family: str) -> None:
    """§8.1: the FFN input is N2(h') (pre), N2(h) (parallel) or LN1(u1) (post-LN): its radius is that norm's reset;
    §18.3 without input norms it is h' = h + N1b(.): the radius of h plus N1b's reset (reset 3 sqrt 8 here)."""
    layer = make_random_layer(family, T, 1e-5, seed=0)
    w = layer.weights
    if layer.residual == "output_norm":
        w.norm_attn_out = NormWeights(torch.full((8,), -3.0, dtype=F64), None)
        assert compute_ffn_reset_radius(layer.cfg, w, 7.0) == pytest.approx(7.0 + 3.0 * math.sqrt(8), rel=1e-15)
        with pytest.raises(ValueError):
            compute_ffn_reset_radius(layer.cfg, w)
        return
    w.norm_attn = NormWeights(torch.full((8,), 2.0, dtype=F64), None)                  # reset 2 sqrt 8
    w.norm_ffn = NormWeights(torch.full((8,), -5.0, dtype=F64), None)                  # reset 5 sqrt 8
    expected = (2.0 if layer.residual == "post" else 5.0) * math.sqrt(8)
    assert compute_ffn_reset_radius(layer.cfg, w) == pytest.approx(expected, rel=1e-15)


def test_weights_tier_ffn_uses_the_norm_feeding_the_ffn() -> None:
    """§8.1: the SwiGLU ball radius is the reset of N2 in a pre-norm layer: with ||gamma_2||_inf = 3 and d = 8 the
    radius is 3 sqrt 8, independent of N1 and of the MHA radius; GELU layers use 1.129 ||W1|| ||W2||."""
    layer = make_random_layer("llama", T, 1e-5, seed=2)
    layer.weights.norm_ffn = NormWeights(torch.full((8,), -3.0, dtype=F64), None)
    wt = compute_weights_tier(layer.weights, layer.cfg, r2_in_reset=1.0)
    f = layer.ffn
    assert wt.lip_ffn_weights == pytest.approx(compute_swiglu_ball(3 * math.sqrt(8), f["w_gate"], f["w_up"],
                                                                   f["w_out"]), rel=1e-14)
    assert wt.mha.lip_mha == pytest.approx(compute_mha_bound(_norms(layer), 1.0, 1.0, layer.heads.scale).lip_mha)


# ------------------------------------------------------------------------------------------------ T23 gradient flow

def _stack(fns):
    def f(x):
        for fn in fns:
            x = fn(x)
        return x
    return f


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "gemma2", "olmo2"])
def test_pre_norm_and_parallel_identity_path(family: str) -> None:
    """T23 (Theorem 5.4; §18.3 for sandwich and output-norm layers): with both sublayers' output projections zeroed,
    two pre-norm / parallel / sandwich / output-norm layers are the identity, ``d h_2 / d h_0 = I``: the residual path is additive and never
    passes through a norm."""
    from attnstab_cli.metrics.lipschitz.empirical import make_layer_function

    layers = []
    for seed in (0, 1):
        layer = make_random_layer(family, T, 1e-5, seed=seed)
        layer.weights.wo = torch.zeros_like(layer.weights.wo)
        layer.weights.bo = None
        layer.ffn["w_out"] = torch.zeros_like(layer.ffn["w_out"])
        layer.ffn.pop("b_out", None)
        layers.append(make_layer_function(layer.weights, layer.cfg, layer.layer, layer.rope_cs))
    h = _hidden(make_random_layer(family, T, 1e-5, seed=0), 4)
    jac = torch.autograd.functional.jacobian(_stack(layers), h).reshape(h.numel(), h.numel())
    torch.testing.assert_close(jac, torch.eye(h.numel(), dtype=F64), rtol=0, atol=1e-12)


def test_post_ln_output_perturbations_are_centred() -> None:
    """T23 (Theorem 5.5), as it holds: every factor of a post-LN stack ends in an LN, so each output token's
    perturbation lies in ``diag(gamma_2) 1^perp``: ``1^T diag(gamma_2)^{-1} (d h_N / d h_l) = 0`` per token. (The
    gradient at ``h_l`` itself is not mean-zero: it passes ``(I + J_MHA)^T`` last.)"""
    from attnstab_cli.metrics.lipschitz.empirical import make_layer_function

    layers = [make_random_layer("bert", T, 1e-5, seed=s) for s in (0, 1)]
    fns = [make_layer_function(m.weights, m.cfg, m.layer, None, m.key_padding_mask) for m in layers]
    h = _hidden(layers[0], 6)
    jac = torch.autograd.functional.jacobian(_stack(fns), h)                        # [T, d, T, d]
    centred = torch.einsum("iajb,a->ijb", jac, 1 / layers[1].weights.norm_ffn.weight)
    assert float(centred.abs().max()) <= 1e-12 * float(jac.abs().max())
    grad = torch.einsum("iajb,ia->jb", jac, torch.ones(T, 8, dtype=F64))
    assert float(grad.sum(-1).abs().max()) > 1e-6
