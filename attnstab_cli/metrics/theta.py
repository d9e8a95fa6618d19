"""Balanced-mass factor θ(p) = 4·max_S p(S)(1−p(S)) of attention rows (THEORY §2, §3; arXiv 2602.18849 Def. 4.1).

θ(p)/τ is the exact ∞→1 norm of the softmax Jacobian (Thm 4.2). Exact θ is two-way number partitioning (weakly
NP-hard), so every row gets a certified interval [θ_lo, θ_hi]: A1 enumeration for n ≤ 20 keys (§3.2), otherwise the
A2 heuristics (sorted prefix, greedy fill, Karmarkar–Karp; §3.3) for θ_lo and the A3 top-k refinement (§3.4) for
θ_hi. Every θ_lo is the value of a concrete subset, evaluated as 4PQ/(P+Q)² with P and Q accumulated separately
(§3.1). A5 (§3.6) is the paper's estimator, kept for comparability only.

Input convention: a batch of rows ``p`` of shape [R, n]; masked or absent keys are exactly 0 and are ignored
(§3.1); rows need not be normalised (θ of p/Σp is computed). Inputs of any float dtype are analysed in float64.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

EXACT_MAX_KEYS = 20                 # A1 limit (§3.2)
DEFAULT_TOP_K = 14                  # A3 default k (§3.4)
THETA_SLACK = 1e-6                  # `theta_slack` covering upstream float32 rounding (§3.1)
EXACT_WIDTH = 1e-12                 # width at or below which a row counts as exact (§0.3 `theta_exact_frac`)
_CHUNK_ELEMS = 1 << 20              # float64 elements per enumeration intermediate (8 MiB; ≤ ~64 MiB live)
_TOPK_CANDIDATES = 8                # A3: subsets A of the top k extended into concrete subsets
_KK_HEAP_SIZE = 48                  # KK: the last items are finished on a binary heap


class ThetaRule(IntEnum):
    """Code (int8 in :class:`ThetaInterval`) of the rule that produced θ_lo or θ_hi."""

    SINGLE = 0    # n_keys ≤ 1: θ = 0 exactly (§3.1)
    PEAKED = 1    # p_max ≥ 1/2: θ = 4·p_max·q/(p_max+q)² exactly (§2.3 case 3, §3.3 step 1)
    EXACT = 2     # A1 enumeration (§3.2)
    PREFIX = 3    # best sorted prefix (§3.3)
    GREEDY = 4    # largest-first greedy fill, S or S ∪ {r}, or S after two best single exchanges (§3.3)
    KK = 5        # Karmarkar–Karp differencing (§3.3)
    TOPK = 6      # A3 top-k refinement (§3.4)
    TRIVIAL = 7   # θ_hi = 1, the universal bound (§2.4(5))


@dataclass(frozen=True)
class ThetaInterval:
    """Certified per-row bracket θ_lo ≤ θ(p) ≤ θ_hi (§3.3) and the row facts it was derived from.

    lo, hi: float64 [R], widened by ``slack`` and clamped to [0, 1]; lo_rule, hi_rule: int8 [R] (:class:`ThetaRule`);
    pmax: float64 [R] (largest entry); n_keys: int64 [R] (nonzero entries); subset: bool [R, n], the concrete subset
    (input column order) whose value is θ_lo before the slack; exact: bool [R], width ≤ 1e-12 before the slack.
    """

    lo: Tensor
    hi: Tensor
    lo_rule: Tensor
    hi_rule: Tensor
    pmax: Tensor
    n_keys: Tensor
    subset: Tensor
    exact: Tensor
    slack: float

    @property
    def width(self) -> Tensor:
        """θ_hi − θ_lo per row, float64 [R] (includes 2·slack unless clamped)."""
        return self.hi - self.lo


class PmaxEntropy(NamedTuple):
    """p_max, 1 − p_max (accumulated as Σ_{j≠argmax} p_j) and entropy in nats; each float64 [R] (§3.5)."""

    pmax: Tensor
    one_minus_pmax: Tensor
    entropy: Tensor


def _as_rows(p: Tensor, keep_device: bool = False) -> Tensor:
    """Validate a batch of probability rows [R, n] and return it as float64 (§3.1), on the CPU unless
    ``keep_device`` (the vectorised full-coverage paths run where the rows are)."""
    if p.ndim != 2:
        raise ValueError(f"expected probability rows of shape [R, n], got {tuple(p.shape)}")
    p64 = p.detach().to(device=p.device if keep_device else "cpu", dtype=torch.float64)  # [R, n]
    if not bool(torch.isfinite(p64).all()) or bool((p64 < 0).any()):
        raise ValueError("probability rows must be finite and non-negative")
    return p64


def _sort_rows(p64: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows sorted descending (zeros last), the permutation, and n_keys (count of nonzero entries)."""
    vals, perm = torch.sort(p64, dim=-1, descending=True, stable=True)     # [R, n], [R, n]
    return vals, perm, (p64 > 0).sum(-1)                                   # n_keys: [R]


