"""CPU benchmark (issue 3, item 4a): attnstab's θ path against the plain approach a user would otherwise write.

Plain approach: ``transformers`` eager attention with ``output_attentions=True`` (every layer's full [B, H, n, n]
probabilities), then the sort-based θ estimate in torch. attnstab: the layer-streaming forward pass plus the θ
pass (certified interval for every row, refinement, aggregation). Same random-weight GPT-2-style model, same
tokens. Each measurement runs in a fresh subprocess so peak RSS (``ru_maxrss``) belongs to that approach alone;
we also report the peak above the process's RSS after imports and model loading.

Run:  python bench/bench_theta_cpu.py [--lengths 512 2048] [--json out.json]
Never run as a test. Reports ratios from one run on one machine; see README "Benchmarks".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(n_layer=4, n_embd=256, n_head=8, n_positions=2048, vocab_size=1000)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    model.save_pretrained(path)


def run_plain(path: Path, n: int) -> dict:
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, output_attentions=True)
        means = []
        for p in out.attentions:                                   # [B, H, n, n]
            c = p.sort(dim=-1, descending=True).values.cumsum(-1)
            k = (c - 0.5).abs().argmin(dim=-1, keepdim=True)
            ck = c.gather(-1, k)
            means.append(float((4 * ck * (1 - ck)).mean()))
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(), "base_mb": base, "theta_mean": means}


def run_attnstab(path: Path, n: int) -> dict:
    import torch

    from attnstab_cli.metrics.theta_scan import ThetaOptions, ThetaPass
    from attnstab_cli.model.load import open_model
    from attnstab_cli.model.stream import LayerStream

    model = open_model(path)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        obs = ThetaPass(model.cfg.n_heads, model.cfg.n_kv_heads, ThetaOptions())
        for trace in LayerStream(model, [ids]).layers():
            obs.observe(trace)
            del trace
        records = obs.records()
    means = [sum(r["theta_mean"] for r in records if r["layer"] == layer) / model.cfg.n_heads
             for layer in range(model.cfg.n_layers)]
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(), "base_mb": base, "theta_mean": means,
            "refined_rows": obs.refined_rows}


def _child(mode: str, path: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(path), "--n", str(n)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["plain", "attnstab"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.child:
        fn = run_plain if args.child == "plain" else run_attnstab
        print(json.dumps(fn(args.model, args.n)))
        return
    import torch

    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "model": CONFIG, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_model(path)
        print(f"{'n':>6} {'plain s':>9} {'attnstab s':>11} {'speedup':>8} {'plain MB':>9} {'attnstab MB':>12} "
              f"{'mem ratio':>10} {'plain +MB':>10} {'attnstab +MB':>13}")
        for n in args.lengths:
            plain, ours = _child("plain", path, n), _child("attnstab", path, n)
            row = {"n": n, "plain": plain, "attnstab": ours, "speedup": plain["seconds"] / ours["seconds"],
                   "peak_ratio": ours["peak_mb"] / plain["peak_mb"],
                   "above_base_ratio": (ours["peak_mb"] - ours["base_mb"]) / max(plain["peak_mb"] - plain["base_mb"], 1e-9)}
            results["runs"].append(row)
            print(f"{n:>6} {plain['seconds']:>9.2f} {ours['seconds']:>11.2f} {row['speedup']:>8.2f} "
                  f"{plain['peak_mb']:>9.0f} {ours['peak_mb']:>12.0f} {row['peak_ratio']:>10.2f} "
                  f"{plain['peak_mb'] - plain['base_mb']:>10.0f} {ours['peak_mb'] - ours['base_mb']:>13.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
