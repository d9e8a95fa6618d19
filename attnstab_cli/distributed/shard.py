"""Which calibration sequences each rank streams: contiguous, near-equal shares in sequence order.

Sequence i keeps its global index wherever it runs, so everything seeded per sequence (sampled rows, tier-3
sequences, masked-LM positions) is the same at every world size, and concatenating the ranks' per-sequence records in
rank order restores the one-process order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnstab_cli.errors import UsageError


@dataclass(frozen=True)
class Shard:
    """One rank's batches ``[B, T]`` and the global index of each batch's first sequence."""

    batches: list[torch.Tensor]
    first_seqs: list[int]
    counts: list[int]                    # sequences per rank, in rank order

    @property
    def n_sequences(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)


def shard_sequences(batches: list[torch.Tensor] | tuple[torch.Tensor, ...], rank: int = 0,
                    world_size: int = 1) -> Shard:
    """Rank ``rank``'s share of the sequences of ``batches``: ranks r < n mod W hold ⌈n/W⌉ sequences, the others
    ⌊n/W⌋, rebatched at the first batch's size. One rank keeps the batches exactly as given."""
    sizes = [int(b.shape[0]) for b in batches]
    n = sum(sizes)
    if world_size == 1:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return Shard(list(batches), starts, [n])
    if n < world_size:
        raise UsageError(f"{n} calibration sequences cannot be shared by {world_size} ranks: every rank needs at "
                         f"least one (raise --batches or --batch-size, or start fewer ranks)")
    counts = [n // world_size + (r < n % world_size) for r in range(world_size)]
    start = sum(counts[:rank])
    seqs = torch.cat(list(batches))[start:start + counts[rank]]
    step = sizes[0]
    return Shard([seqs[i:i + step] for i in range(0, seqs.shape[0], step)],
                 [start + i for i in range(0, seqs.shape[0], step)], counts)
