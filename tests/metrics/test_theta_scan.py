"""The θ pass of the scan (issue 3, items 1–3; THEORY §3.7, §3.8, T11) against independent computations.

Independent references here: θ by brute force over all subsets (n ≤ 18, numpy, no code shared with the tool), the
paper's estimator re-implemented in a few lines, p_max and entropy from dense softmax rows, and the attention
probabilities of ``transformers`` eager attention for the end-to-end check.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.theta_scan import ThetaOptions, ThetaPass
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import ScanOptions, run_scan
from trace_helpers import make_trace


@lru_cache(maxsize=None)
def _subset_bits(n: int) -> np.ndarray:
    """All 2^n subsets of n items as a 0/1 matrix [2^n, n]."""
    return ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(np.float64)


def brute_theta(p: np.ndarray) -> float:
    """max_S 4 p(S)(1 − p(S)) over every subset of the nonzero entries of one row (Definition 4.1)."""
    q = p[p > 0]
    if q.size <= 1:
        return 0.0
    q = q / q.sum()
    mass = _subset_bits(q.size) @ q
    return float((4.0 * mass * (1.0 - mass)).max())


def paper_estimate(p: np.ndarray) -> float:
    """A5 as the paper describes it: sorted prefix whose mass is closest to 1/2, value 4c(1 − c)."""
    q = np.sort(p[p > 0])[::-1]
    if q.size == 0:
        return 0.0
    c = np.cumsum(q / q.sum())
    k = int(np.argmin(np.abs(c - 0.5)))
    return float(4.0 * c[k] * (1.0 - c[k]))


def dense_probabilities(q, k, scale, causal, window, pad) -> torch.Tensor:
    """[B, H, T, T] float64 softmax from dense logits with the masks applied by hand (test sizes only)."""
    group = q.shape[1] // k.shape[1]
    logits = scale * q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
    t = logits.shape[-1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    ok = torch.ones(t, t, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (i - j) < window
    ok = ok[None, None] & (pad[:, None, None, :] if pad is not None else True)
    return logits.masked_fill(~ok, -math.inf).softmax(-1).nan_to_num(0.0)


def expected_columns(probs: torch.Tensor, min_keys: int) -> dict[str, list[float]]:
    """Per-head reference values of the θ/p_max/entropy columns from dense rows [B, H, T, T]."""
    p = probs.permute(1, 0, 2, 3).reshape(probs.shape[1], -1, probs.shape[-1]).numpy()   # [H, rows, T]
    out: dict[str, list] = {k: [] for k in ("n_rows", "n_rows_short", "theta_mean", "theta_lo_min", "theta_tilde",
                                            "theta_paper_mean", "pmax_mean", "pmax_max", "entropy_mean",
                                            "peaked_frac")}
    for rows in p:
        n_keys = (rows > 0).sum(-1)
        theta = np.array([brute_theta(r) for r in rows])
        keep = n_keys >= min_keys
        r = rows[keep]
        pmax = r.max(-1)
        ent = -np.sum(np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0), -1)
        out["n_rows"].append(int(keep.sum()))
        out["n_rows_short"].append(int((~keep).sum()))
        out["theta_mean"].append(theta[keep].mean())
        out["theta_lo_min"].append(theta[keep].min())
        out["theta_tilde"].append(theta.max())
        out["theta_paper_mean"].append(np.mean([paper_estimate(x) for x in r]))
        out["pmax_mean"].append(pmax.mean())
        out["pmax_max"].append(pmax.max())
        out["entropy_mean"].append(ent.mean())
        out["peaked_frac"].append(float((pmax >= 0.5).mean()))
    return out


CASES = {
    "causal_gqa_padding": dict(causal=True, window=None, pad_last=3, h=4, h_kv=2),
    "bidirectional_mqa": dict(causal=False, window=None, pad_last=0, h=4, h_kv=1),
    "sliding_window": dict(causal=True, window=5, pad_last=0, h=2, h_kv=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_observer_matches_brute_force(case: str) -> None:
    c = CASES[case]
    gen = torch.Generator().manual_seed(7)
    b, t, d = 2, 17, 8
    q = torch.randn(b, c["h"], t, d, generator=gen) * 1.5
    k = torch.randn(b, c["h_kv"], t, d, generator=gen) * 1.5
    pad = None
    if c["pad_last"]:
        pad = torch.ones(b, t, dtype=torch.bool)
        pad[1, t - c["pad_last"]:] = False
    min_keys = 5
    # tol = 0: every row full coverage does not pin exactly is refined (A1 here), as this test compares exactly
    obs = ThetaPass(c["h"], c["h_kv"], ThetaOptions(min_keys=min_keys, slack=0.0, tol=0.0, rows_per_head=None))
    obs.observe(make_trace(q, k, 0.35, c["causal"], c["window"], pad))
    rec = obs.records()
    ref = expected_columns(dense_probabilities(q, k, 0.35, c["causal"], c["window"], pad), min_keys)
    assert [r["kv_head"] for r in rec] == [h // (c["h"] // c["h_kv"]) for h in range(c["h"])]
    for h, r in enumerate(rec):
        assert r["n_rows"] == ref["n_rows"][h] and r["n_rows_short"] == ref["n_rows_short"][h]
        # every row has ≤ 20 keys, so every interval is exact (A1): lo = hi = brute force
        assert r["theta_exact_frac"] == 1.0 and r["theta_wide_rows"] == 0
        for col, ref_col in (("theta_mean", "theta_mean"), ("theta_hi_mean", "theta_mean"),
                             ("theta_lo_min", "theta_lo_min"), ("theta_tilde_lo", "theta_tilde"),
                             ("theta_tilde_hi", "theta_tilde"), ("theta_paper_mean", "theta_paper_mean"),
                             ("pmax_mean", "pmax_mean"), ("pmax_max", "pmax_max"),
                             ("entropy_mean", "entropy_mean"), ("peaked_frac", "peaked_frac")):
            assert r[col] == pytest.approx(ref[ref_col][h], abs=1e-9), (col, h)
        assert r["theta_width_max"] <= 1e-12
        assert r["theta_p05_lo"] <= r["theta_p05"] <= r["theta_p05_hi"]


def test_uniform_causal_rows_hand_computed() -> None:
    """THEORY T11: uniform attention over n = i + 1 keys has θ = 1 − (n mod 2)/n²; row 0 has θ = 0; rows with
    fewer than min_keys keys leave the aggregates but not θ̃."""
    t, min_keys = 64, 16
    q = torch.zeros(1, 2, t, 4)
    k = torch.randn(1, 2, t, 4, generator=torch.Generator().manual_seed(0))
    obs = ThetaPass(2, 2, ThetaOptions(min_keys=min_keys, slack=0.0, rows_per_head=None))
    obs.observe(make_trace(q, k, 1.0, causal=True))
    theta = [0.0] + [1.0 - (n % 2) / n**2 for n in range(2, t + 1)]
    kept = theta[min_keys - 1:]
    for r in obs.records():
        assert r["n_rows"] == t - min_keys + 1 and r["n_rows_short"] == min_keys - 1
        assert r["theta_mean"] == pytest.approx(sum(kept) / len(kept), abs=1e-12)
        assert r["theta_lo_min"] == pytest.approx(min(kept), abs=1e-12)
        assert r["theta_tilde_lo"] == pytest.approx(1.0, abs=1e-12)
        assert r["pmax_max"] == pytest.approx(1.0 / min_keys, abs=1e-12)
        assert r["entropy_mean"] == pytest.approx(np.mean([math.log(n) for n in range(min_keys, t + 1)]), abs=1e-9)
        # odd n > 20: no partition reaches 1/2, and the cardinality bound (n, p_max, p_min) certifies it, so every
        # uniform row is pinned without a sort: θ_hi = θ_lo = 1 − 1/n²
        assert r["theta_hi_mean"] >= r["theta_mean"]
        assert r["theta_hi_mean"] == pytest.approx(r["theta_mean"], abs=1e-12)
        assert r["theta_wide_rows"] == 0


def test_budget_keeps_intervals_certified() -> None:
    """With no refinement budget every row still gets a certified interval that contains the truth."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 18, 8, generator=gen), torch.randn(1, 2, 18, 8, generator=gen)
    probs = dense_probabilities(q, k, 0.5, True, None, None)
    ref = expected_columns(probs, min_keys=1)
    obs = ThetaPass(2, 2, ThetaOptions(min_keys=1, rows_per_head=0))
    # rows_per_head=0 still refines rows with ≤ 20 keys; use longer rows for the unrefined case below
    obs.observe(make_trace(q, k, 0.5, True))
    for h, r in enumerate(obs.records()):
        assert r["theta_mean"] <= ref["theta_mean"][h] <= r["theta_hi_mean"]
    t = 40
    q, k = torch.randn(1, 2, t, 8, generator=gen) * 0.3, torch.randn(1, 2, t, 8, generator=gen)
    obs = ThetaPass(2, 2, ThetaOptions(min_keys=1, rows_per_head=0))
    obs.observe(make_trace(q, k, 0.5, True))
    full = ThetaPass(2, 2, ThetaOptions(min_keys=1, rows_per_head=None))
    full.observe(make_trace(q, k, 0.5, True))
    assert obs.unrefined_rows > 0 and full.unrefined_rows == 0
    for cheap, best in zip(obs.records(), full.records()):
        assert cheap["theta_mean"] <= best["theta_mean"] + 1e-12
        assert cheap["theta_hi_mean"] >= best["theta_hi_mean"] - 1e-12
        assert cheap["theta_wide_rows"] >= best["theta_wide_rows"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "bert", "distilbert", "roberta", "xlm_roberta",
                                    "gptj", "phi"])
