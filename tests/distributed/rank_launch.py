"""Start ``attnstab`` as several ranks of one gloo process group, the way torchrun does: one process per rank with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (no GPU, no torchrun agent)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, timeout_s: float = 60.0) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ATTNSTAB_COLLECTIVE_TIMEOUT": str(timeout_s),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                               os.environ.get("PYTHONPATH")]))}
    env.pop("ATTNSTAB_DEBUG", None)
    return env


def run_ranks(args: list[str], world: int = 2, wrapper: dict[int, str] | None = None,
              timeout_s: float = 240.0, collective_timeout_s: float = 60.0) -> list[RankResult]:
    """``attnstab ARGS`` on ``world`` ranks; ``wrapper[r]`` replaces rank r's ``-m attnstab_cli`` by ``-c CODE``
    (which must end by running the CLI), e.g. to make that rank fail."""
    port = free_port()
    procs = []
    for rank in range(world):
        code = (wrapper or {}).get(rank)
        launcher = ["-c", code, *args] if code is not None else ["-m", "attnstab_cli", *args]
        procs.append(subprocess.Popen([sys.executable, *launcher], env=rank_env(rank, world, port,
                                                                                collective_timeout_s),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
    out = []
    for rank, p in enumerate(procs):
        try:
            stdout, stderr = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {rank} did not exit within {timeout_s} s") from None
        out.append(RankResult(rank, p.returncode, stdout, stderr))
    return out


def run_single(args: list[str], timeout_s: float = 240.0) -> subprocess.CompletedProcess:
    """``attnstab ARGS`` in one process, without any launch variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ATTNSTAB_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "attnstab_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


def fail_at_layer(layer: int, how: str) -> str:
    """Code for ``python -c`` that runs the CLI and, on reaching ``layer`` of the scan, kills its own process
    (``how="kill"``, SIGKILL: no Python cleanup at all) or raises (``how="raise"``)."""
    action = ("os.kill(os.getpid(), signal.SIGKILL)" if how == "kill"
              else "raise RuntimeError('injected failure')")
    return (
        "import os, signal, sys\n"
        "import attnstab_cli.metrics.theta_scan as theta_scan\n"
        "observe = theta_scan.ThetaPass.observe\n"
        "def failing(self, trace, ctx=None):\n"
        f"    if trace.layer == {layer}:\n"
        f"        {action}\n"
        "    return observe(self, trace, ctx)\n"
        "theta_scan.ThetaPass.observe = failing\n"
        "sys.argv = ['attnstab', *sys.argv[1:]]\n"
        "from attnstab_cli.cli.entry import main\n"
        "main()\n")
