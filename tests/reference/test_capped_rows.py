"""Soft-capped attention rows (THEORY §18.5): every path that turns q, k into probabilities reads c tanh(s q.k / c).

The independent computation is a dense float64 softmax of the capped logits written here; the row statistics of the
torch reference, the chosen-row recomputation and the kernel dispatch (which always takes the torch path under a
cap, since the fused kernel computes plain s q.k) must agree with it, and must differ from the uncapped rows.
"""
from __future__ import annotations

import math

import torch

from attnstab_cli.kernel_dispatch import attn_row_stats
from attnstab_cli.metrics.theta import compute_theta_interval
from attnstab_cli.reference.attention_rows import compute_row_probabilities
from attnstab_cli.reference.row_stats import attn_row_stats_ref

F64 = torch.float64
CAP = 1.5


def _inputs() -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(0)
    q = 2.0 * torch.randn(1, 4, 9, 8, generator=g, dtype=F64)
    k = 2.0 * torch.randn(1, 2, 9, 8, generator=g, dtype=F64)
    return q, k, 8 ** -0.5


def _dense(q: torch.Tensor, k: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    s = scale * q @ k.repeat_interleave(2, 1).transpose(-1, -2)                  # [1, H, T, T]
    assert float(s.abs().max()) > 3 * CAP                                         # raw logits well beyond the cap
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    t = s.shape[-1]
    return s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf).softmax(-1)


def test_row_stats_read_capped_logits() -> None:
    q, k, scale = _inputs()
    p = _dense(q, k, scale, CAP)
    for kernel in ("torch", "triton"):                       # "triton" falls back to the torch path under a cap
        st = attn_row_stats(q, k, scale, causal=True, key_padding_mask=None, window=None, kernel=kernel,
                            logit_cap=CAP)
        torch.testing.assert_close(st.pmax, p.amax(-1), rtol=1e-13, atol=1e-15)
        exact = compute_theta_interval(p.reshape(-1, 9), slack=0.0)
        assert bool((st.theta_lo.reshape(-1) <= exact.hi + 1e-12).all())
        assert bool((exact.lo <= st.theta_hi.reshape(-1) + 1e-12).all())
    plain = attn_row_stats_ref(q, k, scale, causal=True)
    assert float((plain.pmax - p.amax(-1)).abs().max()) > 1e-3


def test_chosen_rows_read_capped_logits() -> None:
    q, k, scale = _inputs()
    p = _dense(q, k, scale, CAP)
    b, h, i = torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 2, 3, 3]), torch.tensor([8, 4, 8, 2, 7])
    rows, _ = compute_row_probabilities(q, k, scale, b, h, i, causal=True, window=None, key_padding_mask=None,
                                        logit_cap=CAP)
    torch.testing.assert_close(rows, p[0, h, i], rtol=1e-13, atol=1e-15)
    plain, _ = compute_row_probabilities(q, k, scale, b, h, i, causal=True, window=None, key_padding_mask=None)
    torch.testing.assert_close(plain, _dense(q, k, scale, None)[0, h, i], rtol=1e-13, atol=1e-15)


def test_capped_attention_in_query_blocks(monkeypatch) -> None:
    """The layer's explicit capped attention, one query block at a time (3 rows per block here, GQA), equals the
    dense softmax of the capped logits times v."""
    from attnstab_cli.model import blocks

    q, k, scale = _inputs()
    v = torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    want = _dense(q, k, scale, CAP) @ v.repeat_interleave(2, 1)
    monkeypatch.setattr(blocks, "_EXPLICIT_BLOCK_ELEMENTS", 3 * 4 * 9)
    torch.testing.assert_close(blocks.explicit_attention(q, k, v, allowed, scale, CAP), want, rtol=1e-13, atol=1e-14)
