"""Which keys each query may attend to: the one mask rule shared by the forward pass, the row-statistics reference
and the θ pass (the fused kernel applies the same rule tile by tile)."""
from __future__ import annotations

import torch


def compute_allowed(i0: int, i1: int, t_q: int, t_k: int, *, causal: bool, window: int | None,
                    key_padding_mask: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
    """Allowed (query, key) pairs for query rows [i0, i1): bool ``[B or 1, 1, i1 − i0, T_k]``.

    Query i sits at absolute position i + (T_k − T_q) (bottom-right alignment, as in SDPA). Causal: key j ≤ position;
    ``window``: |position − j| < window, i.e. the last ``window`` keys of a causal row (Mistral, Phi-3) and the keys
    within ``window − 1`` positions on either side of a bidirectional one (ModernBERT's local layers);
    ``key_padding_mask`` ``[B, T_k]``: True for real tokens.
    """
    pos = torch.arange(i0, i1, device=device)[:, None] + (t_k - t_q)       # [R, 1]
    j = torch.arange(t_k, device=device)[None, :]                          # [1, T_k]
    allowed = torch.ones(i1 - i0, t_k, dtype=torch.bool, device=device)   # [R, T_k]
    if causal:
        allowed &= j <= pos
    if window is not None:
        allowed &= (pos - j).abs() < window
    allowed = allowed[None, None]                                          # [1, 1, R, T_k]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]             # [B, 1, R, T_k]
    return allowed
