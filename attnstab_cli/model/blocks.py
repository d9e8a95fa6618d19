"""One transformer layer in plain torch: norms, attention through SDPA (explicit for soft-capped logits, §18.5, and
for sink logits, §18.4), FFN, and the residual wirings of §7 and §18.3.

The layer is written once; families differ only in the layout facts of their spec (norm kind, residual wiring,
QKV packing, RoPE), never in code paths of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnstab_cli.arch.spec import FFNKind, NormKind, QKNorm, Residual, RouterScore, SharedGate
from attnstab_cli.model.activations import ACTIVATIONS
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.experts import compute_expert_output, expert_form
from attnstab_cli.model.masks import compute_allowed
from attnstab_cli.model.mla import compute_mla_qkv
from attnstab_cli.model.rope import apply_rope
from attnstab_cli.model.traces import AttentionTrace, LayerTrace, MoETrace, NormTrace
from attnstab_cli.model.weights import LayerWeights, MoEWeights, NormWeights


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


def apply_qk_norm(u: torch.Tensor, w: NormWeights | None, cfg: ModelConfig,
                  heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The q or k norm of THEORY §18.2 on projections ``u [B, T, heads*D]`` (before RoPE), and its statistic: per
    head over each head's D coordinates (``[B, T, heads]``) or over the full width (``[B, T]``); the identity and
    None without one."""
    if cfg.layout.qk_norm is None or w is None:
        return u, None
    if cfg.layout.qk_norm is QKNorm.FULL_WIDTH:
        n = apply_norm(u, w, cfg.layout.norm, cfg.norm_eps)
        return n.out, n.stat
    b, t, _ = u.shape
    n = apply_norm(u.view(b, t, heads, cfg.head_dim), w, cfg.layout.norm, cfg.norm_eps)
    return n.out.reshape(b, t, heads * cfg.head_dim), n.stat


def run_attention(x: torch.Tensor, w: LayerWeights, cfg: ModelConfig, layer: int,
                  rope_cs: tuple[torch.Tensor, torch.Tensor] | None,
                  key_padding_mask: torch.Tensor | None) -> AttentionTrace:
    """Multi-head attention with GQA, or latent attention (:mod:`~attnstab_cli.model.mla`); the output comes from
    ``scaled_dot_product_attention``."""
    b, t, _ = x.shape
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if w.latent:                                   # MLA (THEORY §18.8): norm statistics of the latents
        q, k, v, q_norm, k_norm = compute_mla_qkv(x, w, cfg)                  # [B, H, T, D], v [B, H, T, D_v]
    else:
        q, q_norm = apply_qk_norm(_project(x, w.wq, w.bq), w.q_norm, cfg, h)   # [B, T, H*D]
        k, k_norm = apply_qk_norm(_project(x, w.wk, w.bk), w.k_norm, cfg, hkv)  # [B, T, H_kv*D]
        q = q.view(b, t, h, dh).transpose(1, 2)                                # [B, H, T, D]
        k = k.view(b, t, hkv, dh).transpose(1, 2)                              # [B, H_kv, T, D]
        v = _project(x, w.wv, w.bv).view(b, t, hkv, dh).transpose(1, 2)        # [B, H_kv, T, D]
    rope = cfg.rope_at(layer)
    if rope is not None and rope_cs is not None:
        q, k = apply_rope(q, *rope_cs, rope), apply_rope(k, *rope_cs, rope)
    causal, window, scale = cfg.layout.causal, cfg.sliding_windows[layer], cfg.attn_scale(layer)
    mask = build_attention_mask(t, causal, window, key_padding_mask, x.device)
    cap, sinks = cfg.attn_logit_cap, w.sinks
    if cap is None and sinks is None:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             scale=scale, enable_gqa=hkv != h)  # [B, H, T, D]
    else:
        if mask is None:
            mask = compute_allowed(0, t, t, t, causal=causal, window=None, key_padding_mask=None, device=x.device)
        ctx = explicit_attention(q, k, v, mask, scale, cap, sinks)             # [B, H, T, D]
    out = _project(ctx.transpose(1, 2).reshape(b, t, h * v.shape[-1]), w.wo, w.bo)   # [B, T, d]
    return AttentionTrace(x=x, q=q, k=k, v=v, scale=scale, causal=causal, window=window,
                          key_padding_mask=key_padding_mask, context=ctx, out=out, logit_cap=cap,
                          q_norm_stat=q_norm, k_norm_stat=k_norm, sinks=sinks)