def _balanced(P: Tensor, Q: Tensor) -> Tensor:
    """4PQ/(P+Q)² as 4·(P/s)·(Q/s) (no under/overflow of s²), clamped to [0, 1], 0 where s = P + Q = 0 (§3.1:
    never 4P(1−P))."""
    s = P + Q
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (4.0 * (P / s) * (Q / s)).clamp(0.0, 1.0)


def compute_balanced(P: Tensor, Q: Tensor) -> Tensor:
    """4PQ/(P+Q)² of separately accumulated masses P, Q (§3.1); with P = p_max and Q = Σ_{j≠argmax} p_j ≤ P it is θ
    exactly (§2.3)."""
    return _balanced(P, Q)


def compute_theta_subset(p: Tensor, mask: Tensor) -> Tensor:
    """θ-value 4PQ/(P+Q)² of the concrete subsets ``mask`` (bool [R, n]) of rows ``p`` [R, n]; a certified lower
    bound on θ (§2.4(1)), with P = p(S) and Q = p(S^c) each accumulated from their own entries (§3.1)."""
    return _balanced(*_split_sums(_as_rows(p), mask.to(torch.bool)))


def compute_maximiser_signs(mask: Tensor) -> Tensor:
    """Sign vector v = 1_S − 1_{S^c} (float64 [R, n]) of subsets ``mask``; for a maximising S* it attains
    ‖Jv‖₁ = θ/τ (Thm 4.2, §2.2 step 5)."""
    return torch.where(mask, 1.0, -1.0).to(torch.float64)


def compute_pmax_entropy(p: Tensor) -> PmaxEntropy:
    """p_max, 1 − p_max without cancellation, and entropy −Σ p log p in nats of rows [R, n] (§3.5, §2.4(6))."""
    p64 = _as_rows(p)
    if p64.shape[1] == 0:
        return PmaxEntropy(*torch.zeros(3, p64.shape[0], dtype=torch.float64))
    pmax, arg = p64.max(dim=-1)                                            # [R], [R]
    rest = p64.scatter(1, arg[:, None], 0.0).sum(-1)                       # [R]
    entropy = -torch.special.xlogy(p64, p64).sum(-1)                       # [R]
    return PmaxEntropy(pmax, rest, entropy)


def _subset_sums(v: Tensor) -> Tensor:
    """Sums of all 2^k subsets of the k columns of v [r, k] by doubling; bit j of the index selects column j."""
    sums = torch.empty(v.shape[0], 1 << v.shape[1], dtype=v.dtype)          # [r, 2^k]
    sums[:, 0] = 0.0
    for j in range(v.shape[1]):
        torch.add(sums[:, :1 << j], v[:, j:j + 1], out=sums[:, 1 << j:2 << j])
    return sums


def _bits_to_mask(index: Tensor, k: int) -> Tensor:
    """Bool [r, k] membership mask of subset indices [r] (bit j ↔ column j)."""
    return (index[:, None] >> torch.arange(k)) & 1 == 1


