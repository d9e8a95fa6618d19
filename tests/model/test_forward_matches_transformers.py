"""Issue 2, item 6: the streaming forward pass reproduces ``transformers`` eager attention and hidden states.

For every family, attention probabilities recomputed from the exposed Q, K, scale and mask match
``output_attentions`` to 1e-5 (fp32) and the final hidden states match to 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.model.traces import AttentionTrace
from router_helpers import deepseek_router_in_input_dtype
from tiny_models import FAMILIES


def probabilities_from_trace(a: AttentionTrace) -> torch.Tensor:
    """Dense softmax [B, H, T, T] rebuilt from Q, K, scale and the mask description (test sizes only); with sink
    logits, the real keys' probabilities of the softmax over the n + 1 outcomes (THEORY §18.4)."""
    group = a.q.shape[1] // a.k.shape[1]
    logits = a.scale * a.q.double() @ a.k.double().repeat_interleave(group, 1).transpose(-1, -2)
    if a.logit_cap is not None:
        logits = a.logit_cap * torch.tanh(logits / a.logit_cap)
    t = logits.shape[-1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = torch.ones(t, t, dtype=torch.bool)
    if a.causal:
        allowed &= j <= i
    if a.window is not None:
        allowed &= (i - j).abs() < a.window
    allowed = allowed[None, None]
    if a.key_padding_mask is not None:
        allowed = allowed & a.key_padding_mask[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    if a.sinks is None:
        return logits.softmax(-1)
    sink = a.sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    return torch.cat([logits, sink], dim=-1).softmax(-1)[..., :-1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_probabilities_and_hidden_states_match(family: str, tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints[family]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids, output_attentions=True, output_hidden_states=True)
    stream = LayerStream(model, [ids])
    seen = 0
    for trace in stream.layers():
        got = probabilities_from_trace(trace.attn)
        torch.testing.assert_close(got.float(), expected.attentions[trace.layer], atol=1e-5, rtol=0)
        seen += 1
    assert seen == model.cfg.n_layers
    torch.testing.assert_close(stream.final_hidden()[0], expected.hidden_states[-1], atol=1e-4, rtol=0)


def test_longrope_selects_its_factor_set_by_length(tiny_checkpoints: dict) -> None:
    """LongRoPE: the long factors beyond the original context, the short ones within it, as the model chooses; the
    attention factor's split keeps every rotation a contraction and leaves logits unchanged."""
    from attnstab_cli.model.rope import apply_rope, compute_inv_freq, compute_rope_cos_sin

    path, ref = tiny_checkpoints["phi3_longrope"]
    rope = open_model(path).cfg.rope
    emb = ref.model.rotary_emb
    x = torch.zeros(1)
    for t in (12, 16, 17, 40):
        cos, sin = emb(x, torch.arange(t)[None])                           # [1, T, r]  m cos, m sin
        want = emb.inv_freq.clone()
        used = compute_inv_freq(rope, t)
        assert torch.equal(used, want), t
        assert torch.equal(used, compute_inv_freq(rope, 12)) == (t <= 16)
        ours_cos, ours_sin = compute_rope_cos_sin(rope, torch.arange(t), torch.float64)
        scale = rope.rot_scale / rope.attention_factor
        torch.testing.assert_close(ours_cos, cos[0, :, : rope.rotary_dim // 2].double() * scale, rtol=1e-15, atol=0)
    q = torch.randn(1, 1, 40, 16, dtype=torch.float64)
    rotated = apply_rope(q, *compute_rope_cos_sin(rope, torch.arange(40), torch.float64), rope)
    assert float((rotated.norm(dim=-1) / q.norm(dim=-1)).max()) <= 1 + 1e-7     # float32 cos/sin rounding


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_key_padding_mask_matches(family: str, tiny_checkpoints: dict) -> None:
    """Padding: masked keys get no probability, exactly as with the ``attention_mask`` of ``transformers``."""
    path, ref = tiny_checkpoints[family]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False                                    # right padding on the second sequence
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask.long(), output_attentions=True)
    stream = LayerStream(model, [ids], key_padding_masks=[mask])
    for trace in stream.layers():
        got = probabilities_from_trace(trace.attn).float()
        assert got[1, ..., 15:].abs().max() == 0
        torch.testing.assert_close(got[:, :, :15], expected.attentions[trace.layer][:, :, :15], atol=1e-5, rtol=0)


def test_per_head_slices_recombine_to_attention_output(tiny_checkpoints: dict) -> None:
    """THEORY T29: per-head contexts times the row blocks W_O^h, summed, give the attention output."""
    for family in ("gpt2", "llama", "neox", "bert"):
        model = open_model(tiny_checkpoints[family][0])
        ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
        trace = next(iter(LayerStream(model, [ids], dtype=torch.float64).layers()))
        w, d = trace.weights, model.cfg.head_dim
        total = sum(trace.attn.context[:, h] @ w.wo[h * d:(h + 1) * d] for h in range(model.cfg.n_heads))
        total = total + (w.bo if w.bo is not None else 0)
        torch.testing.assert_close(total, trace.attn.out, rtol=1e-10, atol=1e-12)


# Families whose ``transformers`` reference computes in float64 when cast to it. The RMSNorms of the LLaMA family,
# Qwen3, Phi-3, Gemma 3 and OLMo 2 (also OLMo 2's full-width q/k norms) cast their input to float32, which would cap the comparison near 1e-7: for the families in
# UNCAST_RMSNORM the reference's RMSNorm modules are replaced by the same formula in the input dtype
# (gamma * x / sqrt(mean(x^2) + eps), gamma = w or 1 + w as the family stores it), everything else stays the
# model's own.
# ModernBERT's apply_rotary_pos_emb and DeepSeek-V2's apply_rotary_emb (a complex product) cast q and k to float32:
# for UNCAST_ROPE they are replaced, for the test only, by the same formula in the input dtype (the model's float32
# angles kept).
UNCAST_RMSNORM = {"phi3": "w", "phi3_longrope": "w", "llama": "w", "llama3_scaled": "w", "mistral": "w",
                  "qwen2": "w", "qwen3": "w", "gemma3": "1+w", "olmo2": "w", "deepseek_v2": "w", "deepseek_v3": "w",
                  "deepseek_v3_yarn": "w", "deepseek_v2_moe": "w", "deepseek_v3_moe": "w", "mixtral": "w",
                  "qwen2_moe": "w", "qwen3_moe": "w", "gpt_oss": "w"}
FLOAT64_REFERENCE = ("bert", "roberta", "xlm_roberta", "distilbert", "gpt2", "gpt2_scaled", "gptj", "neox",
                     "neox_serial", "phi", "phi_qk", "modernbert", *UNCAST_RMSNORM)


def _rotate_in_input_dtype(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def half(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)
    return q * cos + half(q) * sin, k * cos + half(k) * sin


def _complex_rotate_in_input_dtype(xq: torch.Tensor, xk: torch.Tensor,
                                   freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's rotation of pairs (2i, 2i + 1) by a complex product, in the input dtype."""
    freqs = freqs_cis.unsqueeze(1).to(torch.complex128 if xq.dtype == torch.float64 else torch.complex64)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * freqs).flatten(3)
    return rotate(xq), rotate(xk)


_DEEPSEEK_V2_ROPE = ("transformers.models.deepseek_v2.modeling_deepseek_v2", "apply_rotary_emb",
                     _complex_rotate_in_input_dtype)
UNCAST_ROPE = {"modernbert": ("transformers.models.modernbert.modeling_modernbert", "apply_rotary_pos_emb",
                              _rotate_in_input_dtype),
               "deepseek_v2": _DEEPSEEK_V2_ROPE, "deepseek_v2_moe": _DEEPSEEK_V2_ROPE}


def _router_in_input_dtype(module: torch.nn.Module) -> None:
    """The MoE routers of Mixtral and Qwen-MoE take the softmax in float32; the same formula in the input dtype:
    softmax over all logits, top-k, renormalized (Mixtral always, Qwen with ``norm_topk_prob``). gpt-oss's router
    (a bias, a softmax over the top-k logits) already computes in the input dtype and is kept."""
    if getattr(module, "bias", None) is not None:
        return
    renormalize = getattr(module, "norm_topk_prob", True)

    def forward(h: torch.Tensor, m: torch.nn.Module = module) -> tuple[torch.Tensor, ...]:
        logits = torch.nn.functional.linear(h.reshape(-1, m.hidden_dim), m.weight)
        top, index = torch.topk(logits.softmax(dim=-1), m.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True) if renormalize else top, index
    module.forward = forward


def _float64_reference(family: str, ref: torch.nn.Module) -> torch.nn.Module:
    """A float64 SDPA copy of ``ref`` (RMSNorms in float64 for UNCAST_RMSNORM families, MoE routers too); a model
    without SDPA (gpt-oss, whose eager attention computes in the input dtype) keeps its eager attention."""
    import copy

    ref64 = copy.deepcopy(ref).double()
    if ref64._supports_sdpa:
        ref64.set_attn_implementation("sdpa")
    for module in ref64.modules():
        if type(module).__name__.endswith("TopKRouter"):
            _router_in_input_dtype(module)
        elif type(module).__name__.startswith("Deepseek") and type(module).__name__.endswith("TopkRouter"):
            deepseek_router_in_input_dtype(module)
    if family in UNCAST_RMSNORM:
        one_plus = UNCAST_RMSNORM[family] == "1+w"
        for module in ref64.modules():
            if type(module).__name__.endswith("RMSNorm"):
                def forward(x: torch.Tensor, m: torch.nn.Module = module) -> torch.Tensor:
                    eps = getattr(m, "variance_epsilon", None) or m.eps
                    gamma = 1.0 + m.weight if one_plus else m.weight
                    return gamma * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
                module.forward = forward
    return ref64


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if f in FLOAT64_REFERENCE])
@pytest.mark.parametrize("seq_len", [40, 12])
def test_float64_layers_match(family: str, seq_len: int, tiny_checkpoints: dict,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """In float64 every layer's output h_{l+1} matches ``transformers`` to 1e-10 relative.

    The reference runs SDPA attention: some eager implementations (GPT-J) cast q and k to float32 for the logits,
    which would cap a float64 comparison at float32 precision. Two lengths: ``phi3_longrope`` uses its long factors
    at 40 positions (beyond its original 16) and its short ones at 12."""
    path, ref = tiny_checkpoints[family]
    ref64 = _float64_reference(family, ref)
    if family in UNCAST_ROPE:
        import importlib

        module, name, replacement = UNCAST_ROPE[family]
        monkeypatch.setattr(importlib.import_module(module), name, replacement)
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref64(ids, output_hidden_states=True).hidden_states
    stream = LayerStream(model, [ids], dtype=torch.float64)
    for trace in stream.layers():
        if trace.layer + 1 < model.cfg.n_layers:           # the last entry of hidden_states is after the final norm
            want = expected[trace.layer + 1]
            err = (trace.resid_out - want).norm() / want.norm()
            assert err < 1e-10, f"layer {trace.layer}: relative error {float(err):.3g}"
    got, want = stream.final_hidden()[0], expected[-1]
    assert (got - want).norm() / want.norm() < 1e-10


MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "deepseek_v3_yarn", "deepseek_v2_moe", "deepseek_v3_moe")


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_mla_heads_recombine_to_the_hooked_attention_output(family: str, tiny_checkpoints: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """THEORY T39: per-head q, k (width nope + rope) and v (width v) of latent attention, recombined as
    sum_h softmax(s q_h k_h^T) v_h W_O^h + b_O, reproduce the reference's hooked self-attention output in float64."""
    path, ref = tiny_checkpoints[family]
    ref64 = _float64_reference(family, ref)
    if family in UNCAST_ROPE:
        import importlib

        module, name, replacement = UNCAST_ROPE[family]
        monkeypatch.setattr(importlib.import_module(module), name, replacement)
    hooked: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(ref64.model.layers):
        layer.self_attn.register_forward_hook(lambda m, args, out, i=i: hooked.__setitem__(i, out[0]))
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref64(ids)
    m = model.cfg.mla
    for trace in LayerStream(model, [ids], dtype=torch.float64).layers():
        a, w = trace.attn, trace.weights
        assert a.q.shape[-1] == a.k.shape[-1] == m.nope + m.rope and a.v.shape[-1] == m.v != m.nope + m.rope
        t = a.q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        p = (a.scale * a.q @ a.k.transpose(-1, -2)).masked_fill(~causal, float("-inf")).softmax(-1)   # [B, H, T, T]
        assert torch.equal(a.k[:, 0, :, m.nope:], a.k[:, -1, :, m.nope:])          # one rotary key for every head
        total = sum((p[:, h] @ a.v[:, h]) @ w.wo[h * m.v:(h + 1) * m.v] for h in range(model.cfg.n_heads))
        total = total + (w.bo if w.bo is not None else 0)
        want = hooked[trace.layer]
        assert float((total - want).norm() / want.norm()) < 1e-10


def _reference_routes(ref64: torch.nn.Module,
                      ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Layer -> (router logits [N, E], chosen experts [N, k], their gates [N, k]) of the reference's routers."""
    routes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(ref64.model.layers):
        gate = getattr(layer.mlp, "gate", None) or getattr(layer.mlp, "router", None)   # gpt-oss: mlp.router
        if type(gate).__name__.lower().endswith("topkrouter"):
            handles.append(gate.register_forward_hook(
                lambda m, args, out, i=i: routes.__setitem__(i, (out[0].detach(), out[2].detach(),
                                                                 out[1].detach()))))
    with torch.no_grad():
        ref64(ids)
    for h in handles:
        h.remove()
    return routes


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2_moe", "deepseek_v3_moe",
                                    "gpt_oss"])
def test_float64_router_choices_match(family: str, tiny_checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """MoE layers (THEORY §18.7): the router logits match the reference's to 1e-10 relative and every token picks
    the same experts; dense layers (Qwen2-MoE's mlp_only_layers, DeepSeek's first_k_dense_replace) have no
    routing; the gates match to 1e-12."""
    path, ref = tiny_checkpoints[family]
    ref64 = _float64_reference(family, ref)
    if family in UNCAST_ROPE:
        import importlib

        module, name, replacement = UNCAST_ROPE[family]
        monkeypatch.setattr(importlib.import_module(module), name, replacement)
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    want = _reference_routes(ref64, ids)
    assert sorted(want) == [i for i in range(model.cfg.n_layers) if model.cfg.is_moe(i)]
    seen = []
    for trace in LayerStream(model, [ids], dtype=torch.float64).layers():
        if trace.moe is None:
            continue
        logits, chosen, gates = want[trace.layer]
        got = trace.moe.logits.reshape(logits.shape)
        assert (got - logits).norm() / logits.norm() < 1e-10
        ours = trace.moe.selected.reshape(chosen.shape)
        assert torch.equal(ours.sort(-1).values, chosen.sort(-1).values)
        mine = trace.moe.gates.reshape(gates.shape).gather(-1, ours.sort(-1).indices)
        theirs = gates.gather(-1, chosen.sort(-1).indices)                  # both by expert index
        assert float((mine - theirs).abs().max()) <= 1e-12 * float(theirs.abs().max())
        assert len(torch.unique(chosen)) > model.cfg.moe.top_k             # the routing varies between tokens
        seen.append(trace.layer)
    assert seen == sorted(want)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2_moe", "deepseek_v3_moe"])
def test_fused_expert_tensors_read_as_per_expert(family: str, tiny_checkpoints: dict, tmp_path) -> None:
    """transformers' own fused layout (``save_original_format=False``: ``experts.gate_up_proj [E, 2m, d]``,
    ``experts.down_proj [E, d, m]``) loads to the same experts as the hub's per-expert tensors (the first MoE
    layer; the router, its selection bias and the shared experts too)."""
    from safetensors import safe_open

    path, ref = tiny_checkpoints[family]
    ref.save_pretrained(tmp_path / "fused", save_original_format=False)
    with safe_open(str(tmp_path / "fused" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    models = [open_model(p) for p in (path, tmp_path / "fused")]
    layer = next(i for i in range(models[0].cfg.n_layers) if models[0].cfg.is_moe(i))
    per_expert, fused = (m.loader(dtype=torch.float64).layer(layer).moe for m in models)
    for key in ("w_gate", "w_up", "w_out"):
        assert torch.equal(per_expert.experts[key], fused.experts[key])
    assert torch.equal(per_expert.router, fused.router)
    for a, b in ((per_expert.score_bias, fused.score_bias), (per_expert.shared, fused.shared)):
        assert (a is None) == (b is None)
    if per_expert.shared is not None:
        assert all(torch.equal(per_expert.shared[k], fused.shared[k]) for k in per_expert.shared)
    if per_expert.score_bias is not None:
        assert torch.equal(per_expert.score_bias, fused.score_bias)


@pytest.mark.parametrize("family", ["deepseek_v2_moe", "deepseek_v3_moe"])
def test_deepseek_router_stays_float32_under_bfloat16(family: str, tiny_checkpoints: dict) -> None:
    """DeepSeek keeps its router (weight, e_score_correction_bias) in float32 and casts the input to float32: in a
    bfloat16 run the loader reads them in float32, and on the reference router's own bfloat16 inputs the routing
    gives its logits, choices and gates."""
    import transformers

    from attnstab_cli.model.blocks import route_tokens

    path, ref = tiny_checkpoints[family]
    ref16 = getattr(transformers, type(ref).__name__).from_pretrained(path, dtype=torch.bfloat16).eval()
    model = open_model(path)
    layer = next(i for i in range(model.cfg.n_layers) if model.cfg.is_moe(i))
    gate = ref16.model.layers[layer].mlp.gate
    assert gate.weight.dtype == torch.float32
    seen: dict[str, tuple] = {}
    gate.register_forward_hook(lambda m, args, out: seen.__setitem__("io", (args[0], out)))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref16(ids)
    x, (logits, gates, chosen) = seen["io"]
    assert x.dtype == torch.bfloat16
    w = model.loader(dtype=torch.bfloat16).layer(layer).moe
    assert w.router.dtype == torch.float32 and w.experts["w_gate"].dtype == torch.bfloat16
    if w.score_bias is not None:
        assert w.score_bias.dtype == torch.float32 and torch.equal(w.score_bias, gate.e_score_correction_bias)
    route = route_tokens(x, w, model.cfg)
    torch.testing.assert_close(route.logits.reshape(logits.shape), logits, rtol=1e-6, atol=1e-6)
    ours = route.selected.reshape(chosen.shape)
    assert torch.equal(ours.sort(-1).values, chosen.sort(-1).values)
    torch.testing.assert_close(route.gates.reshape(gates.shape).gather(-1, ours.sort(-1).indices),
                               gates.gather(-1, chosen.sort(-1).indices), rtol=1e-6, atol=1e-7)


def test_deepseek_v2_greedy_selection_matches(tiny_checkpoints: dict, tmp_path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSeek-V2's other ``topk_method``: ``greedy`` ignores the groups; the same checkpoint so configured picks the
    reference's experts (which differ from the group-limited ones) and matches it per layer in float64."""
    import json
    import shutil

    import transformers

    src, _ = tiny_checkpoints["deepseek_v2_moe"]
    ck = tmp_path / "greedy"
    shutil.copytree(src, ck)
    config = json.loads((ck / "config.json").read_text())
    config["topk_method"] = "greedy"
    (ck / "config.json").write_text(json.dumps(config))
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    ref.config._experts_implementation = "eager"
    ref64 = _float64_reference("deepseek_v2_moe", ref)
    monkeypatch.setattr(*_patch_target(UNCAST_ROPE["deepseek_v2_moe"]))
    model, grouped = open_model(ck), open_model(src)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    want = _reference_routes(ref64, ids)
    with torch.no_grad():
        expected = ref64(ids, output_hidden_states=True).hidden_states
    differ = 0
    for trace, other in zip(LayerStream(model, [ids], dtype=torch.float64).layers(),
                            LayerStream(grouped, [ids], dtype=torch.float64).layers()):
        if trace.layer + 1 < model.cfg.n_layers:
            e = expected[trace.layer + 1]
            assert float((trace.resid_out - e).norm() / e.norm()) < 1e-10
        if trace.moe is not None:
            chosen = want[trace.layer][1]
            ours = trace.moe.selected.reshape(chosen.shape).sort(-1).values
            assert torch.equal(ours, chosen.sort(-1).values)
            differ += int((ours != other.moe.selected.reshape(chosen.shape).sort(-1).values).any(-1).sum())
    assert differ > 0


def _patch_target(entry: tuple) -> tuple:
    """``(module, name, replacement)`` of UNCAST_ROPE as monkeypatch.setattr arguments."""
    import importlib

    module, name, replacement = entry
    return importlib.import_module(module), name, replacement


def test_gpt_oss_clamps_windows_and_sinks_are_exercised(tiny_checkpoints: dict) -> None:
    """The tiny gpt-oss reaches what its layout adds, so the float64 matches above test it: gate and up
    pre-activations beyond swiglu_limit, a sliding window shorter than the sequence beside full layers, sink
    logits that take a visible share of each row, and expert biases."""
    from attnstab_cli.model.experts import preactivations

    path, _ = tiny_checkpoints["gpt_oss"]
    model = open_model(path)
    limit = model.cfg.moe.glu_limit
    assert set(model.cfg.sliding_windows) == {6, None}
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    parked = 0.0
    for trace in LayerStream(model, [ids], dtype=torch.float64).layers():
        moe = trace.weights.moe
        assert {"b_gate", "b_up", "b_out"} <= set(moe.experts)
        x = trace.ffn_in.reshape(-1, model.cfg.d_model)
        for e in range(model.cfg.moe.n_experts):
            a, b = preactivations(x, moe.expert(e))
            assert 0.02 < float((a > limit).double().mean()) < 0.5
            assert 0.02 < float((b.abs() > limit).double().mean()) < 0.5
        mass = probabilities_from_trace(trace.attn).sum(-1)                  # [B, H, T]
        share = (1 - mass).mean(dim=(0, 2))                                  # [H] mean sink mass
        assert float(share.max()) > 0.1 and float(mass.min()) < 0.5
        parked = max(parked, float(share.max()))
    assert parked > 0.5                                                      # a head parks most mass on its sink
