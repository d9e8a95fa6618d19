"""Upper bounds on the block-(inf,2) Lipschitz constant of multi-head attention (THEORY §5).

General form (§5.2, derived; biases, RoPE, partial rotary, GQA, any scale ``s``), per query head ``h`` with its
key/value head ``g = g(h)``::

    Lambda_h = ||W^Q_h|| (||W^K_g|| R2 + beta^K_g) + ||W^K_g|| (||W^Q_h|| R2 + ||b^Q_h||)
    c_h      = ||W^V_g|| (1 + s theta_h Lambda_h R2)
    L_MHA   <= ||W^O|| sum_h c_h        (also ||W^O|| (sum_h c_h^2)^(1/2) and sum_h ||W^O_h|| c_h, §5.5)

``beta^K_g`` is the norm of the rotary coordinates of ``b^K_g`` (pass-through coordinates cancel, §5.4); under a logit
soft-cap (§18.5) no row constant may be shifted out, so it is the norm of all of ``b^K_g`` and tier 2r's key spread
is ``max_j ||k_j||`` (centre 0), never the centred ``k_bar_i`` form; θ comes from the capped probabilities. With a
sink logit (§18.4) rows sum to m < 1, so neither centring holds: the key terms are those of the cap, the value
magnitude is ``M_V = ||W^V_g|| R2 + ||b^V_g||`` (centre 0, ``b^V`` no longer cancels) and tier 2r's value spread is
``max_j ||v_j||``; θ is θ_sink of the model's rows, and the value pathway keeps ``||W^V_g||`` (sub-stochastic mixing
is non-expansive). Tier 1 uses
``theta = 1`` and the reset radius; tier 2 the measured radius and ``theta_tilde_hi`` (§5.2, §8). The activation-norm
form (tier 2r, §5.5) uses the measured ``q, k, v`` row by row.

Everything is written through the projection constants of §18.1, ``Lambda_h = L_Q M_K + M_Q L_K`` and
``c_h = L_V + s theta_h Lambda_h M_V``: for a plain linear map ``L = ||W||`` and ``M = ||W|| R2 + ||b||`` (the line
above, where the centred value map has ``M_V = ||W^V_g|| R2``); with a q/k norm on the projections (§18.2) ``M`` is the norm's reset radius, independent of the input, and
``L = ||W|| ||gamma||_inf / sqrt(stat + eps)`` with the norm statistic's minimum over the tokens (0 in tier 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from attnstab_cli.arch.spec import NormKind, QKNorm
from attnstab_cli.metrics.lipschitz._linalg import head_rows, head_slices
from attnstab_cli.metrics.lipschitz.mla import MLANorms, compute_mla_norms
from attnstab_cli.metrics.lipschitz.norms import compute_reset_radius
from attnstab_cli.metrics.spectral import spectral_norm_value as spectral_norm
from attnstab_cli.model.masks import compute_allowed
from attnstab_cli.reference.attention_rows import compute_masked_softmax
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.weights import LayerWeights, NormWeights

F64 = torch.float64


@dataclass(frozen=True)
class NormedProjection:
    """A q or k map ``x -> N(x W + b)`` with the norm on the projections (THEORY §18.2)."""

    gain: float           # ||gamma||_inf of the norm
    eps: float
    radius: float         # reset radius of the norm output: a bound on every head's ||q_h|| (||k_g||), any input
    lin: torch.Tensor     # [H | H_kv] ||W_h||_2 per head (per-head norm), or the full ||W||_2 (full width)

    @classmethod
    def of(cls, norm: NormWeights, kind: NormKind, eps: float, per_head: torch.Tensor,
           full: torch.Tensor | float, mode: QKNorm) -> "NormedProjection":
        """Per-head norms use each head's own matrix; a full-width norm couples the heads, so every head takes the
        full matrix's norm (§18.2)."""
        lin = per_head if mode is QKNorm.PER_HEAD else torch.full_like(per_head, float(full))
        gain = float(norm.weight.to(F64).abs().max())
        return cls(gain, eps, compute_reset_radius(norm, kind), lin)

    def lipschitz(self, stat: torch.Tensor | None) -> torch.Tensor:
        """``L = ||W|| ||gamma||_inf / sqrt(stat + eps)`` per head; ``stat`` the smallest statistic over the tokens
        (``[heads]`` or a scalar), None on every input (statistic 0)."""
        floor = torch.zeros((), dtype=F64) if stat is None else stat.to(F64).clamp_min(0.0)
        return self.lin * self.gain / torch.sqrt(floor + self.eps)

    def to(self, device: torch.device | str) -> "NormedProjection":
        return replace(self, lin=self.lin.to(device))


