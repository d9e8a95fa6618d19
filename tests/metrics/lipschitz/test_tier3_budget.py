"""Tier 3 under its budget (THEORY §8.3 "Budget"): a float32 search on a causal prefix, certified in float64.

For a causal layer the prefix certificate, padded with zero rows, is a feasible perturbation of the WHOLE sequence
whose output row has the same norm: the check that the reported value bounds the full sequence's local constant.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from attnstab_cli.metrics.lipschitz import empirical
from attnstab_cli.metrics.lipschitz.empirical import (compute_layer_empirical_budgeted, make_layer_function,
                                                      plan_lane_iterations)
from attnstab_cli.metrics.layer_context import to_dtype
from attnstab_cli.model.load import open_model
from attnstab_cli.model.rope import compute_rope_cos_sin
from attnstab_cli.model.stream import LayerStream

F64 = torch.float64


def first_layer(path, t: int):
    model = open_model(path)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(1))
    trace = next(LayerStream(model, [tokens]).layers())
    cfg = model.cfg

    def rope(n: int, dtype: torch.dtype):
        return None if cfg.rope is None else compute_rope_cos_sin(cfg.rope, torch.arange(n), dtype)

    return cfg, trace, rope


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox", "gptj", "phi"])
def test_prefix_certificate_holds_on_the_whole_sequence(family: str, tiny_checkpoints: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_checkpoints[family]
    t, prefix = 48, 32
    monkeypatch.setattr(empirical, "SEARCH_PREFIX", prefix)       # a prefix shorter than the tiny sequence
    cfg, trace, rope = first_layer(path, t)
    w = trace.weights
    result, budget = compute_layer_empirical_budgeted(to_dtype(w, torch.float32), to_dtype(w, F64), cfg, 0,
                                                      trace.resid_in[0], rope, None, None, tokens_per_layer=t)
    assert budget.prefix == prefix and not budget.whole_sequence
    assert budget.allowed_lane_iters == plan_lane_iterations(t, prefix)
    assert 0 < budget.used_lane_iters <= budget.allowed_lane_iters
    cert = result.certificate
    assert float(torch.linalg.vector_norm(cert.delta, dim=-1).max()) <= 1.0 + 1e-12
    full = torch.zeros(t, cfg.d_model, dtype=F64)
    full[:prefix] = cert.delta
    f = make_layer_function(to_dtype(w, F64), cfg, 0, rope(t, F64), None)
    z = jvp(f, (trace.resid_in[0].to(F64),), (full,))[1]
    assert float(torch.linalg.vector_norm(z[cert.row])) == pytest.approx(result.lip_layer_empirical, rel=1e-12)
    assert cert.row < prefix and result.lip_layer_empirical > 0


def test_bidirectional_layers_search_the_whole_sequence(tiny_checkpoints: dict) -> None:
    path, _ = tiny_checkpoints["bert"]
    cfg, trace, rope = first_layer(path, 40)
    w = trace.weights
    result, budget = compute_layer_empirical_budgeted(to_dtype(w, torch.float32), to_dtype(w, F64), cfg, 0,
                                                      trace.resid_in[0], rope, None, None, tokens_per_layer=40)
    assert budget.whole_sequence and budget.prefix == 40 and budget.search_dtype == "float32"
    f = make_layer_function(to_dtype(w, F64), cfg, 0, rope(40, F64), None)
    z = jvp(f, (trace.resid_in[0].to(F64),), (result.certificate.delta,))[1]
    assert float(torch.linalg.vector_norm(z[result.certificate.row])) == pytest.approx(result.lip_layer_empirical,
                                                                                       rel=1e-12)
