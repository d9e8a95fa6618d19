"""Synthetic layer traces for metric tests: only the attention fields the θ pass reads are filled."""
from __future__ import annotations

import torch

from attnstab_cli.model.traces import AttentionTrace, LayerTrace


def make_trace(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, window: int | None = None,
               pad: torch.Tensor | None = None, layer: int = 0) -> LayerTrace:
    """A LayerTrace with q [B, H, T, D], k [B, H_kv, T, D], the mask description and empty other fields."""
    none = torch.zeros(0)
    attn = AttentionTrace(x=none, q=q, k=k, v=k, scale=scale, causal=causal, window=window, key_padding_mask=pad,
                          context=none, out=none)
    return LayerTrace(layer=layer, batch=0, resid_in=none, resid_out=none, attn=attn, ffn_in=none, ffn_out=none)
