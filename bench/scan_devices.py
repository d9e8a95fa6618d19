"""Whole-scan check across devices: the same checkpoint and tokens scanned on the CPU (torch path) and on CUDA (fused
kernel), per-head θ columns compared and the time split (forward, θ pass) printed. Run by hand on a CUDA machine:

    python bench/scan_devices.py sample_checkpoints/llama-tiny
    python bench/scan_devices.py --gpt2-small --seq-len 1024     # a random GPT-2-small-shaped model (needs transformers)
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.theta_scan import ThetaOptions
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import ScanOptions, run_scan

COLUMNS = ("theta_mean", "theta_hi_mean", "theta_tilde_lo", "theta_tilde_hi", "theta_paper_mean", "pmax_mean",
           "entropy_mean")


def gpt2_small(directory: Path) -> Path:
    """A randomly initialised GPT-2-small-shaped checkpoint (12 layers, d=768, 12 heads), saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=2048)).save_pretrained(directory)
    return directory


def scan(path: Path, ids: torch.Tensor, device: str, kernel: str, rows: int | None) -> dict:
    model = open_model(path)
    calib = CalibrationSet(batches=(ids,), source="bench", seq_len=ids.shape[1])
    opts = ScanOptions(device=device, kernel=kernel, theta=ThetaOptions(rows_per_head=rows))
    result = run_scan(model, calib, opts)
    return {"heads": result.tables["heads"], "timings": result.timings, "facts": result.facts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", type=Path)
    p.add_argument("--gpt2-small", action="store_true")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--theta-rows", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = gpt2_small(Path(tmp)) if args.gpt2_small else args.checkpoint
        vocab = open_model(path).cfg.vocab_size
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
        runs = {"cpu/torch": scan(path, ids, "cpu", "torch", args.theta_rows),
                "cuda/triton": scan(path, ids, "cuda", "triton", args.theta_rows),
                "cuda/torch": scan(path, ids, "cuda", "torch", args.theta_rows)}
    worst = {c: max(abs((a[c] or 0) - (b[c] or 0)) for a, b in zip(runs["cpu/torch"]["heads"],
                                                                     runs["cuda/triton"]["heads"]))
             for c in COLUMNS}
    report = {"checkpoint": str(args.checkpoint or "gpt2-small (random)"), "tokens": list(ids.shape),
              "max_abs_diff_cpu_vs_triton": worst,
              "timings": {k: v["timings"] for k, v in runs.items()},
              "refined_rows": {k: v["facts"]["theta"]["refined_rows"] for k, v in runs.items()},
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
