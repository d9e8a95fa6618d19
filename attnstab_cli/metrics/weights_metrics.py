"""Weight-only metrics of one layer: head-slice norms, the RoPE-aware bilinear norm, condition numbers, layer products.

Per (layer, head) (THEORY §0.3): ``wq_norm``, ``wk_norm``, ``wv_norm``, ``wo_norm`` (§5.1; K/V of the shared head
g(h) = h // (H / H_kv), ``W^O_h`` = row block), ``bq_norm``, ``bk_rot_norm`` (§5.4: rotary coordinates of ``b^K_g``),
``qk_norm`` (§5.5: ``max_Delta ||W^Q_h P_Delta W^K_g^T||_2`` under RoPE via QR factors, else ``||W^Q_h W^K_g^T||_2``),
``proj_product`` (§5.2, full ``||W^O||``) and ``kappa_wq``, ``kappa_wk``, ``kappa_wv`` (§14, no ridge).

Per layer: full-matrix norms, ``proj_product_layer`` (§12), ``alpha_geo`` = Pi^(1/4) (§10), ``kappa_eff`` (§13,
ridge 1e-6; gated FFN: W1 = [W_g W_u], W2 = W_d), FFN norms (§6; ``||.||_{2->inf}`` of gate/up for §6.2), norm-layer
stats (§4) and ``norm_eps``. Per model: ``depth_budget`` = N max_l Pi_l (§10).

All math runs in float64 on the weights' device. Spectral norms of full matrices come from
:func:`~attnstab_cli.metrics.spectral.spectral_norm_value` (certified: exact SVD, Gram eigenvalue bracket or
power iteration, by size).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from attnstab_cli.arch.spec import FFNKind
from attnstab_cli.errors import InputError
from attnstab_cli.metrics.lipschitz._linalg import head_rows, head_slices
from attnstab_cli.metrics.lipschitz.mla import mla_head_blocks
from attnstab_cli.metrics.spectral import (extreme_singular_values, norm_2_to_inf, singular_values,
                                           spectral_norm_value)
from attnstab_cli.model.config import ModelConfig, RopeConfig
from attnstab_cli.model.rope import apply_rope, compute_inv_freq, rope_regimes
from attnstab_cli.model.weights import LayerWeights, NormWeights
from attnstab_cli.metrics.threads import single_threaded

F64 = torch.float64
KAPPA_EFF_RIDGE = 1e-6                 # THEORY §13: kappa(W) = sigma_max / (sigma_min + 1e-6)
OFFSET_CHUNK_ELEMENTS = 1 << 23        # [H, C, D, D] float64 elements per offset chunk (64 MiB per tensor)
QK_PRUNE_SQUARINGS = 4                 # offsets pruned with ||A^16||_F before the exact eigvalsh
QK_EXACT_ROUND = 4                     # offsets per head evaluated exactly between two pruning steps
QK_PRUNE_MARGIN = 1e-3                 # relative widening of the float32 pruning brackets


@dataclass(frozen=True)
class HeadWeightMetrics:
    """Weight-only columns of one (layer, head); ``None`` means not applicable (no such bias)."""

    layer: int
    head: int
    wq_norm: float
    wk_norm: float
    wv_norm: float
    wo_norm: float
    bq_norm: float | None
    bk_rot_norm: float | None
    qk_norm: float | None              # None where a q/k norm sits between the projections and the logits
    proj_product: float
    kappa_wq: float
    kappa_wk: float
    kappa_wv: float


@dataclass(frozen=True)
class LayerWeightMetrics:
    """Weight-only columns of one layer; gated-FFN columns are ``None`` for plain MLPs, ``*_beta_norm`` for RMSNorm."""

    layer: int
    proj_product_layer: float
    alpha_geo: float
    kappa_eff: float | None               # None for a mixture-of-experts FFN (per expert: experts.parquet)
    wq_full_norm: float
    wk_full_norm: float
    wv_full_norm: float
    wo_full_norm: float
    ffn_w1_norm: float | None
    ffn_w2_norm: float | None
    ffn_gate_norm: float | None
    ffn_up_norm: float | None
    ffn_gate_norm_2inf: float | None
    ffn_up_norm_2inf: float | None
    norm1_gamma_max: float
    norm1_beta_norm: float | None
    norm2_gamma_max: float
    norm2_beta_norm: float | None
    norm_eps: float
    qnorm_gamma_max: float | None = None   # q/k norms on the projections (THEORY §18.2); None without
    knorm_gamma_max: float | None = None
    norm1_out_gamma_max: float | None = None   # branch-output norms (THEORY §18.3); None without them
    norm1_out_beta_norm: float | None = None
    norm2_out_gamma_max: float | None = None
    norm2_out_beta_norm: float | None = None


@dataclass(frozen=True)
class HeadSlices:
    """Per-head blocks in the row convention x -> xW (float64)."""

    wq: torch.Tensor           # [H, d, D]     columns hD:(h+1)D of W^Q
    wk: torch.Tensor           # [H_kv, d, D]
    wv: torch.Tensor           # [H_kv, d, D]
    wo: torch.Tensor           # [H, D, d]     rows hD:(h+1)D of W^O
    kv_of_head: torch.Tensor   # [H] long      g(h) = h // (H / H_kv)


def kv_head_index(n_heads: int, n_kv_heads: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``g(h) = floor(h / (H / H_kv))`` for every query head (THEORY §5.1): ``[H]`` long."""
    return torch.arange(n_heads, device=device) // (n_heads // n_kv_heads)


