"""THEORY T40: multi-head latent attention (§18.8) through the compositions and concatenations of §18.1.

Each case is a random pre-norm LLaMA-like layer of ``lip_helpers`` whose attention is replaced by MLA, with and
without a q rank, with and without the latent biases, with a RoPE attention factor on cos and sin (YaRN) or none,
and with small down-projections (the latent norms then amplify perturbations by 1 / rms, the case a wrong L would
miss). A plain reference written here (down-project, normalize, up-project, rotate the last coordinates as complex
pairs, softmax) is checked equal to the package's ``run_layer``; then the MHA tiers 2r <= 2 <= 1 and the layer tiers
are at least the certified lower bound (dense alternating maximisation of the reference's exact Jacobian), the
constants equal their §18.8 values computed here, and ``logit_bound`` is at least every measured |s q.k|.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attnstab_cli.arch.spec import Attention, RopeStyle
from attnstab_cli.metrics.lipschitz.layer import compute_layer_lipschitz, compute_r2_in_reset, qk_stats
from attnstab_cli.metrics.lipschitz.mha import compute_layer_head_norms, compute_projection_constants
from attnstab_cli.model.blocks import run_layer
from attnstab_cli.model.config import MLADims, RopeConfig
from attnstab_cli.model.weights import LayerWeights, NormWeights
from lip_helpers import dense_alternating_max, jacobian_blocks, make_random_layer, theta_exact

F64 = torch.float64
T, H, NOPE, ROPE, V, R_KV, R_Q = 6, 2, 2, 2, 3, 3, 5
LATENT_EPS = 1e-6


def _spec(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def _rms(u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + LATENT_EPS) * gamma


class MLALayer:
    """A random MLA layer (q rank ``q_rank`` or one q projection) with its plain reference; ``factor`` is the RoPE
    attention factor m on cos and sin, ``down`` scales the down-projections W_qa and W_kva."""

    def __init__(self, q_rank: int | None, bias: bool, factor: float, down: float, eps: float, seed: int) -> None:
        base = make_random_layer("llama", T, eps, seed)
        g = torch.Generator().manual_seed(seed + 50)
        rnd = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=F64)
        d, dk = base.cfg.d_model, NOPE + ROPE
        self.q_rank, self.base, self.factor = q_rank, base, factor
        self.wq = None if q_rank else rnd(d, H * dk, s=2.0 * d ** -0.5)
        self.wq_a = rnd(d, q_rank, s=down * d ** -0.5) if q_rank else None
        self.bq_a = rnd(q_rank, s=0.3 * down) if q_rank and bias else None
        self.gq = 1.0 + 0.4 * rnd(q_rank) if q_rank else None
        self.wq_b = rnd(q_rank, H * dk, s=2.0 * q_rank ** -0.5) if q_rank else None
        self.wkv_a = rnd(d, R_KV + ROPE, s=down * d ** -0.5)
        self.wkv_a[:, R_KV:] *= 3.0 / down                      # the rotary key at unit scale
        self.bkv_a = rnd(R_KV + ROPE, s=0.5) if bias else None
        self.gkv = 1.0 + 0.4 * rnd(R_KV)
        self.wkv_b = rnd(R_KV, H * (NOPE + V), s=2.0 * R_KV ** -0.5)
        self.wo = rnd(H * V, d, s=(H * V) ** -0.5)
        self.bo = rnd(d, s=0.3) if bias else None
        self.angles = torch.arange(T, dtype=F64)[:, None] * (50.0 ** -(torch.arange(0, ROPE, 2, dtype=F64) / ROPE))
        self.s0, self.softmax_factor = dk ** -0.5, 1.1
        rope = RopeConfig(theta=50.0, rotary_dim=ROPE, style=RopeStyle.INTERLEAVED, attention_factor=factor,
                          rotary_last=True, softmax_factor=self.softmax_factor)
        self.rope_cs = (self.angles.cos() * rope.rot_scale, self.angles.sin() * rope.rot_scale)
        self.cfg = replace(base.cfg, layout=replace(base.cfg.layout, attention=Attention.MLA), head_dim=dk,
                           n_heads=H, n_kv_heads=H, rope=rope, mla=MLADims(q_rank, R_KV, NOPE, ROPE, V))
        w = base.weights
        self.weights = LayerWeights(
            layer=w.layer, wq=self.wq, wk=None, wv=None, wo=self.wo, bq=None, bk=None, bv=None, bo=self.bo,
            norm_attn=w.norm_attn, norm_ffn=w.norm_ffn, ffn=w.ffn, wq_a=self.wq_a, bq_a=self.bq_a,
            q_a_norm=NormWeights(self.gq, None) if q_rank else None, wq_b=self.wq_b, wkv_a=self.wkv_a,
            bkv_a=self.bkv_a, kv_a_norm=NormWeights(self.gkv, None), wkv_b=self.wkv_b)
        self.allowed = base.heads.allowed                      # causal, within the layer's window

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The last ROPE coordinates of ``x [H, T, dk]`` as complex pairs times m e^{i angle}."""
        z = torch.view_as_complex(x[..., NOPE:].reshape(*x.shape[:-1], -1, 2).contiguous())
        rot = torch.view_as_real(z * self.factor * torch.polar(torch.ones_like(self.angles), self.angles))
        return torch.cat([x[..., :NOPE], rot.flatten(-2)], dim=-1)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = x @ self.wq if self.q_rank is None else \
            _rms(x @ self.wq_a + (0 if self.bq_a is None else self.bq_a), self.gq) @ self.wq_b
        q = q.reshape(T, H, NOPE + ROPE).transpose(0, 1)                               # [H, T, dk]
        lat = x @ self.wkv_a + (0 if self.bkv_a is None else self.bkv_a)
        kv = (_rms(lat[:, :R_KV], self.gkv) @ self.wkv_b).reshape(T, H, NOPE + V).transpose(0, 1)
        k = torch.cat([kv[..., :NOPE], lat[None, :, R_KV:].expand(H, T, ROPE)], dim=-1)
        return self._rotate(q), self._rotate(k), kv[..., NOPE:]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.qkv(x)
        return self.s0 * self.softmax_factor * q @ k.transpose(-1, -2)                 # [H, T, T]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).masked_fill(~self.allowed, float("-inf")).softmax(-1)

    def mha(self, x: torch.Tensor) -> torch.Tensor:
        _, _, v = self.qkv(x)
        out = (self.probabilities(x) @ v).transpose(0, 1).reshape(T, H * V) @ self.wo
        return out if self.bo is None else out + self.bo

    def layer(self, h: torch.Tensor) -> torch.Tensor:
        b = self.base
        mid = h + self.mha(b.norm(h, "norm_attn"))
        return mid + b.ffn_map(b.norm(mid, "norm_ffn"))


