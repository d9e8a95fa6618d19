"""Shared ``Annotated`` option aliases, so every command spells and documents an option the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

Checkpoint = Annotated[str, typer.Argument(
    help="Checkpoint: a Hugging Face directory, a .safetensors file, or a repo id in the local HF cache.",
    show_default=False)]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="Force the architecture family (gpt2, llama, mistral, qwen2, gpt_neox, bert).")]
NHeads = Annotated[Optional[int], typer.Option("--n-heads", help="Attention heads (bare .safetensors files).")]
NKVHeads = Annotated[Optional[int], typer.Option("--n-kv-heads", help="Key/value heads (bare .safetensors files).")]
NormEps = Annotated[Optional[float], typer.Option("--norm-eps", help="Norm epsilon (bare .safetensors files).")]
RopeTheta = Annotated[Optional[float], typer.Option("--rope-theta", help="RoPE base (bare .safetensors files).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or log lines on stderr.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Report directory to write (atomically).")]
Force = Annotated[bool, typer.Option(
    "--force", help="Replace an existing attnstab report directory of the same kind, or an empty directory "
                    "(nothing else, and never the checkpoint or a directory holding it).")]


def config_overrides(n_heads: int | None, n_kv_heads: int | None, norm_eps: float | None,
                     rope_theta: float | None) -> dict[str, Any]:
    """The config values a user may supply for checkpoints that lack them."""
    return {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "norm_eps": norm_eps, "rope_theta": rope_theta}

# Calibration and run flags shared by every command that may scan a checkpoint (scan, compare, gate, track).
Calib = Annotated[Optional[str], typer.Option(
    "--calib", help="Calibration text: a .txt, .jsonl (field 'text') or .parquet (column 'text') file, or "
                    "'random' for uniform random token ids. Default: the bundled corpus.")]
Tokens = Annotated[Optional[Path], typer.Option(
    "--tokens", help="Token ids (.npy or .pt, shape \\[batch, seq] or \\[seq]) used exactly as given.")]
SeqLen = Annotated[Optional[int], typer.Option(
    "--seq-len", help="Tokens per sequence (default min(256, the model's maximum positions)).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per batch.")]
Batches = Annotated[int, typer.Option("--batches", help="Number of batches.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for random calibration and sampling.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, float64, bfloat16, float16.")]
Grad = Annotated[bool, typer.Option(
    "--grad", help="Also the gradient flow: per-layer gradient norms of the training loss (or a probe loss), "
                   "streamed backward one layer at a time.")]
EmpiricalSeqs = Annotated[int, typer.Option(
    "--empirical-seqs", min=0, help="Sequences per layer for the tier-3 empirical Lipschitz lower bound and the "
                                    "tightness ratios (float64 autograd; 0 skips tier 3).")]
HashMode = Annotated[str, typer.Option(
    "--hash", help="Weight fingerprint: 'sampled' (headers plus evenly spaced blocks, ~6 MiB per file) or 'full' "
                   "(every byte).")]
Detail = Annotated[bool, typer.Option(
    "--detail", help="Also the per-layer tables of every metric family (activations, weights, sensitivity, "
                     "Lipschitz tiers, fragility, gradients) and the notable heads.")]
Format = Annotated[str, typer.Option(
    "--format", help="Output on stdout: rich (terminal summary), json or markdown (for CI job summaries).")]


SEED_MAX = 2**64 - 1            # torch, numpy and Python's random all take a seed in [0, 2^64)


def check_seed(seed: int) -> None:
    """``--seed`` must fit the 64 bits every random generator of the scan is seeded with."""
    from attnstab_cli.errors import UsageError

    if not 0 <= seed <= SEED_MAX:
        shown = str(seed) if len(str(seed)) <= 24 else f"{str(seed)[:12]}… ({len(str(seed))} digits)"
        raise UsageError(f"--seed must be an integer from 0 to 2^64 - 1, got {shown}")


def check_format(value: str, json_flag: bool = False) -> str:
    """``--format`` (with ``--json`` as a shorthand for ``--format json``)."""
    from attnstab_cli.errors import UsageError

    fmt = "json" if json_flag else value.lower()
    if fmt not in ("rich", "json", "markdown"):
        raise UsageError(f"--format must be rich, json or markdown, got {value!r}")
    return fmt
