"""Numerical-fragility diagnostics (THEORY §13; issue 4, item 5): each definition on hand-built inputs and against
dense brute force (eigvalsh, svdvals, matrix_norm on the materialised matrices)."""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.fragility import (compute_kappa_score, compute_kappa_v, compute_norm_constants,
                                            compute_softmax_lambda_max)
from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.scan import ScanOptions, run_scan

F64 = torch.float64


@pytest.mark.parametrize("t,d,h,h_kv", [(9, 4, 2, 1), (3, 8, 2, 2), (16, 16, 4, 2)])
def test_kappa_score_matches_dense(t: int, d: int, h: int, h_kv: int) -> None:
    g = torch.Generator().manual_seed(t)
    q, k = torch.randn(2, h, t, d, generator=g, dtype=F64), torch.randn(2, h_kv, t, d, generator=g, dtype=F64)
    got = compute_kappa_score(q, k)
    for b in range(2):
        for head in range(h):
            qq, kk = q[b, head], k[b, head // (h // h_kv)]
            s = 0.125 * qq @ kk.T                      # the scale cancels: s‖Q‖‖K‖/‖sQKᵀ‖
            want = 0.125 * torch.linalg.matrix_norm(qq, 2) * torch.linalg.matrix_norm(kk, 2) / \
                torch.linalg.matrix_norm(s, 2)
            assert float(got[b, head]) == pytest.approx(float(want), rel=1e-10)
    assert float(compute_kappa_score(torch.zeros(1, 1, 3, 2), torch.ones(1, 1, 3, 2))) == math.inf


def test_softmax_lambda_max_matches_eigvalsh() -> None:
    g = torch.Generator().manual_seed(0)
    rows = [torch.softmax(torch.randn(n, generator=g, dtype=F64) * sd, 0) for n in (2, 5, 33) for sd in (0.1, 2, 8)]
    rows += [torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([0.4, 0.4, 0.2], dtype=F64),
             torch.tensor([1.0], dtype=F64), torch.tensor([0.25] * 4, dtype=F64)]
    width = max(r.numel() for r in rows)
    p = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])  # zeros = masked keys
    got = compute_softmax_lambda_max(p)
    for i, r in enumerate(rows):
        want = torch.linalg.eigvalsh(torch.diag(r) - torch.outer(r, r)).max().clamp_min(0)
        assert float(got[i]) == pytest.approx(float(want), abs=1e-13)
    assert float(got[-3]) == pytest.approx(0.4)         # repeated top value: λ_max = p_max
    assert float(got[-2]) == pytest.approx(0.0, abs=1e-15)  # one key: diag(1) − 1 = 0


