"""Weight-only head and layer metrics (THEORY §5.1, §5.4, §5.5 / T17, §10, §12, §13, §14).

Head slices are checked against an independent slicing of each ``transformers`` model's own parameters (GPT-2 Conv1D
``c_attn``, LLaMA GQA, NeoX interleaved ``query_key_value``, BERT), the RoPE-aware ``qk_norm`` against a brute-force
maximum of the full ``d x d`` product over offsets, and the closed forms on hand-built weights.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attnstab_cli.arch.spec import FFNKind, Layout, NormKind, Orientation, Positions, QKVPacking, Residual, RopeStyle
from attnstab_cli.errors import InputError
from attnstab_cli.metrics.weights_metrics import (
    HeadWeightMetrics, LayerWeightMetrics, compute_depth_budget, compute_head_weight_metrics,
    compute_layer_weight_metrics, compute_qk_norms, compute_weight_metrics, kv_head_index, rope_offsets,
    rotary_key_bias_norms,
)
from attnstab_cli.metrics.weights_metrics import _chunk_max_sigma
from attnstab_cli.model.config import ModelConfig, RopeConfig
from attnstab_cli.model.load import open_model
from attnstab_cli.model.rope import apply_rope
from attnstab_cli.model.weights import LayerWeights, NormWeights

F64 = torch.float64
norm2 = lambda w: torch.linalg.matrix_norm(w.to(F64), ord=2).item()
cond = lambda w: torch.linalg.cond(w.to(F64), p=2).item()


# ----------------------------------------------------------------------------------------------- hand-built models

def make_config(*, d: int = 10, n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 6, d_ff: int = 12,
                rope: RopeConfig | None = None, causal: bool = True, ffn: FFNKind = FFNKind.MLP,
                max_positions: int | None = 37, window: int | None = None, norm_eps: float = 1e-5) -> ModelConfig:
    layout = Layout(Orientation.OUT_IN, QKVPacking.SEPARATE, NormKind.LAYERNORM, Residual.PRE,
                    Positions.ROPE if rope else Positions.LEARNED, rope.style if rope else None, causal, ffn)
    return ModelConfig(family="test", model_type=None, layout=layout, n_layers=1, d_model=d, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, d_ff=d_ff, vocab_size=11,
                       max_positions=max_positions, norm_eps=norm_eps, activation="gelu", rope=rope,
                       sliding_windows=(window,))


def make_weights(cfg: ModelConfig, seed: int = 0, biases: bool = True) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    d, hd, kvd, m = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    ffn = ({"w_gate": r(d, m), "w_up": r(d, m), "w_out": r(m, d)} if cfg.layout.ffn is FFNKind.GATED
           else {"w_in": r(d, m), "b_in": r(m), "w_out": r(m, d), "b_out": r(d)})
    b = (lambda n: r(n)) if biases else (lambda n: None)
    return LayerWeights(layer=0, wq=r(d, hd), wk=r(d, kvd), wv=r(d, kvd), wo=r(hd, d), bq=b(hd), bk=b(kvd),
                        bv=b(kvd), bo=b(d), norm_attn=NormWeights(r(d), b(d)), norm_ffn=NormWeights(r(d), b(d)),
                        ffn=ffn)


def explicit_rotation(rope: RopeConfig, head_dim: int, delta: int) -> torch.Tensor:
    """P_Delta ``[D, D]`` written out from the RoPE definition (row convention ``x -> x P``), not via apply_rope."""
    r = rope.rotary_dim
    inv = 1.0 / rope.theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)   # float32, as trained
    p = torch.eye(head_dim, dtype=F64)
    for i, w in enumerate(inv.tolist()):
        a, b = (i, i + r // 2) if rope.style is RopeStyle.HALF_SPLIT else (2 * i, 2 * i + 1)
        c, s = math.cos(delta * w), math.sin(delta * w)
        p[a, a], p[a, b], p[b, a], p[b, b] = c, s, -s, c    # out_a = x_a c - x_b s, out_b = x_b c + x_a s
    return p


def brute_force_qk(w: LayerWeights, cfg: ModelConfig, offsets: range, rotation) -> list[float]:
    """``max_Delta ||W^Q_h P_Delta W^K_g^T||_2`` with the full ``d x d`` product, one head and offset at a time."""
    D, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    out = []
    for h in range(cfg.n_heads):
        q = w.wq[:, h * D:(h + 1) * D].to(F64)
        k = w.wk[:, (h // group) * D:(h // group + 1) * D].to(F64)
        out.append(max(norm2(q @ rotation(delta) @ k.T) for delta in offsets))
    return out


# ------------------------------------------------------------------------------------- transformers cross-checks

def reference_blocks(family: str, model: torch.nn.Module, layer: int) -> dict:
    """Head blocks sliced independently from the ``transformers`` parameters (THEORY §15), float64."""
    p = lambda t: t.detach().to(F64)
    if family == "gpt2":
        blk = model.transformer.h[layer]
        c_attn, b = p(blk.attn.c_attn.weight), p(blk.attn.c_attn.bias)            # Conv1D (d, 3d): x -> x W
        d = c_attn.shape[0]
        wq, wk, wv, bq, bk = c_attn[:, :d], c_attn[:, d:2 * d], c_attn[:, 2 * d:], b[:d], b[d:2 * d]
        wo, w1, w2 = p(blk.attn.c_proj.weight), p(blk.mlp.c_fc.weight), p(blk.mlp.c_proj.weight)
        n1, n2, eps, gated = blk.ln_1, blk.ln_2, model.config.layer_norm_epsilon, None
    elif family == "llama":
        blk = model.model.layers[layer]
        at = blk.self_attn
        wq, wk, wv = (p(m.weight).T for m in (at.q_proj, at.k_proj, at.v_proj))     # nn.Linear (out, in)
        bq = bk = None
        wo = p(at.o_proj.weight).T
        gated = (p(blk.mlp.gate_proj.weight).T, p(blk.mlp.up_proj.weight).T)
        w1, w2 = torch.cat(gated, dim=1), p(blk.mlp.down_proj.weight).T
        n1, n2, eps = blk.input_layernorm, blk.post_attention_layernorm, model.config.rms_norm_eps
    elif family == "neox":
        blk = model.gpt_neox.layers[layer]
        at, cfg = blk.attention, model.config
        H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        fused = p(at.query_key_value.weight).view(H, 3, D, -1)                     # per head [q; k; v] rows
        fb = p(at.query_key_value.bias).view(H, 3, D)
        wq, wk, wv = (torch.cat([fused[h, i].T for h in range(H)], dim=1) for i in range(3))
        bq, bk = fb[:, 0].reshape(-1), fb[:, 1].reshape(-1)
        wo = p(at.dense.weight).T
        w1, w2 = p(blk.mlp.dense_h_to_4h.weight).T, p(blk.mlp.dense_4h_to_h.weight).T
        n1, n2, eps, gated = blk.input_layernorm, blk.post_attention_layernorm, cfg.layer_norm_eps, None
    elif family == "gptj":
        blk = model.transformer.h[layer]
        at = blk.attn
        wq, wk, wv = (p(m.weight).T for m in (at.q_proj, at.k_proj, at.v_proj))
        bq = bk = None
        wo = p(at.out_proj.weight).T
        w1, w2 = p(blk.mlp.fc_in.weight).T, p(blk.mlp.fc_out.weight).T
        n1, n2, eps, gated = blk.ln_1, blk.ln_1, model.config.layer_norm_epsilon, None   # one norm feeds both
    elif family == "phi":
        blk = model.model.layers[layer]
        at = blk.self_attn
        wq, wk, wv = (p(m.weight).T for m in (at.q_proj, at.k_proj, at.v_proj))
        bq, bk = p(at.q_proj.bias), p(at.k_proj.bias)
        wo = p(at.dense.weight).T
        w1, w2 = p(blk.mlp.fc1.weight).T, p(blk.mlp.fc2.weight).T
        n1, n2, eps, gated = blk.input_layernorm, blk.input_layernorm, model.config.layer_norm_eps, None
    else:
        blk = model.bert.encoder.layer[layer]
        s = blk.attention.self
        wq, wk, wv = (p(m.weight).T for m in (s.query, s.key, s.value))
        bq, bk = p(s.query.bias), p(s.key.bias)
        wo = p(blk.attention.output.dense.weight).T
        w1, w2 = p(blk.intermediate.dense.weight).T, p(blk.output.dense.weight).T
        n1, n2, eps, gated = blk.attention.output.LayerNorm, blk.output.LayerNorm, model.config.layer_norm_eps, None
    return dict(wq=wq, wk=wk, wv=wv, wo=wo, bq=bq, bk=bk, w1=w1, w2=w2, gated=gated, eps=eps,
                norms=[(p(n.weight), None if getattr(n, "bias", None) is None else p(n.bias)) for n in (n1, n2)])


def hf_rotation(family: str, model: torch.nn.Module, n_positions: int, head_dim: int):
    """P_Delta from the ``transformers`` rotary module and ``apply_rotary_pos_emb`` applied to the identity rows."""
    if family == "llama":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        rotary = model.model.rotary_emb
    elif family == "neox":
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
        rotary = model.gpt_neox.rotary_emb
    elif family == "gptj":
        from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope
        r = model.config.rotary_dim
        eye = torch.eye(head_dim, dtype=F64)[None, None].expand(1, n_positions, head_dim, head_dim)  # [1, T, D, D]
        sin, cos = model.transformer.rotary_emb(eye, torch.arange(n_positions)[None])
        rotated = torch.cat([gptj_rope(eye[..., :r], sin.to(F64), cos.to(F64)), eye[..., r:]], dim=-1)
        return lambda delta: rotated[0, delta]                                    # row a: e_a P_Delta
    elif family == "phi":
        from transformers.models.phi.modeling_phi import apply_rotary_pos_emb as phi_rope
        r = model.model.layers[0].self_attn.rotary_ndims
        eye = torch.eye(head_dim, dtype=F64)[None, :, None, :].expand(1, head_dim, n_positions, head_dim)
        cos, sin = model.model.rotary_emb(eye, torch.arange(n_positions)[None])
        rot = phi_rope(eye[..., :r], eye[..., :r], cos.to(F64), sin.to(F64))[0]    # the attention rotates [:r] only
        rotated = torch.cat([rot, eye[..., r:]], dim=-1)
        return lambda delta: rotated[0, :, delta, :]
    else:
        return lambda delta: torch.eye(head_dim, dtype=F64)
    eye = torch.eye(head_dim, dtype=F64)[None, :, None, :].expand(1, head_dim, n_positions, head_dim)  # [1, D, T, D]
    cos, sin = rotary(eye, torch.arange(n_positions)[None])
    rotated = apply_rotary_pos_emb(eye, eye, cos.to(F64), sin.to(F64))[0]        # row a at t: e_a P_t
    return lambda delta: rotated[0, :, delta, :]


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "bert", "gptj", "phi"])
def test_slices_match_transformers_parameters(family: str, tiny_checkpoints: dict) -> None:
    path, hf = tiny_checkpoints[family]
    model = open_model(path)
    cfg = model.cfg
    H, H_kv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    group, r_dim = H // H_kv, (cfg.rope.rotary_dim if cfg.rope else 0)
    rel = dict(rel=1e-10)
    for layer in range(cfg.n_layers):
        lw = model.loader(dtype=F64).layer(layer)
        heads, rec = compute_weight_metrics(lw, cfg, layer)
        ref = reference_blocks(family, hf, layer)
        rotation = hf_rotation(family, hf, cfg.max_positions, D)
        qk_ref = brute_force_qk(LayerWeights(layer, ref["wq"], ref["wk"], ref["wv"], ref["wo"], None, None, None,
                                             None, lw.norm_attn, lw.norm_ffn, {}), cfg, range(cfg.max_positions),
                                rotation)
        assert [(h.layer, h.head) for h in heads] == [(layer, h) for h in range(H)]
        for h, got in enumerate(heads):
            g = h // group
            blk = lambda t, i: t[:, i * D:(i + 1) * D]
            assert got.wq_norm == pytest.approx(norm2(blk(ref["wq"], h)), **rel)
            assert got.wk_norm == pytest.approx(norm2(blk(ref["wk"], g)), **rel)
            assert got.wv_norm == pytest.approx(norm2(blk(ref["wv"], g)), **rel)
            assert got.wo_norm == pytest.approx(norm2(ref["wo"][h * D:(h + 1) * D]), **rel)
            assert got.kappa_wq == pytest.approx(cond(blk(ref["wq"], h)), rel=1e-9)
            assert got.kappa_wk == pytest.approx(cond(blk(ref["wk"], g)), rel=1e-9)
            assert got.kappa_wv == pytest.approx(cond(blk(ref["wv"], g)), rel=1e-9)
            if ref["bq"] is None:
                assert got.bq_norm is None and got.bk_rot_norm is None
            else:
                assert got.bq_norm == pytest.approx(ref["bq"][h * D:(h + 1) * D].norm().item(), **rel)
                assert got.bk_rot_norm == pytest.approx(ref["bk"][g * D:g * D + r_dim].norm().item(), abs=1e-12)
            # float32 angles in transformers vs float64 here: agreement to ~1e-6
            assert got.qk_norm == pytest.approx(qk_ref[h], rel=1e-5)
            assert got.proj_product == pytest.approx(got.wq_norm * got.wk_norm * got.wv_norm * rec.wo_full_norm,
                                                     rel=1e-14)
        full = [norm2(ref[k]) for k in ("wq", "wk", "wv", "wo")]
        assert [rec.wq_full_norm, rec.wk_full_norm, rec.wv_full_norm, rec.wo_full_norm] == pytest.approx(full, **rel)
        assert rec.proj_product_layer == pytest.approx(math.prod(full), **rel)
        assert rec.alpha_geo == pytest.approx(math.prod(full) ** 0.25, **rel)
        assert rec.ffn_w1_norm == pytest.approx(norm2(ref["w1"]), **rel)
        assert rec.ffn_w2_norm == pytest.approx(norm2(ref["w2"]), **rel)
        kappa = lambda w: (s := torch.linalg.svdvals(w))[0].item() / (s[-1].item() + 1e-6)
        assert rec.kappa_eff == pytest.approx(kappa(ref["w1"]) + kappa(ref["w2"]) + kappa(ref["wo"]), rel=1e-9)
        if ref["gated"] is None:
            assert rec.ffn_gate_norm is None and rec.ffn_up_norm_2inf is None
        else:
            wg, wu = ref["gated"]
            assert (rec.ffn_gate_norm, rec.ffn_up_norm) == pytest.approx((norm2(wg), norm2(wu)), **rel)
            assert rec.ffn_gate_norm_2inf == pytest.approx(wg.norm(dim=0).max().item(), **rel)
            assert rec.ffn_up_norm_2inf == pytest.approx(wu.norm(dim=0).max().item(), **rel)
        got_norms = [(rec.norm1_gamma_max, rec.norm1_beta_norm), (rec.norm2_gamma_max, rec.norm2_beta_norm)]
        for (gamma_max, beta_norm), (gamma, beta) in zip(got_norms, ref["norms"]):
            assert gamma_max == pytest.approx(gamma.abs().max().item(), **rel)
            assert beta_norm == (None if beta is None else pytest.approx(beta.norm().item(), **rel))
        assert rec.norm_eps == pytest.approx(ref["eps"], rel=1e-12)


def test_sliding_window_caps_offsets(tiny_checkpoints: dict) -> None:
    cfg = open_model(tiny_checkpoints["mistral"][0]).cfg
    assert rope_offsets(cfg, 0).tolist() == list(range(7))
    assert rope_offsets(cfg, 0, max_offset=3).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ biases (§5.4)

@pytest.mark.parametrize("style", [RopeStyle.HALF_SPLIT, RopeStyle.INTERLEAVED])
def test_bk_rot_norm_partial_rotary(style: RopeStyle) -> None:
    """Only the first ``rotary_dim`` coordinates of b^K_g count; heads share their K/V head's value."""
    rope = RopeConfig(theta=100.0, rotary_dim=4, style=style)
    cfg = make_config(d=10, n_heads=4, n_kv_heads=2, head_dim=8, rope=rope)
    w = make_weights(cfg)
    w.bk = torch.tensor([3.0, 4, 0, 0, 100, 100, 100, 100,           # kv head 0: rotary part (3, 4, 0, 0) -> 5
                         0, 0, 0, 1, -7, 7, 7, 7], dtype=F64)       # kv head 1: rotary part (0, 0, 0, 1) -> 1
    heads = compute_head_weight_metrics(w, cfg)
    assert [h.bk_rot_norm for h in heads] == pytest.approx([5.0, 5.0, 1.0, 1.0], abs=1e-15)
    assert rotary_key_bias_norms(w.bk, 2, 8, dataclasses.replace(rope, rotary_dim=8)).tolist() == pytest.approx(
        [w.bk[:8].norm().item(), w.bk[8:].norm().item()])
    flat = make_config(d=10, n_heads=4, n_kv_heads=2, head_dim=8)
    assert [h.bk_rot_norm for h in compute_head_weight_metrics(w, flat)] == [0.0] * 4
    assert [h.bq_norm for h in heads] == pytest.approx([w.bq[i * 8:(i + 1) * 8].norm().item() for i in range(4)])
    no_bias = make_weights(cfg, biases=False)
    assert all(h.bq_norm is None and h.bk_rot_norm is None for h in compute_head_weight_metrics(no_bias, cfg))