def _lower(f, x: torch.Tensor) -> float:
    lower, _ = dense_alternating_max(jacobian_blocks(f, x), list(range(x.shape[0])), restarts=2, seed=0)
    return lower


CASES = [(q, bias, m, down, eps) for q in (None, R_Q) for bias in (False, True) for m in (1.0, 1.3)
         for down in (1.0, 0.03) for eps in (1e-6, 1e-2)]


def _setup(q_rank: int | None, bias: bool, factor: float, down: float, eps: float):
    seed = 7 + (q_rank or 0) + 2 * bias + int(10 * factor) + int(-math.log10(eps)) + int(down < 1)
    L = MLALayer(q_rank, bias, factor, down, eps, seed)
    g = torch.Generator().manual_seed(seed)
    h = 2.0 * torch.randn(T, L.cfg.d_model, generator=g, dtype=F64) + 0.5
    trace = run_layer(h[None], L.weights, L.cfg, L.base.layer, 0, L.rope_cs)
    a = L.base.norm(h, "norm_attn")
    torch.testing.assert_close(trace.attn.out[0], L.mha(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trace.resid_out[0], L.layer(h), rtol=1e-12, atol=1e-12)
    return L, h, a, trace, theta_exact(L.probabilities(a)), compute_r2_in_reset(L.cfg, L.weights)


@pytest.mark.parametrize("q_rank,bias,factor,down,eps", CASES)
def test_mla_tiers_dominate_the_lower_bound(q_rank: int | None, bias: bool, factor: float, down: float,
                                            eps: float) -> None:
    """T40: LB <= MHA tiers 2r <= 2 <= 1 and LB <= layer tiers; logit_bound >= every measured |s q.k|."""
    L, h, a, trace, theta, r2_reset = _setup(q_rank, bias, factor, down, eps)
    rec = compute_layer_lipschitz(L.weights, L.cfg, r2_reset, trace, theta).record
    mha_lower = _lower(L.mha, a)
    assert mha_lower > 0
    assert rec.lip_mha_refined / mha_lower >= 1 - 1e-9
    assert rec.lip_mha_refined <= rec.lip_mha_calibrated * (1 + 1e-12)
    assert rec.lip_mha_calibrated <= rec.lip_mha_weights * (1 + 1e-12)
    layer_lower = _lower(L.layer, h)
    assert rec.lip_layer_refined / layer_lower >= 1 - 1e-9
    assert rec.lip_layer_refined <= rec.lip_layer_calibrated * (1 + 1e-12)
    assert rec.lip_layer_calibrated <= rec.lip_layer_weights * (1 + 1e-12)
    assert rec.logit_bound >= float(L.logits(a).abs().max())
    assert math.isfinite(rec.lip_layer_weights)


@pytest.mark.parametrize("q_rank,bias,factor,down,eps", CASES[::5])
def test_mla_constants_are_those_of_the_theory(q_rank: int | None, bias: bool, factor: float, down: float,
                                               eps: float) -> None:
    """§18.8 constants by hand, per head: L_V = ||W^V_h|| L_Nkv ||W^c||, M_V = ||W^V_h|| ||gamma_kv||_inf sqrt(r_kv),
    the key as the concatenation [N_kv(c) W^nope_h; x W^r + b^r] and the query through N_qa; the latent norms'
    L_N = ||gamma||_inf / sqrt(ms + eps) at the smallest statistic over the tokens (0 in tier 1)."""
    L, h, a, trace, theta, r2_reset = _setup(q_rank, bias, factor, down, eps)
    norms = compute_layer_head_norms(L.weights, L.cfg)
    r2 = float(a.norm(dim=-1).max())
    lat = a @ L.wkv_a + (0 if L.bkv_a is None else L.bkv_a)
    for local in (False, True):
        stats = qk_stats(trace, 0) if local else None
        pc = compute_projection_constants(norms, r2, stats)
        ms_kv = float(lat[:, :R_KV].pow(2).mean(-1).min()) if local else 0.0
        l_kv = float(L.gkv.abs().max()) / math.sqrt(ms_kv + LATENT_EPS) * _spec(L.wkv_a[:, :R_KV])
        radius_kv = float(L.gkv.abs().max()) * math.sqrt(R_KV)
        b_r = 0.0 if L.bkv_a is None else float(L.bkv_a[R_KV:].norm())
        for head in range(H):
            cols = slice(head * (NOPE + V), (head + 1) * (NOPE + V))
            w_nope, w_v = L.wkv_b[:, cols][:, :NOPE], L.wkv_b[:, cols][:, NOPE:]
            w_q = (L.wq if q_rank is None else L.wq_b)[:, head * (NOPE + ROPE):(head + 1) * (NOPE + ROPE)]
            if q_rank is None:
                lq, mq = _spec(w_q), _spec(w_q) * r2
            else:
                u = a @ L.wq_a + (0 if L.bq_a is None else L.bq_a)
                ms_q = float(u.pow(2).mean(-1).min()) if local else 0.0
                lq = _spec(w_q) * float(L.gq.abs().max()) / math.sqrt(ms_q + LATENT_EPS) * _spec(L.wq_a)
                mq = _spec(w_q) * float(L.gq.abs().max()) * math.sqrt(q_rank)
            lk = math.hypot(_spec(w_nope) * l_kv, _spec(L.wkv_a[:, R_KV:]))
            mk = math.hypot(_spec(w_nope) * radius_kv, _spec(L.wkv_a[:, R_KV:]) * r2 + b_r)
            want = (lq, mq, lk, mk, _spec(w_v) * l_kv, _spec(w_v) * radius_kv)
            got = (pc.lq[head], pc.mq[head], pc.lk[head], pc.mk[head], pc.lv[head], pc.mv[head])
            for x, y in zip(got, want):
                assert abs(float(x) - y) <= 1e-10 * y
