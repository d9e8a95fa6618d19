"""The scan flags of every command that may scan a checkpoint (``scan``, ``compare``, ``gate``, ``track``), declared
once.

:func:`with_scan_flags` appends them to a command's signature, which is what Typer reads, and hands the command one
:class:`ScanFlags` that builds the :class:`~attnstab_cli.scan.ScanRequest` for any of its checkpoints. Every command
therefore scans with the same calibration, run and θ options, and accepts a bare ``.safetensors`` file with
``--arch``, ``--n-heads``, ``--n-kv-heads``, ``--norm-eps`` and ``--rope-theta``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from attnstab_cli.cli.options import (
    Arch, BatchSize, Batches, Calib, Device, Dtype, EmpiricalSeqs, Grad, HashMode, NHeads, NKVHeads, NormEps,
    RopeTheta, Seed, SeqLen, Tokens, config_overrides,
)
from attnstab_cli.cli.targets import build_scan_request
from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.curvature_scan import CurvatureOptions
from attnstab_cli.metrics.theta_scan import ThetaOptions
from attnstab_cli.scan import ScanRequest

THETA = ThetaOptions()                  # the defaults the θ options show

Kernel = Annotated[str, typer.Option(
    "--kernel", help="Row statistics: auto (Triton on CUDA, torch otherwise), torch or triton.")]
MinKeys = Annotated[int, typer.Option(
    "--min-keys", min=1, help="Rows with fewer unmasked keys are left out of the descriptive θ aggregates "
                              "(counted in n_rows_short; the bound input theta_tilde still uses them).")]
ThetaTol = Annotated[float, typer.Option(
    "--theta-tol", min=0.0, help="Refine rows whose certified θ interval is wider than this.")]
ThetaRows = Annotated[str, typer.Option(
    "--theta-rows", help="Wide rows refined per head and sequence (all rows with ≤ 20 keys always are), or 'all'.")]
TopK = Annotated[int, typer.Option(
    "--top-k", min=0, max=20, help="k of the top-k θ upper bound (2^k subset sums per refined row).")]
ThetaSlack = Annotated[float, typer.Option(
    "--theta-slack", min=0.0, max=0.5, help="Widening of every θ interval for float32 rounding of q, k.")]


@dataclass(frozen=True)
class ScanFlags:
    """The shared flags as given on the command line (defaults: THEORY's and the README's)."""

    calib: Optional[str] = None
    tokens: Optional[Path] = None
    seq_len: Optional[int] = None
    batch_size: int = 4
    batches: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    kernel: str = "auto"
    grad: bool = False
    empirical_seqs: int = 1
    hash_mode: str = "sampled"
    min_keys: int = THETA.min_keys
    theta_tol: float = THETA.tol
    theta_rows: str = str(THETA.rows_per_head)
    top_k: int = THETA.top_k
    theta_slack: float = THETA.slack
    arch: Optional[str] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    norm_eps: Optional[float] = None
    rope_theta: Optional[float] = None

    def request(self, checkpoint: str, *, weights_only: bool = False,
                curvature: CurvatureOptions | None = None) -> ScanRequest:
        """The scan of ``checkpoint`` these flags ask for; device, dtype, kernel and seed are checked here."""
        theta = ThetaOptions(min_keys=self.min_keys, tol=self.theta_tol, top_k=self.top_k, slack=self.theta_slack,
                             rows_per_head=parse_theta_rows(self.theta_rows), seed=self.seed)
        return build_scan_request(
            checkpoint, calib=self.calib, tokens=self.tokens, seq_len=self.seq_len, batch_size=self.batch_size,
            batches=self.batches, seed=self.seed, device=self.device, dtype=self.dtype, grad=self.grad,
            empirical_seqs=self.empirical_seqs, hash_mode=self.hash_mode, theta=theta, kernel=self.kernel,
            weights_only=weights_only, arch=self.arch,
            overrides=config_overrides(self.n_heads, self.n_kv_heads, self.norm_eps, self.rope_theta),
            curvature=curvature)


def parse_theta_rows(value: str) -> int | None:
    """``--theta-rows``: a non-negative count, or ``all`` (None: refine every wide row)."""
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"--theta-rows must be a non-negative integer or 'all', got {value!r}")
    return n


_ANNOTATIONS: dict[str, Any] = {
    "calib": Calib, "tokens": Tokens, "seq_len": SeqLen, "batch_size": BatchSize, "batches": Batches, "seed": Seed,
    "device": Device, "dtype": Dtype, "kernel": Kernel, "grad": Grad, "empirical_seqs": EmpiricalSeqs,
    "hash_mode": HashMode, "min_keys": MinKeys, "theta_tol": ThetaTol, "theta_rows": ThetaRows, "top_k": TopK,
    "theta_slack": ThetaSlack, "arch": Arch, "n_heads": NHeads, "n_kv_heads": NKVHeads, "norm_eps": NormEps,
    "rope_theta": RopeTheta,
}
FLAG_PARAMETERS = tuple(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                          annotation=_ANNOTATIONS[f.name]) for f in fields(ScanFlags))


def with_scan_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` (which takes ``flags: ScanFlags``) the shared scan flags as command-line options."""
    own = inspect.signature(command, eval_str=True)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
              and p.default is not inspect.Parameter.empty else p
              for p in own.parameters.values() if p.name != "flags"]
    clash = {p.name for p in params} & {p.name for p in FLAG_PARAMETERS}
    if clash:
        raise TypeError(f"{command.__name__} declares shared scan flags itself: {sorted(clash)}")
    names = [p.name for p in FLAG_PARAMETERS]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = ScanFlags(**{name: kwargs.pop(name) for name in names if name in kwargs})
        return command(*args, flags=flags, **kwargs)

    signature = own.replace(parameters=[*params, *FLAG_PARAMETERS])
    wrapper.__signature__ = signature                              # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    del wrapper.__wrapped__                                        # Typer reads this signature, not the command's
    return wrapper
