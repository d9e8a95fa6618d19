"""Rotary position embeddings (RoPE) with partial rotary and the Hugging Face frequency scalings we support.

Each rotation P_i is orthogonal (THEORY §5.5): block rotations of coordinate pairs, either rotate-half pairs
(i, i + r/2) or interleaved pairs (2i, 2i+1), on the first ``rotary_dim`` coordinates of each head; the rest pass
through. With a LongRoPE attention factor P_i is a contraction instead (rotations times a <= 1, pass-through times
b <= 1), the rest of the factor being part of the softmax scale. Scalings: ``linear`` (positions / factor), ``llama3`` (wavelength-banded), ``dynamic`` (NTK, only active
beyond the original context, which attnstab never exceeds), ``yarn`` (NTK-by-parts, DeepSeek; its attention factor
on cos and sin as LongRoPE's), ``longrope`` (per-frequency divisors, a short and a long
set chosen by the sequence length; its attention factor as above, see :class:`~attnstab_cli.model.config.RopeConfig`).
"""
from __future__ import annotations

import math

import torch

from attnstab_cli.arch.spec import RopeStyle
from attnstab_cli.model.config import RopeConfig


def compute_inv_freq(rope: RopeConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim / 2]`` after the configured scaling, for a forward pass over ``seq_len``
    positions (only LongRoPE depends on it; None: its short set).

    Formed in float32 on purpose: checkpoints were trained with float32 angles (the Hugging Face convention), and
    reproducing the model's own logits matters more here than a more accurate rotation.
    """
    r = rope.rotary_dim
    powers = rope.theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)
    sc = rope.scaling_dict
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "longrope":                       # the divisor multiplies theta^(2i/r) first: the model's rounding
        factors = rope.long_factor if rope.uses_long_factor(seq_len) else rope.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * powers)
    inv = 1.0 / powers
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        inv = _llama3_scale(inv, sc)
    elif kind == "yarn":
        inv = _yarn_scale(powers, rope.theta, r, sc)
    return inv


def _yarn_scale(powers: torch.Tensor, base: float, r: int, sc: dict) -> torch.Tensor:
    """YaRN (NTK-by-parts): frequencies that turn fewer than ``beta_slow`` times over the original context are
    divided by ``factor``, those turning more than ``beta_fast`` times kept, a linear ramp over the dimensions
    between (the correction range, rounded outward unless ``truncate`` is false), as Hugging Face computes it."""
    factor, original = float(sc["factor"]), float(sc["original_max_position_embeddings"])
    fast, slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (r * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001                                         # no singular ramp
    ramp = ((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                           # 1: extrapolated (original), 0: interpolated
    return (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep


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


def compute_rope_cos_sin(rope: RopeConfig, positions: torch.Tensor, dtype: torch.dtype,
                         seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[T, rotary_dim / 2]`` for integer ``positions [T]`` (float32 angles, as trained).

    ``seq_len`` is the length of the forward pass the positions belong to, which selects LongRoPE's factors
    (default: the largest position + 1, as in Hugging Face); a prefix of a longer sequence passes the full length.
    With an attention factor m the model multiplies by its float32 m cos, m sin; these are returned times a / m
    (``rot_scale`` a of :class:`RopeConfig`), so the rotation's norm is a up to that float32 rounding.
    """
    if seq_len is None:
        seq_len = int(positions.max()) + 1 if positions.numel() else None
    angles = positions.float()[:, None] * compute_inv_freq(rope, seq_len).to(positions.device)[None, :]
    if rope.style is RopeStyle.INTERLEAVED_COMPLEX:                    # the model's e^{i angle}
        unit = torch.polar(torch.ones_like(angles), angles)
        cos, sin = unit.real, unit.imag
    else:
        cos, sin = angles.cos(), angles.sin()
    m = rope.attention_factor
    if m != 1.0:
        k = rope.rot_scale / m
        cos, sin = (cos * m).double() * k, (sin * m).double() * k       # the model's float32 m cos, m sin, times a/m
    return cos.to(dtype), sin.to(dtype)


def rope_regimes(rope: RopeConfig) -> list[tuple[int | None, int | None]]:
    """The frequency sets a forward pass may use, as ``(seq_len selecting it, bound on |i - j| under it)``:
    LongRoPE's short set serves sequences of at most ``original_max`` tokens, so offsets below it, its long set
    any offset; every other rope type has one set."""
    if rope.long_factor is None or rope.original_max is None:
        return [(None, None)]
    return [(None, rope.original_max), (rope.original_max + 1, None)]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` coordinates of ``x [B, H, T, D]`` by position (the last ones with
    ``rotary_last``, MLA's [nope; rope]); the rest pass through, times ``pass_scale`` (1 unless an attention factor is
    split off, :class:`RopeConfig`). ``interleaved_split`` reads pairs (2i, 2i + 1) and writes the rotated pairs as
    [first members; second members], as DeepSeek-V3 does (an orthogonal relayout shared by q and k)."""
    r = rope.rotary_dim
    if rope.rotary_last:
        rest, rot = x[..., : x.shape[-1] - r], x[..., x.shape[-1] - r:]
    else:
        rot, rest = x[..., :r], x[..., r:]
    if rope.pass_scale != 1.0 and rest.shape[-1]:
        rest = rest * rope.pass_scale
    if rope.style is RopeStyle.HALF_SPLIT:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    elif rope.style is RopeStyle.INTERLEAVED_SPLIT:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:                                                              # interleaved, in place (also as complex)
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([rest, rotated] if rope.rotary_last else [rotated, rest], dim=-1)
