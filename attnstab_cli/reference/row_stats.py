"""Per-row softmax statistics of attention: the plain-torch reference (THEORY §2.4, §3.1, §3.5, §3.7).

For every query row of every head the scan needs the softmax's largest probability, its entropy and certified bounds on
the balanced-mass factor θ (Definition 4.1), without ever keeping the attention matrix. This module computes them the
slow, clear way: query blocks of full logit rows, all in float64 (§3.7: float32 products are exact there, so the logits
carry no rounding to cover, and neither the exponentials nor the sums over keys lose anything the slack would have to
absorb). Only the recorded q, k carry their compute dtype's rounding. The fused Triton kernel
`attnstab_kernels.row_stats.attn_row_stats` streams the same quantities with the online update of §3.5 and must agree
with `attn_row_stats_ref` (same signature, same `RowStats`).

Closed forms in terms of z = z_rest = Σ_{j≠argmax} e^{s_j − max s} (every one cancellation-free, §3.1, §3.5):
  p_max = 1/(1+z),  1 − p_max = z/(1+z),  lse = max s + log1p(z),  H = log1p(z) − t/(1+z) with t = Σ_j e^{s_j−m}(s_j−m);
  p_max ≥ ½ (z ≤ 1): θ = 4 p_max q/(p_max+q)² = 4z/(1+z)² exactly (§2.3, §3.3.1);
  p_max < ½ (z > 1): θ ≥ max{4 p_max(1−p_max), 1 − p_max²} = z·max(4, z+2)/(1+z)² and θ ≤ 1 (§2.4.3).
The natural-order prefix crossing (§2.4.2, §3.5) evaluates the two key-order prefixes around the first c_j ≥ ½ as
concrete subsets, 4PQ/(P+Q)² with P and Q accumulated separately; its two O(n) completions (add one later key, remove
one earlier key) are further concrete subsets, and the cardinality bound (:func:`compute_theta_hi_count`) an upper
bound below 1 where no subset can reach mass ½; none needs a sort. Keys outside the causal / window band of a query
block are never scored.

Attention sinks (§18.4): with a sink logit σ_h the real keys carry p = m·q, where q is the softmax over the keys alone
(the row every formula above describes) and m = 1/(1 + e^{σ_h − lse}) < 1. The θ machinery runs on q unchanged;
:func:`apply_sinks` then maps every θ bound through θ_sink = m(1 − m) + m² θ(q), which is increasing in θ(q), so
interval endpoints map to endpoints; p_max and 1 − p_max become those of p, and the entropy is that of the n + 1
outcomes, m H(q) + h(m) with h the binary entropy. ``row_max`` and ``lse`` stay those of the keys alone.

Conventions: a row with n_keys = 0 (fully masked) has row_max = lse = −inf, p_max, 1 − p_max and entropy NaN (not
applicable), n_keys = 0 and all θ fields 0; rows with n_keys ≤ 1 have θ = 0 (§3.1), or m(1 − m) with a sink.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from attnstab_cli.model.masks import compute_allowed

__all__ = ["FLOAT_FIELDS", "RowStats", "SINK_ERR_FACTOR", "apply_sinks", "attn_row_stats_ref",
           "check_row_stats_inputs", "compute_key_band", "compute_prefix_crossing", "compute_sink_theta",
           "compute_theta_fields", "compute_theta_hi_count"]

# Budget for one chunk of logits, in elements (B · H · block_q · T_k): 4 MiB per float32 temporary, 8 MiB in float64.
_CHUNK_ELEMENTS = 1 << 20
_MASKED = -1e300  # the logit of a masked key inside a chunk: exp underflows to exactly 0, and 0 · _MASKED = 0


@dataclass(frozen=True)
class RowStats:
    """Per-row softmax statistics; every field is `# [B, H, T_q]` float64 (the reported per-row values)."""

    row_max: Tensor  # max_j s_ij over unmasked keys, s = scale · q·k
    lse: Tensor  # log Σ_j e^{s_ij}
    pmax: Tensor  # largest probability
    one_minus_pmax: Tensor  # 1 − pmax, computed as z/(1+z)
    entropy: Tensor  # nats
    theta_lo_stream: Tensor  # §3.5: exact when pmax ≥ ½, else max{4pmax(1−pmax), 1−pmax²}
    theta_hi_stream: Tensor  # §3.5: exact when pmax ≥ ½, else 1
    theta_prefix: Tensor  # §3.5: natural-order prefix crossing (a concrete subset, so a lower bound)
    theta_prefix_plus: Tensor  # the crossing's lower prefix plus the one later key closing its gap best (≥ prefix)
    theta_lo: Tensor  # best certified lower bound: exact if pmax ≥ ½, else max(theta_lo_stream, theta_prefix_plus)
    theta_hi: Tensor  # best certified upper bound: exact if pmax ≥ ½, else the cardinality bound (≤ 1)
    n_keys: Tensor  # int32 count of unmasked keys
    theta_err: Tensor  # bound on how far the logits' rounding moves θ of the row: 0 for float64 logits (§3.7)
    sink_mass: Tensor | None = None  # 1 − m, the sink's probability (§18.4); None without a sink

    def to_dict(self) -> dict[str, Tensor]:
        """Field name -> tensor, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The float fields in declaration order; the kernel writes them as planes of one [len(FLOAT_FIELDS), B, H, T_q] buffer.
FLOAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RowStats)
                                      if f.name not in ("n_keys", "theta_err", "sink_mass"))
_THETA_FIELDS = ("theta_lo_stream", "theta_hi_stream", "theta_prefix", "theta_prefix_plus", "theta_lo", "theta_hi")
# ‖diag(p) − ppᵀ‖∞→1 = m − min_S (2p(S) − m)² moves by at most 3‖p' − p‖₁ (|Δm| plus twice |Δ(p·v)|, |p·v| ≤ 1),
# against 2‖p' − p‖₁ for θ of a full row (§3.1): a path's rounding bound on θ(q) grows by this factor with a sink.
SINK_ERR_FACTOR = 1.5


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


def compute_prefix_crossing(p: Tensor) -> tuple[Tensor, Tensor]:
    """Natural-order prefix crossing and its one-key completion (§2.4(1), §2.4(2), §3.5): `p` `# [..., T_k]`
    (masked keys exactly 0) -> (theta_prefix, theta_prefix_plus), each `# [...]` float64.

    j* is the first key with c_{j*} = Σ_{j≤j*} p_j ≥ ½ (cumulative sums in float64). The prefixes {j < j*} and
    {j ≤ j*} are concrete subsets, each evaluated as 4PQ/(P+Q)² with P = c_{j*−1} or c_{j*} and Q the mass after
    them summed on its own, so 1 − c never cancels. Two completions, each a concrete subset: add to {j < j*} the one
    later key r > j* whose p_r is closest to the gap ½ − c_{j*−1}, and remove from {j ≤ j*} the key a < j* whose p_a
    is closest to its excess c_{j*} − ½ (first such key on ties). On diffuse rows the discrepancy then falls from
    O(p_max) to about the spacing of the p_j. Rows without a crossing (no keys) give 0.
    """
    f64 = torch.float64
    n = p.shape[-1]
    c = torch.cumsum(p, dim=-1, dtype=f64)  # [..., T_k]
    total = c[..., -1:]  # [..., 1]
    j_star = torch.searchsorted(c, torch.full_like(total, 0.5)).clamp_(max=n - 1)  # [..., 1] first c_j ≥ ½
    found = (c.gather(-1, j_star) >= 0.5).squeeze(-1)  # [...]
    p_at = p.gather(-1, j_star).to(f64)  # [..., 1] p_{j*}
    p_before = torch.where(j_star > 0, c.gather(-1, (j_star - 1).clamp_(min=0)), 0.0)  # [..., 1] c_{j*−1}
    later = torch.arange(n, device=p.device) > j_star  # [..., T_k] keys after j*
    p_after = torch.where(later, p, 0.0).sum(-1, keepdim=True, dtype=f64)  # [..., 1] summed, never 1 − c
    tiny = torch.finfo(f64).tiny
    total = p_before + p_at + p_after
    norm = (total * total).clamp_min(tiny)
    best = torch.maximum(p_before * (p_at + p_after), (p_before + p_at) * p_after)
    prefix = torch.where(found, (4.0 * best / norm).squeeze(-1), 0.0)
    miss = (p - (0.5 - p_before).to(p.dtype)).abs_().masked_fill_(~later, math.inf)  # [..., T_k] |p_j − gap|
    r = miss.argmin(dim=-1, keepdim=True)  # [..., 1]
    has_r = found & torch.isfinite(miss.gather(-1, r)).squeeze(-1)
    p_r = p.gather(-1, r).to(f64)  # [..., 1]
    plus = (4.0 * (p_before + p_r) * (p_at + (p_after - p_r).clamp_min(0.0)) / norm).squeeze(-1)
    excess = (p_before + p_at - 0.5).to(p.dtype)  # [..., 1] mass {j ≤ j*} holds beyond ½
    miss = (p - excess).abs_().masked_fill_(~(torch.arange(n, device=p.device) < j_star), math.inf)  # j < j*
    a = miss.argmin(dim=-1, keepdim=True)  # [..., 1]
    has_a = found & torch.isfinite(miss.gather(-1, a)).squeeze(-1)
    p_a = p.gather(-1, a).to(f64)
    minus = (4.0 * ((p_before - p_a).clamp_min(0.0) + p_at) * (p_after + p_a) / norm).squeeze(-1)
    best_plus = torch.maximum(torch.where(has_r, plus, 0.0), torch.where(has_a, minus, 0.0))
    return prefix, torch.maximum(prefix, best_plus)


