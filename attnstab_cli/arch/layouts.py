"""Pure functions keyed by layout enums: bring stored tensors into the canonical row convention x -> xW.

Canonical shapes (THEORY §0.2, §15): W_Q [d, H*D], W_K and W_V [d, H_kv*D], W_O [H*D, d]; head h owns columns
h*D:(h+1)*D of W_Q and rows h*D:(h+1)*D of W_O.
"""
from __future__ import annotations

import torch

from attnstab_cli.arch.spec import ExpertPacking, FFNPacking, Orientation, QKVPacking


def orient(weight: torch.Tensor, orientation: Orientation) -> torch.Tensor:
    """Stored matrix -> canonical ``[d_in, d_out]``; nn.Linear stores ``(out, in)``, GPT-2 Conv1D ``(in, out)``. A
    stack of matrices ``[E, *, *]`` (fused experts) is oriented matrix by matrix."""
    return weight.transpose(-1, -2) if orientation is Orientation.OUT_IN else weight


def split_packed_qkv(packed: torch.Tensor, packing: QKVPacking, n_heads: int, n_kv_heads: int,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a canonical fused QKV weight ``[d, *]`` or bias ``[*]`` into Q, K, V along the last dimension.

    ``concat``: [Q | K | V] blocks (GPT-2). ``interleaved_per_head``: the last dim viewed as [H, 3, D], i.e. per head
    [q; k; v] (GPT-NeoX; requires H_kv == H).
    """
    if packing is QKVPacking.CONCAT:
        sizes = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
        q, k, v = torch.split(packed, sizes, dim=-1)
        return q, k, v
    if packing is QKVPacking.INTERLEAVED_PER_HEAD:
        grouped = packed.reshape(*packed.shape[:-1], n_heads, 3, head_dim)  # [..., H, 3, D]
        q, k, v = (grouped[..., i, :].reshape(*packed.shape[:-1], n_heads * head_dim) for i in range(3))
        return q, k, v
    raise ValueError(f"packing {packing} is not a fused layout")


def packed_qkv_width(packing: QKVPacking, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Expected last-dimension size of a fused QKV tensor."""
    if packing is QKVPacking.INTERLEAVED_PER_HEAD:
        return 3 * n_heads * head_dim
    return (n_heads + 2 * n_kv_heads) * head_dim


def split_packed_ffn(packed: torch.Tensor, packing: FFNPacking, d_ff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a canonical fused gated-FFN input weight ``[d, 2 m]`` into ``W_g, W_u [d, m]``.

    ``gate_up``: the stored rows are [activated half; multiplying half] (Phi-3 ``gate_up_proj`` [gate; up],
    ModernBERT ``Wi`` [input; gate]), i.e. canonical columns [W_g | W_u]; the FFN is ``(act(x W_g) * x W_u) W_d``.
    """
    if packing is FFNPacking.GATE_UP:
        w_gate, w_up = torch.split(packed, d_ff, dim=-1)
        return w_gate, w_up
    raise ValueError(f"packing {packing} is not a fused FFN layout")


def split_fused_experts(packed: torch.Tensor, packing: ExpertPacking) -> tuple[torch.Tensor, torch.Tensor]:
    """Split canonical fused expert input weights ``[E, d, 2 m]`` into ``W_g, W_u [E, d, m]`` (THEORY §18.7), or
    their biases ``[E, 2 m]`` into ``b_g, b_u [E, m]`` (the same packing along the last dimension).

    ``gate_up``: columns [W_g | W_u] (transformers' fused Mixtral / Qwen-MoE ``gate_up_proj``, whose rows are
    [gate; up] per expert). ``interleaved``: columns alternate gate, up (gpt-oss).
    """
    if packing is ExpertPacking.GATE_UP:
        w_gate, w_up = packed.chunk(2, dim=-1)
        return w_gate, w_up
    return packed[..., 0::2], packed[..., 1::2]