def test_kappa_v_matches_svdvals() -> None:
    v = torch.randn(2, 3, 10, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = torch.linalg.svdvals(v[1, 2])
    assert float(compute_kappa_v(v)[1, 2]) == pytest.approx(float(s[0] / (s[-1] + 1e-6)), rel=1e-12)


def test_norm_constants_hand_computed() -> None:
    c = compute_norm_constants(0.04, 1e-5, 64)
    assert c["c_ln"] == pytest.approx(0.2 / math.sqrt(1e-5) + 0.04 / 1e-5 + 1)
    assert c["rho_ln_fp32"] == pytest.approx(4000 * 64 * 2.0 ** -23)
    assert c["rho_ln_bf16"] == pytest.approx(4000 * 64 * 2.0 ** -7) and c["ln_eps_suggested_bf16"] is None  # ρ ≥ 1
    c = compute_norm_constants(1.5e-5, 1e-5, 64)        # ρ_bf16 = 1.5 · 64 / 128 = 0.75 ∈ (0.5, 1)
    assert c["rho_ln_bf16"] == pytest.approx(0.75)
    assert c["ln_eps_suggested_bf16"] == pytest.approx(1.5e-5 * 64 * 2.0 ** -7 / 0.5)     # ρ lands on ρ⋆ = 0.5
    assert c["rho_ln_fp16"] == pytest.approx(0.09375) and c["ln_eps_suggested_fp16"] is None  # below ρ⋆
    c = compute_norm_constants(1.5e-9, 1e-9, 64)        # the new ε is floored at 1e-6
    assert c["ln_eps_suggested_bf16"] == pytest.approx(1e-6)


def test_scan_columns_against_dense_layers(tiny_checkpoints: dict) -> None:
    """With fewer rows than the sample size every row is used: κ_softmax equals the dense maximum."""
    path, _ = tiny_checkpoints["llama"]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=16), ScanOptions(device="cpu")).tables
    for trace, row in zip(LayerStream(model, [ids]).layers(), tables["layers"]):
        a = trace.attn
        group = a.q.shape[1] // a.k.shape[1]
        k = a.k.double().repeat_interleave(group, 1)
        s = a.scale * a.q.double() @ k.transpose(-1, -2)                              # [1, H, T, T]
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        best = 0.0
        for hh in range(a.q.shape[1]):
            for i in range(16):
                si = s[0, hh, i][causal[i]]
                p = torch.softmax(si, 0)
                lam = torch.linalg.eigvalsh(torch.diag(p) - torch.outer(p, p)).max()
                best = max(best, float(lam * si.norm() / p.norm()))
        assert row["kappa_softmax"] == pytest.approx(best, rel=1e-9)
        sv = torch.linalg.svdvals(a.v[0].double())
        assert row["kappa_v"] == pytest.approx(float((sv[:, 0] / (sv[:, -1] + 1e-6)).max()), rel=1e-9)
        med = max(float(n.stat.double().median()) for n in trace.norms.values())
        eps = model.cfg.norm_eps
        assert row["c_ln"] == pytest.approx(math.sqrt(med / eps) + med / eps + 1, rel=1e-9)
        term = row["kappa_softmax"] * (1 + row["kappa_score"]) * row["kappa_v"] * row["wo_full_norm"] + \
            row["kappa_eff"] + row["c_ln"]
        assert row["nf_layer_term"] == pytest.approx(term, rel=1e-12)
    terms = [r["nf_layer_term"] for r in tables["layers"]]
    rho = [min(0.9, r["wo_full_norm"] + r["ffn_w2_norm"] * r["ffn_w1_norm"]) for r in tables["layers"]]
    model_row = tables["model"][0]
    assert model_row["nf_rhs"] == pytest.approx(sum(terms))
    assert model_row["nf_rhs_relaxed"] == pytest.approx(
        sum(t * math.prod(1 + x for x in rho[i + 1:]) for i, t in enumerate(terms)))


def test_norm_diagnostics_of_output_norm_layers(tiny_checkpoints: dict) -> None:
    """OLMo 2 (THEORY §18.3): the norms of C_LN and ρ_LN are the branch-output norms, at the branch outputs they read
    (the MHA and FFN outputs, recomputed here from the trace); the identity input norms contribute nothing."""
    path, _ = tiny_checkpoints["olmo2"]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=16),
                      ScanOptions(device="cpu", dtype="float64", empirical_seqs=0)).tables
    eps = model.cfg.norm_eps
    for trace, row in zip(LayerStream(model, [ids], dtype=torch.float64).layers(), tables["layers"]):
        assert trace.norms["norm_attn"].stat is None and trace.norms["norm_ffn"].stat is None
        med = max(float(x.double().pow(2).mean(-1).median()) for x in (trace.attn.out, trace.ffn_out))
        assert row["c_ln"] == pytest.approx(math.sqrt(med / eps) + med / eps + 1, rel=1e-9)
        assert row["rho_ln_bf16"] == pytest.approx(med / eps * model.cfg.d_model * 2.0 ** -7, rel=1e-9)
        assert row["norm1_min_var"] is None and row["norm2_min_var"] is None
        assert row["norm1_out_min_var"] == pytest.approx(float(trace.attn.out.double().pow(2).mean(-1).min()),
                                                         rel=1e-9)
