"""The split of calibration sequences over ranks, the launch variables, and per-sequence seeds."""
from __future__ import annotations

import pytest
import torch

from attnstab_cli.distributed.group import SOLO, read_launch_env, read_timeout
from attnstab_cli.distributed.shard import shard_sequences
from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.seeding import sequence_rand


def _batches(n: int, size: int, t: int = 3) -> list[torch.Tensor]:
    seqs = torch.arange(n * t).view(n, t)
    return [seqs[i:i + size] for i in range(0, n, size)]


@pytest.mark.parametrize("n,size,world", [(3, 3, 2), (8, 4, 2), (7, 2, 3), (5, 1, 5), (10, 4, 4)])
def test_shards_cover_every_sequence_once_in_order(n: int, size: int, world: int) -> None:
    batches = _batches(n, size)
    shards = [shard_sequences(batches, r, world) for r in range(world)]
    assert torch.equal(torch.cat([b for s in shards for b in s.batches]), torch.cat(batches))
    counts = [s.n_sequences for s in shards]
    assert counts == shards[0].counts and max(counts) - min(counts) <= 1 and sum(counts) == n
    for s in shards:                                  # each batch's first sequence keeps its global index
        assert all(int(b[0, 0]) // 3 == first for b, first in zip(s.batches, s.first_seqs))
        assert all(b.shape[0] <= size for b in s.batches)


def test_one_rank_keeps_the_batches() -> None:
    batches = _batches(7, 3)
    shard = shard_sequences(batches)
    assert shard.batches == batches and shard.first_seqs == [0, 3, 6] and shard.counts == [7]


def test_more_ranks_than_sequences_is_refused() -> None:
    with pytest.raises(UsageError, match="3 calibration sequences cannot be shared by 4 ranks"):
        shard_sequences(_batches(3, 2), 0, 4)


def test_launch_variables() -> None:
    assert read_launch_env({}) is None
    assert read_launch_env({"WORLD_SIZE": "1", "RANK": "0"}) is None          # one process: no group
    env = read_launch_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                           "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port, env.agent_store) == (1, 2, 1, 29500, True)
    with pytest.raises(UsageError, match="MASTER_ADDR and MASTER_PORT not set"):
        read_launch_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(UsageError, match="is not a rank of"):
        read_launch_env({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(UsageError, match="must be integers"):
        read_launch_env({"WORLD_SIZE": "two"})
    assert read_timeout({}) == 900.0 and read_timeout({"ATTNSTAB_COLLECTIVE_TIMEOUT": "12.5"}) == 12.5
    with pytest.raises(UsageError, match="positive number of seconds"):
        read_timeout({"ATTNSTAB_COLLECTIVE_TIMEOUT": "0"})


def test_one_process_collectives_are_identities() -> None:
    t = torch.tensor([1.0, 2.0])
    assert SOLO.all_reduce(t, "max") is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert SOLO.all_gather({"a": 1}) == [{"a": 1}]
    SOLO.checkpoint("nothing")
    assert SOLO.device_name("auto") == "auto"
    with pytest.raises(ValueError, match="unknown reduction"):
        SOLO.all_reduce(t, "mean")


def test_seeded_draws_do_not_depend_on_batching() -> None:
    """Sequence i draws the same numbers in a batch of 4 starting at 0 as alone, starting at i."""
    whole = sequence_rand(7, "refine", 0, (4, 2, 5), layer=3)
    for i in range(4):
        assert torch.equal(sequence_rand(7, "refine", i, (1, 2, 5), layer=3)[0], whole[i])
    assert not torch.equal(sequence_rand(7, "refine", 0, (1, 2, 5), layer=4)[0], whole[0])   # layers differ
    assert not torch.equal(sequence_rand(7, "paper", 0, (1, 2, 5), layer=3)[0], whole[0])    # purposes differ
