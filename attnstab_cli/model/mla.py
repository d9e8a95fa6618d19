"""Multi-head latent attention's per-head q, k, v (THEORY §18.8; DeepSeek V2/V3, as ``transformers`` forms them).

Per token: ``c_q = N_qa(x W_qa + b_qa)`` and ``q = c_q W_qb`` (or ``q = x W_q`` without a q rank);
``[c_kv; k_rope] = x W_kva + b_kva``; per head ``[k_nope_h; v_h] = N_kv(c_kv) W_kvb``. Heads are laid out
``q_h = [q_nope_h; q_rope_h]`` and ``k_h = [k_nope_h; k_rope]``, the rotary part ``k_rope`` shared by all heads; RoPE
(applied by the caller, :func:`~attnstab_cli.model.rope.apply_rope` with ``rotary_last``) rotates the last
``rope`` coordinates of each. Both latent norms are RMSNorms with the reference's fixed epsilon
(:attr:`~attnstab_cli.model.config.MLADims.latent_eps`).
"""
from __future__ import annotations

import torch

from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.weights import LayerWeights, NormWeights


def _rms(u: torch.Tensor, w: NormWeights, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``gamma * u / sqrt(ms(u) + eps)`` and ``ms(u)`` ``[B, T]``, statistics in float32 or wider (as the blocks'
    norms)."""
    uf = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
    stat = uf.pow(2).mean(dim=-1)                                              # [B, T]
    out = uf * torch.rsqrt(stat + eps)[..., None] * w.weight.to(uf.dtype)
    return out.to(u.dtype), stat


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight
    return y if bias is None else y + bias


def compute_mla_qkv(x: torch.Tensor, w: LayerWeights, cfg: ModelConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``q, k [B, H, T, nope + rope]`` (not yet rotated), ``v [B, H, T, v]`` from the attention input ``x [B, T, d]``,
    with the latent norms' statistics ``ms`` over ``[B, T]`` (q's None without a q rank)."""
    m = cfg.mla
    eps = m.latent_eps
    b, t, _ = x.shape
    h = cfg.n_heads
    if w.wq_a is None:
        q, q_stat = x @ w.wq, None                                             # [B, T, H*(nope + rope)]
    else:
        c_q, q_stat = _rms(_linear(x, w.wq_a, w.bq_a), w.q_a_norm, eps)        # [B, T, r_q]
        q = c_q @ w.wq_b                                                       # [B, T, H*(nope + rope)]
    q = q.view(b, t, h, m.nope + m.rope).transpose(1, 2)                       # [B, H, T, D_k]
    latent = _linear(x, w.wkv_a, w.bkv_a)                                      # [B, T, r_kv + rope]
    c_kv, k_rope = latent[..., : m.kv_lora_rank], latent[..., m.kv_lora_rank:]
    n_kv, kv_stat = _rms(c_kv, w.kv_a_norm, eps)                               # [B, T, r_kv]
    kv = (n_kv @ w.wkv_b).view(b, t, h, m.nope + m.v).transpose(1, 2)          # [B, H, T, nope + v]
    k_nope, v = kv[..., : m.nope], kv[..., m.nope:]
    k_rope = k_rope[:, None].expand(b, h, t, m.rope)                           # [B, H, T, rope], one for all heads
    k = torch.cat([k_nope, k_rope], dim=-1)                                    # [B, H, T, D_k]
    return q, k, v.contiguous(), q_stat, kv_stat
