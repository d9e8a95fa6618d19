"""THEORY §18.7 on the tiny Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss scans: the routing columns and the experts
table against a direct computation from ``transformers``' router logits and weights, the tier ordering 3 <= 2r <= 2 <= 1 on every
layer, and each expert's ball bound against its Jacobian on the ball."""
from __future__ import annotations

import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import ScanOptions, run_scan
from lipschitz.lip_helpers import theta_exact
from tiny_models import MOE_FAMILIES

F64 = torch.float64


@pytest.fixture(scope="module")
def scans(tiny_checkpoints: dict) -> dict[str, tuple[dict, object, list[torch.Tensor]]]:
    out = {}
    for family in MOE_FAMILIES:
        path, ref = tiny_checkpoints[family]
        batches = [torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        result = run_scan(open_model(path), CalibrationSet(tuple(batches), "random", 24, None),
                          ScanOptions(device="cpu", empirical_seqs=2))
        out[family] = (result.tables, ref, batches)
    return out


def reference_routes(ref: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Router logits ``[N, E]`` of each MoE layer over every calibration token, from ``transformers``."""
    with torch.no_grad():
        per_batch = [ref(ids, output_router_logits=True).router_logits for ids in batches]
    return [torch.cat([b[i] for b in per_batch]).to(F64) for i in range(len(per_batch[0]))]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_columns_match_the_reference_router(family: str, scans: dict) -> None:
    tables, ref, batches = scans[family]
    cfg = ref.config
    k, n = cfg.num_experts_per_tok, (getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    renormalize = getattr(cfg, "norm_topk_prob", True)
    moe_layers = [r for r in tables["layers"] if r["moe_piecewise"]]
    dense = [r for r in tables["layers"] if not r["moe_piecewise"]]
    assert [r["layer"] for r in dense] == list(getattr(cfg, "mlp_only_layers", []))
    assert all(r[c] is None for r in dense for c in ("router_margin_min", "gate_theta_mean", "expert_load_max"))
    routes = reference_routes(ref, batches)
    assert len(routes) == len(moe_layers)
    experts = tables["experts"]
    for row, logits in zip(moe_layers, routes):
        p = logits.softmax(dim=-1)                                                      # [N, E]
        top = p.topk(k + 1, dim=-1)
        gap = top.values[:, k - 1] - top.values[:, k]
        assert row["router_margin_min"] == pytest.approx(float(gap.min()), abs=2e-6)
        assert row["router_margin_p05"] == pytest.approx(float(torch.quantile(gap, 0.05)), abs=2e-6)
        share = torch.bincount(top.indices[:, :k].flatten(), minlength=n).to(F64) / (k * p.shape[0])
        assert row["expert_load_max"] == pytest.approx(float(share.max()), rel=1e-12)
        assert row["expert_load_cv"] == pytest.approx(float(share.std(unbiased=False) / share.mean()), rel=1e-12)
        assert row["router_entropy_mean"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), abs=2e-6)
        gates = top.values[:, :k] / top.values[:, :k].sum(-1, keepdim=True) if renormalize else p
        assert row["gate_theta_mean"] == pytest.approx(float(theta_exact(gates).mean()), abs=3e-6)
        rows = [r for r in experts if r["layer"] == row["layer"]]
        assert [r["expert"] for r in rows] == list(range(n))
        assert [r["load_share"] for r in rows] == pytest.approx(share.tolist(), rel=1e-12)
        assert [r["token_slots"] for r in rows] == (share * k * p.shape[0]).round().long().tolist()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tier_ordering_on_moe_layers(family: str, scans: dict) -> None:
    """Tier 3 <= 2r <= 2 <= 1 on every layer, MoE and dense, routing fixed at the calibration point."""
    tables = scans[family][0]
    for r in tables["layers"]:
        assert 0 < r["lip_layer_empirical"] <= r["lip_layer_refined"] * (1 + 1e-9)
        assert r["lip_layer_refined"] <= r["lip_layer_calibrated"] <= r["lip_layer_weights"]
        assert r["lip_ffn_calibrated"] <= r["lip_ffn_weights"]


def reference_expert_matrices(experts: torch.nn.Module, e: int) -> tuple[torch.Tensor, ...]:
    """Expert ``e``'s W_g, W_u, W_d from the reference's fused parameters, in whatever orientation they are stored:
    ``gate_up_proj`` rows [gate; up] (Mixtral, Qwen-MoE) or, transposed, columns alternating gate, up (gpt-oss)."""
    gate_up, down = experts.gate_up_proj.detach().to(F64)[e], experts.down_proj.detach().to(F64)[e]
    if getattr(experts, "is_transposed", False):
        gate_up = gate_up.T                                                             # [2m, d]
    if getattr(experts, "is_concatenated", True):
        wg, wu = gate_up.chunk(2, dim=0)
    else:
        wg, wu = gate_up[0::2], gate_up[1::2]
    return wg, wu, down


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_table_norms_and_ball_bounds(family: str, scans: dict) -> None:
    """Spectral norms of each expert's matrices from the reference's fused parameters; the expert's ball bound at
    the FFN input radius ||gamma_2||_inf sqrt(d) is >= the Jacobian's norm, at points of that ball, of the
    reference's own expert module (every token sent to that one expert with weight 1)."""
    import copy

    tables, ref, _ = scans[family]
    d = ref.config.hidden_size
    for layer in sorted({r["layer"] for r in tables["experts"]}):
        block = ref.model.layers[layer]
        mlp = getattr(block, "mlp", None) or block.block_sparse_moe
        experts = copy.deepcopy(mlp.experts).double()
        radius = float(block.post_attention_layernorm.weight.detach().abs().max()) * d ** 0.5
        x = torch.randn(16, d, generator=torch.Generator().manual_seed(layer), dtype=F64)
        x = radius * x / x.norm(dim=-1, keepdim=True)
        for r in (r for r in tables["experts"] if r["layer"] == layer):
            e = r["expert"]
            for name, w in zip(("gate_norm", "up_norm", "out_norm"), reference_expert_matrices(mlp.experts, e)):
                assert r[name] == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-5)
            route = torch.tensor([[e]]), torch.ones(1, 1, dtype=F64)
            expert = lambda v: experts(v[None], *route)[0]                                  # noqa: E731
            worst = max(float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(expert, v), ord=2))
                        for v in x)
            assert worst <= r["lip_expert_weights"]
