"""The process group a run belongs to: one process, or one rank of those ``torchrun`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) started.

Everything attnstab aggregates is mergeable (THEORY §3.8), so ranks merge with the library's collectives only:
``all_reduce`` for counts, sums, histograms and extrema, ``all_gather_object`` for small records. A one-process
:class:`Group` runs the same calls as identities, so a scan has one code path whatever its world size.

Faults: each rank records in the rendezvous store (``torch.distributed.TCPStore``, the launcher's own) the checkpoints
it passes and, when it fails, its error line. A collective that fails (a peer closed its connection, or the collective
timeout passed) becomes a :class:`PeerFailure` that names the failing rank from those records.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

from attnstab_cli.errors import ScanFailure, UsageError

TIMEOUT_ENV = "ATTNSTAB_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0            # one layer's imbalance between ranks, at most, passes between two checkpoints
_FAILURE_WAIT_S = 2.0                # how long rank 0 waits for a failing peer's error line to reach the store
_PREFIX = "attnstab/"
_OPS = ("sum", "max", "min")


class PeerFailure(ScanFailure):
    """Another rank failed or stopped answering: the run cannot complete (exit 3)."""


@dataclass
class Group:
    """This process's place in the run; the collectives are identities at world size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None           # None: one process, no torch.distributed group
    store: Any = None                    # the rendezvous store (records checkpoints and failures)
    timeout_s: float = DEFAULT_TIMEOUT_S
    steps: int = 0                       # checkpoints this rank has reached

    @property
    def is_root(self) -> bool:
        """Rank 0: the rank that prints and writes."""
        return self.rank == 0

    def device_name(self, name: str) -> str:
        """``--device`` for this rank: under a group, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` when CUDA
        is available."""
        if self.backend is None or name == "cpu" or not torch.cuda.is_available():
            return name
        return f"cuda:{self.local_rank}" if name in ("auto", "cuda") else name

    def all_reduce(self, tensor: torch.Tensor, op: str, what: str = "an aggregate") -> torch.Tensor:
        """``tensor`` reduced over the ranks in place (``op``: sum, max or min) and returned."""
        if op not in _OPS:
            raise ValueError(f"unknown reduction {op!r}")
        if self.backend is None:
            return tensor
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        self._collective(what, lambda: dist.all_reduce(tensor, op=red))
        return tensor

    def all_gather(self, obj: Any, what: str = "records") -> list[Any]:
        """Every rank's ``obj`` (small, picklable records made by attnstab itself), in rank order."""
        if self.backend is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def checkpoint(self, label: str) -> None:
        """Wait until every rank has reached ``label`` (the end of a layer, the written report), so that a rank
        that fails stops the others within one step. Each rank records its arrival first, so that
        :meth:`failure` can name a rank that never arrived."""
        if self.backend is None:
            return
        import torch.distributed as dist

        self.steps += 1
        self._store_set(f"step/{self.rank}", f"{self.steps}\n{label}")
        self._collective(label, dist.barrier)

    def record_failure(self, line: str) -> None:
        """Leave this rank's error line in the store for rank 0 to print."""
        if self.backend is not None:
            self._store_set(f"failed/{self.rank}", line)

    def _collective(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:          # gloo and NCCL raise RuntimeError subclasses (DistBackendError, ...)
            raise self.failure(what, exc) from exc

    def failure(self, what: str, exc: BaseException) -> PeerFailure:
        """The error a failed collective means: which rank failed (its own error line when it left one), else
        which rank stopped before this step, else the collective's own message."""
        failed = self._failed_ranks()
        if failed:
            rank, line = failed[0]
            also = f" (ranks {', '.join(str(r) for r, _ in failed[1:])} failed too)" if len(failed) > 1 else ""
            return PeerFailure(f"rank {rank} failed: {line}{also}")
        behind = self._ranks_behind()
        if behind:
            rank, step = behind[0]
            return PeerFailure(f"rank {rank} stopped responding after {step}, before {what} (its process ended or "
                               f"lost contact; collective timeout {self.timeout_s:g} s)")
        return PeerFailure(f"a collective operation failed at {what}: {' '.join(str(exc).split())[:300]}")

    def _failed_ranks(self) -> list[tuple[int, str]]:
        deadline = time.monotonic() + _FAILURE_WAIT_S
        while True:
            out = [(r, line) for r in range(self.world_size) if r != self.rank
                   if (line := self._store_get(f"failed/{r}")) is not None]
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.1)

    def _ranks_behind(self) -> list[tuple[int, str]]:
        """Ranks that have not reached this rank's last checkpoint, with the last one each reached."""
        out = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            value = self._store_get(f"step/{r}")
            steps, label = (0, "the start") if value is None else value.split("\n", 1)
            if int(steps) < self.steps:
                out.append((r, label))
        return out

    def _store_set(self, key: str, value: str) -> None:
        try:
            self.store.set(_PREFIX + key, value)
        except Exception:                 # the store's host is gone: nothing more to record
            pass

    def _store_get(self, key: str) -> str | None:
        try:
            if not self.store.check([_PREFIX + key]):
                return None
            return self.store.get(_PREFIX + key).decode("utf-8", "replace")
        except Exception:
            return None


SOLO = Group()


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher put in the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool                    # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """The launch variables, or None when this process was not started as one rank of several."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    try:
        world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not a rank of WORLD_SIZE={world}")
    if world == 1:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start the ranks with torchrun, "
                         f"or set the rendezvous address yourself")
    try:
        port = int(env["MASTER_PORT"])
    except ValueError:
        raise UsageError(f"MASTER_PORT must be a port number, got {env['MASTER_PORT']!r}") from None
    return LaunchEnv(rank, world, local, env["MASTER_ADDR"], port,
                     env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def read_timeout(environ: dict[str, str] | None = None) -> float:
    """The collective timeout in seconds (``ATTNSTAB_COLLECTIVE_TIMEOUT``, default 900)."""
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


@contextmanager
def process_group(device: str = "auto") -> Iterator[Group]:
    """The run's group: :data:`SOLO` outside a multi-process launch, else this rank joined to the others (gloo on
    the CPU; NCCL for CUDA tensors when ``device`` may use CUDA and CUDA is available). An exception leaving the
    block is recorded in the store for rank 0 before it propagates; the group is torn down on the way out."""
    env = read_launch_env()
    if env is None:
        yield SOLO
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run one process")
    timeout = read_timeout()
    cuda = device != "cpu" and torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(env.local_rank)
    wait = timedelta(seconds=timeout)
    try:
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                              is_master=env.rank == 0 and not env.agent_store, timeout=wait,
                              multi_tenant=not env.agent_store)
        dist.init_process_group(backend, store=dist.PrefixStore(_PREFIX + "pg/", store), rank=env.rank,
                                world_size=env.world_size, timeout=wait)
    except Exception as exc:
        raise ScanFailure(f"rank {env.rank} could not join the process group at {env.master_addr}:"
                          f"{env.master_port}: {' '.join(str(exc).split())[:300]}") from None
    group = Group(env.rank, env.world_size, env.local_rank, backend, store, timeout)
    try:
        yield group
    except BaseException as exc:
        group.record_failure(error_line(exc))
        raise
    finally:
        dist.destroy_process_group()


def error_line(exc: BaseException) -> str:
    """One line for an exception: an attnstab error's own message, else its type and text."""
    from attnstab_cli.errors import AttnstabError

    if isinstance(exc, AttnstabError):
        return exc.message
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
