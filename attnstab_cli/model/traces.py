"""What one layer exposes to the metrics (issue 2, item 6): per-head Q, K, V, mask, scale, outputs, norm statistics.

Tensors follow the vocabulary of STYLE.md: B batch, T tokens, d model width, H query heads, H_kv key/value heads,
D head dim. Nothing here is an n x n matrix: attention probabilities are recomputed from Q, K, scale and mask by the
metrics, one query block at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnstab_cli.model.weights import LayerWeights


@dataclass
class NormTrace:
    kind: str                                # "layernorm" | "rmsnorm" | "identity"
    stat: torch.Tensor | None                # [B, T] per-token biased variance (LN) or mean square (RMSNorm) of the
                                             # input; None for the identity
    eps: float
    out: torch.Tensor                        # [B, T, d]     the norm output


@dataclass
class AttentionTrace:
    x: torch.Tensor                          # [B, T, d]     attention input (after the norm in pre-norm/parallel)
    q: torch.Tensor                          # [B, H, T, D]  after biases and RoPE
    k: torch.Tensor                          # [B, H_kv, T, D] after biases and RoPE
    v: torch.Tensor                          # [B, H_kv, T, D_v]  (D_v = D except under MLA)
    scale: float                             # logits are scale * q.k
    causal: bool
    window: int | None                       # sliding window: key j visible from query i iff |i - j| < window
    key_padding_mask: torch.Tensor | None    # [B, T] bool, True = real token
    context: torch.Tensor                    # [B, H, T, D_v]  softmax(s q k^T) v per head
    out: torch.Tensor                        # [B, T, d]     after W_O and b_O
    q_norm_stat: torch.Tensor | None = None  # q/k norms (THEORY §18.2): the norm statistic of the projections,
    k_norm_stat: torch.Tensor | None = None  # [B, T, H|H_kv] per head, [B, T] full width; None without q/k norms;
                                             # MLA: of the q and kv latents (N_qa, N_kv), [B, T]
    logit_cap: float | None = None           # logits are c tanh(scale q.k / c) when set (THEORY §18.5)
    sinks: torch.Tensor | None = None        # [H] sink logit per query head: joins each row's softmax with no value,
                                             # so a row's key probabilities sum to m < 1 (THEORY §18.4)


@dataclass
class MoETrace:
    """The routing of a mixture-of-experts FFN (THEORY §18.7) over its input tokens."""

    logits: torch.Tensor                     # [B, T, E]  router logits x W_r + b_r
    scores: torch.Tensor                     # [B, T, E]  softmax or sigmoid of the logits (float32 or wider)
    selected: torch.Tensor                   # [B, T, k]  chosen experts (int64), by descending selection score
    gates: torch.Tensor                      # [B, T, k]  their gates (float32 or wider)
    shared_weight: torch.Tensor | None = None   # [B, T] sigmoid shared gate omega_s; None without one


@dataclass
class LayerTrace:
    layer: int
    batch: int
    resid_in: torch.Tensor                   # [B, T, d]  h_l
    resid_out: torch.Tensor                  # [B, T, d]  h_{l+1}
    attn: AttentionTrace
    ffn_in: torch.Tensor                     # [B, T, d]
    ffn_out: torch.Tensor                    # [B, T, d]
    norms: dict[str, NormTrace] = field(default_factory=dict)   # "norm_attn", "norm_ffn" (+ "norm_attn_out",
                                                                 # "norm_ffn_out" with branch-output norms)
    weights: LayerWeights | None = None
    moe: MoETrace | None = None              # the routing of a mixture-of-experts FFN; None for a dense FFN
    first_seq: int = 0                       # global index of the batch's first calibration sequence (its seeds)