@dataclass(frozen=True)
class QKStats:
    """Per-sequence minima of the q/k norm statistics (tier 2): ``[H]`` / ``[H_kv]`` per head, scalars full width;
    under MLA scalars of the q and kv latents (q None without a q rank)."""

    q: torch.Tensor | None
    k: torch.Tensor

    def to(self, device: torch.device | str) -> "QKStats":
        return QKStats(None if self.q is None else self.q.to(device), self.k.to(device))


@dataclass(frozen=True)
class HeadNorms:
    """Weight-only inputs of §5.2 for one layer, float64 (``g(h) = h // (H / H_kv)``)."""

    wq: torch.Tensor          # [H]       ||W^Q_h||_2
    wk: torch.Tensor          # [H_kv]    ||W^K_g||_2
    wv: torch.Tensor          # [H_kv]    ||W^V_g||_2
    wo: float                 #           ||W^O||_2 of the full output projection
    wo_heads: torch.Tensor    # [H]       ||W^O_h||_2 of the row blocks
    bq: torch.Tensor          # [H]       ||b^Q_h||_2
    bk_rot: torch.Tensor      # [H_kv]    beta^K_g: norm of the rotary coordinates of b^K_g (all of b^K_g if capped)
    bk_pass: torch.Tensor     # [H_kv, D] b^K_g with its rotary coordinates zeroed (centre for tier 2r; 0 if capped)
    bv: torch.Tensor          # [H_kv, D] b^V_g (zeros without bias)
    head_dim: int
    q_normed: NormedProjection | None = None   # q/k norms on the projections (§18.2); the biases above then sit
    k_normed: NormedProjection | None = None   # inside the norm and take no part in the constants
    logit_cap: float | None = None   # soft-capped logits (§18.5): no row-constant shift in the key terms
    sinks: bool = False              # sink logits (§18.4): rows sum to m < 1, no centring of keys or values
    mla: MLANorms | None = None      # latent attention (§18.8): its constants replace the linear ones

    @property
    def n_heads(self) -> int:
        return self.wq.shape[0]

    @property
    def group(self) -> int:
        return self.n_heads // self.wk.shape[0]

    def per_query(self, t: torch.Tensor) -> torch.Tensor:
        """Expand a per-K/V-head tensor ``[H_kv, ...]`` to the query heads ``[H, ...]``."""
        return t.repeat_interleave(self.group, dim=0)

    def to(self, device: torch.device | str) -> "HeadNorms":
        """The same norms with every tensor on ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("wq", "wk", "wv", "wo_heads", "bq", "bk_rot", "bk_pass", "bv")}
        normed = {f: getattr(self, f).to(device) for f in ("q_normed", "k_normed", "mla")
                  if getattr(self, f) is not None}
        return replace(self, **moved, **normed)


def compute_head_norms(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                       bq: torch.Tensor | None, bk: torch.Tensor | None, bv: torch.Tensor | None,
                       n_heads: int, n_kv_heads: int, rotary_dim: int = 0,
                       logit_cap: float | None = None, sinks: bool = False) -> HeadNorms:
    """Spectral and bias norms per head from row-convention weights ``wq [d, H*D]``, ``wk, wv [d, H_kv*D]``,
    ``wo [H*D, d]``; ``rotary_dim`` is the number of rotated coordinates per head (0 without RoPE). With a
    ``logit_cap`` or ``sinks`` the key bias enters whole (``bk_rot`` = ||b^K_g||, ``bk_pass`` = 0; §18.4, §18.5)."""
    head_dim = wq.shape[1] // n_heads
    zeros_q, zeros_kv = torch.zeros(n_heads, head_dim, dtype=F64), torch.zeros(n_kv_heads, head_dim, dtype=F64)
    bq_h = zeros_q if bq is None else bq.to(F64).reshape(n_heads, head_dim)             # [H, D]
    bk_g = zeros_kv if bk is None else bk.to(F64).reshape(n_kv_heads, head_dim)         # [H_kv, D]
    bv_g = zeros_kv if bv is None else bv.to(F64).reshape(n_kv_heads, head_dim)         # [H_kv, D]
    bk_pass = bk_g.clone()
    bk_pass[:, :rotary_dim] = 0.0
    shifted = bk_g[:, :rotary_dim]                      # the coordinates no row-constant shift removes
    if logit_cap is not None or sinks:
        bk_pass, shifted = torch.zeros_like(bk_g), bk_g
    return HeadNorms(
        wq=spectral_norm(head_slices(wq, n_heads)), wk=spectral_norm(head_slices(wk, n_kv_heads)),
        wv=spectral_norm(head_slices(wv, n_kv_heads)), wo=float(spectral_norm(wo)),
        wo_heads=spectral_norm(head_rows(wo, n_heads)),
        bq=torch.linalg.vector_norm(bq_h, dim=-1), bk_rot=torch.linalg.vector_norm(shifted, dim=-1),
        bk_pass=bk_pass, bv=bv_g, head_dim=head_dim, logit_cap=logit_cap, sinks=sinks,
    )


def compute_layer_head_norms(w: LayerWeights, cfg: ModelConfig) -> HeadNorms:
    """:func:`compute_head_norms` for one loaded layer, with its q/k norms (§18.2) when the layout has them; latent
    attention through :func:`compute_mla_head_norms`."""
    if w.latent:
        return compute_mla_head_norms(w, cfg)
    rotary = cfg.rope.rotary_dim if cfg.rope is not None else 0
    norms = compute_head_norms(w.wq, w.wk, w.wv, w.wo, w.bq, w.bk, w.bv, cfg.n_heads, cfg.n_kv_heads, rotary,
                               cfg.attn_logit_cap, sinks=w.sinks is not None)
    mode = cfg.layout.qk_norm
    if mode is None:
        return norms
    full = mode is QKNorm.FULL_WIDTH
    q = NormedProjection.of(w.q_norm, cfg.layout.norm, cfg.norm_eps, norms.wq,
                            spectral_norm(w.wq) if full else 0.0, mode)
    k = NormedProjection.of(w.k_norm, cfg.layout.norm, cfg.norm_eps, norms.wk,
                            spectral_norm(w.wk) if full else 0.0, mode)
    return replace(norms, q_normed=q, k_normed=k, bk_pass=torch.zeros_like(norms.bk_pass))


def compute_mla_head_norms(w: LayerWeights, cfg: ModelConfig) -> HeadNorms:
    """Head norms of a latent-attention layer (§18.8): the per-head columns are the up-projection blocks' norms
    (``wq`` of W^Q_h or W_qb,h, ``wk`` of W^nope_kvb,h, ``wv`` of W^V_kvb,h); the constants come from ``mla``. No
    per-head biases: the centres of tier 2r are 0 (the shared rotary key bias enters M_K whole)."""
    mla = compute_mla_norms(w, cfg)
    h, dk, dv = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
    return HeadNorms(wq=mla.wq, wk=mla.wk_nope, wv=mla.wv, wo=float(spectral_norm(w.wo)),
                     wo_heads=spectral_norm(head_rows(w.wo, h)), bq=torch.zeros(h, dtype=F64),
                     bk_rot=torch.full((h,), mla.b_rope, dtype=F64), bk_pass=torch.zeros(h, dk, dtype=F64),
                     bv=torch.zeros(h, dv, dtype=F64), head_dim=dk, mla=mla)


@dataclass(frozen=True)
class MHABound:
    """The general-form bound of §5.2 and its parts (per-head tensors ``[H]``, float64)."""

    lambda_h: torch.Tensor               # [H] logit-sensitivity factor
    phi_h: torch.Tensor                  # [H] Lambda_h M_V / sqrt(d_k) (paper's Phi_h, l2 units; M_V = ||W^V_g|| R2
                                         # without sinks)
    head_term_calibrated: torch.Tensor   # [H] c_h
    mha_value_path: float                # ||W^O|| sum_h ||W^V_g||
    mha_attn_path: float                 # ||W^O|| sum_h s theta_h Lambda_h M_V
    lip_mha: float                       # ||W^O|| sum_h c_h (paper aggregation)
    lip_mha_l2: float                    # ||W^O|| (sum_h c_h^2)^(1/2)
    lip_mha_block: float                 # sum_h ||W^O_h|| c_h
    logit_bound: float                   # max_h s M_Q,h M_K,g: a bound on every |s q.k| (§18.2), uncentred keys


@dataclass(frozen=True)
class ProjectionConstants:
    """``L`` and ``M`` of the q, k and v maps per query head (§18.1): ``[H]`` each, float64."""

    lq: torch.Tensor
    mq: torch.Tensor
    lk: torch.Tensor
    mk: torch.Tensor          # centred keys (the row-constant shift of §5.3 step 2; uncentred under a cap or sinks)
    mk_raw: torch.Tensor      # a bound on ||k_g|| itself (the logit bound)
    lv: torch.Tensor          # L_V
    mv: torch.Tensor          # M^c_V: bounds ||v_j - c_V|| (centre b^V for linear maps; centre 0 with sinks, §18.4)


def compute_projection_constants(norms: HeadNorms, r2: float, stats: QKStats | None = None) -> ProjectionConstants:
    """The q/k/v constants at radius ``r2``: linear maps (§5.2), normalized q/k (§18.2) or latent attention (§18.8),
    local at ``stats``."""
    if norms.mla is not None:
        lq, mq, lk, mk, lv, mv = norms.mla.constants(r2, None if stats is None else stats.q,
                                                     None if stats is None else stats.k)
        return ProjectionConstants(lq, mq, lk, mk, mk, lv, mv)
    wk, wv = norms.per_query(norms.wk), norms.per_query(norms.wv)
    if norms.q_normed is None:
        lq, mq = norms.wq, norms.wq * r2 + norms.bq
    else:
        lq = norms.q_normed.lipschitz(None if stats is None else stats.q).expand(norms.n_heads)
        mq = torch.full_like(lq, norms.q_normed.radius)
    if norms.k_normed is None:
        bk_full = torch.sqrt(norms.bk_rot ** 2 + norms.bk_pass.pow(2).sum(-1))
        lk, mk, mk_raw = wk, wk * r2 + norms.per_query(norms.bk_rot), wk * r2 + norms.per_query(bk_full)
    else:
        lk_kv = norms.k_normed.lipschitz(None if stats is None else stats.k).expand(norms.wk.shape[0])
        lk = norms.per_query(lk_kv)
        mk = mk_raw = torch.full_like(lk, norms.k_normed.radius)
    mv = wv * r2
    if norms.sinks:                                      # §18.4 (ii): b^V does not cancel
        mv = mv + norms.per_query(torch.linalg.vector_norm(norms.bv, dim=-1))
    return ProjectionConstants(lq, mq, lk, mk, mk_raw, wv, mv)


def _lambda(pc: ProjectionConstants) -> torch.Tensor:
    return pc.lq * pc.mk + pc.mq * pc.lk


def _head_terms(pc: ProjectionConstants, lam: torch.Tensor, theta_h: torch.Tensor, scale: float) -> torch.Tensor:
    """``c_h = L_V + s theta_h Lambda_h M_V`` (§18.1)."""
    return pc.lv + scale * theta_h * lam * pc.mv


def compute_lambda_h(norms: HeadNorms, r2: float, stats: QKStats | None = None) -> torch.Tensor:
    """``Lambda_h = L_Q M_K + M_Q L_K`` (§5.2, §18.1) for every query head: ``[H]``."""
    return _lambda(compute_projection_constants(norms, r2, stats))


def compute_head_terms(norms: HeadNorms, theta: torch.Tensor | float, r2: float, scale: float,
                       stats: QKStats | None = None) -> torch.Tensor:
    """``c_h = L_V + s theta_h Lambda_h M_V`` (§5.2, §18.1; ``||W^V_g|| (1 + s theta_h Lambda_h R2)`` without sinks):
    ``[H]``; ``theta`` is ``[H]`` or a scalar."""
    theta_h = torch.as_tensor(theta, dtype=F64).expand(norms.n_heads)
    pc = compute_projection_constants(norms, r2, stats)
    return _head_terms(pc, _lambda(pc), theta_h, scale)


def compute_mha_bound(norms: HeadNorms, theta: torch.Tensor | float, r2: float, scale: float,
                      stats: QKStats | None = None) -> MHABound:
    """Evaluate §5.2 at radius ``r2`` with per-head ``theta`` (1 for tier 1, ``theta_tilde_hi`` for tier 2); q/k
    norm constants are local at ``stats`` (tier 2) or global without (tier 1)."""
    theta_h = torch.as_tensor(theta, dtype=F64).expand(norms.n_heads)
    pc = compute_projection_constants(norms, r2, stats)
    lam = _lambda(pc)
    c = _head_terms(pc, lam, theta_h, scale)                                            # [H]
    attn = float(norms.wo * (scale * theta_h * lam * pc.mv).sum())
    return MHABound(
        lambda_h=lam, phi_h=lam * pc.mv / math.sqrt(norms.head_dim), head_term_calibrated=c,
        mha_value_path=float(norms.wo * pc.lv.sum()), mha_attn_path=attn, lip_mha=float(norms.wo * c.sum()),
        lip_mha_l2=float(norms.wo * torch.linalg.vector_norm(c)), lip_mha_block=float((norms.wo_heads * c).sum()),
        logit_bound=float(scale * (pc.mq * pc.mk_raw).max()),
    )


def compute_attention_allowed(t: int, causal: bool, window: int | None,
                              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's key sets ``K(i)`` as a boolean ``[T, T]`` (True = attend), one sequence (``mask [T]``)."""
    kpm = None if key_padding_mask is None else key_padding_mask.reshape(1, t).bool().cpu()
    return compute_allowed(0, t, t, t, causal=causal, window=window, key_padding_mask=kpm, device="cpu")[0, 0]