# ---------------------------------------------------------------------------------------------- qk_norm (T17)

def test_t17_adversarial_instance() -> None:
    """W^Q W^K^T = 0, yet RoPE rotates q into k: the non-RoPE variant (0) falls below a realised logit (E4)."""
    rope = RopeConfig(theta=10000.0, rotary_dim=2, style=RopeStyle.HALF_SPLIT)      # one pair, omega = 1 rad
    cfg = make_config(d=2, n_heads=1, n_kv_heads=1, head_dim=2, rope=rope, max_positions=64)
    w = make_weights(cfg, biases=False)
    w.wq = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)                         # q = (x_1, 0)
    w.wk = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)                         # k = (0, x_1)
    assert norm2(w.wq @ w.wk.T) == 0.0
    non_rope = compute_qk_norms(w.wq[None], w.wk[None], torch.zeros(1, dtype=torch.long), None, torch.zeros(1)).item()
    rope_aware = compute_head_weight_metrics(w, cfg)[0].qk_norm
    # lower bound: |s q_i . k_j| / (|x_i| |x_j|) for unit x = e_1, rotated by the model's own apply_rope
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    lb = 0.0
    for i in range(64):
        for j in range(0, i + 1, 7):
            cos = lambda t: torch.tensor([[math.cos(t)]], dtype=F64)
            sin = lambda t: torch.tensor([[math.sin(t)]], dtype=F64)
            q = apply_rope(x @ w.wq, cos(i), sin(i), rope)
            k = apply_rope(x @ w.wk, cos(j), sin(j), rope)
            lb = max(lb, abs((q * k).sum().item()))
    assert non_rope == 0.0 and non_rope / lb < 1
    assert rope_aware >= lb * (1 - 1e-12)
    assert rope_aware == pytest.approx(max(abs(math.sin(delta)) for delta in range(64)), rel=1e-12)