def compute_theta_fields(z: Tensor, theta_prefix: Tensor, n_keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(theta_lo_stream, theta_hi_stream, theta_lo) from z = z_rest (§3.5) and the best natural-order subset value
    ``theta_prefix``; rows with n_keys ≤ 1 get 0 (§3.1)."""
    one_z2 = (1.0 + z) * (1.0 + z)
    exact = 4.0 * z / one_z2  # θ when pmax ≥ ½, i.e. z ≤ 1
    peaked = z <= 1.0
    lo_stream = torch.where(peaked, exact, z * torch.clamp(z + 2.0, min=4.0) / one_z2)
    hi_stream = torch.where(peaked, exact, torch.ones_like(z))
    lo = torch.where(peaked, exact, torch.maximum(lo_stream, theta_prefix))
    short = n_keys <= 1
    return tuple(torch.where(short, 0.0, x) for x in (lo_stream, hi_stream, lo))  # type: ignore[return-value]


def _stats_chunk(s: Tensor, allowed: Tensor) -> dict[str, Tensor]:
    """All fields for one chunk of float64 logits `s` `# [B, H, T_chunk, T_k]` with its mask (consumed in place).

    Masked logits become a huge finite negative number rather than −inf, so e = 0 and e·(s − m) = 0 need no extra
    pass; rows without any key are overwritten by the empty-row conventions at the end.
    """
    s_min = s.masked_fill(~allowed, math.inf).amin(-1)  # [B, H, T_chunk] smallest allowed logit
    s.masked_fill_(~allowed, _MASKED)  # [B, H, T_chunk, T_k]
    n_keys = allowed.sum(-1, dtype=torch.int32).expand(s.shape[:-1])  # [B, H, T_chunk]
    empty = n_keys == 0
    m, arg = s.max(dim=-1, keepdim=True)  # [B, H, T_chunk, 1] one argmax; ties count in z_rest
    d = s.sub_(m)  # [B, H, T_chunk, T_k] s_j − m ≤ 0
    e = torch.exp(d)  # masked keys 0
    e.scatter_(-1, arg, 0.0)  # leave out the argmax: z_rest, no 1 is ever subtracted
    z = e.sum(-1)  # [B, H, T_chunk]
    t = torch.linalg.vecdot(e, d)  # [B, H, T_chunk] Σ e (s − m) ≤ 0 (the argmax term is 0)
    del d
    one_z = 1.0 + z
    log1p_z = torch.log1p(z)
    p = e.div_(one_z[..., None]).scatter_(-1, arg, (1.0 / one_z)[..., None])  # [B, H, T_chunk, T_k] softmax
    short = n_keys <= 1
    prefix, plus = (torch.where(short, 0.0, x) for x in compute_prefix_crossing(p))
    lo_stream, hi_stream, lo = compute_theta_fields(z, plus, n_keys)
    m = m.squeeze(-1)
    pmin = torch.exp(s_min - m) / one_z  # [B, H, T_chunk]
    hi = torch.where(hi_stream >= 1.0, compute_theta_hi_count(1.0 / one_z, pmin, n_keys), hi_stream)
    nan = torch.full_like(z, math.nan)
    return {
        "row_max": torch.where(empty, -math.inf, m),
        "lse": torch.where(empty, -math.inf, m + log1p_z),
        "pmax": torch.where(empty, nan, 1.0 / one_z),
        "one_minus_pmax": torch.where(empty, nan, z / one_z),
        "entropy": torch.where(empty, nan, log1p_z - t / one_z),
        "theta_lo_stream": lo_stream,
        "theta_hi_stream": hi_stream,
        "theta_prefix": prefix,
        "theta_prefix_plus": plus,
        "theta_lo": lo,
        "theta_hi": torch.where(n_keys <= 1, 0.0, hi),
        "n_keys": n_keys.contiguous(),
    }


def compute_theta_hi_count(pmax: Tensor, pmin: Tensor, n_keys: Tensor) -> Tensor:
    """Upper bound on θ from the key count and the extreme probabilities alone (no sort), float64 `# [...]`.

    A subset of k of the n keys has mass in [L_k, U_k] with L_k = max(k·p_min, 1 − (n−k)·p_max) and
    U_k = min(k·p_max, 1 − (n−k)·p_min), both non-decreasing in k. So the k with U_k < ½ form a prefix ending at k1,
    those with L_k > ½ a suffix starting at k2; if k2 = k1 + 1 no subset reaches mass ½ and
    g = min(½ − U_{k1}, L_{k2} − ½) > 0 bounds every |p(S) − ½| from below: θ ≤ 1 − 4g² (§2.1). Tight on the
    near-uniform rows with an odd number of keys, where θ ≈ 1 − 1/n² and no subset heuristic narrows θ_hi = 1.
    A margin of 16·n·2⁻⁵³ on g covers the rounding of these few float64 operations; otherwise 1.
    """
    f64 = torch.float64
    n = n_keys.to(f64)
    pmax, pmin = pmax.to(f64), pmin.to(f64).clamp_min(1e-300)  # p_min = 0 leaves only the p_max conditions
    # k1 = largest k with U_k < ½: k·p_max < ½ or (n − k)·p_min > ½
    k1 = torch.maximum(torch.ceil(0.5 / pmax) - 1.0, torch.ceil(n - 0.5 / pmin) - 1.0)
    k1 = torch.minimum(k1.clamp_min(-1.0), n)
    # k2 = smallest k with L_k > ½: k·p_min > ½ or (n − k)·p_max < ½
    k2 = torch.minimum(torch.floor(0.5 / pmin) + 1.0, torch.floor(n - 0.5 / pmax) + 1.0)
    k2 = torch.minimum(k2.clamp_min(0.0), n + 1.0)
    u = torch.minimum(k1 * pmax, 1.0 - (n - k1) * pmin)
    lo = torch.maximum(k2 * pmin, 1.0 - (n - k2) * pmax)
    g = torch.minimum(0.5 - u, lo - 0.5) - 16.0 * n * 2.0 ** -53
    ok = (k2 == k1 + 1.0) & (k1 >= 0.0) & (k2 <= n) & (g > 0.0) & (n >= 2)
    return torch.where(ok, 1.0 - 4.0 * g * g, 1.0)


def compute_sink_theta(theta: Tensor, sink_mass: Tensor) -> Tensor:
    """θ_sink = m(1 − m) + m² θ(q) with 1 − m = ``sink_mass`` (§18.4), float64, elementwise; increasing in θ."""
    m = 1.0 - sink_mass
    return m * sink_mass + m * m * theta


def apply_sinks(stats: RowStats, sinks: Tensor) -> RowStats:
    """The statistics of rows whose softmax also holds a sink logit ``sinks [H]`` (module docstring, §18.4), from
    those of the keys alone; every field stays `# [B, H, T_q]` float64 and ``sink_mass`` holds 1 − m.

    With x = σ_h − lse: 1 − m = sigmoid(x), m = sigmoid(−x), and h(m) = m·softplus(x) + (1 − m)·softplus(−x), all
    cancellation-free; a row with no key has lse = −inf, so m = 0 and every θ field stays 0.
    """
    x = sinks.to(device=stats.lse.device, dtype=torch.float64).view(1, -1, 1) - stats.lse   # [B, H, T_q]
    sink_mass, m = torch.sigmoid(x), torch.sigmoid(-x)
    binary = torch.where(m > 0, m * F.softplus(x), 0.0) + sink_mass * F.softplus(-x)
    cols = stats.to_dict()
    cols.update({name: compute_sink_theta(cols[name], sink_mass) for name in _THETA_FIELDS})
    cols.update(pmax=m * stats.pmax, one_minus_pmax=sink_mass + m * stats.one_minus_pmax,
                entropy=m * stats.entropy + binary, theta_err=SINK_ERR_FACTOR * stats.theta_err, sink_mass=sink_mass)
    return RowStats(**cols)


def compute_key_band(i0: int, i1: int, t_q: int, t_k: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [j0, j1) that the causal / window band allows to some query row of [i0, i1); every other key is masked
    for all of these rows, so a chunk need not compute their logits."""
    offset = t_k - t_q
    j1 = max(0, min(t_k, i1 + offset)) if causal else t_k
    if window is not None and not causal:                  # bidirectional window: |position - j| < window
        j1 = max(0, min(t_k, i1 - 1 + offset + window))
    j0 = min(j1, max(0, i0 + offset - window + 1)) if window is not None else 0
    return j0, j1


def _all_rows_empty(B: int, H: int, T_q: int, device: torch.device) -> RowStats:
    """RowStats where no row has a key (T_q = 0 or T_k = 0), with the module's empty-row conventions."""
    def fill(value: float) -> Tensor:
        return torch.full((B, H, T_q), value, dtype=torch.float64, device=device)  # [B, H, T_q]

    values = {"row_max": -math.inf, "lse": -math.inf, "pmax": math.nan, "one_minus_pmax": math.nan,
              "entropy": math.nan}
    return RowStats(**{name: fill(values.get(name, 0.0)) for name in FLOAT_FIELDS},
                    n_keys=torch.zeros(B, H, T_q, dtype=torch.int32, device=device), theta_err=fill(0.0))


def attn_row_stats_ref(
    q: Tensor,
    k: Tensor,
    scale: float,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    block_q: int | None = None,
    logit_cap: float | None = None,
    sinks: Tensor | None = None,
) -> RowStats:
    """Softmax row statistics of s = scale · q kᵀ, chunked over query blocks (THEORY §3.5).

    q `# [B, H, T_q, D]`, k `# [B, H_kv, T_k, D]` (query head h reads key head h // (H // H_kv), grouped-query
    attention by a view, never a copy per head); `causal` bottom-right aligned (query i sees keys j ≤ i + T_k − T_q);
    `key_padding_mask` bool `# [B, T_k]`, True = real token; `window` sliding window (|position − j| < window).
    `block_q` query rows per chunk; default keeps each chunk near 1M logits. Precision as in the module docstring.
    `logit_cap` c: the softmax reads c · tanh(s / c) (THEORY §18.5), in float64 like s. `sinks` `# [H]`: a sink
    logit per query head joins each row (§18.4, :func:`apply_sinks`).
    Returns `RowStats` of `# [B, H, T_q]` float64 tensors (n_keys int32).
    """
    B, H, H_kv, T_q, T_k, D = check_row_stats_inputs(q, k, key_padding_mask, window)
    G = H // H_kv
    if block_q is None:
        block_q = max(1, _CHUNK_ELEMENTS // max(1, B * H * T_k))
    if T_q == 0 or T_k == 0:
        empty = _all_rows_empty(B, H, T_q, q.device)
        return empty if sinks is None else apply_sinks(empty, sinks)
    k_t = k.to(torch.float64).transpose(-1, -2)  # [B, H_kv, D, T_k]; float32 products are exact in float64
    parts: list[dict[str, Tensor]] = []
    for i0 in range(0, T_q, block_q):
        i1 = min(T_q, i0 + block_q)
        j0, j1 = compute_key_band(i0, i1, T_q, T_k, causal, window)
        if j1 == j0:  # no key in the band for any row of the chunk
            parts.append(_all_rows_empty(B, H, i1 - i0, q.device).to_dict())
            continue
        q_c = q[:, :, i0:i1].to(torch.float64).reshape(B, H_kv, G * (i1 - i0), D)  # [B, H_kv, G·T_chunk, D]
        s = ((q_c * scale) @ k_t[..., j0:j1]).reshape(B, H, i1 - i0, j1 - j0)  # [B, H, T_chunk, T_band] float64
        if logit_cap is not None:
            s = logit_cap * torch.tanh(s / logit_cap)
        allowed = compute_allowed(i0, i1, T_q, T_k, causal=causal, key_padding_mask=key_padding_mask, window=window,
                                  device=q.device)[..., j0:j1]
        parts.append(_stats_chunk(s, allowed))
    cols = {name: torch.cat([p[name] for p in parts], dim=-1) for name in (*FLOAT_FIELDS, "n_keys")}
    stats = RowStats(**cols, theta_err=torch.zeros_like(cols["theta_lo"]))  # float64 logits: no rounding to cover
    return stats if sinks is None else apply_sinks(stats, sinks)