def compute_attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float,
                                    allowed: torch.Tensor, logit_cap: float | None = None,
                                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax rows ``[H, T_q, T_k]`` in float64 from ``q [H, T_q, D]``, ``k [H, T_k, D]`` (already expanded), of
    the logits ``s q.k`` or, with a ``logit_cap`` c, ``c tanh(s q.k / c)``; ``sinks [H]`` join each row of their
    head (§18.4: the rows then sum to m < 1)."""
    logits = scale * q.to(F64) @ k.to(F64).transpose(-1, -2)                           # [H, T_q, T_k]
    if logit_cap is not None:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    sink = None if sinks is None else sinks.to(logits.device, F64)[:, None].expand(logits.shape[:-1])
    return compute_masked_softmax(logits, allowed, sink)


@dataclass(frozen=True)
class RefinedMHABound:
    """Activation-norm form (tier 2r, §5.5) at one sequence."""

    lip_mha_refined: float       # max_i ||W^O|| (sum_h c_{h,i}^2)^(1/2)
    row_terms: torch.Tensor      # [T]    ||W^O|| (sum_h c_{h,i}^2)^(1/2), the tier-3 candidate score (§8.3)
    head_row_terms: torch.Tensor  # [H, T] c_{h,i}
    key_spread: torch.Tensor     # [H, T] K_i
    value_spread: torch.Tensor   # [H, T] V_i


def _max_distance(centres: torch.Tensor, points: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``max_{j allowed} ||points_j − centres_i||`` as ``[H, c]`` for ``centres [H, c, D]``, ``points [H, T, D]``,
    ``allowed [c, T]``, all float64, through one matmul: ||k||² − 2 k·c + ||c||² (never below 0), raised by the
    rounding bound γ_{D+3}(||k|| + ||c||)² of that form, so the result stays an upper bound."""
    sq = points.pow(2).sum(-1)                                                          # [H, T]
    g = torch.baddbmm(sq[:, None, :], centres, points.transpose(1, 2), alpha=-2.0)     # [H, c, T]
    g.masked_fill_(~allowed, float("-inf"))
    c_sq = centres.pow(2).sum(-1)                                                       # [H, c]
    n = centres.shape[-1] + 3
    gamma = n * 2.0 ** -53 / (1.0 - n * 2.0 ** -53)
    reach = (sq.amax(-1, keepdim=True).sqrt() + c_sq.sqrt()) ** 2                      # [H, c]
    return (g.amax(-1) + c_sq + gamma * reach).clamp_min(0.0).sqrt()


