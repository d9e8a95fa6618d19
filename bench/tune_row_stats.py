"""Sweep the fused row-statistics kernel's launch configs (BLOCK_Q, BLOCK_K, warps, stages) on a few shapes and print
each config's median time relative to SDPA forward on the same shape. Run by hand on a CUDA machine:

    python bench/tune_row_stats.py
"""
from __future__ import annotations

import itertools

import torch
import triton.testing

import attnstab_kernels.row_stats as rs

SHAPES = ((4, 16, 16, 2048, 64), (1, 32, 8, 8192, 128))
CONFIGS = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)) if not (c[0] == 64 and c[3] == 3)]


def main() -> None:
    base = rs._launch_config
    print(f"# {torch.cuda.get_device_name()} | bf16 causal | kernel ms / SDPA ms")
    for B, H, H_kv, n, D in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, H_kv, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=H != H_kv), warmup=25, rep=100)
        ref = None
        results = []
        for bq, bk, w, s in CONFIGS:
            rs._launch_config = lambda dtype, block_q, c=(bq, bk, w, s): c
            try:
                out = rs.attn_row_stats(q, k, D ** -0.5, causal=True)
                if ref is None:
                    ref = out
                err = max(float((getattr(out, f) - getattr(ref, f)).abs().nan_to_num().max()) for f in ("pmax", "theta_lo"))
                ms = triton.testing.do_bench(lambda: rs.attn_row_stats(q, k, D ** -0.5, causal=True), warmup=25, rep=100)
                results.append((ms / sdpa, (bq, bk, w, s), ms, err))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is just skipped
                print(f"  {(bq, bk, w, s)} failed: {type(exc).__name__}: {str(exc)[:80]}")
        rs._launch_config = base
        print(f"shape {(B, H, H_kv, n, D)}: SDPA {sdpa:.3f} ms")
        for ratio, cfg, ms, err in sorted(results)[:8]:
            print(f"  {cfg}: {ms:.3f} ms  ratio {ratio:.2f}  max|diff vs first| {err:.1e}")


if __name__ == "__main__":
    main()