@pytest.mark.parametrize("style", [RopeStyle.HALF_SPLIT, RopeStyle.INTERLEAVED])
@pytest.mark.parametrize("rotary_dim,causal", [(6, True), (4, True), (4, False)])
def test_qk_norm_equals_brute_force(style: RopeStyle, rotary_dim: int, causal: bool) -> None:
    rope = RopeConfig(theta=50.0, rotary_dim=rotary_dim, style=style)
    cfg = make_config(d=10, n_heads=4, n_kv_heads=2, head_dim=6, rope=rope, causal=causal, max_positions=23)
    w = make_weights(cfg, seed=rotary_dim)
    offsets = range(23) if causal else range(-22, 23)
    expected = brute_force_qk(w, cfg, offsets, lambda delta: explicit_rotation(rope, 6, delta))
    got = [h.qk_norm for h in compute_head_weight_metrics(w, cfg)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert rope_offsets(cfg, 0).tolist() == list(offsets)


def test_qr_identity_per_offset() -> None:
    """||W^Q P W^K^T||_2 = ||G_Q P G_K^T||_2 for every offset (THEORY §5.5), d < D included."""
    rope = RopeConfig(theta=30.0, rotary_dim=4, style=RopeStyle.HALF_SPLIT)
    for d, D in [(12, 6), (4, 6)]:
        cfg = make_config(d=d, n_heads=2, n_kv_heads=1, head_dim=D, rope=rope)
        w = make_weights(cfg, seed=d)
        q = w.wq.reshape(d, 2, D).permute(1, 0, 2)
        k = w.wk.reshape(d, 1, D).permute(1, 0, 2)
        kv = kv_head_index(2, 1)
        for delta in range(0, 40, 3):
            got = compute_qk_norms(q, k, kv, rope, torch.tensor([delta]))
            direct = [norm2(q[h] @ explicit_rotation(rope, D, delta) @ k[0].T) for h in range(2)]
            assert got.tolist() == pytest.approx(direct, rel=1e-12)


def test_offset_pruning_is_exact_at_extreme_scales() -> None:
    """The pruned per-head maximum equals the dense one, with norms from 1e-150 to 1e150 (no over/underflow)."""
    g = torch.Generator().manual_seed(9)
    m = torch.randn(3, 40, 5, 5, generator=g, dtype=F64)
    m = m * torch.logspace(-150, 150, 40, dtype=F64)[torch.randperm(40, generator=g)][None, :, None, None]
    m[1, 7] = 0.0
    dense = torch.linalg.matrix_norm(m, ord=2).amax(dim=1)                       # [H]
    got = _chunk_max_sigma(m, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=0)
    floor = dense * 2                                                            # a floor above everything stays
    torch.testing.assert_close(_chunk_max_sigma(m, floor), floor, rtol=0, atol=0)


def test_offset_pruning_is_exact_at_model_size() -> None:
    """At head size 64 the float32 pruning brackets neither underflow nor drop the maximiser: the pruned maximum
    equals the dense one, on random heads and on heads whose offsets differ by less than the pruning margin."""
    g = torch.Generator().manual_seed(4)
    m = torch.randn(2, 96, 64, 64, generator=g, dtype=F64)
    near = m[1, :1] * (1 + 1e-5 * torch.rand(96, 1, 1, generator=g, dtype=F64))   # head 1: nearly tied offsets
    m[1] = near
    dense = torch.linalg.matrix_norm(m, ord=2).amax(dim=1)                       # [H]
    torch.testing.assert_close(_chunk_max_sigma(m, torch.zeros(2, dtype=F64)), dense, rtol=1e-13, atol=0)


def test_qk_norm_equals_brute_force_at_model_size() -> None:
    """``qk_norm`` of 64-dimensional RoPE heads over 160 offsets equals the dense maximum of the full products."""
    rope = RopeConfig(theta=1e5, rotary_dim=64, style=RopeStyle.HALF_SPLIT)
    cfg = make_config(d=96, n_heads=3, n_kv_heads=1, head_dim=64, rope=rope, causal=True, max_positions=160)
    w = make_weights(cfg, seed=11)
    expected = brute_force_qk(w, cfg, range(160), lambda delta: explicit_rotation(rope, 64, delta))
    got = [h.qk_norm for h in compute_head_weight_metrics(w, cfg)]
    assert got == pytest.approx(expected, rel=1e-12)


def test_qk_norm_without_rope_is_the_plain_product() -> None:
    cfg = make_config(d=10, n_heads=4, n_kv_heads=1, head_dim=6)
    w = make_weights(cfg, seed=4)
    got = [h.qk_norm for h in compute_head_weight_metrics(w, cfg)]
    assert got == pytest.approx([norm2(w.wq[:, h * 6:(h + 1) * 6] @ w.wk.T) for h in range(4)], rel=1e-12)


def test_missing_span_is_an_input_error() -> None:
    cfg = make_config(rope=RopeConfig(theta=10.0, rotary_dim=6, style=RopeStyle.HALF_SPLIT), max_positions=None)
    with pytest.raises(InputError):
        rope_offsets(cfg, 0)
    assert rope_offsets(cfg, 0, max_offset=5).tolist() == list(range(5))


# ------------------------------------------------------------------------------------- products and kappa (§10-13)

def test_products_and_depth_budget() -> None:
    cfg = make_config(d=10, n_heads=4, n_kv_heads=2, head_dim=6)
    recs = []
    for seed in range(3):
        w = make_weights(cfg, seed=seed)
        heads, rec = compute_weight_metrics(w, cfg, layer=seed)
        assert rec.layer == seed and all(h.layer == seed for h in heads)
        for h in heads:
            assert h.proj_product == pytest.approx(h.wq_norm * h.wk_norm * h.wv_norm * norm2(w.wo), rel=1e-13)
        assert rec.proj_product_layer == pytest.approx(norm2(w.wq) * norm2(w.wk) * norm2(w.wv) * norm2(w.wo),
                                                       rel=1e-13)
        assert rec.alpha_geo ** 4 == pytest.approx(rec.proj_product_layer, rel=1e-13)
        recs.append(rec)
    top = max(r.proj_product_layer for r in recs)
    assert compute_depth_budget(recs) == pytest.approx(3 * top, rel=1e-15)
    assert compute_depth_budget([dataclasses.asdict(r) for r in recs], n_layers=10) == pytest.approx(10 * top)
    assert set(dataclasses.asdict(recs[0])) == {f.name for f in dataclasses.fields(LayerWeightMetrics)}
    assert "qk_norm" in {f.name for f in dataclasses.fields(HeadWeightMetrics)}


def _diag(rows: int, cols: int, values: list[float]) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=F64)
    out[range(len(values)), range(len(values))] = torch.tensor(values, dtype=F64)
    return out


