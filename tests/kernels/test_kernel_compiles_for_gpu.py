"""The θ row-statistics kernel compiles to PTX for a Hopper GPU, checked without one.

The interpreter tests run the kernel's semantics on the CPU but never its compilation, so a construct the GPU
compiler rejects (a loop-carried type change, a reduction it cannot lower) would pass them and fail on the first
CUDA scan. Triton compiles for a target architecture with no device present (the wheel bundles ptxas); a
subprocess does it with the interpreter off, in the launch configurations the GPU uses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import inspect, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.row_stats import _attn_row_stats_kernel as kernel

pointers = {"Q": "*bf16", "K": "*bf16", "PAD": "*u8", "STATS": "*fp64", "N_KEYS": "*i32", "SCALE": "*fp64"}
out = {}
for name, dtype, acc, block, causal, window, pad in json.loads(sys.argv[1]):
    const = dict(BLOCK_Q=block[0], BLOCK_K=block[1], BLOCK_D=64, IS_CAUSAL=causal, HAS_WINDOW=window,
                 HAS_PAD=pad, UPCAST=False, ACC=getattr(tl, acc), INPUT_PRECISION="ieee")
    sig = {p: {**pointers, "Q": dtype, "K": dtype}.get(p, "constexpr" if p in const else "i32")
           for p in inspect.signature(kernel.fn).parameters}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    ptx = compiled.asm["ptx"]
    out[name] = {"entry": ".entry _attn_row_stats_kernel" in ptx, "exp2": ptx.count("ex2.approx")}
print(json.dumps(out))
"""

CONFIGS = [  # name, q/k dtype, accumulation, (BLOCK_Q, BLOCK_K), causal, window, padding
    ("bf16_causal", "*bf16", "float32", (64, 32), True, False, False),
    ("fp32_window_pad", "*fp32", "float32", (64, 32), False, True, True),
    ("fp64_causal_window", "*fp64", "float64", (32, 32), True, True, False),
]


def test_kernel_compiles_to_ptx_for_sm90() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CONFIGS)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(got) == {c[0] for c in CONFIGS}
    for name, facts in got.items():
        assert facts["entry"], name
        if not name.startswith("fp64"):
            assert facts["exp2"] > 0, name                    # every exponential is an exp2 on the GPU
