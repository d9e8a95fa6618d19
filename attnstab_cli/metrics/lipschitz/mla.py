"""Projection constants of multi-head latent attention (THEORY §18.8 through the compositions and concatenations of
§18.1).

Per head ``h`` (no K/V sharing: ``H_kv = H``), with ``N_qa``, ``N_kv`` the latent RMSNorms, ``W^c``, ``W^r`` the
columns of ``W_kva`` that give ``c_kv`` and ``k_rope``, ``b^r`` the rotary part of its bias, and
``L_N = ||gamma||_inf / sqrt(ms + eps)`` (local at the smallest statistic over the tokens; ``ms = 0`` in tier 1)::

    q_h = N_qa(x W_qa + b_qa) W_qb,h      L_Q = ||W_qb,h|| L_Nqa ||W_qa||      M_Q = ||W_qb,h|| R(N_qa)
    (no q rank: q_h = x W_q,h             L_Q = ||W_q,h||                      M_Q = ||W_q,h|| R2)
    k_h = [N_kv(c) W^nope_h ; (x W^r + b^r) P_j]
        L_K = sqrt((||W^nope_h|| L_Nkv ||W^c||)^2 + ||W^r||^2)
        M_K = sqrt((||W^nope_h|| R(N_kv))^2 + (||W^r|| R2 + ||b^r||)^2)      (centre 0: the rotary bias moves with j)
    v_h = N_kv(c) W^V_h                   L_V = ||W^V_h|| L_Nkv ||W^c||       M_V = ||W^V_h|| R(N_kv)   (centre 0)

with ``R(N) = ||gamma||_inf sqrt(width)`` the norm's reset radius (§4.2): the query (with a q rank), the non-rotary
key and the value magnitudes do not depend on the input. The biases inside a norm take no part (the local constant
reads the statistic of the biased latent).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnstab_cli.arch.spec import NormKind
from attnstab_cli.metrics.lipschitz.norms import compute_reset_radius
from attnstab_cli.metrics.spectral import spectral_norm_value as spectral_norm
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.weights import LayerWeights, NormWeights

F64 = torch.float64


def mla_head_blocks(w: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The heads' up-projection blocks, float64: ``W^Q_h`` of the q projection (``[H, d, nope + rope]``) or
    ``W_qb,h`` (``[H, r_q, nope + rope]``), ``W^nope_kvb,h`` ``[H, r_kv, nope]`` and ``W^V_kvb,h`` ``[H, r_kv, v]``."""
    m, h = cfg.mla, cfg.n_heads
    wq = (w.wq if w.wq_b is None else w.wq_b).to(F64)
    q = wq.reshape(wq.shape[0], h, m.nope + m.rope).permute(1, 0, 2)
    kv = w.wkv_b.to(F64).reshape(m.kv_lora_rank, h, m.nope + m.v).permute(1, 0, 2)     # [H, r_kv, nope + v]
    return q, kv[..., : m.nope], kv[..., m.nope:]


@dataclass(frozen=True)
class LatentNorm:
    """A latent RMSNorm after a down-projection: ``L = ||W_a|| ||gamma||_inf / sqrt(ms + eps)``, reset radius."""

    gain: float        # ||gamma||_inf
    eps: float
    radius: float      # ||gamma||_inf sqrt(width)
    down: float        # ||W_a||_2 of the columns that feed the norm

    @classmethod
    def of(cls, norm: NormWeights, eps: float, down: torch.Tensor) -> "LatentNorm":
        return cls(float(norm.weight.to(F64).abs().max()), eps, compute_reset_radius(norm, NormKind.RMSNORM),
                   float(spectral_norm(down)))

    def lipschitz(self, stat: torch.Tensor | None) -> torch.Tensor:
        """``||W_a|| L_N`` at the smallest statistic ``stat`` (a scalar; None: every input, ms = 0)."""
        floor = torch.zeros((), dtype=F64) if stat is None else stat.to(F64).clamp_min(0.0)
        return self.down * self.gain / torch.sqrt(floor + self.eps)


@dataclass(frozen=True)
class MLANorms:
    """The weight-only inputs of the MLA constants (module docstring), per head ``[H]`` float64."""

    wq: torch.Tensor               # ||W^Q_h|| or ||W_qb,h||
    wk_nope: torch.Tensor          # ||W^nope_kvb,h||
    wv: torch.Tensor               # ||W^V_kvb,h||
    w_rope: float                  # ||W^r||
    b_rope: float                  # ||b^r|| (0 without a bias)
    q_latent: LatentNorm | None    # None without a q rank
    kv_latent: LatentNorm

    def constants(self, r2: float, q_stat: torch.Tensor | None, kv_stat: torch.Tensor | None
                  ) -> tuple[torch.Tensor, ...]:
        """``(L_Q, M_Q, L_K, M_K, L_V, M_V)`` per head at radius ``r2`` (module docstring)."""
        if self.q_latent is None:
            lq, mq = self.wq, self.wq * r2
        else:
            lq, mq = self.wq * self.q_latent.lipschitz(q_stat), self.wq * self.q_latent.radius
        l_kv = self.kv_latent.lipschitz(kv_stat)
        lk = torch.sqrt((self.wk_nope * l_kv) ** 2 + self.w_rope ** 2)
        mk = torch.sqrt((self.wk_nope * self.kv_latent.radius) ** 2 + (self.w_rope * r2 + self.b_rope) ** 2)
        return lq, mq, lk, mk, self.wv * l_kv, self.wv * self.kv_latent.radius

    def to(self, device: torch.device | str) -> "MLANorms":
        return replace(self, wq=self.wq.to(device), wk_nope=self.wk_nope.to(device), wv=self.wv.to(device))


def compute_mla_norms(w: LayerWeights, cfg: ModelConfig) -> MLANorms:
    """:class:`MLANorms` of one loaded MLA layer. The latent norms' epsilon is :attr:`MLADims.latent_eps`."""
    m = cfg.mla
    q, k_nope, v = mla_head_blocks(w, cfg)
    w_c, w_r = w.wkv_a[:, : m.kv_lora_rank], w.wkv_a[:, m.kv_lora_rank:]               # [d, r_kv], [d, rope]
    b_r = 0.0 if w.bkv_a is None else float(w.bkv_a[m.kv_lora_rank:].to(F64).norm())
    q_latent = None if w.wq_a is None else LatentNorm.of(w.q_a_norm, m.latent_eps, w.wq_a)
    return MLANorms(wq=spectral_norm(q), wk_nope=spectral_norm(k_nope), wv=spectral_norm(v),
                    w_rope=float(spectral_norm(w_r)), b_rope=b_r, q_latent=q_latent,
                    kv_latent=LatentNorm.of(w.kv_a_norm, m.latent_eps, w_c))