def test_kappa_eff_hand_built_mlp() -> None:
    cfg = make_config(d=4, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=6)
    w = make_weights(cfg)
    w.wo = _diag(4, 4, [4.0, 2.0, 1.0, 0.5])
    w.ffn["w_in"] = _diag(4, 6, [3.0, 1.0, 1.0, 1.0])       # min(4, 6) = 4 singular values: no zero padding
    w.ffn["w_out"] = _diag(6, 4, [2.0, -2.0, 2.0, 0.25])
    w.norm_attn = NormWeights(torch.tensor([0.5, -3.0, 1.0, 2.0], dtype=F64), torch.tensor([3.0, 4, 0, 0], dtype=F64))
    rec = compute_layer_weight_metrics(w, cfg)
    expected = 3.0 / (1 + 1e-6) + 2.0 / (0.25 + 1e-6) + 4.0 / (0.5 + 1e-6)
    assert rec.kappa_eff == pytest.approx(expected, rel=1e-13)
    assert (rec.ffn_w1_norm, rec.ffn_w2_norm, rec.wo_full_norm) == pytest.approx((3.0, 2.0, 4.0), rel=1e-14)
    assert (rec.norm1_gamma_max, rec.norm1_beta_norm, rec.norm_eps) == (3.0, 5.0, 1e-5)