def test_scan_heads_match_transformers(family: str, tiny_checkpoints: dict) -> None:
    """End to end: heads.parquet columns from the layer stream equal brute force on ``transformers`` attentions."""
    path, ref_model = tiny_checkpoints[family]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    calib = CalibrationSet(batches=(ids,), source="test", seq_len=16)
    opts = ScanOptions(device="cpu", kernel="torch", theta=ThetaOptions(min_keys=4, rows_per_head=None))
    heads = run_scan(model, calib, opts).tables["heads"]
    with torch.no_grad():
        attentions = ref_model(ids, output_attentions=True).attentions
    assert len(heads) == model.cfg.n_layers * model.cfg.n_heads
    for layer, probs in enumerate(attentions):
        ref = expected_columns(probs.double() / probs.double().sum(-1, keepdim=True), min_keys=4)
        for h in range(model.cfg.n_heads):
            r = heads[layer * model.cfg.n_heads + h]
            assert (r["layer"], r["head"]) == (layer, h)
            assert r["n_rows"] == ref["n_rows"][h]
            # float32 probabilities from transformers vs float64 from recorded q, k: |Δθ| ≤ 2‖Δp‖₁ (§2.1)
            assert r["theta_mean"] == pytest.approx(ref["theta_mean"][h], abs=2e-5)
            assert r["theta_tilde_hi"] == pytest.approx(ref["theta_tilde"][h], abs=2e-5)
            assert r["theta_tilde_hi"] >= ref["theta_tilde"][h] - 1e-7      # slack covers the float32 rounding
            assert r["pmax_mean"] == pytest.approx(ref["pmax_mean"][h], abs=1e-5)
            assert r["entropy_mean"] == pytest.approx(ref["entropy_mean"][h], abs=1e-4)
