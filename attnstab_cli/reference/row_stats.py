"""Per-row softmax statistics of attention: the plain-torch reference (THEORY §2.4, §3.1, §3.5, §3.7).

For every query row of every head the scan needs the softmax's largest probability, its entropy and certified bounds on
the balanced-mass factor θ (Definition 4.1), without ever keeping the attention matrix. This module computes them the
slow, clear way: query blocks of full logit rows, accumulated in float32 (float64 for float64 inputs). The fused Triton
kernel `attnstab_kernels.row_stats.attn_row_stats` streams the same quantities with the online update of §3.5 and must
agree with `attn_row_stats_ref` (same signature, same `RowStats`).

Closed forms in terms of z = z_rest = Σ_{j≠argmax} e^{s_j − max s} (every one cancellation-free, §3.1, §3.5):
  p_max = 1/(1+z),  1 − p_max = z/(1+z),  lse = max s + log1p(z),  H = log1p(z) − t/(1+z) with t = Σ_j e^{s_j−m}(s_j−m);
  p_max ≥ ½ (z ≤ 1): θ = 4 p_max q/(p_max+q)² = 4z/(1+z)² exactly (§2.3, §3.3.1);
  p_max < ½ (z > 1): θ ≥ max{4 p_max(1−p_max), 1 − p_max²} = z·max(4, z+2)/(1+z)² and θ ≤ 1 (§2.4.3).
The natural-order prefix crossing (§2.4.2, §3.5) evaluates the two key-order prefixes around the first c_j ≥ ½ as
concrete subsets, 4PQ/(P+Q)² with P and Q accumulated separately.

Conventions: a row with n_keys = 0 (fully masked) has row_max = lse = −inf, p_max, 1 − p_max and entropy NaN (not
applicable), n_keys = 0 and all θ fields 0; rows with n_keys ≤ 1 have θ = 0 (§3.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from attnstab_cli.model.masks import compute_allowed

__all__ = ["FLOAT_FIELDS", "RowStats", "attn_row_stats_ref", "check_row_stats_inputs", "compute_prefix_crossing",
           "compute_theta_fields"]

# Budget for one chunk of logits, in elements (B · H · block_q · T_k): 4 MiB per float32 temporary, 8 MiB in float64.
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class RowStats:
    """Per-row softmax statistics; every field is `# [B, H, T_q]`, float32 (float64 for float64 inputs)."""

    row_max: Tensor  # max_j s_ij over unmasked keys, s = scale · q·k
    lse: Tensor  # log Σ_j e^{s_ij}
    pmax: Tensor  # largest probability
    one_minus_pmax: Tensor  # 1 − pmax, computed as z/(1+z)
    entropy: Tensor  # nats
    theta_lo_stream: Tensor  # §3.5: exact when pmax ≥ ½, else max{4pmax(1−pmax), 1−pmax²}
    theta_hi_stream: Tensor  # §3.5: exact when pmax ≥ ½, else 1
    theta_prefix: Tensor  # §3.5: natural-order prefix crossing (a concrete subset, so a lower bound)
    theta_lo: Tensor  # best certified lower bound: exact if pmax ≥ ½, else max(theta_lo_stream, theta_prefix)
    n_keys: Tensor  # int32 count of unmasked keys

    def to_dict(self) -> dict[str, Tensor]:
        """Field name -> tensor, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The float fields in declaration order; the kernel writes them as planes of one [len(FLOAT_FIELDS), B, H, T_q] buffer.
FLOAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RowStats) if f.name != "n_keys")


