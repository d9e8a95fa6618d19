"""The θ pass's per-row intervals contain the exact values of the full float64 algorithm (THEORY §3.3, §3.7).

The independent computation is the previous policy run on every row: the layer's attention probabilities formed
densely in float64 from the recorded q, k and A1 / A2 + A3 (``compute_theta_interval``) on every row. Where that
pins a row (width ≤ 1e-12) its value must lie in the scan's interval widened by ``theta_slack``; everywhere the two
certified intervals must intersect. Run on every tiny family and every bundled sample checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnstab_cli.metrics.theta import compute_theta_interval
from attnstab_cli.metrics.theta_scan import ThetaOptions, ThetaPass
from attnstab_cli.model.load import open_model
from attnstab_cli.model.masks import compute_allowed
from attnstab_cli.model.stream import LayerStream
from tiny_models import FAMILIES

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
SAMPLE_NAMES = ("gpt2-tiny", "bert-tiny", "llama-tiny", "pythia-tiny")


def dense_rows(a, b: int) -> torch.Tensor:
    """Every attention row of sequence ``b`` in float64, ``[H·T, T]``, masked keys exactly 0; with sink logits the
    real keys' probabilities of the softmax over the n + 1 outcomes (rows summing to m < 1, THEORY §18.4)."""
    h, h_kv, t = a.q.shape[1], a.k.shape[1], a.q.shape[2]
    k = a.k[b].double().repeat_interleave(h // h_kv, dim=0)                       # [H, T, D]
    s = a.scale * a.q[b].double() @ k.transpose(-1, -2)                            # [H, T, T]
    if a.logit_cap is not None:                                                    # Gemma 2 soft-cap (§18.5)
        s = a.logit_cap * torch.tanh(s / a.logit_cap)
    pad = None if a.key_padding_mask is None else a.key_padding_mask[b:b + 1]
    allowed = compute_allowed(0, t, t, t, causal=a.causal, window=a.window, key_padding_mask=pad, device="cpu")
    s = s.masked_fill(~allowed[0], float("-inf"))
    if a.sinks is not None:
        sink = a.sinks.double().view(h, 1, 1).expand(h, t, 1)
        return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :t].reshape(h * t, t)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p.reshape(h * t, t)


def sink_theta_interval(p: torch.Tensor):
    """The float64 algorithm's interval of ``theta_sink = m (1 - m) + m^2 theta(p / m)`` per row (THEORY §18.4; plain
    theta where the rows sum to 1): ``(lo, hi)``."""
    m = p.sum(-1)
    ref = compute_theta_interval(p / m[:, None], slack=0.0)
    return m * (1 - m) + m * m * ref.lo, m * (1 - m) + m * m * ref.hi


def check_model(path: Path, batches: list[torch.Tensor]) -> int:
    model = open_model(path)
    cfg = model.cfg
    opts = ThetaOptions(slack=1e-6)
    obs = ThetaPass(cfg.n_heads, cfg.n_kv_heads, opts)
    checked = 0
    for trace in LayerStream(model, batches).layers():
        v = obs.measure(trace.attn)
        for b in range(trace.attn.q.shape[0]):
            ref_lo, ref_hi = sink_theta_interval(dense_rows(trace.attn, b))
            lo, hi = v.lo[b].reshape(-1) - opts.slack, v.hi[b].reshape(-1) + opts.slack   # [H·T]
            exact = (ref_hi - ref_lo) <= 1e-12
            assert bool((lo[exact] <= ref_lo[exact] + 1e-12).all() and (ref_hi[exact] <= hi[exact] + 1e-12).all())
            assert bool((lo <= ref_hi + 1e-12).all() and (ref_lo <= hi + 1e-12).all())
            checked += int(exact.sum())
    return checked


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_theta_intervals_contain_exact_values_tiny(family: str, tiny_checkpoints: dict) -> None:
    path, _ = tiny_checkpoints[family]
    vocab = open_model(path).cfg.vocab_size
    tokens = torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(3))
    assert check_model(path, [tokens]) > 0


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_theta_intervals_contain_exact_values_samples(name: str) -> None:
    path = SAMPLES / name
    vocab = open_model(path).cfg.vocab_size
    tokens = torch.randint(0, vocab, (1, 80), generator=torch.Generator().manual_seed(5))
    assert check_model(path, [tokens]) > 0