def slice_heads(w: LayerWeights, n_heads: int, n_kv_heads: int, head_dim: int,
                cfg: ModelConfig | None = None) -> HeadSlices:
    """Split the canonical projections into head blocks (THEORY §5.1, §15); under latent attention (``cfg`` given)
    the heads' up-projection blocks W^Q_h or W_qb,h, W^nope_kvb,h and W^V_kvb,h (§18.8)."""
    if w.latent:
        q, k, v = mla_head_blocks(w, cfg)
        return HeadSlices(wq=q, wk=k, wv=v, wo=head_rows(w.wo, n_heads),
                          kv_of_head=kv_head_index(n_heads, n_heads, w.wo.device))
    return HeadSlices(
        wq=head_slices(w.wq, n_heads), wk=head_slices(w.wk, n_kv_heads), wv=head_slices(w.wv, n_kv_heads),
        wo=head_rows(w.wo, n_heads),                                            # [H*D, d] -> [H, D, d]
        kv_of_head=kv_head_index(n_heads, n_kv_heads, w.wq.device),
    )


def head_bias_norms(bias: torch.Tensor | None, n: int, head_dim: int, coords: int | None = None) -> torch.Tensor | None:
    """``||b_h[:coords]||_2`` per head for a bias ``[n*D]`` -> ``[n]`` float64 (``None`` without a bias)."""
    if bias is None:
        return None
    per_head = bias.to(F64).reshape(n, head_dim)                               # [n, D]
    return per_head[:, : head_dim if coords is None else coords].norm(dim=-1)


def rotary_key_bias_norms(bk: torch.Tensor | None, n_kv_heads: int, head_dim: int,
                          rope: RopeConfig | None) -> torch.Tensor | None:
    """``beta^K_g = ||b^{K,rot}_g||_2`` (THEORY §5.4): first ``rotary_dim`` coordinates; 0 without RoPE. ``[H_kv]``."""
    return head_bias_norms(bk, n_kv_heads, head_dim, 0 if rope is None else rope.rotary_dim)


def rope_offsets(cfg: ModelConfig, layer: int, max_offset: int | None = None) -> torch.Tensor:
    """Relative offsets Delta = i - j the mask allows (THEORY §5.5): ``[n_offsets]`` long.

    Causal: ``0 .. span-1``; bidirectional: ``-(span-1) .. span-1``; ``span`` = ``max_offset`` (override) or
    ``max_positions``, capped by the layer's sliding window (keys with ``|i - j| < window``). Without RoPE: ``[0]``.
    """
    if cfg.rope is None:
        return torch.zeros(1, dtype=torch.long)
    window = cfg.sliding_windows[layer] if layer < len(cfg.sliding_windows) else None
    span_src = [s for s in (max_offset if max_offset is not None else cfg.max_positions, window) if s]
    if not span_src:
        raise InputError("the RoPE-aware qk_norm needs the longest attention span, but the config gives no "
                         "max_position_embeddings", hint="pass the maximum offset explicitly")
    span = int(min(span_src))
    return torch.arange(span) if cfg.layout.causal else torch.arange(-(span - 1), span)