def check_row_stats_inputs(
    q: Tensor, k: Tensor, key_padding_mask: Tensor | None, window: int | None
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes and return (B, H, H_kv, T_q, T_k, D); shared by the reference and the kernel launcher."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, T, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T_q, D = q.shape
    B_k, H_kv, T_k, D_k = k.shape
    if B_k != B or D_k != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads H_kv={H_kv}")
    if key_padding_mask is not None and (key_padding_mask.shape != (B, T_k) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be bool [B, T_k] = [{B}, {T_k}]; got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int; got {window}")
    return B, H, H_kv, T_q, T_k, D


def compute_prefix_crossing(p: Tensor, valid: Tensor) -> Tensor:
    """Natural-order prefix crossing (§2.4.2, §3.5): `p`, `valid` `# [..., T_k]` -> `# [...]`.

    j* is the first key with c_{j*} = Σ_{j≤j*} p_j ≥ ½. The prefixes {j < j*} and {j ≤ j*} are concrete subsets, each
    evaluated as 4PQ/(P+Q)² with P (before/at j*) and Q (after j*) summed separately, so 1 − c never cancels.
    Rows without a crossing (no keys) give 0.
    """
    c = torch.cumsum(p, dim=-1)  # [..., T_k]
    hit = (c >= 0.5) & valid  # [..., T_k]
    found = hit.any(dim=-1)  # [...]
    j_star = torch.argmax(hit.to(torch.int8), dim=-1, keepdim=True)  # [..., 1] first True
    idx = torch.arange(p.shape[-1], device=p.device)  # [T_k]
    p_before = torch.where(idx < j_star, p, 0.0).sum(-1)  # [...] c_{j*−1}
    p_at = torch.gather(p, -1, j_star).squeeze(-1)  # [...] p_{j*}
    p_after = torch.where(idx > j_star, p, 0.0).sum(-1)  # [...] 1 − c_{j*}
    total = p_before + p_at + p_after
    best = torch.maximum(p_before * (p_at + p_after), (p_before + p_at) * p_after)
    return torch.where(found, 4.0 * best / (total * total).clamp_min(torch.finfo(p.dtype).tiny), 0.0)


def compute_theta_fields(z: Tensor, theta_prefix: Tensor, n_keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(theta_lo_stream, theta_hi_stream, theta_lo) from z = z_rest (§3.5); rows with n_keys ≤ 1 get 0 (§3.1)."""
    one_z2 = (1.0 + z) * (1.0 + z)
    exact = 4.0 * z / one_z2  # θ when pmax ≥ ½, i.e. z ≤ 1
    peaked = z <= 1.0
    lo_stream = torch.where(peaked, exact, z * torch.clamp(z + 2.0, min=4.0) / one_z2)
    hi_stream = torch.where(peaked, exact, torch.ones_like(z))
    lo = torch.where(peaked, exact, torch.maximum(lo_stream, theta_prefix))
    short = n_keys <= 1
    return tuple(torch.where(short, 0.0, x) for x in (lo_stream, hi_stream, lo))  # type: ignore[return-value]


def _stats_chunk(s: Tensor, allowed: Tensor) -> dict[str, Tensor]:
    """All fields for one chunk of logits `s` `# [B, H, T_chunk, T_k]` (accumulation dtype) with its mask."""
    s = s.masked_fill(~allowed, -math.inf)  # [B, H, T_chunk, T_k]
    valid = allowed.expand_as(s)  # [B, H, T_chunk, T_k]
    n_keys = valid.sum(-1, dtype=torch.int32)  # [B, H, T_chunk]
    empty = n_keys == 0
    m = s.amax(-1)  # [B, H, T_chunk]
    m_sub = torch.where(empty, 0.0, m)
    d = torch.where(valid, s - m_sub[..., None], 0.0)  # [B, H, T_chunk, T_k] s_j − m, 0 where masked
    e = torch.where(valid, torch.exp(d), 0.0)  # [B, H, T_chunk, T_k]
    arg = torch.argmax(s, dim=-1, keepdim=True)  # [B, H, T_chunk, 1] one argmax; ties count in z_rest
    z = e.scatter(-1, arg, 0.0).sum(-1)  # [B, H, T_chunk] z_rest, no 1 is ever subtracted
    t = (e * d).sum(-1)  # [B, H, T_chunk] ≤ 0
    log1p_z = torch.log1p(z)
    lse = m_sub + log1p_z
    p = torch.where(valid, torch.exp(torch.where(valid, s - lse[..., None], 0.0)), 0.0)  # [B, H, T_chunk, T_k]
    theta_prefix = torch.where(n_keys <= 1, 0.0, compute_prefix_crossing(p, valid))
    lo_stream, hi_stream, lo = compute_theta_fields(z, theta_prefix, n_keys)
    nan = torch.full_like(z, math.nan)
    return {
        "row_max": m,
        "lse": torch.where(empty, -math.inf, lse),
        "pmax": torch.where(empty, nan, 1.0 / (1.0 + z)),
        "one_minus_pmax": torch.where(empty, nan, z / (1.0 + z)),
        "entropy": torch.where(empty, nan, log1p_z - t / (1.0 + z)),
        "theta_lo_stream": lo_stream,
        "theta_hi_stream": hi_stream,
        "theta_prefix": theta_prefix,
        "theta_lo": lo,
        "n_keys": n_keys,
    }


def _all_rows_empty(B: int, H: int, T_q: int, dtype: torch.dtype, device: torch.device) -> RowStats:
    """RowStats where no row has a key (T_q = 0 or T_k = 0), with the module's empty-row conventions."""
    def fill(value: float) -> Tensor:
        return torch.full((B, H, T_q), value, dtype=dtype, device=device)  # [B, H, T_q]

    values = {"row_max": -math.inf, "lse": -math.inf, "pmax": math.nan, "one_minus_pmax": math.nan,
              "entropy": math.nan}
    return RowStats(**{name: fill(values.get(name, 0.0)) for name in FLOAT_FIELDS},
                    n_keys=torch.zeros(B, H, T_q, dtype=torch.int32, device=device))


def attn_row_stats_ref(
    q: Tensor,
    k: Tensor,
    scale: float,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    block_q: int | None = None,
) -> RowStats:
    """Softmax row statistics of s = scale · q kᵀ, chunked over query blocks (THEORY §3.5).

    q `# [B, H, T_q, D]`, k `# [B, H_kv, T_k, D]` (query head h reads key head h // (H // H_kv), grouped-query
    attention by a view, never a copy per head); `causal` bottom-right aligned (query i sees keys j ≤ i + T_k − T_q);
    `key_padding_mask` bool `# [B, T_k]`, True = real token; `window` Mistral sliding window (position − j < window).
    `block_q` query rows per chunk; default keeps each chunk near 4M logits. Accumulates in float32, float64 for
    float64 inputs. Returns `RowStats` of `# [B, H, T_q]` tensors.
    """
    B, H, H_kv, T_q, T_k, D = check_row_stats_inputs(q, k, key_padding_mask, window)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    G = H // H_kv
    if block_q is None:
        block_q = max(1, _CHUNK_ELEMENTS // max(1, B * H * T_k))
    k_t = k.to(acc).transpose(-1, -2)  # [B, H_kv, D, T_k]
    if T_q == 0 or T_k == 0:
        return _all_rows_empty(B, H, T_q, acc, q.device)
    parts: list[dict[str, Tensor]] = []
    for i0 in range(0, T_q, block_q):
        i1 = min(T_q, i0 + block_q)
        q_c = q[:, :, i0:i1].to(acc).reshape(B, H_kv, G * (i1 - i0), D)  # [B, H_kv, G·T_chunk, D]
        s = (q_c @ k_t).reshape(B, H, i1 - i0, T_k) * scale  # [B, H, T_chunk, T_k]
        allowed = compute_allowed(i0, i1, T_q, T_k, causal=causal, key_padding_mask=key_padding_mask, window=window,
                                  device=q.device)
        parts.append(_stats_chunk(s, allowed))
    return RowStats(**{name: torch.cat([p[name] for p in parts], dim=-1) for name in parts[0]})
