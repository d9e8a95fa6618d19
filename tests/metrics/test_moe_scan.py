"""THEORY §18.7 on the tiny Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek V2/V3 MoE and gpt-oss scans: the routing
columns and the experts table against a direct computation from ``transformers``' router logits, choices and weights,
the tier ordering 3 <= 2r <= 2 <= 1 on every layer, each expert's ball bound against its Jacobian on the ball, and T37
on DeepSeek's MoE modules."""
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


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
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


def deepseek_routes(ref: torch.nn.Module, batches: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, ...]]:
    """MoE layer -> (router logits [N, E], gates [N, k], chosen experts [N, k]) of DeepSeek's routers, hooked."""
    seen: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    handles = [layer.mlp.gate.register_forward_hook(
        lambda m, args, out, i=i: seen.setdefault(i, []).append(tuple(o.detach() for o in out)))
        for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        for ids in batches:
            ref(ids)
    for h in handles:
        h.remove()
    return {i: tuple(torch.cat([b[j] for b in parts]) for j in range(3)) for i, parts in seen.items()}


def _inf_to_one(jac: torch.Tensor) -> float:
    """``max_{v in {-1, 1}^n} ||J v||_1`` of one ``[k, n]`` Jacobian by enumeration."""
    import itertools

    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=jac.shape[-1])), dtype=F64)
    return float((jac @ signs.T).abs().sum(dim=0).max())