def rope_cos_sin(rope: RopeConfig, offsets: torch.Tensor, device: torch.device | str,
                 seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of P_Delta for ``offsets [C]``: ``[C, rotary_dim/2]`` float64 (the model's float32 frequencies
    for a forward pass over ``seq_len`` positions)."""
    angles = offsets.to(F64)[:, None] * compute_inv_freq(rope, seq_len).to(F64)[None, :]  # [C, r/2]
    return angles.cos().to(device), angles.sin().to(device)


def _sigma_brackets(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified ``lower <= sigma_max(m[h, c]) <= upper`` for ``m [H, C, k, k]`` (float32 or float64), float64 ``[H, C]``.

    With ``A = M M^T / s^2`` (``s = ||M||_F``, so no overflow) and ``B = A^K``, ``K = 2^QK_PRUNE_SQUARINGS``, every
    offset satisfies ``max_i B_ii^(1/2K) <= sigma_max / s <= ||B||_F^(1/2K)``. These brackets are computed in float32
    (renormalised every squaring, the scale kept as a float64 logarithm) and widened by ``QK_PRUNE_MARGIN``
    (relative), far more than float32 rounding moves them (~``2^K k^1.5 eps_32`` on ``B``, divided by ``2K`` by the
    root).
    """
    norm = m.norm(dim=(-2, -1)).clamp_min(torch.finfo(m.dtype).tiny)             # [H, C], in m's dtype
    unit = (m / norm[..., None, None]).float()
    scale = norm.to(F64)
    b = unit @ unit.transpose(-1, -2)                                            # [H, C, k, k]  float32 A
    log_norm = torch.zeros(scale.shape, dtype=F64, device=m.device)              # log ||A^K||_F, tracked in float64
    for step in range(QK_PRUNE_SQUARINGS + 1):
        if step:
            b = b @ b
            log_norm = 2 * log_norm
        nb = b.norm(dim=(-2, -1)).clamp_min(torch.finfo(torch.float32).tiny)    # renormalised: no float32 underflow
        b = b / nb[..., None, None]
        log_norm = log_norm + nb.to(F64).log()
    root = 1.0 / 2 ** (QK_PRUNE_SQUARINGS + 1)
    upper = scale * (log_norm * root).exp() * (1 + QK_PRUNE_MARGIN)              # [H, C]
    diag = b.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(torch.float32).tiny).to(F64)
    lower = scale * ((diag.log() + log_norm) * root).exp() * (1 - QK_PRUNE_MARGIN)   # [H, C]
    return lower, upper