def _masked_key_max(values: torch.Tensor, allowed: torch.Tensor, causal_rows: slice | None) -> torch.Tensor:
    """``max_{j allowed} values_j`` as ``[H, c]`` for per-key ``values [H, T]``; on a plain causal mask (rows given
    as ``causal_rows``) the running maximum, else a masked maximum over ``allowed [c, T]``."""
    if causal_rows is not None:
        return values.cummax(dim=-1).values[:, causal_rows]
    return values[:, None, :].masked_fill(~allowed, float("-inf")).amax(dim=-1)


def _spreads(p: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, norms: HeadNorms, allowed: torch.Tensor,
             causal_rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``K_i`` and ``V_i`` of §5.5 for a block of query rows: ``[H, c]`` each (p ``[H, c, T]``, k, v ``[H, T, D]``);
    under a logit cap or sinks ``K_i = max_j ||k_j||`` (§18.5, §18.4: the row-constant shift behind the centred forms
    is gone), with sinks also ``V_i = max_j ||v_j||`` (§18.4: rows sum to m < 1, so no value centre cancels)."""
    k_pass = torch.linalg.vector_norm(k - norms.per_query(norms.bk_pass)[:, None], dim=-1)   # [H, T]
    if norms.sinks:
        return (_masked_key_max(k_pass, allowed, causal_rows),
                _masked_key_max(torch.linalg.vector_norm(v, dim=-1), allowed, causal_rows))
    o = p @ v                                                                           # [H, c, D]
    v_bias = torch.linalg.vector_norm(v - norms.per_query(norms.bv)[:, None], dim=-1)        # [H, T]
    key = _masked_key_max(k_pass, allowed, causal_rows)
    if norms.logit_cap is None:
        key = torch.minimum(_max_distance(p @ k, k, allowed), key)
    val = torch.minimum(_max_distance(o, v, allowed), _masked_key_max(v_bias, allowed, causal_rows))
    return key, val


def compute_mha_refined(norms: HeadNorms, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        allowed: torch.Tensor, theta_hi: torch.Tensor, block: int = 256,
                        stats: QKStats | None = None) -> RefinedMHABound:
    """Tier-2r bound from one sequence's ``q [H, T, D]``, ``k, v [H_kv, T, D]`` (biased, rotated), the key sets
    ``allowed [T, T]`` and certified per-row ``theta_hi [H, T]``; rows are processed ``block`` at a time; q/k norm
    constants are local at ``stats`` (§18.1: ``L_Q``, ``L_K`` in place of ``||W^Q_h||``, ``||W^K_g||``); with sinks
    the spreads are uncentred (:func:`_spreads`, §18.4) and ``theta_hi`` must be θ_sink of the model's rows. Under a
    logit cap the attention term of row i carries the factor ``max_j sech^2(s q_i.k_j / c) <= 1`` (§18.5): at this
    input each capped logit moves by sech^2 times its raw logit's move."""
    q64, norms = q.to(F64), norms.to(q.device)
    k64, v64 = norms.per_query(k.to(F64)), norms.per_query(v.to(F64))                 # [H, T, D]
    allowed = allowed.to(q.device)
    t = allowed.shape[-1]
    causal = allowed.shape[0] == t and torch.equal(allowed, torch.ones_like(allowed).tril())
    pc = compute_projection_constants(norms, 0.0, None if stats is None else stats.to(q.device))
    wq, wk, wv = pc.lq[:, None], pc.lk[:, None], pc.lv[:, None]                        # L_Q, L_K, L_V: [H, 1]
    keys, vals, slopes = [], [], []
    for start in range(0, q64.shape[1], block):
        rows = slice(start, start + block)
        seen = torch.nonzero(allowed[rows].any(0))[:, 0]                              # keys any row of the block sees
        lo, hi = (int(seen[0]), int(seen[-1]) + 1) if seen.numel() else (0, 1)
        band = allowed[rows, lo:hi]                          # causal / windowed: the keys outside are never scored
        p = None if norms.sinks else compute_attention_probabilities(q64[:, rows], k64[:, lo:hi], scale, band,
                                                                     norms.logit_cap)   # [H, c, T]; unused w/ sinks
        key, val = _spreads(p, k64[:, lo:hi], v64[:, lo:hi], norms, band, rows if causal else None)
        keys.append(key)
        vals.append(val)
        if norms.logit_cap is not None:
            raw = scale * q64[:, rows] @ k64[:, lo:hi].transpose(-1, -2)               # [H, c, T_band]
            sech2 = torch.cosh(raw / norms.logit_cap).pow(-2).clamp_max(1.0)
            slopes.append(sech2.masked_fill(~band, 0.0).amax(dim=-1))                  # [H, c]
    key_spread, value_spread = torch.cat(keys, dim=1), torch.cat(vals, dim=1)           # [H, T]
    slope = torch.cat(slopes, dim=1) if slopes else 1.0                                 # [H, T] or 1
    q_norm = torch.linalg.vector_norm(q64, dim=-1)                                      # [H, T]
    c = wv + scale * theta_hi.to(F64) * slope * (wq * key_spread + wk * q_norm) * value_spread  # [H, T]
    rows_bound = norms.wo * torch.linalg.vector_norm(c, dim=0)                          # [T]
    return RefinedMHABound(float(rows_bound.max()), rows_bound, c, key_spread, value_spread)