@pytest.mark.parametrize("family", ["deepseek_v2_moe", "deepseek_v3_moe"])
def test_deepseek_routing_columns_match_the_reference_router(family: str, scans: dict) -> None:
    """DeepSeek's routing (V2: softmax scores, groups ranked by their best score; V3: sigmoid scores plus
    e_score_correction_bias, groups ranked by their two best): the margin is the smaller of the k-th to (k+1)-th
    selection-score gap inside the searched groups and the gap between the last searched and the first skipped
    group's rank, and the reference's choices are exactly the k best there; loads from the reference's choices;
    the reference's gates are the scaled scores the gate map describes; gate_theta is that map's inf->1 norm: theta
    of the full softmax times the factor (V2), or enumerated over the autograd Jacobian of the scaled renormalized
    sigmoid gates (V3)."""
    tables, ref, batches = scans[family]
    cfg = ref.config
    k, n, groups, searched, s = (cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.n_group, cfg.topk_group,
                                 cfg.routed_scaling_factor)
    v3 = family == "deepseek_v3_moe"
    routes = deepseek_routes(ref, batches)
    rows = {r["layer"]: r for r in tables["layers"]}
    assert sorted(i for i, r in rows.items() if r["moe_piecewise"]) == sorted(routes)
    assert all(rows[i]["router_margin_min"] is None for i in range(cfg.first_k_dense_replace))
    for layer, (logits, gates, chosen) in routes.items():
        row, logits = rows[layer], logits.to(F64)
        scores = logits.sigmoid() if v3 else logits.softmax(dim=-1)
        select = scores + ref.model.layers[layer].mlp.gate.e_score_correction_bias.to(F64) if v3 else scores
        grouped = select.reshape(-1, groups, n // groups)
        rank = grouped.topk(2, dim=-1).values.sum(-1) if v3 else grouped.amax(dim=-1)      # [N, G]
        order = rank.sort(dim=-1, descending=True)
        group_gap = order.values[:, searched - 1] - order.values[:, searched]
        kept = torch.zeros_like(rank, dtype=torch.bool).scatter(1, order.indices[:, :searched], True)
        inside = select.masked_fill(~kept.repeat_interleave(n // groups, dim=1), float("-inf"))
        top = inside.topk(k + 1, dim=-1)
        assert torch.equal(top.indices[:, :k].sort(-1).values, chosen.sort(-1).values)
        margin = torch.minimum(top.values[:, k - 1] - top.values[:, k], group_gap)
        assert row["router_margin_min"] == pytest.approx(float(margin.min()), abs=2e-6)
        assert row["router_margin_p05"] == pytest.approx(float(torch.quantile(margin, 0.05)), abs=2e-6)
        share = torch.bincount(chosen.flatten(), minlength=n).to(F64) / chosen.numel()
        assert row["expert_load_max"] == pytest.approx(float(share.max()), rel=1e-12)
        assert row["expert_load_cv"] == pytest.approx(float(share.std(unbiased=False) / share.mean()), rel=1e-12)
        p = scores / scores.sum(-1, keepdim=True)
        assert row["router_entropy_mean"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), abs=2e-6)
        picked = scores.gather(1, chosen)
        if v3:
            gate_map = lambda l: s * l.sigmoid() / l.sigmoid().sum()                          # noqa: E731
            want = torch.tensor([_inf_to_one(torch.autograd.functional.jacobian(gate_map, logits[t, chosen[t]]))
                                 for t in range(logits.shape[0])], dtype=F64)
            formula = s * picked / picked.sum(-1, keepdim=True)
        else:
            want, formula = s * theta_exact(p), s * picked
        torch.testing.assert_close(gates.to(F64), formula, rtol=1e-5, atol=1e-7)
        assert row["gate_theta_mean"] == pytest.approx(float(want.mean()), abs=3e-6)
        experts = [r for r in tables["experts"] if r["layer"] == layer]
        assert [r["load_share"] for r in experts] == pytest.approx(share.tolist(), rel=1e-12)


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


@pytest.mark.parametrize("family", ["deepseek_v2_moe", "deepseek_v3_moe"])
def test_t37_on_the_tiny_deepseek_moe_layers(family: str, tiny_checkpoints: dict) -> None:
    """T37 on DeepSeek's own MoE layers (V3: sigmoid scores, correction bias, groups, renormalized gates times 2.5,
    a shared expert; V2: softmax gates over all experts times 1.5, groups by their best score, two shared experts as
    one): at the FFN inputs of the tiny model's tokens away from a switch (margin > 1e-3), ||J|| of the reference's
    MoE module (autograd, float64 router) <= the tier-2 local bound <= the tier-1 ball bound, and the module's
    output is the streamed FFN output."""
    import copy

    from attnstab_cli.metrics.lipschitz.moe import compute_moe_ball, compute_moe_local_tokens
    from attnstab_cli.metrics.moe_scan import compute_selection_margin
    from attnstab_cli.model.stream import LayerStream
    from router_helpers import deepseek_router_in_input_dtype

    path, ref = tiny_checkpoints[family]
    ref64 = copy.deepcopy(ref).double()
    model = open_model(path)
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(9))
    checked = 0
    for trace in LayerStream(model, [ids], dtype=F64).layers():
        if trace.moe is None:
            continue
        mlp = ref64.model.layers[trace.layer].mlp
        deepseek_router_in_input_dtype(mlp.gate)
        x, w = trace.ffn_in[0], trace.weights.moe
        with torch.no_grad():
            out = mlp(x[None])[0]
        assert float((out - trace.ffn_out[0]).norm() / out.norm()) < 1e-12
        local = compute_moe_local_tokens(x, w, cfg.moe, trace.moe, 0, cfg.activation)          # [T]
        radius = float(trace.weights.norm_ffn.weight.abs().max()) * cfg.d_model ** 0.5
        ball = compute_moe_ball(radius, w, cfg.moe, cfg.activation)
        away = compute_selection_margin(trace.moe, w, cfg.moe)[0] > 1e-3
        assert int(away.sum()) >= 12
        for t in away.nonzero().flatten().tolist():
            jac = torch.autograd.functional.jacobian(lambda v: mlp(v[None, None])[0, 0], x[t])
            lower = float(torch.linalg.matrix_norm(jac, ord=2))
            assert lower <= float(local[t]) * (1 + 1e-9) and float(local[t]) <= ball
            checked += 1
    assert checked >= 24