def test_kappa_eff_hand_built_gated() -> None:
    """Gated: W1 = [W_g W_u] with singular values sqrt(a_i^2 + b_i^2); W2 = W_d (THEORY §13 family extension)."""
    cfg = make_config(d=3, n_heads=1, n_kv_heads=1, head_dim=3, d_ff=3, ffn=FFNKind.GATED)
    w = make_weights(cfg, biases=False)
    w.wo = _diag(3, 3, [1.0, 1.0, 1.0])
    w.ffn = {"w_gate": _diag(3, 3, [3.0, 1.0, 0.0]), "w_up": _diag(3, 3, [4.0, 0.0, 2.0]),
             "w_out": _diag(3, 3, [6.0, 3.0, 2.0])}
    rec = compute_layer_weight_metrics(w, cfg)
    expected = 5.0 / (1.0 + 1e-6) + 6.0 / (2.0 + 1e-6) + 1.0 / (1.0 + 1e-6)
    assert rec.kappa_eff == pytest.approx(expected, rel=1e-13)
    assert (rec.ffn_w1_norm, rec.ffn_gate_norm, rec.ffn_up_norm) == pytest.approx((5.0, 3.0, 4.0), rel=1e-14)
    assert (rec.ffn_gate_norm_2inf, rec.ffn_up_norm_2inf) == pytest.approx((3.0, 4.0), rel=1e-14)
    assert rec.norm1_beta_norm is None and rec.norm2_beta_norm is None


