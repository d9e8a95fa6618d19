"""One transformer layer in plain torch: norms, attention through SDPA, FFN, and the residual wirings of §7.

The layer is written once; families differ only in the layout facts of their spec (norm kind, residual wiring,
QKV packing, RoPE), never in code paths of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnstab_cli.arch.spec import FFNKind, NormKind, Residual
from attnstab_cli.model.activations import ACTIVATIONS
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.masks import compute_allowed
from attnstab_cli.model.rope import apply_rope
from attnstab_cli.model.traces import AttentionTrace, LayerTrace, NormTrace
from attnstab_cli.model.weights import LayerWeights, NormWeights


def apply_norm(x: torch.Tensor, w: NormWeights, kind: NormKind, eps: float) -> NormTrace:
    """LayerNorm (gamma * z + beta) or RMSNorm (gamma * x / sqrt(ms + eps)), statistics in float32 or better; a
    norm without weights is the identity."""
    if w.identity:
        return NormTrace(kind="identity", stat=None, eps=eps, out=x)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if kind is NormKind.LAYERNORM:
        stat = xf.var(dim=-1, unbiased=False)                                   # [B, T]
        out = F.layer_norm(xf, (x.shape[-1],), w.weight.to(xf.dtype),
                           None if w.bias is None else w.bias.to(xf.dtype), eps)
    else:
        stat = xf.pow(2).mean(dim=-1)                                           # [B, T]
        out = xf * torch.rsqrt(stat + eps)[..., None] * w.weight.to(xf.dtype)
    return NormTrace(kind=kind.value, stat=stat, eps=eps, out=out.to(x.dtype))


def build_attention_mask(t: int, causal: bool, window: int | None, key_padding_mask: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean ``[B|1, 1, T, T]`` mask (True = attend), or None when plain ``is_causal`` / no mask suffices."""
    if window is None and key_padding_mask is None:
        return None
    allowed = compute_allowed(0, t, t, t, causal=causal, window=window, key_padding_mask=key_padding_mask,
                              device=device)                                   # [B|1, 1, T, T]
    if key_padding_mask is not None:
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (empty & torch.eye(t, dtype=torch.bool, device=device))  # never a fully masked row
    return allowed


def run_attention(x: torch.Tensor, w: LayerWeights, cfg: ModelConfig, layer: int,
                  rope_cs: tuple[torch.Tensor, torch.Tensor] | None,
                  key_padding_mask: torch.Tensor | None) -> AttentionTrace:
    """Multi-head attention with GQA; the output comes from ``scaled_dot_product_attention``."""
    b, t, _ = x.shape
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = _project(x, w.wq, w.bq).view(b, t, h, dh).transpose(1, 2)              # [B, H, T, D]
    k = _project(x, w.wk, w.bk).view(b, t, hkv, dh).transpose(1, 2)            # [B, H_kv, T, D]
    v = _project(x, w.wv, w.bv).view(b, t, hkv, dh).transpose(1, 2)            # [B, H_kv, T, D]
    rope = cfg.rope_at(layer)
    if rope is not None and rope_cs is not None:
        q, k = apply_rope(q, *rope_cs, rope), apply_rope(k, *rope_cs, rope)
    causal, window, scale = cfg.layout.causal, cfg.sliding_windows[layer], cfg.attn_scale(layer)
    mask = build_attention_mask(t, causal, window, key_padding_mask, x.device)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         scale=scale, enable_gqa=hkv != h)     # [B, H, T, D]
    out = _project(ctx.transpose(1, 2).reshape(b, t, h * dh), w.wo, w.bo)     # [B, T, d]
    return AttentionTrace(x=x, q=q, k=k, v=v, scale=scale, causal=causal, window=window,
                          key_padding_mask=key_padding_mask, context=ctx, out=out)


def run_ffn(x: torch.Tensor, ffn: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """GELU-style MLP or gated (SwiGLU-style) FFN, per token."""
    act = ACTIVATIONS[cfg.activation]
    if cfg.layout.ffn is FFNKind.GATED:
        return (act(x @ ffn["w_gate"]) * (x @ ffn["w_up"])) @ ffn["w_out"]
    return _project(act(_project(x, ffn["w_in"], ffn.get("b_in"))), ffn["w_out"], ffn.get("b_out"))


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight
    return y if bias is None else y + bias


def run_layer(hidden: torch.Tensor, w: LayerWeights, cfg: ModelConfig, layer: int, batch: int,
              rope_cs: tuple[torch.Tensor, torch.Tensor] | None,
              key_padding_mask: torch.Tensor | None = None) -> LayerTrace:
    """h_l -> h_{l+1} with the family's residual wiring, recording everything the metrics need; with a shared
    parallel norm the ``norm_ffn`` trace is the ``norm_attn`` one (the FFN reads the same normalized input)."""
    kind, eps, residual = cfg.layout.norm, cfg.norm_eps, cfg.layout.residual
    if residual is Residual.POST:
        attn = run_attention(hidden, w, cfg, layer, rope_cs, key_padding_mask)
        n1 = apply_norm(hidden + attn.out, w.norm_attn, kind, eps)
        ffn_out = run_ffn(n1.out, w.ffn, cfg)
        n2 = apply_norm(n1.out + ffn_out, w.norm_ffn, kind, eps)
        return LayerTrace(layer, batch, hidden, n2.out, attn, n1.out, ffn_out, {"norm_attn": n1, "norm_ffn": n2}, w)
    n1 = apply_norm(hidden, w.norm_attn, kind, eps)
    attn = run_attention(n1.out, w, cfg, layer, rope_cs, key_padding_mask)
    if residual in (Residual.PARALLEL, Residual.PARALLEL_SHARED):
        n2 = n1 if residual.shared_norm else apply_norm(hidden, w.norm_ffn, kind, eps)
        ffn_out = run_ffn(n2.out, w.ffn, cfg)
        out = hidden + attn.out + ffn_out
    else:
        mid = hidden + attn.out
        n2 = apply_norm(mid, w.norm_ffn, kind, eps)
        ffn_out = run_ffn(n2.out, w.ffn, cfg)
        out = mid + ffn_out
    return LayerTrace(layer, batch, hidden, out, attn, n2.out, ffn_out, {"norm_attn": n1, "norm_ffn": n2}, w)
