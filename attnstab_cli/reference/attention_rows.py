"""Chosen attention rows as float64 probability vectors, recomputed from the recorded q and k (THEORY §3.1).

The one masked float64 softmax of the package: the θ refinement (§3.7), the paper's estimator on sampled rows (§3.6)
and the softmax-conditioning sample (§13) all ask for a few rows ``(b, h, i)`` of one layer, never the n × n matrix
of every head. Rows are grouped by (sequence, key/value head), so each group costs one small matmul. With a sink
logit per head (THEORY §18.4) the model's key probabilities are p = m·q, q the softmax over the keys alone and 1 − m
the sink's share: :func:`compute_row_probabilities` gives p, :func:`compute_sink_mass` gives 1 − m.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def compute_row_logits(q: Tensor, k: Tensor, scale: float, b: Tensor, h: Tensor, i: Tensor, *, causal: bool,
                       window: int | None, key_padding_mask: Tensor | None,
                       logit_cap: float | None = None) -> tuple[Tensor, Tensor]:
    """Float64 logits ``s = scale · q_i·k_j`` (``c · tanh(s / c)`` with a ``logit_cap`` c, §18.5) of the rows
    ``(b[r], h[r], i[r])`` and their key masks.

    q ``[B, H, T_q, D]``, k ``[B, H_kv, T_k, D]`` (query head h reads key head h // (H / H_kv)), index tensors
    int64 ``[R]``. Returns ``(s [R, T_k], allowed [R, T_k])``; masked logits are −inf.
    """
    n_heads, n_kv, t_q, t_k = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    group = n_heads // n_kv
    dev = q.device
    b, h, i = b.to(dev), h.to(dev), i.to(dev)
    s = torch.full((b.numel(), t_k), -math.inf, dtype=F64, device=dev)             # [R, T_k]
    if b.numel() == 0:
        return s, torch.zeros(0, t_k, dtype=torch.bool, device=dev)
    pos = i + (t_k - t_q)                                                           # [R] absolute query position
    j = torch.arange(t_k, device=dev)[None, :]                                      # [1, T_k]
    allowed = torch.ones(b.numel(), t_k, dtype=torch.bool, device=dev)            # [R, T_k], the rule of masks.py
    if causal:
        allowed &= j <= pos[:, None]
    if window is not None:
        allowed &= (pos[:, None] - j).abs() < window
    if key_padding_mask is not None:
        allowed &= key_padding_mask.to(dev)[b]
    group_id = b * n_kv + h // group                                                # [R]
    for gid in torch.unique(group_id).tolist():
        sel = torch.nonzero(group_id == gid).flatten()                              # rows of this (b, g)
        bi, g = divmod(gid, n_kv)
        rows = q[bi, h[sel], i[sel]].to(F64)                                        # [r, D]
        s[sel] = scale * rows @ k[bi, g].to(F64).T                                  # [r, T_k]
    if logit_cap is not None:
        s = logit_cap * torch.tanh(s / logit_cap)
    return s.masked_fill(~allowed, -math.inf), allowed


def compute_row_probabilities(q: Tensor, k: Tensor, scale: float, b: Tensor, h: Tensor, i: Tensor, *,
                              causal: bool, window: int | None, key_padding_mask: Tensor | None,
                              logit_cap: float | None = None, sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Float64 rows ``p [R, T_k]`` of the model's key probabilities (masked keys exactly 0; a row with no key is all
    0) and their masks; with ``sinks [H]`` the row's sink logit joins its softmax, so the row sums to m < 1."""
    s, allowed = compute_row_logits(q, k, scale, b, h, i, causal=causal, window=window,
                                    key_padding_mask=key_padding_mask, logit_cap=logit_cap)
    sink = None if sinks is None else sinks.to(s.device, F64)[h.to(s.device)]
    return compute_masked_softmax(s, allowed, sink), allowed


def compute_masked_softmax(s: Tensor, allowed: Tensor, sink: Tensor | None = None) -> Tensor:
    """Float64 softmax over the last axis of logits ``s [..., T_k]`` restricted to ``allowed`` keys: masked keys are
    exactly 0 and a row with no allowed key is all 0 (never NaN). ``sink [...]``: one more outcome per row with that
    logit and no key of its own (§18.4); the keys' probabilities then sum to m < 1."""
    s = s.to(F64).masked_fill(~allowed.to(s.device), -math.inf)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)                                  # [..., 1]
    if sink is not None:
        lse = torch.logaddexp(lse, sink.to(F64)[..., None])
    return torch.exp(s - lse).nan_to_num(0.0)


def compute_sink_mass(s: Tensor, allowed: Tensor, sink: Tensor) -> Tensor:
    """The sink's probability 1 − m = sigmoid(σ − lse) per row ``[...]`` (float64; 1 for a row with no key), for
    logits ``s [..., T_k]`` over the ``allowed`` keys and the rows' sink logits ``sink [...]`` (§18.4)."""
    lse = torch.logsumexp(s.to(F64).masked_fill(~allowed.to(s.device), -math.inf), dim=-1)
    return torch.sigmoid(sink.to(F64) - lse)

