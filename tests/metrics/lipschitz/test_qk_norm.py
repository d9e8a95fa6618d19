"""THEORY T31: attention with q/k RMSNorm on the projections (§18.2), per head (Qwen3, Gemma 3) and full width
(OLMo 2), with GQA and RoPE.

Each case is a random LLaMA-like layer of ``lip_helpers`` given q/k norms (and an OLMo-2-like one: full-width q/k
norms in the output-norm wiring of §18.3, whose MHA reads h itself); a plain reference written here (project,
normalize, rotate, softmax) is checked equal to the package's ``run_layer``, and then: the MHA tiers 2r, 2 and 1 and
the layer tiers are at least the certified lower bound (dense alternating maximisation of the reference's exact
Jacobian), the constants equal their §18.2 values computed here, and ``logit_bound`` is at least every |s q.k| on
calibration-like, huge and tiny inputs.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attnstab_cli.arch.spec import QKNorm
from attnstab_cli.metrics.lipschitz.layer import compute_layer_lipschitz, compute_r2_in_reset
from attnstab_cli.metrics.lipschitz.mha import compute_layer_head_norms, compute_mha_bound
from attnstab_cli.model.blocks import run_layer
from attnstab_cli.model.weights import NormWeights
from lip_helpers import _rotate, dense_alternating_max, jacobian_blocks, make_random_layer, theta_exact

F64 = torch.float64
T = 6


def _spec(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


class QKNormLayer:
    """A random layer of ``family`` with q/k RMSNorm ``mode`` and its plain reference; ``proj_scale`` scales W_Q and
    W_K (small projections: the norms amplify perturbations by 1 / rms(u), the case a wrong L would miss)."""

    def __init__(self, family: str, mode: QKNorm, eps: float, seed: int, proj_scale: float = 1.0) -> None:
        base = make_random_layer(family, T, eps, seed)
        m, g = base.heads, torch.Generator().manual_seed(seed + 100)
        m.wq, m.wk = proj_scale * m.wq, proj_scale * m.wk
        base.weights = replace(base.weights, wq=m.wq, wk=m.wk)
        dh = m.head_dim
        qw, kw = (dh, dh) if mode is QKNorm.PER_HEAD else (m.n_heads * dh, m.n_kv_heads * dh)
        self.gq = 1.0 + 0.4 * torch.randn(qw, generator=g, dtype=F64)
        self.gk = 1.0 + 0.4 * torch.randn(kw, generator=g, dtype=F64)
        self.base, self.mode, self.eps, self.m = base, mode, eps, m
        self.cfg = replace(base.cfg, layout=replace(base.cfg.layout, qk_norm=mode))
        self.weights = replace(base.weights, q_norm=NormWeights(self.gq, None), k_norm=NormWeights(self.gk, None))

    def projections(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """Un-normalized ``x W + b`` of ``q`` or ``k``: ``[T, n*D]``."""
        w, b = (self.m.wq, self.m.bq) if which == "q" else (self.m.wk, self.m.bk)
        return x @ w + (0 if b is None else b)

    def _normalize(self, u: torch.Tensor, gamma: torch.Tensor, n: int) -> torch.Tensor:
        t, dh = u.shape[0], self.m.head_dim
        if self.mode is QKNorm.FULL_WIDTH:
            return (u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + self.eps) * gamma).reshape(t, n, dh)
        u = u.reshape(t, n, dh)
        return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + self.eps) * gamma

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [H, T, D]``, ``k, v [H_kv, T, D]``: projected, normalized, then rotated."""
        m, t = self.m, x.shape[0]
        q = self._normalize(self.projections(x, "q"), self.gq, m.n_heads).transpose(0, 1)
        k = self._normalize(self.projections(x, "k"), self.gk, m.n_kv_heads).transpose(0, 1)
        v = (x @ m.wv + (0 if m.bv is None else m.bv)).reshape(t, m.n_kv_heads, m.head_dim).transpose(0, 1)
        return _rotate(q, m.angles, m.rotary_dim), _rotate(k, m.angles, m.rotary_dim), v

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.qkv(x)
        k = k.repeat_interleave(self.m.n_heads // self.m.n_kv_heads, 0)
        return self.m.scale * q @ k.transpose(-1, -2)                                  # [H, T, T]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).masked_fill(~self.m.allowed, float("-inf")).softmax(-1)

    def mha(self, x: torch.Tensor) -> torch.Tensor:
        _, _, v = self.qkv(x)
        v = v.repeat_interleave(self.m.n_heads // self.m.n_kv_heads, 0)
        out = (self.probabilities(x) @ v).transpose(0, 1).reshape(x.shape[0], -1) @ self.m.wo
        return out if self.m.bo is None else out + self.m.bo

    def layer(self, h: torch.Tensor) -> torch.Tensor:
        """The layer map with this attention: pre-norm, or output norms only (§18.3)."""
        b = self.base
        attn = self.mha(b.norm(h, "norm_attn"))
        if b.residual == "output_norm":
            mid = h + b.norm(attn, "norm_attn_out")
            return mid + b.norm(b.ffn_map(mid), "norm_ffn_out")
        mid = h + attn
        return mid + b.ffn_map(b.norm(mid, "norm_ffn"))


def _lower(f, x: torch.Tensor) -> float:
    lower, _ = dense_alternating_max(jacobian_blocks(f, x), list(range(x.shape[0])), restarts=2, seed=0)
    return lower


CASES = [(fam, mode, eps) for fam in ("llama", "qwen2") for mode in QKNorm for eps in (1e-6, 1e-2, 1.0)] + \
    [("olmo2", QKNorm.FULL_WIDTH, eps) for eps in (1e-6, 1e-2, 1.0)]


def _setup(family: str, mode: QKNorm, eps: float, proj_scale: float = 1.0):
    seed = len(family) + 3 * list(QKNorm).index(mode) + int(-math.log10(eps))
    L = QKNormLayer(family, mode, eps, seed, proj_scale)
    g = torch.Generator().manual_seed(seed)
    h = 2.0 * torch.randn(T, L.cfg.d_model, generator=g, dtype=F64) + 0.5
    trace = run_layer(h[None], L.weights, L.cfg, L.base.layer, 0, L.base.rope_cs)
    a = L.base.norm(h, "norm_attn")
    torch.testing.assert_close(trace.attn.out[0], L.mha(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trace.resid_out[0], L.layer(h), rtol=1e-12, atol=1e-12)
    theta = theta_exact(L.probabilities(a))                                             # [H, T]
    radius = 1.5 * float(h.norm(dim=-1).max())          # output norms: the MHA reads h, radius of the inputs considered
    return L, h, a, trace, theta, compute_r2_in_reset(L.cfg, L.weights, stream_radius=radius)


@pytest.mark.parametrize("proj_scale", [1.0, 0.02])
@pytest.mark.parametrize("family,mode,eps", CASES)
def test_qk_norm_tiers_dominate_the_lower_bound(family: str, mode: QKNorm, eps: float, proj_scale: float) -> None:
    """T31: LB <= MHA tiers 2r <= 2 <= 1 and LB <= layer tiers, at the layer's actual attention input."""
    L, h, a, trace, theta, r2_reset = _setup(family, mode, eps, proj_scale)
    rec = compute_layer_lipschitz(L.weights, L.cfg, r2_reset, trace, theta).record
    mha_lower = _lower(L.mha, a)
    assert mha_lower > 0
    assert rec.lip_mha_refined / mha_lower >= 1 - 1e-9
    assert rec.lip_mha_refined <= rec.lip_mha_calibrated * (1 + 1e-12)
    assert rec.lip_mha_calibrated <= rec.lip_mha_weights * (1 + 1e-12)
    layer_lower = _lower(L.layer, h)
    assert rec.lip_layer_refined / layer_lower >= 1 - 1e-9
    assert rec.lip_layer_calibrated <= rec.lip_layer_weights * (1 + 1e-12)


@pytest.mark.parametrize("family,mode,eps", CASES[::3])
def test_qk_norm_constants_are_those_of_the_theory(family: str, mode: QKNorm, eps: float) -> None:
    """§18.2 constants by hand: M = ||gamma||_inf sqrt(width) for any input, L = ||W|| ||gamma||_inf / sqrt(ms + eps)
    with ms the smallest statistic over the tokens (0 in tier 1), the full W for a full-width norm."""
    L, h, a, trace, theta, r2_reset = _setup(family, mode, eps)
    m, dh = L.m, L.m.head_dim
    full = mode is QKNorm.FULL_WIDTH
    heads_q = [m.wq[:, i * dh:(i + 1) * dh] for i in range(m.n_heads)]
    heads_k = [m.wk[:, i * dh:(i + 1) * dh] for i in range(m.n_kv_heads)]
    wq = torch.tensor([_spec(m.wq) if full else _spec(w) for w in heads_q], dtype=F64)
    wk = torch.tensor([_spec(m.wk) if full else _spec(w) for w in heads_k], dtype=F64)
    gq, gk = float(L.gq.abs().max()), float(L.gk.abs().max())
    mq, mk = gq * math.sqrt(L.gq.numel()), gk * math.sqrt(L.gk.numel())
    group = m.n_heads // m.n_kv_heads

    def ms(which: str, n: int) -> torch.Tensor:
        u = L.projections(a, which)
        return u.pow(2).mean(-1).min().expand(n) if full else u.reshape(T, n, dh).pow(2).mean(-1).amin(0)

    for stat_q, stat_k, r2, th, got in (
            (torch.zeros(m.n_heads, dtype=F64), torch.zeros(m.n_kv_heads, dtype=F64), r2_reset, 1.0,
             compute_mha_bound(compute_layer_head_norms(L.weights, L.cfg), 1.0, r2_reset, m.scale)),
            (ms("q", m.n_heads), ms("k", m.n_kv_heads), float(a.norm(dim=-1).max()), theta.amax(-1), None)):
        lq = wq * gq / torch.sqrt(stat_q + eps)
        lk = (wk * gk / torch.sqrt(stat_k + eps)).repeat_interleave(group)
        lam = lq * mk + mq * lk
        wv = torch.tensor([_spec(m.wv[:, i * dh:(i + 1) * dh]) for i in range(m.n_kv_heads)],
                          dtype=F64).repeat_interleave(group)
        c = wv + m.scale * torch.as_tensor(th, dtype=F64) * lam * wv * r2
        if got is None:
            rec = compute_layer_lipschitz(L.weights, L.cfg, r2_reset, trace, theta).record
            assert rec.lip_mha_calibrated == pytest.approx(_spec(m.wo) * float(c.sum()), rel=1e-10)
        else:
            torch.testing.assert_close(got.lambda_h, lam, rtol=1e-10, atol=0)
            assert got.lip_mha == pytest.approx(_spec(m.wo) * float(c.sum()), rel=1e-10)
            assert got.logit_bound == pytest.approx(m.scale * mq * mk, rel=1e-12)


@pytest.mark.parametrize("mode", list(QKNorm))
def test_logit_bound_holds_on_every_input(mode: QKNorm) -> None:
    """T31: ``logit_bound >= |s q.k|`` on calibration-like, huge and near-zero inputs (whatever their radius)."""
    L, h, a, trace, theta, r2_reset = _setup("qwen2", mode, 1e-6)
    bound = compute_layer_lipschitz(L.weights, L.cfg, r2_reset).record.logit_bound
    g = torch.Generator().manual_seed(7)
    seen = 0.0
    for scale in (1e-6, 1.0, 1e3, 1e6):
        x = scale * torch.randn(T, L.cfg.d_model, generator=g, dtype=F64)
        seen = max(seen, float(L.logits(x).abs().max()))
    assert seen > 0.3 * bound            # the bound is approached, not vacuous: normalized q, k are near their radii
    assert seen <= bound * (1 + 1e-12)


def test_logit_bound_without_qk_norm_is_at_the_reset_radius() -> None:
    """Without q/k norms ``logit_bound = max_h s (||W_Q^h|| R + ||b_Q^h||)(||W_K^g|| R + ||b_K^g||)`` at
    ``R = r2_in_reset``, and every |s q.k| inside that ball lies below it."""
    base = make_random_layer("qwen2", T, 1e-2, seed=4)
    m, dh = base.heads, base.heads.head_dim
    r2 = compute_r2_in_reset(base.cfg, base.weights)
    bound = compute_layer_lipschitz(base.weights, base.cfg, r2).record.logit_bound
    group = m.n_heads // m.n_kv_heads
    want = max(m.scale * (_spec(m.wq[:, h * dh:(h + 1) * dh]) * r2 + float(m.bq[h * dh:(h + 1) * dh].norm()))
               * (_spec(m.wk[:, (h // group) * dh:(h // group + 1) * dh]) * r2
                  + float(m.bk[(h // group) * dh:(h // group + 1) * dh].norm())) for h in range(m.n_heads))
    assert bound == pytest.approx(want, rel=1e-12)
    from lip_helpers import heads_qkv, random_unit_ball_rows
    q, k, _ = heads_qkv(random_unit_ball_rows(T, base.cfg.d_model, r2, torch.Generator().manual_seed(1)), m)
    logits = m.scale * q @ k.repeat_interleave(group, 0).transpose(-1, -2)
    assert float(logits.abs().max()) <= bound
