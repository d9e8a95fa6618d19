"""Random draws seeded per (purpose, layer, sequence), so that what a scan samples never depends on how the
sequences are batched or which rank holds them."""
from __future__ import annotations

import hashlib

import torch


def sequence_generator(seed: int, purpose: str, seq: int, layer: int = -1) -> torch.Generator:
    """A CPU generator for one sequence's draws of one purpose (``"refine"``, ``"paper"``, ...) in one layer."""
    digest = hashlib.blake2b(f"{seed}/{purpose}/{layer}/{seq}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sequence_rand(seed: int, purpose: str, first_seq: int, shape: tuple[int, ...], layer: int = -1) -> torch.Tensor:
    """Uniform float64 draws of shape ``[B, ...]``: row b from sequence ``first_seq + b``'s own generator."""
    return torch.stack([torch.rand(shape[1:], generator=sequence_generator(seed, purpose, first_seq + b, layer),
                                   dtype=torch.float64) for b in range(shape[0])])
