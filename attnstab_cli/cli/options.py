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
Force = Annotated[bool, typer.Option("--force", help="Replace an existing report directory.")]


def config_overrides(n_heads: int | None, n_kv_heads: int | None, norm_eps: float | None,
                     rope_theta: float | None) -> dict[str, Any]:
    """The config values a user may supply for checkpoints that lack them."""
    return {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "norm_eps": norm_eps, "rope_theta": rope_theta}
