"""GPU benchmark: fused row-statistics kernel vs PyTorch SDPA forward on the same Q, K, V shapes (THEORY §3.5, §3.7).

The scan computes softmax row statistics for every row on the accelerator (§3.7), so its cost should stay within a
small factor of the attention forward the model runs anyway. Times come from `triton.testing.do_bench` (median, p20,
p80, in ms); the table also gives kernel/SDPA, the GPU and the torch/triton versions. Run by hand, never as a test:

    python bench/bench_row_stats.py                  # default shape grid, bf16, causal
    python bench/bench_row_stats.py --shape 1,32,8,16384,128 --json out/bench_row_stats.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# (B, H, H_kv, n, D): batch 1–8, heads 12–32, head dim 64/128, n 1k–16k; GQA rows as in LLaMA/Mistral.
DEFAULT_SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 12, 12, 1024, 64),
    (8, 12, 12, 1024, 64),
    (4, 16, 16, 2048, 64),
    (2, 16, 16, 4096, 128),
    (1, 32, 8, 4096, 128),
    (2, 32, 8, 8192, 128),
    (1, 32, 8, 16384, 128),
    (1, 12, 12, 16384, 64),
)
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """do_bench quantiles in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass(frozen=True)
class BenchRow:
    B: int
    H: int
    H_kv: int
    n: int
    D: int
    causal: bool
    kernel: Timing | None
    sdpa: Timing | None
    ratio: float | None  # kernel median / SDPA median
    error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", default=None, metavar="B,H,H_kv,n,D",
                   help="shape to time (repeatable); default: the built-in grid")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="time full (non-causal) attention")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement time in ms (default 100)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def parse_shapes(specs: list[str] | None) -> list[tuple[int, int, int, int, int]]:
    if not specs:
        return list(DEFAULT_SHAPES)
    shapes = []
    for spec in specs:
        parts = tuple(int(x) for x in spec.split(","))
        if len(parts) != 5 or parts[1] % parts[2]:
            raise SystemExit(f"bench_row_stats: bad --shape {spec!r}; want B,H,H_kv,n,D with H a multiple of H_kv")
        shapes.append(parts)  # type: ignore[arg-type]
    return shapes


def time_ms(fn, warmup: int, rep: int) -> Timing:
    """Median, p20 and p80 of `fn` in ms via `triton.testing.do_bench`."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
    return Timing(med, p20, p80)


def bench_shape(shape: tuple[int, int, int, int, int], causal: bool, warmup: int, rep: int) -> BenchRow:
    """Time the fused kernel and SDPA forward on one shape; out-of-memory becomes a row with `error`."""
    from attnstab_kernels.row_stats import attn_row_stats

    B, H, H_kv, n, D = shape
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g)  # [B, H, T_q, D]
        k = torch.randn(B, H_kv, n, D, device="cuda", dtype=torch.bfloat16, generator=g)  # [B, H_kv, T_k, D]
        v = torch.randn_like(k)  # [B, H_kv, T_k, D]
        scale = D ** -0.5
        kernel = time_ms(lambda: attn_row_stats(q, k, scale, causal=causal), warmup, rep)
        sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=H_kv != H), warmup, rep)
    except torch.cuda.OutOfMemoryError as exc:
        return BenchRow(B, H, H_kv, n, D, causal, None, None, None, error=f"out of memory: {exc}".splitlines()[0])
    finally:
        torch.cuda.empty_cache()
    return BenchRow(B, H, H_kv, n, D, causal, kernel, sdpa, kernel.median_ms / sdpa.median_ms)


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'B':>2} {'H':>3} {'H_kv':>4} {'n':>6} {'D':>4}  {'kernel ms (p20-p80)':>24}  "
            f"{'sdpa ms (p20-p80)':>24}  {'kernel/sdpa':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r.B:>2} {r.H:>3} {r.H_kv:>4} {r.n:>6} {r.D:>4}"
        if r.error or r.kernel is None or r.sdpa is None:
            lines.append(f"{shape}  {r.error}")
            continue
        cell = lambda t: f"{t.median_ms:8.3f} ({t.p20_ms:.3f}-{t.p80_ms:.3f})"  # noqa: E731
        lines.append(f"{shape}  {cell(r.kernel):>24}  {cell(r.sdpa):>24}  {r.ratio:>11.2f}")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "dtype": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_row_stats: no CUDA device found; this benchmark times the compiled kernel on a GPU. "
              "Correctness tests run on CPU: pytest tests/kernels", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_row_stats: TRITON_INTERPRET is set; unset it to time the compiled kernel", file=sys.stderr)
        return 2
    shapes = parse_shapes(args.shape)
    env = environment()
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | bf16, "
          f"{'causal' if args.causal else 'full'} | times in ms: median (p20-p80)")
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, args.causal, args.warmup, args.rep))
        print(f"done {shape}", file=sys.stderr)
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**env, "quantiles": QUANTILES, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