_EXPLICIT_BLOCK_ELEMENTS = 1 << 22   # logits per query block of the explicit attention


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                       cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention SDPA cannot express, computed explicitly one block of query rows at a time, over the
    ``allowed [B|1, 1, T, T]`` keys: soft-capped logits ``c tanh(s q.k / c)`` (THEORY §18.5) and a sink logit
    ``sinks [H]`` per head that joins each row's softmax with no value (§18.4), so the row's key weights sum to
    m < 1. ``q [B, H, T, D]``, ``k, v [B, H_kv, T, D]``; the softmax runs in float32 or wider, as the model's
    does, and a row whose keys are all masked then has weight 0 on every key (only the sink)."""
    b, h, t, dh = q.shape
    hkv = k.shape[1]
    g = h // hkv
    block = max(1, _EXPLICIT_BLOCK_ELEMENTS // max(1, b * h * t))
    soft_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    sink_col = None if sinks is None else sinks.to(soft_dtype).view(1, h, 1, 1)   # [1, H, 1, 1]
    parts = []
    for i0 in range(0, t, block):
        i1 = min(t, i0 + block)
        qi = q[:, :, i0:i1].reshape(b, hkv, g * (i1 - i0), dh)                  # query heads of one K/V head together
        s = (qi @ k.transpose(-1, -2)).reshape(b, h, i1 - i0, t) * scale       # [B, H, c, T]
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        s = s.masked_fill(~allowed[..., i0:i1, :], float("-inf"))
        if sink_col is None:
            p = torch.softmax(s, dim=-1, dtype=soft_dtype).to(q.dtype)
        else:
            full = torch.cat([s.to(soft_dtype), sink_col.expand(b, h, i1 - i0, 1)], dim=-1)   # [B, H, c, T + 1]
            p = torch.softmax(full, dim=-1)[..., :t].to(q.dtype)                   # the sink column carries no value
        parts.append((p.reshape(b, hkv, g * (i1 - i0), t) @ v).reshape(b, h, i1 - i0, dh))
    return torch.cat(parts, dim=2)


def run_ffn(x: torch.Tensor, ffn: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """GELU-style MLP or gated (SwiGLU-style) FFN, per token."""
    act = ACTIVATIONS[cfg.activation]
    if cfg.layout.ffn is FFNKind.GATED:
        return (act(x @ ffn["w_gate"]) * (x @ ffn["w_up"])) @ ffn["w_out"]
    return _project(act(_project(x, ffn["w_in"], ffn.get("b_in"))), ffn["w_out"], ffn.get("b_out"))


def route_tokens(x: torch.Tensor, w: MoEWeights, cfg: ModelConfig) -> MoETrace:
    """Router of THEORY §18.7 on ``x [B, T, d]``: logits, scores (softmax or sigmoid, float32 or wider), the k experts
    of each token by the selection score (the score plus the selection-only bias, group-limited for DeepSeek) and
    their gates (the selected scores, renormalized to sum 1 when configured, times the scaling factor)."""
    moe = cfg.moe
    assert moe is not None
    half = x.dtype in (torch.float16, torch.bfloat16)
    xr = x.float() if moe.router_float32 and half else x                          # DeepSeek: a float32 router
    bias = None if w.router_bias is None else w.router_bias.to(xr.dtype)
    logits = _project(xr, w.router.to(xr.dtype), bias)                            # [B, T, E]
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    scores = wide.softmax(dim=-1) if moe.score is RouterScore.SOFTMAX else torch.sigmoid(wide)
    select = scores if w.score_bias is None else scores + w.score_bias.to(scores.dtype)
    if moe.selection.group_rank_terms is not None:
        select = limit_to_groups(select, moe.n_group, moe.topk_group, moe.selection.group_rank_terms)
    with torch.no_grad():
        selected = torch.topk(select.detach(), moe.top_k, dim=-1).indices          # [B, T, k]
    gates = scores.gather(-1, selected)                                           # [B, T, k]
    if moe.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    if moe.scaling != 1.0:
        gates = gates * moe.scaling
    return MoETrace(logits=logits, scores=scores, selected=selected, gates=gates)


def group_ranks(select: torch.Tensor, n_group: int, terms: int) -> torch.Tensor:
    """Rank of each of ``n_group`` expert groups: the sum of its ``terms`` largest selection scores (two in
    DeepSeek-V3, one, the maximum, in DeepSeek-V2): ``[..., G]``."""
    *lead, n = select.shape
    grouped = select.reshape(*lead, n_group, n // n_group)                        # [..., G, E/G]
    return grouped.topk(min(terms, n // n_group), dim=-1).values.sum(dim=-1)


def limit_to_groups(select: torch.Tensor, n_group: int, topk_group: int, terms: int = 2) -> torch.Tensor:
    """Selection scores outside the ``topk_group`` best of ``n_group`` expert groups (ranked by
    :func:`group_ranks`) set to -inf (DeepSeek's group-limited routing; V2 sets them to 0 instead, which picks the
    same experts while k <= the searched groups' experts, as the config check requires)."""
    *lead, n = select.shape
    grouped = select.detach().reshape(*lead, n_group, n // n_group)               # [B, T, G, E/G]
    rank = group_ranks(select.detach(), n_group, terms)                           # [B, T, G]
    keep = torch.zeros_like(rank, dtype=torch.bool).scatter(-1, rank.topk(topk_group, dim=-1).indices, True)
    mask = keep[..., None].expand_as(grouped).reshape(*lead, n)
    return select.masked_fill(~mask, float("-inf"))


def run_moe(x: torch.Tensor, w: MoEWeights, cfg: ModelConfig) -> tuple[torch.Tensor, MoETrace]:
    """Mixture-of-experts FFN of THEORY §18.7 on ``x [B, T, d]``: each routed expert's gated FFN on its tokens,
    weighted by its gate (the experts' unit per :mod:`~attnstab_cli.model.experts`, with their biases), plus the
    shared experts (times their sigmoid gate, if any). The selection is piecewise constant, so autograd
    differentiates with the routing fixed."""
    act, form = ACTIVATIONS[cfg.activation], expert_form(cfg.moe, cfg.activation)
    route = route_tokens(x, w, cfg)
    flat = x.reshape(-1, x.shape[-1])                                             # [N, d]
    chosen = route.selected.reshape(flat.shape[0], -1)                            # [N, k]
    gates = route.gates.reshape(flat.shape[0], -1)                                # [N, k]
    out = torch.zeros_like(flat)
    for e in torch.unique(chosen).tolist():
        hit = chosen == e                                                         # [N, k]
        rows = hit.any(dim=-1).nonzero().flatten()                                # [n_e]
        weight = (gates * hit).sum(dim=-1)[rows]                                  # [n_e]
        xe = flat[rows]
        ye = compute_expert_output(xe, w.expert(e), form)                         # [n_e, d]
        out = out.index_add(0, rows, (ye * weight[:, None]).to(out.dtype))
    out = out.reshape(x.shape)
    if w.shared is not None:
        shared = (act(x @ w.shared["w_gate"]) * (x @ w.shared["w_up"])) @ w.shared["w_out"]
        if cfg.moe is not None and cfg.moe.shared_gate is SharedGate.SIGMOID:
            omega = torch.sigmoid(x @ w.shared_router)                            # [B, T, 1]
            route.shared_weight = omega[..., 0]
            shared = omega * shared
        out = out + shared
    return out, route


def run_ffn_branch(x: torch.Tensor, w: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, MoETrace | None]:
    """The layer's FFN, dense or a mixture of experts (with its routing)."""
    if w.moe is not None:
        return run_moe(x, w.moe, cfg)
    return run_ffn(x, w.ffn, cfg), None


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight
    return y if bias is None else y + bias


def run_layer(hidden: torch.Tensor, w: LayerWeights, cfg: ModelConfig, layer: int, batch: int,
              rope_cs: tuple[torch.Tensor, torch.Tensor] | None,
              key_padding_mask: torch.Tensor | None = None) -> LayerTrace:
    """h_l -> h_{l+1} with the family's residual wiring, recording everything the metrics need; with a shared
    parallel norm the ``norm_ffn`` trace is the ``norm_attn`` one (the FFN reads the same normalized input).
    Branch-output norms (``norm_attn_out``, ``norm_ffn_out``, §18.3) normalize each branch's output before its
    residual add; their traces' statistics are of the branch outputs."""
    kind, eps, residual = cfg.layout.norm, cfg.norm_eps, cfg.layout.residual
    if residual is Residual.POST:
        attn = run_attention(hidden, w, cfg, layer, rope_cs, key_padding_mask)
        n1 = apply_norm(hidden + attn.out, w.norm_attn, kind, eps)
        ffn_out, route = run_ffn_branch(n1.out, w, cfg)
        n2 = apply_norm(n1.out + ffn_out, w.norm_ffn, kind, eps)
        return LayerTrace(layer, batch, hidden, n2.out, attn, n1.out, ffn_out, {"norm_attn": n1, "norm_ffn": n2}, w,
                          route)
    n1 = apply_norm(hidden, w.norm_attn, kind, eps)
    attn = run_attention(n1.out, w, cfg, layer, rope_cs, key_padding_mask)
    if not residual.serial:
        n2 = n1 if residual.shared_norm else apply_norm(hidden, w.norm_ffn, kind, eps)
        ffn_out, route = run_ffn_branch(n2.out, w, cfg)
        out = hidden + attn.out + ffn_out
        return LayerTrace(layer, batch, hidden, out, attn, n2.out, ffn_out, {"norm_attn": n1, "norm_ffn": n2}, w,
                          route)
    norms = {"norm_attn": n1}
    attn_branch = attn.out
    if residual.output_norms:
        norms["norm_attn_out"] = apply_norm(attn.out, w.norm_attn_out, kind, eps)
        attn_branch = norms["norm_attn_out"].out
    mid = hidden + attn_branch
    n2 = norms["norm_ffn"] = apply_norm(mid, w.norm_ffn, kind, eps)
    ffn_out, route = run_ffn_branch(n2.out, w, cfg)
    ffn_branch = ffn_out
    if residual.output_norms:
        norms["norm_ffn_out"] = apply_norm(ffn_out, w.norm_ffn_out, kind, eps)
        ffn_branch = norms["norm_ffn_out"].out
    out = mid + ffn_branch
    return LayerTrace(layer, batch, hidden, out, attn, n2.out, ffn_out, norms, w, route)
