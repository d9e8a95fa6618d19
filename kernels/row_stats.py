"""Fused Triton kernel: per-row softmax statistics of attention without the attention matrix (THEORY §3.5, §3.7).

Flash-attention style: one program owns BLOCK_Q query rows of one (batch, head) and walks the key blocks three times,
keeping O(BLOCK_Q) state per program, so memory is O(B · H · T_q) and the T_q × T_k matrix never exists.
Pass 1 runs the online update of §3.5; pass 2 knows the log-sum-exp and finds the natural-order prefix crossing and
its adding completion; pass 3 knows the crossing and finds the removing completion.
`attn_row_stats` shares its signature and its `RowStats` with `attnstab_cli.reference.row_stats.attn_row_stats_ref`,
the plain-torch reference the tests hold it to. Sink logits (THEORY §18.4) never enter the kernel: it streams the
statistics of the keys alone (the renormalized row q the θ machinery runs on), and the launcher maps them to the
sink rows with the reference's own `apply_sinks`, which needs only each row's log-sum-exp.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from attnstab_cli.reference.row_stats import FLOAT_FIELDS, RowStats, apply_sinks, check_row_stats_inputs

__all__ = ["attn_row_stats", "compute_logit_theta_err", "is_interpreted"]

_FIELD = {name: i for i, name in enumerate(FLOAT_FIELDS)}
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e): logits are scaled into base 2 for exp2
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)    # ln(2): base-2 results back to nats


@triton.jit
def _log1p(x):
    """log(1 + x) for x ≥ 0 to full relative precision without libdevice (Goldberg's trick)."""
    u = 1.0 + x
    tiny = u == 1.0
    return tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _theta_hi_count(pmax, pmin, n):
    """The cardinality upper bound on θ of `compute_theta_hi_count` (same formula, float64 `# [BLOCK_Q]`)."""
    nf = n.to(tl.float64)
    pmin = tl.maximum(pmin, 1e-300)
    k1 = tl.maximum(tl.ceil(0.5 / pmax) - 1.0, tl.ceil(nf - 0.5 / pmin) - 1.0)
    k1 = tl.minimum(tl.maximum(k1, -1.0), nf)
    k2 = tl.minimum(tl.floor(0.5 / pmin) + 1.0, tl.floor(nf - 0.5 / pmax) + 1.0)
    k2 = tl.minimum(tl.maximum(k2, 0.0), nf + 1.0)
    u = tl.minimum(k1 * pmax, 1.0 - (nf - k1) * pmin)
    lo = tl.maximum(k2 * pmin, 1.0 - (nf - k2) * pmax)
    g = tl.minimum(0.5 - u, lo - 0.5) - 16.0 * nf * 1.1102230246251565e-16
    ok = (k2 == k1 + 1.0) & (k1 >= 0.0) & (k2 <= nf) & (g > 0.0) & (n >= 2)
    return tl.where(ok, 1.0 - 4.0 * g * g, 1.0)


@triton.jit
def _score_block(
    q, k_base, pad_base, start_k, offs_k0, offs_d, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset,
    scale, window,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    UPCAST: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Base-2 logits s = scale · q kᵀ (``scale`` carries log2 e) of one key block and the mask of allowed pairs, both
    `# [BLOCK_Q, BLOCK_K]`. Unmasked (``MASKED`` false) blocks are interior: every pair is allowed, no mask is built
    and the caller skips every select."""
    offs_k = start_k + offs_k0  # [BLOCK_K]
    in_k = offs_k < T_k
    if MASKED:
        k_t = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                      mask=in_k[None, :] & (offs_d < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_K]
    else:
        k_t = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                      mask=(offs_d < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_K]
    if UPCAST:  # the interpreter's dot misreads bfloat16; the upcast products are exact, as on tensor cores
        k_t = k_t.to(ACC)
    s = tl.dot(q, k_t, input_precision=INPUT_PRECISION).to(ACC) * scale  # [BLOCK_Q, BLOCK_K]
    valid = (offs_q < T_q)[:, None] & in_k[None, :]  # [BLOCK_Q, BLOCK_K]
    if MASKED:
        pos = offs_q + q_offset  # [BLOCK_Q] absolute query position (bottom-right alignment)
        if IS_CAUSAL:
            valid = valid & (offs_k[None, :] <= pos[:, None])
        if HAS_WINDOW:
            valid = valid & (tl.abs(pos[:, None] - offs_k[None, :]) < window)
        if HAS_PAD:
            real = tl.load(pad_base + offs_k * stride_pt, mask=in_k, other=0)  # [BLOCK_K]
            valid = valid & (real != 0)[None, :]
    return s, valid


@triton.jit
def _online_step(s, valid, m, m_min, z, t, n, offs_k0, BLOCK_K: tl.constexpr, MASKED: tl.constexpr):
    """One key block of pass 1 (base-2 logits): the updated running max m, smallest logit, z, t and count n."""
    if MASKED:
        n += tl.sum(valid.to(tl.int32), axis=1)
        s_m = tl.where(valid, s, -float("inf"))  # [BLOCK_Q, BLOCK_K]
        m_min = tl.minimum(m_min, tl.min(tl.where(valid, s, float("inf")), axis=1))
    else:
        n += BLOCK_K
        s_m = s
        m_min = tl.minimum(m_min, tl.min(s, axis=1))
    m_blk = tl.max(s_m, axis=1)  # [BLOCK_Q]
    is_new = m_blk > m
    m_new = tl.maximum(m, m_blk)
    m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)  # finite stand-in for empty rows
    alpha = tl.exp2(m - m_sub).to(tl.float64)  # 1 if the max stays, 0 on the first allowed key
    shift = tl.where(m == -float("inf"), 0.0, m - m_sub).to(tl.float64)  # m − m' without −inf
    if MASKED:
        d = tl.where(valid, s - m_sub[:, None], 0.0)  # [BLOCK_Q, BLOCK_K] s_j − m'
        e = tl.where(valid, tl.exp2(d), 0.0)  # [BLOCK_Q, BLOCK_K]
    else:
        d = s - m_sub[:, None]
        e = tl.exp2(d)
    arg = tl.min(tl.where(s_m == m_blk[:, None], offs_k0[None, :], BLOCK_K), axis=1)  # first argmax
    drop = is_new[:, None] & (offs_k0[None, :] == arg[:, None])  # the new maximum is the "1", not in z
    t = tl.where(is_new, alpha * (t + (1.0 + z) * shift), t) + tl.sum((e * d).to(tl.float64), axis=1)
    z = tl.where(is_new, alpha * (z + 1.0), z) + tl.sum(tl.where(drop, 0.0, e).to(tl.float64), axis=1)
    return m_new, m_min, z, t, n


@triton.jit
def _online_range(
    q, k_base, pad_base, start, stop, m, m_min, z, t, n, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt,
    q_offset, scale, window,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pass 1 over the key blocks [start, stop), masked or (interior) not: the updated m, m_min, z, t and n."""
    offs_k0 = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    for start_k in range(start, stop, BLOCK_K):
        s, valid = _score_block(q, k_base, pad_base, start_k, offs_k0, offs_d, offs_q, T_q, T_k, D, stride_kt,
                                stride_kd, stride_pt, q_offset, scale, window, MASKED, IS_CAUSAL, HAS_WINDOW, HAS_PAD,
                                UPCAST, ACC, INPUT_PRECISION)
        m, m_min, z, t, n = _online_step(s, valid, m, m_min, z, t, n, offs_k0, BLOCK_K, MASKED)
    return m, m_min, z, t, n


@triton.jit
def _online_pass(
    q, k_base, pad_base, lo, int_lo, int_hi, hi, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset,
    scale, window,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pass 1 over keys [lo, hi) (interior blocks [int_lo, int_hi) unmasked): running max m, smallest logit, z_rest,
    entropy accumulator t (base-2 logits) and key count n, each `# [BLOCK_Q]`."""
    m = tl.full([BLOCK_Q], -float("inf"), ACC)
    m_min = tl.full([BLOCK_Q], float("inf"), ACC)  # smallest allowed logit (the cardinality bound's p_min)
    z = tl.zeros([BLOCK_Q], tl.float64)  # sums over keys accumulate in float64 whatever ACC is
    t = tl.zeros([BLOCK_Q], tl.float64)
    n = tl.zeros([BLOCK_Q], tl.int32)
    m, m_min, z, t, n = _online_range(
        q, k_base, pad_base, lo, int_lo, m, m_min, z, t, n, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt,
        q_offset, scale, window, BLOCK_K, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    m, m_min, z, t, n = _online_range(
        q, k_base, pad_base, int_lo, int_hi, m, m_min, z, t, n, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt,
        q_offset, scale, window, BLOCK_K, BLOCK_D, False, IS_CAUSAL, HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    m, m_min, z, t, n = _online_range(
        q, k_base, pad_base, int_hi, hi, m, m_min, z, t, n, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt,
        q_offset, scale, window, BLOCK_K, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    return m, z, t, n, m_min


@triton.jit
def _first_of(i_a, p_a, c_a, w_a, i_b, p_b, c_b, w_b):
    """Combine of the crossing reduction: the entry with the smaller key index (its p and c), and the total w."""
    take_a = i_a <= i_b
    return (tl.where(take_a, i_a, i_b), tl.where(take_a, p_a, p_b), tl.where(take_a, c_a, c_b), w_a + w_b)


@triton.jit
def _nearest_of(d_a, i_a, p_a, d_b, i_b, p_b):
    """Combine of the completion reductions: the smaller miss d, the first key index on ties, and its p."""
    take_a = (d_a < d_b) | ((d_a == d_b) & (i_a <= i_b))
    return tl.where(take_a, d_a, d_b), tl.where(take_a, i_a, i_b), tl.where(take_a, p_a, p_b)


@triton.jit
def _block_probs(s, valid, lse, ACC: tl.constexpr, MASKED: tl.constexpr):
    """p_j = 2^(s_j − lse) of one key block (base-2 logits and lse), float64 `# [BLOCK_Q, BLOCK_K]`."""
    if MASKED:
        return tl.where(valid, tl.exp2(tl.where(valid, s - lse[:, None], 0.0).to(ACC)), 0.0).to(tl.float64)
    return tl.exp2((s - lse[:, None]).to(ACC)).to(tl.float64)


@triton.jit
def _prefix_step(p, valid, start_k, offs_k0, c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs,
                 BLOCK_K: tl.constexpr):
    """One key block of pass 2: two multi-operand reductions, the first crossing (index, p, c) with the block's
    total, and the later key nearest the gap."""
    c = c_off[:, None] + tl.cumsum(p, axis=1)  # [BLOCK_Q, BLOCK_K]
    idx = tl.where((c >= 0.5) & valid, offs_k0[None, :], BLOCK_K)  # [BLOCK_Q, BLOCK_K]
    j_star, at, c_star, blk = tl.reduce((idx, p, c, p), 1, _first_of)
    new = (found == 0) & (j_star < BLOCK_K)
    before = c_star - at  # c_{j*−1}, absolute (c_off included)
    p_before = tl.where(new, before, p_before)
    p_at = tl.where(new, at, p_at)
    j_abs = tl.where(new, start_k + j_star, j_abs)
    after = c_off + blk - c_star  # float64: no cancellation worth the name
    p_after += tl.where(found != 0, blk, tl.where(new, after, 0.0))  # once found, every later key is in Q
    later = valid & ((found != 0)[:, None] | (new[:, None] & (offs_k0[None, :] > j_star[:, None])))
    miss = tl.where(later, tl.abs(p - (0.5 - p_before)[:, None]), float("inf"))  # [BLOCK_Q, BLOCK_K]
    blk_miss, _, blk_p = tl.reduce((miss, offs_k0[None, :] + tl.zeros_like(idx), p), 1, _nearest_of)
    better = blk_miss < best_miss  # strict: the first key wins ties, as in the reference
    best_miss = tl.where(better, blk_miss, best_miss)
    p_r = tl.where(better, blk_p, p_r)
    c_off += blk
    found = tl.where(new, 1, found)
    return c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs


@triton.jit
def _prefix_range(
    q, k_base, pad_base, start, stop, c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs, lse, offs_q,
    T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset, scale, window,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pass 2 over the key blocks [start, stop), masked or (interior) not: the updated crossing state."""
    offs_k0 = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    for start_k in range(start, stop, BLOCK_K):
        s, valid = _score_block(q, k_base, pad_base, start_k, offs_k0, offs_d, offs_q, T_q, T_k, D, stride_kt,
                                stride_kd, stride_pt, q_offset, scale, window, MASKED, IS_CAUSAL, HAS_WINDOW, HAS_PAD,
                                UPCAST, ACC, INPUT_PRECISION)
        c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs = _prefix_step(
            _block_probs(s, valid, lse, ACC, MASKED), valid, start_k, offs_k0, c_off, p_before, p_at, p_after, p_r,
            best_miss, found, j_abs, BLOCK_K)
    return c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs


@triton.jit
def _prefix_pass(
    q, k_base, pad_base, lo, int_lo, int_hi, hi, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset,
    scale, window, lse,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pass 2 over keys [lo, hi): at the first prefix c_{j*} ≥ ½ (float64 cumulative sums) keep c_{j*−1}, p_{j*}
    and Σ_{j>j*} p_j; among the later keys keep the first p_r closest to the gap ½ − c_{j*−1} (the completion)."""
    c_off = tl.zeros([BLOCK_Q], tl.float64)  # c before this block
    p_before = tl.zeros([BLOCK_Q], tl.float64)
    p_at = tl.zeros([BLOCK_Q], tl.float64)
    p_after = tl.zeros([BLOCK_Q], tl.float64)
    p_r = tl.zeros([BLOCK_Q], tl.float64)
    best_miss = tl.full([BLOCK_Q], float("inf"), tl.float64)
    found = tl.zeros([BLOCK_Q], tl.int32)
    j_abs = tl.zeros([BLOCK_Q], tl.int32)  # absolute key index of j*
    c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs = _prefix_range(
        q, k_base, pad_base, lo, int_lo, c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs, lse, offs_q, T_q,
        T_k, D, stride_kt, stride_kd, stride_pt, q_offset, scale, window, BLOCK_K, BLOCK_D, True, IS_CAUSAL,
        HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs = _prefix_range(
        q, k_base, pad_base, int_lo, int_hi, c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs, lse, offs_q,
        T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset, scale, window, BLOCK_K, BLOCK_D, False, IS_CAUSAL,
        HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs = _prefix_range(
        q, k_base, pad_base, int_hi, hi, c_off, p_before, p_at, p_after, p_r, best_miss, found, j_abs, lse, offs_q, T_q,
        T_k, D, stride_kt, stride_kd, stride_pt, q_offset, scale, window, BLOCK_K, BLOCK_D, True, IS_CAUSAL,
        HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    return p_before, p_at, p_after, p_r, best_miss, found, j_abs


@triton.jit
def _removal_step(p, start_k, offs_k0, j_star, excess, p_a, best_miss):
    """One key block of pass 3: one multi-operand reduction for the earlier key nearest the excess."""
    before = (start_k + offs_k0)[None, :] < j_star[:, None]  # [BLOCK_Q, BLOCK_K]
    miss = tl.where(before, tl.abs(p - excess[:, None]), float("inf"))
    blk_miss, _, blk_p = tl.reduce((miss, offs_k0[None, :] + tl.zeros_like(j_star)[:, None], p), 1, _nearest_of)
    better = blk_miss < best_miss
    return tl.where(better, blk_p, p_a), tl.where(better, blk_miss, best_miss)


@triton.jit
def _removal_range(
    q, k_base, pad_base, start, stop, p_a, best_miss, lse, j_star, excess, offs_q, T_q, T_k, D, stride_kt,
    stride_kd, stride_pt, q_offset, scale, window,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pass 3 over the key blocks [start, stop), masked or (interior) not: the updated p_a and its miss."""
    offs_k0 = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    for start_k in range(start, stop, BLOCK_K):
        s, valid = _score_block(q, k_base, pad_base, start_k, offs_k0, offs_d, offs_q, T_q, T_k, D, stride_kt,
                                stride_kd, stride_pt, q_offset, scale, window, MASKED, IS_CAUSAL, HAS_WINDOW, HAS_PAD,
                                UPCAST, ACC, INPUT_PRECISION)
        p_a, best_miss = _removal_step(_block_probs(s, valid, lse, ACC, MASKED), start_k, offs_k0, j_star, excess,
                                       p_a, best_miss)
    return p_a, best_miss


@triton.jit
def _removal_pass(
    q, k_base, pad_base, lo, int_lo, int_hi, hi, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset,
    scale, window, lse, j_star, excess,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Pass 3 over keys [lo, hi): among the keys j < j* (absolute index) the first p_a closest to the excess
    c_{j*} − ½ of the prefix {j ≤ j*}, for the removal completion (and whether there was one). Keys at or past
    the last j* of the block are never candidates, so the pass stops there."""
    p_a = tl.zeros([BLOCK_Q], tl.float64)
    best_miss = tl.full([BLOCK_Q], float("inf"), tl.float64)
    stop = tl.minimum(hi, tl.max(j_star, axis=0))  # keys ≥ every row's j* hold no candidate
    p_a, best_miss = _removal_range(
        q, k_base, pad_base, lo, tl.minimum(int_lo, stop), p_a, best_miss, lse, j_star, excess, offs_q, T_q, T_k, D,
        stride_kt, stride_kd, stride_pt, q_offset, scale, window, BLOCK_K, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW,
        HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    p_a, best_miss = _removal_range(
        q, k_base, pad_base, int_lo, tl.minimum(int_hi, stop), p_a, best_miss, lse, j_star, excess, offs_q, T_q, T_k, D,
        stride_kt, stride_kd, stride_pt, q_offset, scale, window, BLOCK_K, BLOCK_D, False, IS_CAUSAL, HAS_WINDOW,
        HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    p_a, best_miss = _removal_range(
        q, k_base, pad_base, int_hi, stop, p_a, best_miss, lse, j_star, excess, offs_q, T_q, T_k, D, stride_kt,
        stride_kd, stride_pt, q_offset, scale, window, BLOCK_K, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, HAS_PAD, UPCAST,
        ACC, INPUT_PRECISION)
    return p_a, best_miss


@triton.jit
def _attn_row_stats_kernel(
    Q, K, PAD, STATS, N_KEYS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_pb, stride_pt, stride_field,
    SCALE, H, GROUP, T_q, T_k, D, q_offset, window,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
    ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Row statistics of softmax(s) with s_ij = scale · q_i·k_j over the allowed keys of row i (THEORY §3.5).

    Masking: key j is allowed for query i at position P = i + T_k − T_q iff j < T_k, j ≤ P (IS_CAUSAL),
    |P − j| < window (HAS_WINDOW; causal: Mistral, bidirectional: ModernBERT) and PAD[b, j] ≠ 0 (HAS_PAD); masked
    keys never enter a sum, and key blocks wholly outside the causal/window band are skipped. Query head h reads
    key head h // GROUP (GQA by indexing).
    Logits are scored in base 2 (the launcher folds log2 e into the scale, so every exponential is one exp2 and
    z, p are unchanged; m, lse and t are converted back to nats at the end). Key blocks wholly inside every real
    row's allowed band are interior and run without a mask; the masked blocks before and after them keep the order
    of the keys, which passes 2 and 3 need.
    Pass 1, online max and log-sum-exp: per row keep the running max m, z = Σ_{j≠argmax} e^{s_j−m} and
    t = Σ_j e^{s_j−m}(s_j−m). A block with new max m' > m rescales by α = e^{m−m'}:
    t ← α(t + (1+z)(m−m')), z ← α(z+1), then adds its own terms, leaving out its first argmax (the new "1"), so z
    never suffers 1 − p_max cancellation. Then p_max = 1/(1+z), 1 − p_max = z/(1+z), lse = m + log1p(z),
    H = log1p(z) − t/(1+z), and the θ stream bounds 4z/(1+z)² (exact, z ≤ 1) or z·max(4, z+2)/(1+z)².
    Pass 2, prefix crossing: p_j = e^{s_j − lse}; a tl.cumsum inside the block plus a carried offset gives c_j; at the
    first c_j* ≥ ½ keep P = c_{j*−1}, p_{j*}, then sum every later p into Q, and evaluate 4PQ/(P+Q)² for both
    prefixes; the completion adds to {j < j*} the first later key r whose p_r is closest to ½ − c_{j*−1}. Per block
    that is one scan and two multi-operand reductions (the crossing with the block total, the nearest later key).
    Pass 3 (lse and j* known) removes from {j ≤ j*} the first key a < j* whose p_a is closest to c_{j*} − ½, in one
    reduction per block, and stops at the block's last j*.
    Logits and exponentials are in ACC (float32; float64 for float64 inputs); every sum over keys, z, t and the
    cumulative sums, accumulates in float64, and every output is float64.
    """
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_q < T_q)[:, None] & (offs_d < D)[None, :], other=0.0)  # [BLOCK_Q, BLOCK_D]
    if UPCAST:
        q = q.to(ACC)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    pad_base = PAD + b * stride_pb
    scale = tl.load(SCALE).to(ACC)  # base-2 units (log2 e folded in); a pointer, so float64 runs keep float64
    row0 = pid_q * BLOCK_Q
    pos0 = row0 + q_offset  # absolute position of the block's first and last real rows
    pos_last = tl.minimum(row0 + BLOCK_Q, T_q) - 1 + q_offset
    lo = 0  # key range that can hold allowed keys for some row of this block
    hi = T_k
    if IS_CAUSAL:
        hi = tl.minimum(T_k, pos_last + 1)
    if HAS_WINDOW:
        lo = tl.maximum(0, pos0 - window + 1) // BLOCK_K * BLOCK_K
    # interior key blocks [int_lo, int_hi): every pair of the block allowed for every real row, so no mask
    all_lo = lo
    all_hi = T_k
    if IS_CAUSAL:
        all_hi = tl.minimum(all_hi, pos0 + 1)
    if HAS_WINDOW:
        all_lo = tl.maximum(all_lo, pos_last - window + 1)
        all_hi = tl.minimum(all_hi, pos0 + window)
    int_lo = (all_lo + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    int_hi = tl.maximum(tl.minimum(all_hi, hi), 0) // BLOCK_K * BLOCK_K
    if HAS_PAD:  # padding is per key: no block is known to be interior
        int_hi = int_lo
    none = int_hi <= int_lo
    int_lo = tl.where(none, lo, int_lo)
    int_hi = tl.where(none, lo, int_hi)

    m, z, t, n, m_min = _online_pass(q, k_base, pad_base, lo, int_lo, int_hi, hi, offs_q, T_q, T_k, D, stride_kt,
                                     stride_kd, stride_pt, q_offset, scale, window, BLOCK_Q, BLOCK_K, BLOCK_D,
                                     IS_CAUSAL, HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    empty = n == 0
    log1p_z = _log1p(z)
    lse2 = tl.where(empty, 0.0, m.to(tl.float64) + log1p_z * LOG2E)  # base 2; finite stand-in for empty rows
    p_before, p_at, p_after, p_r, best_miss, found, j_abs = _prefix_pass(
        q, k_base, pad_base, lo, int_lo, int_hi, hi, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset,
        scale, window, lse2, BLOCK_Q, BLOCK_K, BLOCK_D, IS_CAUSAL, HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)
    excess = p_before + p_at - 0.5
    p_a, a_miss = _removal_pass(
        q, k_base, pad_base, lo, int_lo, int_hi, hi, offs_q, T_q, T_k, D, stride_kt, stride_kd, stride_pt, q_offset,
        scale, window, lse2, tl.where(found != 0, j_abs, -1), excess, BLOCK_Q, BLOCK_K, BLOCK_D, IS_CAUSAL,
        HAS_WINDOW, HAS_PAD, UPCAST, ACC, INPUT_PRECISION)

    total = p_before + p_at + p_after
    norm = tl.where(total > 0.0, total * total, 1.0)
    best = tl.maximum(p_before * (p_at + p_after), (p_before + p_at) * p_after)
    short = n <= 1
    prefix = tl.where((found != 0) & (n > 1), 4.0 * best / norm, 0.0)
    plus_q = tl.maximum(p_after - p_r, 0.0)
    plus = tl.where((found != 0) & (n > 1) & (best_miss < float("inf")),
                    4.0 * (p_before + p_r) * (p_at + plus_q) / norm, 0.0)
    minus = tl.where((found != 0) & (n > 1) & (a_miss < float("inf")),
                     4.0 * (tl.maximum(p_before - p_a, 0.0) + p_at) * (p_after + p_a) / norm, 0.0)
    plus = tl.maximum(prefix, tl.maximum(plus, minus))
    one_z = 1.0 + z
    exact = 4.0 * z / (one_z * one_z)  # θ when p_max ≥ ½ (z ≤ 1)
    peaked = z <= 1.0
    lo_stream = tl.where(short, 0.0, tl.where(peaked, exact, z * tl.maximum(z + 2.0, 4.0) / (one_z * one_z)))
    hi_stream = tl.where(short, 0.0, tl.where(peaked, exact, 1.0))
    theta_lo = tl.where(short, 0.0, tl.where(peaked, exact, tl.maximum(lo_stream, plus)))
    pmin = tl.exp2((m_min - m).to(tl.float64)) / one_z
    theta_hi = tl.where(short, 0.0, tl.where(peaked, exact, _theta_hi_count(1.0 / one_z, pmin, n)))

    out = STATS + pid_bh.to(tl.int64) * T_q + offs_q  # [BLOCK_Q] field 0; field f at + f · stride_field
    row = offs_q < T_q
    m = m.to(tl.float64) * LN2  # back to natural units
    lse = m + log1p_z
    tl.store(out + 0 * stride_field, m, mask=row)
    tl.store(out + 1 * stride_field, tl.where(empty, -float("inf"), lse), mask=row)
    tl.store(out + 2 * stride_field, tl.where(empty, float("nan"), 1.0 / one_z), mask=row)
    tl.store(out + 3 * stride_field, tl.where(empty, float("nan"), z / one_z), mask=row)
    tl.store(out + 4 * stride_field, tl.where(empty, float("nan"), log1p_z - t * LN2 / one_z), mask=row)
    tl.store(out + 5 * stride_field, lo_stream, mask=row)
    tl.store(out + 6 * stride_field, hi_stream, mask=row)
    tl.store(out + 7 * stride_field, prefix, mask=row)
    tl.store(out + 8 * stride_field, plus, mask=row)
    tl.store(out + 9 * stride_field, theta_lo, mask=row)
    tl.store(out + 10 * stride_field, theta_hi, mask=row)
    tl.store(N_KEYS + pid_bh.to(tl.int64) * T_q + offs_q, n, mask=row)


# The kernel stores fields by position; keep that order tied to RowStats.
if FLOAT_FIELDS != ("row_max", "lse", "pmax", "one_minus_pmax", "entropy", "theta_lo_stream", "theta_hi_stream",
                    "theta_prefix", "theta_prefix_plus", "theta_lo", "theta_hi"):
    raise ImportError(f"RowStats field order changed ({FLOAT_FIELDS}); update _attn_row_stats_kernel's stores")


def is_interpreted() -> bool:
    """True when the kernel was built under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return isinstance(_attn_row_stats_kernel, InterpretedFunction)


def _launch_config(dtype: torch.dtype, block_q: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_K, num_warps, num_stages): one config, no autotuning.

    Interpreter: tiny tiles, so tests cover several key blocks and tails. GPU: 64 × 32 tiles, 4 warps, 2 stages,
    the fastest of the 30 configs `bench/tune_row_stats.py` swept on an H100 (bf16, causal; n = 2048 and 8192).
    """
    if is_interpreted():
        default_q, block_k, warps, stages = 16, 16, 1, 1
    elif dtype == torch.float64:  # verification path; fp64 has no tensor-core fast path
        default_q, block_k, warps, stages = 32, 32, 4, 1
    else:
        default_q, block_k, warps, stages = 64, 32, 4, 2
    bq = default_q if block_q is None else block_q
    if bq < 16 or bq & (bq - 1):
        raise ValueError(f"block_q must be a power of two ≥ 16 for the kernel; got {bq}")
    return bq, block_k, warps, stages


def attn_row_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    block_q: int | None = None,
    sinks: torch.Tensor | None = None,
) -> RowStats:
    """Fused softmax row statistics of s = scale · q kᵀ; same contract as `attn_row_stats_ref` (THEORY §3.5).

    q `# [B, H, T_q, D]` and k `# [B, H_kv, T_k, D]` in float32, float16, bfloat16 (or float64, accumulated in
    float64), on CUDA, or on CPU under TRITON_INTERPRET=1. `block_q` sets BLOCK_Q (power of two ≥ 16). `sinks`
    `# [H]`: a sink logit per query head, applied to the streamed statistics by `apply_sinks` (§18.4).
    Returns `RowStats` of `# [B, H, T_q]` float64 tensors (n_keys int32); `theta_err` bounds what the rounding of
    the kernel's logits can do to θ (:func:`compute_logit_theta_err`).
    """
    B, H, H_kv, T_q, T_k, D = check_row_stats_inputs(q, k, key_padding_mask, window)
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"q and k must share a float dtype (fp32/fp16/bf16/fp64); got {q.dtype}, {k.dtype}")
    if not is_interpreted() and not (q.is_cuda and k.is_cuda):
        raise ValueError("attn_row_stats needs CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU ones")
    stats = torch.empty(len(FLOAT_FIELDS), B, H, T_q, dtype=torch.float64, device=q.device)  # [F, B, H, T_q]
    n_keys = torch.empty(B, H, T_q, dtype=torch.int32, device=q.device)  # [B, H, T_q]
    if T_q > 0:
        _launch(q, k, scale, causal, key_padding_mask, window, block_q, stats, n_keys)
    out = RowStats(**{name: stats[i] for name, i in _FIELD.items()}, n_keys=n_keys,
                   theta_err=compute_logit_theta_err(q, k, scale))
    return out if sinks is None else apply_sinks(out, sinks)


def compute_logit_theta_err(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """How far the kernel's rounded logits can move θ of each row, float64 `# [B, H, T_q]` (THEORY §3.7).

    The dot product of D terms accumulates in float32 (float64 for float64 inputs; half-precision inputs are exact
    in it), then one product with the base-2 scale c = scale · log2 e, itself rounded once in float64 and once to
    the accumulation dtype: |ŝ_ij − s_ij| ≤ δ_i = γ_{D+3} · scale · ‖q_i‖ · max_j ‖k_j‖ in natural units, with
    γ_n = n·u/(1 − n·u) (D for the dot product, one each for the product and the two roundings of c). Then
    p'_j/p_j ∈ [e^{−2δ}, e^{2δ}], ‖p' − p‖₁ ≤ e^{2δ} − 1, and θ moves by at most twice that.
    """
    u = 2.0 ** -53 if q.dtype == torch.float64 else 2.0 ** -24
    n = q.shape[-1] + 3
    gamma = n * u / (1.0 - n * u)
    group = q.shape[1] // k.shape[1]
    q_norm = torch.linalg.vector_norm(q.to(torch.float64), dim=-1)  # [B, H, T_q]
    k_norm = torch.linalg.vector_norm(k.to(torch.float64), dim=-1)  # [B, H_kv, T_k]
    k_max = k_norm.amax(-1) if k_norm.shape[-1] else k_norm.new_zeros(k_norm.shape[:-1])  # [B, H_kv]
    delta = gamma * abs(scale) * q_norm * k_max.repeat_interleave(group, dim=1)[..., None]
    return 2.0 * torch.expm1(2.0 * delta)


def _launch(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, key_padding_mask: torch.Tensor | None,
    window: int | None, block_q: int | None, stats: torch.Tensor, n_keys: torch.Tensor,
) -> None:
    """Pick the config, lay out the arguments and launch one program per (query block, batch · head)."""
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    bq, bk, warps, stages = _launch_config(q.dtype, block_q)
    pad = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else q  # q: unused dummy pointer
    pad_strides = (pad.stride(0), pad.stride(1)) if key_padding_mask is not None else (0, 0)
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(T_q, bq), B * H)
    _attn_row_stats_kernel[grid](
        q, k, pad, stats, n_keys,
        *q.stride(), *k.stride(), *pad_strides, stats.stride(0),
        torch.tensor([scale * LOG2E.value], dtype=stats.dtype, device=q.device),  # base-2 logits for exp2
        H, H // H_kv, T_q, T_k, D, T_k - T_q, int(window) if window is not None else 0,
        BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=max(16, triton.next_power_of_2(D)),
        IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_PAD=key_padding_mask is not None,
        UPCAST=is_interpreted(), ACC=acc,
        INPUT_PRECISION="ieee",
        num_warps=warps, num_stages=stages,
    )