def _enumerate_exact(vals: Tensor) -> tuple[Tensor, Tensor]:
    """A1 on rows of m sorted keys [r, m] (m ≥ 2): θ and the optimal subset [r, m] (§3.2).

    Searches the 2^(m−1) subsets that exclude the last key by meeting in the middle: the first m − 1 keys split into
    halves A and B; for every subset a of A the subsets b of B whose mass is just below and just above
    W/2 − p(a) are found by binary search in B's sorted subset sums, and one of them maximises min(P, Q) for that a.
    Cost O(2^(m/2)·m) per row instead of O(2^m). P = p(a) + p(b) and Q = p(A∖a) + p(B∖b) + p_last are each
    accumulated from their own subset sums (no 1 − P, no cancellation or underflow; argmin |P − Q| would tie on near
    one-hot rows); the optimum's value is then evaluated as 4PQ/(P+Q)².
    """
    r, m = vals.shape
    na = (m - 1) // 2
    nb = m - 1 - na
    full_a, full_b = (1 << na) - 1, (1 << nb) - 1
    rows_per_chunk = max(1, _CHUNK_ELEMS // (8 << max(na, nb)))
    theta, masks = [], []
    for v in vals.split(rows_per_chunk):
        sa = _subset_sums(v[:, :na])                                       # [c, 2^na]
        sb = _subset_sums(v[:, na:m - 1])                                  # [c, 2^nb]
        sb_sorted, order = sb.sort(-1)                                     # [c, 2^nb]
        half = (v.sum(-1, keepdim=True) * 0.5)                             # [c, 1]
        j = torch.searchsorted(sb_sorted, (half - sa).contiguous())        # [c, 2^na]
        cand = torch.stack([(j - 1).clamp(min=0), j.clamp(max=full_b)], -1)   # [c, 2^na, 2] sorted positions
        ib = order.gather(1, cand.flatten(1)).view_as(cand)                # [c, 2^na, 2] subset indices of B
        ia = torch.arange(1 << na).expand_as(sa)[..., None].expand_as(ib)  # [c, 2^na, 2]
        flat = lambda t, idx: t.gather(1, idx.flatten(1)).view_as(idx)     # noqa: E731
        P = flat(sa, ia) + flat(sb, ib)                                    # [c, 2^na, 2]
        Q = flat(sa, full_a - ia) + flat(sb, full_b - ib) + v[:, -1:, None]
        score = torch.minimum(P, Q).flatten(1)                             # [c, 2^(na+1)]
        best = score.argmax(-1, keepdim=True)                              # [c, 1]
        theta.append(_balanced(P.flatten(1).gather(1, best)[:, 0], Q.flatten(1).gather(1, best)[:, 0]))
        a_idx, b_idx = ia.flatten(1).gather(1, best)[:, 0], ib.flatten(1).gather(1, best)[:, 0]
        masks.append(torch.nn.functional.pad(torch.cat([_bits_to_mask(a_idx, na), _bits_to_mask(b_idx, nb)], -1),
                                             (0, 1)))                       # last key ∉ S
    return torch.cat(theta), torch.cat(masks)


def _exact_sorted(vals: Tensor, n_keys: Tensor) -> tuple[Tensor, Tensor]:
    """A1 for sorted rows [R, n] with n_keys ≤ 20, grouped by key count: θ [R] and the subset [R, n] (sorted order)."""
    theta = torch.zeros(vals.shape[0], dtype=torch.float64)                # [R]
    mask = torch.zeros(vals.shape, dtype=torch.bool)                       # [R, n]
    for m in torch.unique(n_keys).tolist():
        if m < 2:
            continue
        rows = torch.nonzero(n_keys == m)[:, 0]
        t, s = _enumerate_exact(vals[rows, :m])
        theta[rows] = t
        mask[rows, :m] = s
    return theta, mask


def compute_theta_exact(p: Tensor) -> Tensor:
    """Exact θ (float64 [R]) of rows [R, n] with at most 20 nonzero keys by A1 enumeration (§3.2).

    Raises ValueError for a row with more than 20 nonzero keys (use :func:`compute_theta_interval`).
    """
    vals, _, n_keys = _sort_rows(_as_rows(p))
    if bool((n_keys > EXACT_MAX_KEYS).any()):
        raise ValueError(f"A1 enumeration handles at most {EXACT_MAX_KEYS} nonzero keys per row, "
                         f"got {int(n_keys.max())}")
    return _exact_sorted(vals, n_keys)[0]


def _prefix_sums(vals: Tensor) -> tuple[Tensor, Tensor]:
    """For sorted rows [r, m]: P_k = Σ_{j<k} and Q_k = Σ_{j≥k}, k = 1..m, each accumulated ([r, m], [r, m])."""
    P = vals.cumsum(-1)                                                    # [r, m]
    Q = torch.cat([vals.flip(-1).cumsum(-1).flip(-1)[:, 1:], torch.zeros_like(vals[:, :1])], -1)  # [r, m]
    return P, Q


def compute_theta_paper(p: Tensor) -> Tensor:
    """A5, the paper's sorted-prefix estimator (§3.6), float64 [R]: the prefix whose mass is closest to 1/2.

    An ESTIMATE of θ for comparability with the paper's figures (Errata E2). It is the value of a concrete subset,
    so it never exceeds θ, and it is NEVER an upper bound on θ: do not use it where Thm 5.1 needs one.
    """
    vals = _sort_rows(_as_rows(p, keep_device=True))[0]
    if vals.shape[1] == 0:
        return torch.zeros(vals.shape[0], dtype=torch.float64, device=vals.device)
    P, Q = _prefix_sums(vals)                                              # [R, n]
    k = torch.minimum(P, Q).argmax(-1, keepdim=True)                       # [R, 1]: argmin |P_k − W/2|
    return _balanced(P.gather(1, k)[:, 0], Q.gather(1, k)[:, 0])


def _prefix_mask(vals: Tensor) -> Tensor:
    """A2 sorted prefix (§3.3): mask [r, m] of the best prefix of sorted rows; θ ≥ 1 − p_(k*)² (§2.4(2))."""
    P, Q = _prefix_sums(vals)                                              # [r, m]
    k = _balanced(P, Q).argmax(-1)                                         # [r]; prefix length k + 1
    return torch.arange(vals.shape[1]) <= k[:, None]


def _greedy_masks(vals: Tensor) -> tuple[Tensor, Tensor]:
    """A2 largest-first greedy fill (§3.3) on sorted rows [r, m]: S and S ∪ {last rejected r}, bool [r, m] each.

    The best S ∪ {r} candidate is the one with the smallest rejected r (all have P > 1/2 and θ falls with P).
    """
    v = vals.numpy()
    half = v.sum(-1) / 2.0                                                 # [r]
    P = np.zeros(v.shape[0])
    take = np.zeros(v.shape, dtype=bool)                                   # [r, m]
    last = np.full(v.shape[0], -1)
    for j in range(v.shape[1]):
        t = P + v[:, j] <= half
        take[:, j] = t
        P = np.where(t, P + v[:, j], P)
        last = np.where(t, last, j)
    plus = take.copy()
    rows = np.nonzero(last >= 0)[0]
    plus[rows, last[rows]] = True
    return torch.from_numpy(take), torch.from_numpy(plus)


def _exchange_mask(vals: Tensor, take: Tensor) -> Tensor:
    """The best single exchange of a subset: ``take ∖ {a} ∪ {b}`` (a ∈ S, b ∉ S, or S itself) whose mass is closest
    to half the row, for sorted rows ``vals [r, m]`` and subsets ``take`` (bool [r, m]).

    Swapping moves p(S) by b − a, so for every b the best a is the member nearest b − (W/2 − p(S)): one binary
    search per key in the members' sorted values, O(m log m) per row, vectorised over rows. The result is only a
    candidate; its θ is evaluated from its own P and Q like every other rule's.
    """
    r, m = vals.shape
    if m < 2:
        return take
    excess = torch.where(take, vals, 0.0).sum(-1) - vals.sum(-1) * 0.5           # [r]  p(S) − W/2
    members, order = torch.where(take, vals, math.inf).sort(-1)                 # [r, m] ascending, members first
    count = take.sum(-1, keepdim=True)                                           # [r, 1]
    target = (vals + excess[:, None]).contiguous()                               # [r, m]  ideal a for each b
    j = torch.searchsorted(members, target)                                      # [r, m]
    cand = torch.stack([(j - 1).clamp(min=0), j.clamp(max=m - 1)], -1)          # [r, m, 2]
    cand = torch.minimum(cand, (count - 1).clamp(min=0)[..., None])             # stay among members
    a_val = members.gather(1, cand.flatten(1)).view(r, m, 2)                     # [r, m, 2]
    moved = (excess[:, None, None] + vals[..., None] - a_val).abs()             # |p(S') − W/2|
    valid = (~take)[..., None] & (count > 0)[..., None] & torch.isfinite(a_val)
    moved = torch.where(valid, moved, math.inf).flatten(1)                       # [r, 2m]
    best = moved.argmin(-1)                                                      # [r]
    better = moved.gather(1, best[:, None])[:, 0] < excess.abs()                 # [r]
    b_idx, which = best // 2, best % 2
    a_idx = order.gather(1, cand[torch.arange(r), b_idx, which][:, None])[:, 0]  # member position in the row
    out = take.clone()
    rows = torch.nonzero(better)[:, 0]
    out[rows, b_idx[rows]] = True
    out[rows, a_idx[rows]] = False
    return out


def _kk_heap(s: np.ndarray, ids: np.ndarray, parent: np.ndarray) -> None:
    """Finish KK with a binary heap (O(n log n)) from values s (sorted descending) and their item ids."""
    heap = list(zip((-s).tolist(), ids.tolist()))                          # ascending: already a heap
    pop, replace = heapq.heappop, heapq.heapreplace
    for _ in range(len(heap) - 1):
        v1, i1 = pop(heap)
        v2, i2 = heap[0]
        replace(heap, (v1 - v2, i1))                                       # −(a − b) for a ≥ b
        parent[i2] = i1


def _kk_round(s: np.ndarray, ids: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One vectorised batch of KK steps on values s (sorted descending) with item ids; returns the new (s, ids).

    Chain: while c = s₀ − s₁ − … − s_{t+1} ≥ s_{t+2}, the heap would keep pairing the running difference with the
    next item (a dominant item absorbing the rest one by one). Pairing: (s₀,s₁), (s₂,s₃), … are what the heap
    pops as long as each second element is at least every difference made earlier in the batch.
    """
    chain = s[0] - np.cumsum(s[1:])                                        # [len − 1]: c_t = s₀ − s₁ − … − s_{t+1}
    ok = chain[:-1] >= s[2:]                                               # c_t pairs with s_{t+2}, stays on top
    steps = ok.size if bool(ok.all()) else int(np.argmin(ok))
    if steps > 0:                                                          # s₁ … s_{steps+1} join s₀'s other side
        parent[ids[1:steps + 2]] = ids[0]
        nv, nid = np.concatenate([chain[steps:steps + 1], s[steps + 2:]]), np.concatenate([ids[:1], ids[steps + 2:]])
    else:
        h = s.size // 2
        d = s[0:2 * h:2] - s[1:2 * h:2]                                    # [h]
        ok = s[3:2 * h:2] >= np.maximum.accumulate(d)[:-1]                 # [h − 1]
        m = h if bool(ok.all()) else 1 + int(np.argmin(ok))
        parent[ids[1:2 * m:2]] = ids[0:2 * m:2]
        nv = np.concatenate([d[:m], s[2 * m:]])
        nid = np.concatenate([ids[0:2 * m:2], ids[2 * m:]])
    order = np.argsort(-nv, kind="stable")                                 # timsort: long sorted tail
    return nv[order], nid[order]


def _kk_parents(v: np.ndarray) -> np.ndarray:
    """Karmarkar–Karp merge tree of one sorted row v [m] (§3.3): parent[j] (the root is its own parent).

    Merging item i2 into i1 (v1 − v2) puts i2's side opposite to i1's, so a key's side is the parity of its depth.
    Steps run in vectorised batches (:func:`_kk_round`); typical rows need O(log m) batches of O(m log m) work.
    The last _KK_HEAP_SIZE items, or a row needing too many batches, finish on a binary heap (O(m log m)).
    """
    parent, ids, s = np.arange(v.size), np.arange(v.size), v
    for _ in range(2 * v.size.bit_length() + 16):
        if s.size <= _KK_HEAP_SIZE:
            break
        s, ids = _kk_round(s, ids, parent)
    _kk_heap(s, ids, parent)
    return parent


def _kk_masks(vals: Tensor, n_keys: Tensor) -> Tensor:
    """Karmarkar–Karp subsets (bool [r, m], sorted order) of sorted rows [r, m] (§3.3).

    Sides come from the merge trees by pointer jumping on depth parity, vectorised over rows: O(r·m log m).
    """
    r, m = vals.shape
    v = vals.numpy()
    parent = np.tile(np.arange(m), (r, 1))                                 # [r, m]; padding keys are roots
    for i, k in enumerate(n_keys.tolist()):
        parent[i, :k] = _kk_parents(v[i, :k])
    par = (parent + m * np.arange(r)[:, None]).ravel()                     # [r·m], flat indices
    odd = (par != np.arange(r * m)).astype(np.int8)                        # [r·m], depth parity
    for _ in range(max(1, (m - 1).bit_length())):
        odd ^= odd[par]
        par = par[par]
    return torch.from_numpy(odd.reshape(r, m) == 0)


def _topk_refine(vals: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A3 (§3.4) on sorted rows [r, m]: θ_hi [r] and the best concrete subset [r, m] (sorted order).

    With T the k largest keys and r = Σ rest: 2·W·dist_A = max(|p(A) − p(T∖A)| − r, 0), θ_hi = 1 − (2 g_lo/W)².
    The _TOPK_CANDIDATES subsets A with the smallest |p(A) − p(T∖A)| are extended by the prefix of the rest
    closest to W/2 − p(A); when θ_hi < 1 the best of them is exact.
    """
    m = vals.shape[1]
    k = min(k, m)
    full = (1 << k) - 1
    hi, masks = [], []
    for v in vals.split(max(1, _CHUNK_ELEMS // (1 << k))):
        pa = _subset_sums(v[:, :k])                                        # [c, 2^k]
        gap = pa.mul(2.0).sub_(v[:, :k].sum(-1, keepdim=True)).abs_()     # [c, 2^k]: |p(A) − p(T∖A)|
        g, cand = gap.topk(min(_TOPK_CANDIDATES, 1 << k), -1, largest=False)  # [c, nc]
        del gap
        rest = v[:, k:].sum(-1, keepdim=True)                              # [c, 1]
        hi.append(1.0 - ((g[:, 0] - rest[:, 0]).clamp_min(0.0) / v.sum(-1)) ** 2)
        cr = torch.cat([torch.zeros_like(rest), v[:, k:].cumsum(-1)], -1)  # [c, m − k + 1]
        a = cand.repeat_interleave(2, dim=1)                               # [c, 2·nc]
        pc, qc = pa.gather(1, a), pa.gather(1, full - a)                   # [c, 2·nc]: p(A), p(T∖A)
        target = ((qc + rest - pc) / 2.0).clamp(min=0.0).minimum(rest)     # [c, 2·nc]: W/2 − p(A) in [0, r]
        j = torch.searchsorted(cr, target).clamp(max=m - k)                # [c, 2·nc]
        j[:, 1::2] = (j[:, 1::2] - 1).clamp(min=0)                         # the prefix just below the target
        disc = (pc - qc - rest + 2.0 * cr.gather(1, j)).abs()              # [c, 2·nc]: |P − Q|
        best = disc.argmin(-1, keepdim=True)                               # [c, 1]
        jb, ab = j.gather(1, best)[:, 0], a.gather(1, best)[:, 0]          # [c], [c]
        masks.append(torch.cat([_bits_to_mask(ab, k), torch.arange(m - k) < jb[:, None]], -1))
    return torch.cat(hi), torch.cat(masks)


def _bound_hard_rows(vals: Tensor, n_keys: Tensor, top_k: int, use_kk: bool, tol: float = 0.0) -> tuple[Tensor, ...]:
    """A2 + A3 (§3.3 step 3, §3.4) on sorted non-peaked rows [r, m]: (lo subset [r, m], lo_rule, hi, hi_rule).

    θ_lo is the best concrete subset of prefix, greedy (and two best exchanges), KK and the A3 extension (ties go
    to the earlier rule). With ``tol`` = 0 every row gets A3, then KK where A3 left θ_hi = 1 and no rule reached 1.
    With ``tol`` > 0 (the scan's refinement) each step after the O(m) fills runs only on rows still more than ``tol``
    below 1: the exchanges, then KK, whose O(m log m) closes most near-balanced rows, then A3 (2^k sums per row) for
    its θ_hi.
    """
    greedy, plus = _greedy_masks(vals)
    masks = [_prefix_mask(vals), greedy, plus]
    rules = [ThetaRule.PREFIX, ThetaRule.GREEDY, ThetaRule.GREEDY]
    values = torch.stack([_balanced(*_split_sums(vals, s)) for s in masks], -1)  # [r, c]
    hi = torch.ones(vals.shape[0], dtype=torch.float64)                    # [r]

    def add(mask: Tensor, rule: ThetaRule) -> Tensor:
        masks.append(mask)
        rules.append(rule)
        return torch.cat([values, _balanced(*_split_sums(vals, mask))[:, None]], -1)

    exchanged = greedy.clone()                          # two best exchanges of the greedy fill, where still wide
    todo = torch.nonzero(values.amax(-1) < 1.0 - tol)[:, 0] if tol > 0 else torch.arange(vals.shape[0])
    if todo.numel():
        exchanged[todo] = _exchange_mask(vals[todo], _exchange_mask(vals[todo], greedy[todo]))
    values = add(exchanged, ThetaRule.GREEDY)

    def kk_on(todo: Tensor) -> Tensor:
        kk = torch.zeros(vals.shape, dtype=torch.bool)                     # [r, m]
        kk[todo] = _kk_masks(vals[todo], n_keys[todo])
        return kk

    if use_kk and tol > 0:                # refinement: KK (O(m log m)) first, A3 (2^k) only where KK left a gap
        values = add(kk_on(torch.nonzero(values.amax(-1) < 1.0 - tol)[:, 0]), ThetaRule.KK)
    if top_k > 0:
        need = torch.ones_like(hi, dtype=torch.bool) if tol <= 0 else values.amax(-1) < 1.0 - tol
        rows = torch.nonzero(need)[:, 0]
        topk_mask = torch.zeros(vals.shape, dtype=torch.bool)             # rows not refined: the empty set
        if rows.numel():
            hi[rows], topk_mask[rows] = _topk_refine(vals[rows], top_k)
        values = add(topk_mask, ThetaRule.TOPK)
    if use_kk and tol <= 0:
        values = add(kk_on(torch.nonzero((hi >= 1.0) & (values.amax(-1) < 1.0))[:, 0]), ThetaRule.KK)
    best = values.argmax(-1)                                               # [r]
    mask = torch.stack(masks, 1)[torch.arange(vals.shape[0]), best]        # [r, m]
    lo_rule = torch.tensor([int(x) for x in rules], dtype=torch.int8)[best]
    hi_rule = torch.where(hi < 1.0, int(ThetaRule.TOPK), int(ThetaRule.TRIVIAL)).to(torch.int8)
    return mask, lo_rule, hi, hi_rule


def _split_sums(vals: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(P, Q) = (Σ_S, Σ_{S^c}) of rows [r, m] for subsets mask [r, m], each accumulated separately (§3.1)."""
    return torch.where(mask, vals, 0.0).sum(-1), torch.where(mask, 0.0, vals).sum(-1)


def _check_options(top_k: int, exact_max_keys: int, slack: float) -> None:
    """Reject option values outside the ranges the algorithms support (§3.2, §3.4)."""
    for name, value in (("top_k", top_k), ("exact_max_keys", exact_max_keys)):
        if not 0 <= value <= EXACT_MAX_KEYS:
            raise ValueError(f"{name} must be in [0, {EXACT_MAX_KEYS}], got {value}")
    if not 0.0 <= slack < 1.0:
        raise ValueError(f"slack must be in [0, 1), got {slack}")


def _classify_rows(vals: Tensor, n_keys: Tensor, exact_max_keys: int) -> tuple[Tensor, Tensor, Tensor]:
    """A2 routing (§3.3) of sorted rows [R, n]: peaked (p_max ≥ Σ_{j≠argmax} p_j, i.e. ≥ 1/2), A1, rest; bool [R]."""
    multi = n_keys >= 2
    peaked = multi & (vals[:, 0] >= vals[:, 1:].sum(-1)) if vals.shape[1] > 0 else multi
    exact = multi & ~peaked & (n_keys <= exact_max_keys)
    return peaked, exact, multi & ~peaked & ~exact


def compute_theta_interval(p: Tensor, top_k: int = DEFAULT_TOP_K, exact_max_keys: int = EXACT_MAX_KEYS,
                           slack: float = THETA_SLACK, use_kk: bool = True, tol: float = 0.0) -> ThetaInterval:
    """Certified [θ_lo, θ_hi] for every row of p [R, n] by the A2 policy (§3.3) with A1 (§3.2) and A3 (§3.4).

    Order: n_keys ≤ 1 → 0; p_max ≥ 1/2 → exact closed form; n_keys ≤ exact_max_keys → A1; otherwise A2 heuristics
    for θ_lo and A3 with ``top_k`` for θ_hi (top_k=0 disables A3 and exact_max_keys=0 disables A1, for T6/T7).
    θ_lo is re-evaluated on the input row from the returned subset; ``slack`` (`theta_slack`, §3.1) is then
    subtracted from θ_lo and added to θ_hi, clamped to [0, 1]. ``tol`` > 0 skips KK on rows whose interval is
    already that narrow (the scan's refinement tolerance); the result is still certified, only less tight.
    Cost: O(R·n log n) plus R·2^top_k sums; KK is a per-row loop of O(log n) vectorised numpy batches.
    """
    _check_options(top_k, exact_max_keys, slack)
    p64 = _as_rows(p)
    vals, perm, n_keys = _sort_rows(p64)                                   # [R, n], [R, n], [R]
    peaked, exact, hard = _classify_rows(vals, n_keys, exact_max_keys)     # [R] each
    mask = torch.zeros(p64.shape, dtype=torch.bool)                        # [R, n], sorted order
    hi = torch.zeros(p64.shape[0], dtype=torch.float64)                    # [R], A3 value on hard rows
    rule = torch.full_like(n_keys, int(ThetaRule.SINGLE), dtype=torch.int8)
    rule[peaked], rule[exact] = int(ThetaRule.PEAKED), int(ThetaRule.EXACT)
    lo_rule, hi_rule = rule, rule.clone()
    mask[peaked, 0] = True
    if bool(exact.any()):
        mask[exact] = _exact_sorted(vals[exact], n_keys[exact])[1]
    m = int(n_keys[hard].max()) if bool(hard.any()) else 1
    for rows in torch.nonzero(hard)[:, 0].split(max(1, 4 * _CHUNK_ELEMS // m)):   # bounds [rows, m] temporaries
        sub, lo_rule[rows], hi[rows], hi_rule[rows] = _bound_hard_rows(
            vals[rows, :m].contiguous(), n_keys[rows], top_k, use_kk, tol)
        mask[rows[:, None], torch.arange(m)] = sub
    subset = torch.zeros_like(mask).scatter(1, perm, mask) & (p64 > 0)     # [R, n], input order
    lo = _balanced(*_split_sums(p64, subset))                              # [R]
    # exact rules: θ_hi is the attained value; A3: never below the attained θ_lo (rounding)
    hi = torch.where(hi_rule == int(ThetaRule.TOPK), torch.maximum(hi, lo), lo)
    hi = torch.where(hi_rule == int(ThetaRule.TRIVIAL), 1.0, hi)
    pmax = vals[:, 0] if vals.shape[1] > 0 else torch.zeros_like(hi)
    return ThetaInterval(lo=(lo - slack).clamp(0.0, 1.0), hi=(hi + slack).clamp(0.0, 1.0), lo_rule=lo_rule,
                         hi_rule=hi_rule, pmax=pmax, n_keys=n_keys, subset=subset,
                         exact=(hi - lo) <= EXACT_WIDTH, slack=float(slack))
