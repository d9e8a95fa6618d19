"""Static instruction counts of the θ row-statistics kernel, compiled for a Hopper GPU without one.

Why: the kernel steps of THEORY §3.7 (exp2 with log2(e) folded into the scale, no masking on interior tiles, fewer
reductions in the prefix passes) change what the GPU executes per key block. Their wall-time effect needs a GPU
(``bench/bench_row_stats.py``); what each step removes from the compiled code can be counted anywhere, because
Triton compiles to PTX for a target architecture with no device present (the wheel bundles ``ptxas``). This
script compiles ``kernels.row_stats._attn_row_stats_kernel`` for sm_90 in the GPU launch configuration (bf16,
BLOCK_Q × BLOCK_K = 64 × 32, 4 warps, 2 stages) and counts PTX instructions by opcode, for the causal and the
full (bidirectional) mask: the whole program by opcode, and the body of every loop (one key block of a pass; the
interior, unmasked copy and the masked copy of each pass are separate loops). Counts are static instructions, not
executed ones: a pass over n keys runs its loop body once per key block.

Run:  python bench/kernel_ptx_counts.py [--label NAME] [--out-json PATH]
Appends one record per run to bench/results/kernel_ptx_counts.json (label, git commit, counts). Never run as a test.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPCODES = ("ex2.approx", "lg2.approx", "mul.f32", "fma.rn.f32", "selp", "setp", "shfl.sync", "bar.sync", "wgmma",
           "mma.sync", "ld.global", "ld.shared", "st.shared", "cvt")


def compile_ptx(causal: bool) -> str:
    """PTX of the kernel for sm_90 in the bf16 GPU launch configuration."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.row_stats import _attn_row_stats_kernel, _launch_config

    block_q, block_k, warps, stages = _launch_config_gpu(_launch_config)
    const = dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=64, IS_CAUSAL=causal, HAS_WINDOW=False,
                 HAS_PAD=False, UPCAST=False, ACC=tl.float32, INPUT_PRECISION="ieee")
    pointers = {"Q": "*bf16", "K": "*bf16", "PAD": "*u8", "STATS": "*fp64", "N_KEYS": "*i32", "SCALE": "*fp64"}
    params = inspect.signature(_attn_row_stats_kernel.fn).parameters
    signature = {p: pointers.get(p, "constexpr" if p in const else "i32") for p in params}
    src = ASTSource(fn=_attn_row_stats_kernel, signature=signature, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["ptx"]


def _launch_config_gpu(launch_config) -> tuple[int, int, int, int]:
    """The bf16 GPU configuration, whatever mode the kernel module was imported in."""
    import torch
    import kernels.row_stats as rs

    interpreted = rs.is_interpreted
    rs.is_interpreted = lambda: False
    try:
        return launch_config(torch.bfloat16, None)
    finally:
        rs.is_interpreted = interpreted


def _instructions(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.endswith(";") and not ln.startswith((".", "//", "{", "}"))]


def count(ptx: str) -> dict[str, int]:
    """Instruction counts of the whole program by opcode prefix, plus all instructions."""
    instr = _instructions([ln.strip() for ln in ptx.splitlines()])
    out = {op: sum(1 for ln in instr if re.match(r"(@!?%p\d+\s+)?" + re.escape(op), ln)) for op in OPCODES}
    out["all"] = len(instr)
    return out


def loop_bodies(ptx: str) -> list[dict[str, int]]:
    """Per loop of the program (a label and the later branch back to it), in program order: the instructions of
    one iteration (one key block) and among them exp2, selects and warp shuffles (the reductions' traffic)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", ln))}
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"bra(\.uni)?\s+(\$L__BB\d+_\d+);", ln)
        if m and labels.get(m.group(2), i) < i:
            body = _instructions(lines[labels[m.group(2)]:i + 1])
            out.append({"instructions": len(body), "ex2": sum("ex2." in x for x in body),
                        "selp": sum("selp." in x for x in body), "shfl": sum("shfl." in x for x in body)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--out-json", type=Path, default=ROOT / "bench" / "results" / "kernel_ptx_counts.json")
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "kernels"], capture_output=True,
                                text=True).stdout.strip())
    record = {"label": args.label, "commit": commit, "kernels_modified": dirty, "target": "cuda sm_90",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "counts": {}, "loops": {}}
    for name, causal in (("causal", True), ("full", False)):
        ptx = compile_ptx(causal)
        record["counts"][name], record["loops"][name] = count(ptx), loop_bodies(ptx)
    runs = json.loads(args.out_json.read_text()) if args.out_json.exists() else []
    runs.append(record)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