def _max_sigma_pruned(lower: torch.Tensor, upper: torch.Tensor, floor: torch.Tensor,
                      exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``max(floor_h, max_c sigma_max(M[h, c]))`` from brackets ``lower, upper [H, C]`` of every ``sigma_max(M[h, c])``
    and ``exact(heads, cols)``, the float64 matrices ``M[heads, cols]`` ``[S, k, k]``.

    Offsets are evaluated exactly (float64 ``eigvalsh`` of ``M M^T / s^2``, relative error ~ k eps on sigma_max) in
    rounds, each head's highest upper values first; after every round an offset whose upper value is below its
    head's best exact value cannot hold the maximum and is dropped. The maximiser always survives.
    """
    best = torch.maximum(floor, lower.amax(dim=1))                               # [H]
    n_heads, n_off = upper.shape
    order = upper.argsort(dim=1, descending=True)                                # [H, C]
    done = 0
    while done < n_off:
        cols = order[:, done:done + QK_EXACT_ROUND]                              # [H, r]
        live = upper.gather(1, cols) >= best[:, None]                            # [H, r]
        if not bool(live.any()):
            break                                             # sorted: every later offset is below its head's best
        head = torch.arange(n_heads, device=upper.device)[:, None].expand_as(cols)[live]  # [S]
        mats = exact(head, cols[live])                                           # [S, k, k] float64
        scale = mats.norm(dim=(-2, -1)).clamp_min(torch.finfo(F64).tiny)
        u = mats / scale[:, None, None]
        with single_threaded():
            top = torch.linalg.eigvalsh(u @ u.transpose(-1, -2))[..., -1]                     # [S]
        best = best.scatter_reduce(0, head, scale * top.clamp_min(0).sqrt(), reduce="amax")
        done += QK_EXACT_ROUND
    return best


def _chunk_max_sigma(m: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``max(floor_h, max_c sigma_max(m[h, c]))`` for ``m [H, C, k, k]`` float64, exact; ``floor [H]`` is a known
    lower bound (:func:`_sigma_brackets` prune, :func:`_max_sigma_pruned` evaluates)."""
    lower, upper = _sigma_brackets(m)
    return _max_sigma_pruned(lower, upper, floor, lambda head, cols: m[head, cols])


def compute_qk_norms(wq: torch.Tensor, wk: torch.Tensor, kv_of_head: torch.Tensor, rope: RopeConfig | None,
                     offsets: torch.Tensor) -> torch.Tensor:
    """``qk_norm`` per query head (THEORY §5.5): ``max_Delta ||W^Q_h P_Delta W^K_g^T||_2`` -> ``[H]`` float64.

    QR-factor ``W^Q_h = U_Q G_Q`` and ``W^K_g = U_K G_K``; orthonormal ``U`` drop out of the spectral norm, leaving
    the ``k x k`` matrices ``M_Delta = (G_Q P_Delta) G_K^T`` (k = min(d, D)). The model's rotation is affine in the
    per-frequency ``cos, sin`` (``x P = apply_rope(x)``), so ``M_Delta = B_0 + sum_j cos_j(Delta) B^c_j +
    sin_j(Delta) B^s_j`` with ``2 r/2 + 1`` fixed matrices found by applying ``apply_rope`` itself to unit ``cos, sin``
    patterns (no convention is restated here); every chunk of offsets is then one matrix product. The maximum over
    offsets is exact (:func:`_chunk_max_sigma`). ``rope=None``: Delta = 0 only, i.e. ``||W^Q_h W^K_g^T||_2``.
    """
    with single_threaded():
        g_q = torch.linalg.qr(wq.to(F64), mode="r")[1]                            # [H, k, D]
        g_k = torch.linalg.qr(wk.to(F64), mode="r")[1][kv_of_head]                # [H, k, D]
    g_kt = g_k.transpose(-1, -2)                                                  # [H, D, k]
    if rope is None:
        return torch.linalg.matrix_norm(g_q @ g_kt, ord=2)                        # [H]
    n_heads, k, _ = g_q.shape
    basis = _rotation_basis(g_q, rope) @ g_kt                                     # [2F+1, H, k, k]
    unit = basis.abs().amax().clamp_min(torch.finfo(F64).tiny)                   # sigma_max scales out: no float32
    basis = basis / unit                                                          # over- or underflow below
    basis_norms = basis.flatten(2).norm(dim=-1)                                   # [2F+1, H] ||B_a||_F per head
    basis = basis.reshape(basis.shape[0], -1)                                     # [2F+1, H k k]
    basis32 = basis.float()
    gamma = (basis.shape[0] + 2) * 2.0 ** -24 / (1 - (basis.shape[0] + 2) * 2.0 ** -24)
    chunk = max(1, OFFSET_CHUNK_ELEMENTS // (n_heads * k * k))
    best = torch.zeros(n_heads, dtype=F64, device=wq.device)                      # [H]
    a2 = rope.rot_scale ** 2           # P_i P_j^T = diag(a^2 R_Delta, b^2 I); the basis already holds one factor b
    for seq_len, limit in rope_regimes(rope):
        offs = offsets if limit is None else offsets[offsets.abs() < limit]
        for start in range(0, offs.numel(), chunk):
            cos, sin = rope_cos_sin(rope, offs[start:start + chunk], wq.device, seq_len)  # [C, F]
            trig = torch.cat([torch.full_like(cos[:, :1], rope.pass_scale), cos * a2, sin * a2], dim=1)  # [C, 2F+1]
            m32 = (trig.float() @ basis32).reshape(-1, n_heads, k, k).transpose(0, 1)  # [H, C, k, k]  ~ M_Delta
            # ||m32 - M_Delta||_2 <= ||.||_F <= gamma_{2F+3} sum_a |t_a| ||B_a||_F (two input roundings, the dot)
            err = gamma * (trig.abs() @ basis_norms).T                            # [H, C]
            lower, upper = _sigma_brackets(m32)

            def exact(head: torch.Tensor, cols: torch.Tensor, trig: torch.Tensor = trig) -> torch.Tensor:
                rows = basis.view(basis.shape[0], n_heads, k * k)[:, head]        # [2F+1, S, k k]
                return torch.einsum("sa,ask->sk", trig[cols], rows).view(-1, k, k)   # [S, k, k] float64 M_Delta

            best = _max_sigma_pruned((lower - err).clamp_min(0), upper + err, best, exact)   # [H]
    return best * unit


def _rotation_basis(rows: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """``[B_0; B^c_1..B^c_F; B^s_1..B^s_F]`` with ``apply_rope(rows, cos, sin) = B_0 + sum_j cos_j B^c_j + sin_j B^s_j``
    for ``rows [..., D]`` (F = rotary_dim / 2): ``[2F+1, ..., D]``."""
    f = rope.rotary_dim // 2
    eye = torch.eye(f, dtype=rows.dtype, device=rows.device)
    zero = torch.zeros(1, f, dtype=rows.dtype, device=rows.device)
    cos = torch.cat([zero, eye, torch.zeros_like(eye)])                           # [2F+1, F]
    sin = torch.cat([zero, torch.zeros_like(eye), eye])                           # [2F+1, F]
    lead = (slice(None),) + (None,) * (rows.dim() - 1)
    out = apply_rope(rows.unsqueeze(0).expand(2 * f + 1, *rows.shape), cos[lead], sin[lead], rope)  # [2F+1, ..., D]
    return torch.cat([out[:1], out[1:] - out[:1]])


def _kappa(svals: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``sigma_max / (sigma_min + ridge)`` from descending singular values ``[..., r]`` -> ``[...]``."""
    return svals[..., 0] / (svals[..., -1] + ridge)


def compute_head_weight_metrics(w: LayerWeights, cfg: ModelConfig, layer: int | None = None, *,
                                max_offset: int | None = None,
                                wo_full_norm: float | None = None) -> list[HeadWeightMetrics]:
    """Per-head weight columns of one layer (THEORY §0.3 head table); ``wo_full_norm`` may be passed to reuse it."""
    layer = w.layer if layer is None else layer
    sl = slice_heads(w, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg)
    s_q, s_k, s_v = singular_values(sl.wq), singular_values(sl.wk), singular_values(sl.wv)  # [H|H_kv, min(d, D)]
    wq_n, wk_n, wv_n = s_q[:, 0], s_k[sl.kv_of_head, 0], s_v[sl.kv_of_head, 0]            # [H]
    wo_n = singular_values(sl.wo)[:, 0]                                                     # [H]
    wo_full = float(spectral_norm_value(w.wo)) if wo_full_norm is None else wo_full_norm
    qk = None if cfg.layout.qk_norm or w.latent else \
        compute_qk_norms(sl.wq, sl.wk, sl.kv_of_head, cfg.rope_at(layer), rope_offsets(cfg, layer, max_offset))
    bq = head_bias_norms(w.bq, cfg.n_heads, cfg.head_dim)                                  # [H] | None
    bk = rotary_key_bias_norms(w.bk, cfg.n_kv_heads, cfg.head_dim, cfg.rope)               # [H_kv] | None
    if w.latent and w.bkv_a is not None:                  # the shared rotary key's bias, beta^K of every head
        bk = w.bkv_a[cfg.mla.kv_lora_rank:].to(F64).norm().expand(cfg.n_heads)
    kq, kk, kv = _kappa(s_q), _kappa(s_k)[sl.kv_of_head], _kappa(s_v)[sl.kv_of_head]
    proj = wq_n * wk_n * wv_n * wo_full                                                     # [H]
    out = []
    for h in range(cfg.n_heads):
        g = int(sl.kv_of_head[h])
        out.append(HeadWeightMetrics(
            layer=layer, head=h, wq_norm=float(wq_n[h]), wk_norm=float(wk_n[h]), wv_norm=float(wv_n[h]),
            wo_norm=float(wo_n[h]), bq_norm=None if bq is None else float(bq[h]),
            bk_rot_norm=None if bk is None else float(bk[g]),
            qk_norm=None if qk is None else float(qk[h]), proj_product=float(proj[h]),
            kappa_wq=float(kq[h]), kappa_wk=float(kk[h]), kappa_wv=float(kv[h]),
        ))
    return out


def ffn_first_matrix(ffn: Mapping[str, torch.Tensor], kind: FFNKind) -> torch.Tensor:
    """W1 of THEORY §13: ``w_in [d, m]``, or the stacked ``[W_g W_u] [d, 2m]`` for a gated FFN (float64)."""
    if kind is FFNKind.GATED:
        return torch.cat([ffn["w_gate"].to(F64), ffn["w_up"].to(F64)], dim=1)   # [d, 2m]
    return ffn["w_in"].to(F64)                                                     # [d, m]


def _norm_stats(norm: NormWeights | None) -> tuple[float | None, float | None]:
    """``(||gamma||_inf, ||beta||_2 or None)`` of a norm layer (THEORY §4); both None for the identity or a norm the
    layer does not have."""
    if norm is None or norm.identity:
        return None, None
    beta = None if norm.bias is None else float(norm.bias.to(F64).norm())
    return float(norm.weight.to(F64).abs().max()), beta


def _full_projections(w: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_Q, W_K, W_V of the layer; under latent attention the full up-projections W_q or W_qb, W^nope_kvb and
    W^V_kvb (all heads' blocks side by side, §18.8)."""
    if not w.latent:
        return w.wq, w.wk, w.wv
    q, k, v = mla_head_blocks(w, cfg)                                          # [H, r, D]
    return tuple(x.permute(1, 0, 2).reshape(x.shape[1], -1) for x in (q, k, v))


def compute_layer_weight_metrics(w: LayerWeights, cfg: ModelConfig, layer: int | None = None) -> LayerWeightMetrics:
    """Per-layer weight columns (THEORY §0.3 layer table: §4, §6, §10, §12, §13)."""
    layer = w.layer if layer is None else layer
    s_o = extreme_singular_values(w.wo)                           # [2]: upper sigma_max, sigma_min
    dense = w.moe is None                                         # the FFN columns are of one dense FFN
    s_1 = extreme_singular_values(ffn_first_matrix(w.ffn, cfg.layout.ffn)) if dense else None
    s_2 = extreme_singular_values(w.ffn["w_out"]) if dense else None
    wq_n, wk_n, wv_n = (float(spectral_norm_value(t)) for t in _full_projections(w, cfg))
    wo_n = float(s_o[0])
    proj = wq_n * wk_n * wv_n * wo_n
    gated = cfg.layout.ffn is FFNKind.GATED and dense
    g_max1, b1 = _norm_stats(w.norm_attn)
    g_max2, b2 = _norm_stats(w.norm_ffn)
    g_max1o, b1o = _norm_stats(w.norm_attn_out)
    g_max2o, b2o = _norm_stats(w.norm_ffn_out)
    return LayerWeightMetrics(
        layer=layer, proj_product_layer=proj, alpha_geo=proj ** 0.25,
        kappa_eff=float(sum(_kappa(s, KAPPA_EFF_RIDGE) for s in (s_1, s_2, s_o))) if dense else None,
        wq_full_norm=wq_n, wk_full_norm=wk_n, wv_full_norm=wv_n, wo_full_norm=wo_n,
        ffn_w1_norm=float(s_1[0]) if dense else None, ffn_w2_norm=float(s_2[0]) if dense else None,
        ffn_gate_norm=float(spectral_norm_value(w.ffn["w_gate"])) if gated else None,
        ffn_up_norm=float(spectral_norm_value(w.ffn["w_up"])) if gated else None,
        ffn_gate_norm_2inf=float(norm_2_to_inf(w.ffn["w_gate"])) if gated else None,
        ffn_up_norm_2inf=float(norm_2_to_inf(w.ffn["w_up"])) if gated else None,
        norm1_gamma_max=g_max1, norm1_beta_norm=b1, norm2_gamma_max=g_max2, norm2_beta_norm=b2,
        norm1_out_gamma_max=g_max1o, norm1_out_beta_norm=b1o, norm2_out_gamma_max=g_max2o, norm2_out_beta_norm=b2o,
        norm_eps=cfg.norm_eps,
        qnorm_gamma_max=_norm_stats(w.q_norm)[0], knorm_gamma_max=_norm_stats(w.k_norm)[0],
    )


def compute_weight_metrics(w: LayerWeights, cfg: ModelConfig, layer: int | None = None, *,
                           max_offset: int | None = None) -> tuple[list[HeadWeightMetrics], LayerWeightMetrics]:
    """Head and layer records of one layer, sharing ``||W^O||_2``."""
    layer_rec = compute_layer_weight_metrics(w, cfg, layer)
    heads = compute_head_weight_metrics(w, cfg, layer, max_offset=max_offset, wo_full_norm=layer_rec.wo_full_norm)
    return heads, layer_rec


def compute_depth_budget(layers: Sequence[LayerWeightMetrics | Mapping[str, float]],
                         n_layers: int | None = None) -> float:
    """``depth_budget = N * max_l Pi_l`` (THEORY §10); N = ``n_layers`` or the number of records given."""
    if not layers:
        raise ValueError("depth_budget needs at least one layer record")
    pis = [r["proj_product_layer"] if isinstance(r, Mapping) else r.proj_product_layer for r in layers]
    return (len(pis) if n_layers is None else n_layers) * max(pis)
