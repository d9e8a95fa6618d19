"""A scan sharded over 2 gloo ranks reports what one process reports on the same tokens (THEORY §3.8).

Counts, extrema, histogram percentiles and every per-sequence maximum are bit-identical; columns that are sums or
means (or are computed from them) agree to 1e-12 relative, logs of them to 1e-12 absolute. Faults: a rank that dies
or raises makes every rank exit non-zero, rank 0 prints one ``Error:`` line naming it, and no report appears.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rank_launch import REPO, fail_at_layer, run_ranks, run_single
from tiny_models import save_tiny_model

SAMPLES = REPO / "sample_checkpoints"
# Columns that are sums over tokens or sequences, or are computed from such sums: merged up to float64
# reassociation. Every other column must be bit-identical.
SUMMED = ("theta_mean", "theta_hi_mean", "theta_paper_mean", "pmax_mean", "entropy_mean", "sink_mass_mean",
          "r_resid_mean", "r_ln_mean", "theta_bar", "sens_proxy_resid", "sens_proxy_ln", "router_entropy_mean",
          "gate_theta_mean", "grad_h_in", "grad_attn_params", "grad_ffn_params", "grad_norm_params", "grad_loss")
LOGS = ("sens_log_theta", "sens_log_proj", "sens_log_r2_resid", "sens_log_r2_ln")


def compare_reports(one: Path, many: Path) -> list[str]:
    """The columns of every table of ``many`` that disagree with ``one`` beyond what the merge allows."""
    bad = []
    tables = sorted(p.name for p in one.glob("*.parquet"))
    assert tables == sorted(p.name for p in many.glob("*.parquet"))
    for name in tables:
        a, b = pd.read_parquet(one / name), pd.read_parquet(many / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for col in a.columns:
            x, y = a[col].to_numpy(), b[col].to_numpy()
            if x.dtype.kind != "f":
                if not all(p == q or (pd.isna(p) and pd.isna(q)) for p, q in zip(x, y)):
                    bad.append(f"{name}:{col}")
                continue
            if col in SUMMED:
                ok = np.allclose(x, y, rtol=1e-12, atol=0.0, equal_nan=True)
            elif col in LOGS:
                ok = np.allclose(x, y, rtol=0.0, atol=1e-12, equal_nan=True)
            else:
                ok = np.array_equal(x, y, equal_nan=True)
            if not ok:
                bad.append(f"{name}:{col}")
    return bad


def scan_both(tmp_path: Path, checkpoint: Path, extra: list[str]) -> tuple[Path, Path, list]:
    one, many = tmp_path / "one", tmp_path / "many"
    single = run_single(["scan", str(checkpoint), "--out", str(one), "-q", *extra])
    assert single.returncode == 0, single.stderr
    ranks = run_ranks(["scan", str(checkpoint), "--out", str(many), "-q", *extra])
    for r in ranks:
        assert r.returncode == 0, (r.rank, r.stderr)
    return one, many, ranks


@pytest.mark.parametrize("checkpoint,extra", [
    # 3 sequences on 2 ranks (2 + 1, rebatched), with the gradient pass in float64
    (SAMPLES / "llama-tiny", ["--batch-size", "3", "--batches", "1", "--grad", "--dtype", "float64"]),
    # an encoder with the masked-LM loss: masked positions drawn per sequence
    (SAMPLES / "bert-tiny", ["--batch-size", "3", "--batches", "1", "--grad", "--dtype", "float64"]),
    # the default float32 scan of 8 sequences, 4 per rank, post-LN-free GPT-2 with learned positions
    (SAMPLES / "gpt2-tiny", []),
], ids=["llama-uneven-grad", "bert-mlm-grad", "gpt2-default"])
def test_two_ranks_report_what_one_process_reports(tmp_path: Path, checkpoint: Path, extra: list[str]) -> None:
    one, many, ranks = scan_both(tmp_path, checkpoint, extra)
    assert compare_reports(one, many) == []
    assert ranks[1].stdout == "" and ranks[1].stderr == ""          # rank 0 alone prints
    run_one = json.loads((one / "manifest.json").read_text())["run"]
    run_many = json.loads((many / "manifest.json").read_text())["run"]
    assert run_one["distributed"]["world_size"] == 1 and run_one["distributed"]["backend"] is None
    n = sum(run_one["distributed"]["sequences_per_rank"])
    assert run_many["distributed"] == {"world_size": 2, "backend": "gloo",
                                       "sequences_per_rank": [math.ceil(n / 2), n // 2]}
    assert run_many["theta"] == run_one["theta"]                     # row counts of refinement and A5 samples
    assert run_many["tier3"] == run_one["tier3"]


def test_torchrun_scan_reports_what_one_process_reports(tmp_path: Path) -> None:
    """The same through torchrun itself, whose agent hosts the rendezvous store."""
    one, many = tmp_path / "one", tmp_path / "many"
    args = ["scan", str(SAMPLES / "llama-tiny"), "-q", "--batch-size", "2", "--batches", "2"]
    assert run_single([*args, "--out", str(one)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ATTNSTAB_DEBUG")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "attnstab_cli", *args, "--out", str(many)], env=env, capture_output=True,
                         text=True, timeout=240, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert json.loads((many / "manifest.json").read_text())["run"]["distributed"]["world_size"] == 2
    assert compare_reports(one, many) == []


def test_mixture_of_experts_routing_merges(tmp_path: Path) -> None:
    """Expert counts, loads and the margin quantile over the tokens of both ranks (experts.parquet included)."""
    ckpt = tmp_path / "mixtral"
    save_tiny_model("mixtral", ckpt)
    one, many, _ = scan_both(tmp_path, ckpt, ["--calib", "random", "--batch-size", "2", "--batches", "2",
                                              "--seq-len", "24"])
    assert (many / "experts.parquet").exists()
    assert compare_reports(one, many) == []


def _no_report(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_failing_rank_stops_every_rank(tmp_path: Path, how: str) -> None:
    out = tmp_path / "report"
    ranks = run_ranks(["scan", str(SAMPLES / "llama-tiny"), "--out", str(out), "-q"],
                      wrapper={1: fail_at_layer(1, how)}, timeout_s=120.0, collective_timeout_s=60.0)
    assert all(r.returncode != 0 for r in ranks), [(r.returncode, r.stderr) for r in ranks]
    errors = [line for line in ranks[0].stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, ranks[0].stderr
    assert "rank 1" in errors[0]
    if how == "raise":
        assert "injected failure" in errors[0]
        assert ranks[1].stderr == ""                                 # its error is rank 0's to print
    else:
        assert "layer 0" in errors[0]                                # the last layer it finished
    assert "Traceback" not in ranks[0].stderr
    _no_report(out)


def test_curvature_is_refused_under_several_ranks(tmp_path: Path) -> None:
    out = tmp_path / "report"
    ranks = run_ranks(["scan", str(SAMPLES / "llama-tiny"), "--out", str(out), "--curvature", "-q"])
    assert all(r.returncode == 2 for r in ranks), [(r.returncode, r.stderr) for r in ranks]
    errors = [line for line in ranks[0].stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--curvature runs in one process only" in errors[0]
    _no_report(out)


@pytest.mark.parametrize("command", ["compare", "gate"])
def test_commands_that_are_not_distributed_refuse_several_ranks(tmp_path: Path, command: str) -> None:
    args = [command, str(SAMPLES / "gpt2-tiny"), str(SAMPLES / "gpt2-tiny-step200")] if command == "compare" \
        else [command, str(SAMPLES / "gpt2-tiny"), "--rule", "theta_mean<=1"]
    ranks = run_ranks(args)
    assert [r.returncode for r in ranks] == [2, 2]
    errors = [line for line in ranks[0].stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"{command} runs in one process" in errors[0]
    assert ranks[1].stderr == ""
