"""Rotary position embeddings (RoPE) with partial rotary and the Hugging Face frequency scalings we support.

Each rotation P_i is orthogonal (THEORY §5.5): block rotations of coordinate pairs, either rotate-half pairs
(i, i + r/2) or interleaved pairs (2i, 2i+1), on the first ``rotary_dim`` coordinates of each head; the rest pass
through. Scalings: ``linear`` (positions / factor), ``llama3`` (wavelength-banded), ``dynamic`` (NTK, only active
beyond the original context, which attnstab never exceeds).
"""
from __future__ import annotations

import math

import torch

from attnstab_cli.arch.spec import RopeStyle
from attnstab_cli.model.config import RopeConfig


def compute_inv_freq(rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim / 2]`` after the configured scaling.

    Formed in float32 on purpose: checkpoints were trained with float32 angles (the Hugging Face convention), and
    reproducing the model's own logits matters more here than a more accurate rotation.
    """
    r = rope.rotary_dim
    inv = 1.0 / rope.theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)
    sc = rope.scaling_dict
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        inv = _llama3_scale(inv, sc)
    return inv


def _llama3_scale(inv: torch.Tensor, sc: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a smooth blend between."""
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(mid, blended, out)


def compute_rope_cos_sin(rope: RopeConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[T, rotary_dim / 2]`` for integer ``positions [T]`` (float32 angles, as trained)."""
    angles = positions.float()[:, None] * compute_inv_freq(rope).to(positions.device)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` coordinates of ``x [B, H, T, D]`` by position; the rest pass through."""
    r = rope.rotary_dim
    rot, rest = x[..., :r], x[..., r:]
    if rope.style is RopeStyle.HALF_SPLIT:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)