def test_capped_theta_contains_eager_probabilities(tiny_checkpoints: dict) -> None:
    """θ of the soft-capped rows (THEORY §18.5) from the reference's own eager attention probabilities (float32,
    so within 1e-4 by the 2-Lipschitz regularity of θ, T9) lies in the scan's certified intervals."""
    path, ref = tiny_checkpoints["gemma2"]
    model = open_model(path)
    assert model.cfg.attn_logit_cap is not None
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = ref(tokens, output_attentions=True).attentions
    obs = ThetaPass(model.cfg.n_heads, model.cfg.n_kv_heads, ThetaOptions(slack=0.0, tol=0.0, rows_per_head=None))
    capped = 0
    for trace in LayerStream(model, [tokens]).layers():
        a = trace.attn
        raw = a.scale * a.q.double() @ a.k.double().repeat_interleave(model.cfg.group_size, 1).transpose(-1, -2)
        capped += int((raw.abs() > a.logit_cap).sum())
        v = obs.measure(a)
        p = eager[trace.layer][0].double().reshape(-1, 40)                       # [H·T, T]
        exact = compute_theta_interval(p, slack=0.0)
        lo, hi = v.lo[0].reshape(-1), v.hi[0].reshape(-1)
        assert bool((lo <= exact.hi + 1e-4).all() and (exact.lo <= hi + 1e-4).all())
    assert capped > 0                                                             # raw logits beyond the cap


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "deepseek_v3_yarn", "deepseek_v2_moe",
                                    "deepseek_v3_moe"])
def test_latent_attention_theta_pmax_entropy_match_eager(family: str, tiny_checkpoints: dict) -> None:
    """Latent attention (THEORY §18.8): the θ rows use q, k exactly as in the logits, so the certified intervals
    contain θ of the reference's eager probabilities (float32: within 1e-4 by T9), and the rows' p_max and entropy
    agree with those probabilities."""
    path, ref = tiny_checkpoints[family]
    model = open_model(path)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = ref(tokens, output_attentions=True).attentions
    obs = ThetaPass(model.cfg.n_heads, model.cfg.n_kv_heads, ThetaOptions(slack=0.0, tol=0.0, rows_per_head=None))
    for trace in LayerStream(model, [tokens]).layers():
        v = obs.measure(trace.attn)
        p = eager[trace.layer][0].double().reshape(-1, 40)                       # [H·T, T]
        exact = compute_theta_interval(p, slack=0.0)
        lo, hi = v.lo[0].reshape(-1), v.hi[0].reshape(-1)
        assert bool((lo <= exact.hi + 1e-4).all() and (exact.lo <= hi + 1e-4).all())
        torch.testing.assert_close(v.pmax[0].reshape(-1), p.amax(-1), atol=1e-5, rtol=0)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
        torch.testing.assert_close(v.entropy[0].reshape(-1), entropy, atol=1e-4, rtol=0)
        assert float(hi.max()) > 0.5                                               # informative, not uniform rows


def test_sink_theta_pmax_entropy_match_gpt_oss_eager(tiny_checkpoints: dict) -> None:
    """Attention sinks (THEORY §18.4) on the tiny gpt-oss: the reference's eager probabilities are the real keys'
    share of the softmax over the n + 1 outcomes; theta_sink of those rows (float32: within 1e-4 by T9) lies in the
    scan's certified intervals, p_max is the largest real-key probability, the entropy counts the sink outcome, and
    the sink mass is 1 - m."""
    path, ref = tiny_checkpoints["gpt_oss"]
    model = open_model(path)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = ref(tokens, output_attentions=True).attentions
    obs = ThetaPass(model.cfg.n_heads, model.cfg.n_kv_heads, ThetaOptions(slack=0.0, tol=0.0, rows_per_head=None))
    parked = 0
    for trace in LayerStream(model, [tokens]).layers():
        assert trace.attn.sinks is not None
        v = obs.measure(trace.attn)
        p = eager[trace.layer][0].double().reshape(-1, 40)                       # [H·T, T]
        m = p.sum(-1)
        assert float(m.max()) < 1.0
        ref_lo, ref_hi = sink_theta_interval(p)
        lo, hi = v.lo[0].reshape(-1), v.hi[0].reshape(-1)
        assert bool((lo <= ref_hi + 1e-4).all() and (ref_lo <= hi + 1e-4).all())
        torch.testing.assert_close(v.pmax[0].reshape(-1), p.amax(-1), atol=1e-5, rtol=0)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) - (1 - m) * (1 - m).clamp_min(1e-300).log()
        torch.testing.assert_close(v.entropy[0].reshape(-1), entropy, atol=1e-4, rtol=0)
        torch.testing.assert_close(v.sink_mass[0].reshape(-1), 1 - m, atol=1e-5, rtol=0)
        parked += int((1 - m > 0.5).sum())
    assert parked > 0                                                             # rows mostly on the sink