def test_head_kappas_are_unridged_and_gqa_shared() -> None:
    cfg = make_config(d=8, n_heads=4, n_kv_heads=2, head_dim=3)
    w = make_weights(cfg)
    w.wk = torch.cat([_diag(8, 3, [2.0, 1.0, 0.5]), _diag(8, 3, [1.0, 1.0, 1.0])], dim=1)
    heads = compute_head_weight_metrics(w, cfg)
    assert [h.kappa_wk for h in heads] == pytest.approx([4.0, 4.0, 1.0, 1.0], rel=1e-14)
    assert [h.wk_norm for h in heads] == pytest.approx([2.0, 2.0, 1.0, 1.0], rel=1e-14)


def test_offset_pruning_from_float32_products_keeps_the_maximiser() -> None:
    """Brackets taken on float32 copies of the products, widened by the copies' distance to them, still select the
    exact float64 maximum, on offsets tied more closely than float32 resolves."""
    from attnstab_cli.metrics.weights_metrics import _max_sigma_pruned, _sigma_brackets

    g = torch.Generator().manual_seed(5)
    m = torch.randn(2, 64, 64, 64, generator=g, dtype=F64)
    m[1] = m[1, :1] * (1 + 1e-9 * torch.rand(64, 1, 1, generator=g, dtype=F64))  # head 1: ties below float32
    m32 = m.float()
    err = (m32.double() - m).flatten(2).norm(dim=-1)                             # [H, C] >= ||m32 - m||_2
    lower, upper = _sigma_brackets(m32)
    got = _max_sigma_pruned((lower - err).clamp_min(0), upper + err, torch.zeros(2, dtype=F64),
                            lambda head, cols: m[head, cols])
    dense = torch.linalg.matrix_norm(m, ord=2).amax(dim=1)
    torch.testing.assert_close(got, dense, rtol=1e-13, atol=0)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_mla_head_columns_are_the_up_projection_blocks(family: str, tiny_checkpoints: dict) -> None:
    """THEORY §18.8: per head, wq_norm is ||W^Q_h|| (one q projection) or ||W_qb,h||, wk_norm ||W^nope_kvb,h||,
    wv_norm ||W^V_kvb,h||, wo_norm ||W^O_h||, sliced here from the reference's modules; qk_norm is null."""
    from attnstab_cli.metrics.weights_metrics import compute_weight_metrics

    path, ref = tiny_checkpoints[family]
    model = open_model(path)
    m, h = model.cfg.mla, model.cfg.n_heads
    attn = ref.model.layers[0].self_attn
    heads, layer = compute_weight_metrics(model.loader("cpu", torch.float64).layer(0), model.cfg)
    q = (attn.q_proj if attn.q_proj is not None else attn.q_b_proj).weight.double()       # [H dk, r] (out, in)
    kv = attn.kv_b_proj.weight.double().reshape(h, m.nope + m.v, -1)                     # [H, nope + v, r_kv]
    o = attn.o_proj.weight.double()                                                       # [d, H v]
    spec = lambda x: float(torch.linalg.matrix_norm(x, ord=2))
    for rec in heads:
        i = rec.head
        want = (spec(q[i * (m.nope + m.rope):(i + 1) * (m.nope + m.rope)]), spec(kv[i, : m.nope]),
                spec(kv[i, m.nope:]), spec(o[:, i * m.v:(i + 1) * m.v]))
        got = (rec.wq_norm, rec.wk_norm, rec.wv_norm, rec.wo_norm)
        assert all(abs(a - b) <= 1e-6 * b for a, b in zip(got, want))
        assert rec.qk_norm is None and rec.bq_norm is None
    assert abs(layer.wv_full_norm - spec(kv[:, m.nope:].reshape(-1, kv.shape[-1]))) <= 1e-6 * layer.wv_full_norm
