"""Attention sinks in the streamed forward (THEORY §18.4): one attention layer with a learned sink logit per head,
attention biases, GQA, RoPE and sliding or full key sets, against transformers' eager ``GptOssAttention`` (the module
alone, built from a ``GptOssConfig``; the gpt-oss family as a whole needs the MoE FFN) and against a hand-written
float64 softmax over the n + 1 outcomes."""
from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

from attnstab_cli.arch.spec import FFNKind, Layout, NormKind, Orientation, Positions, QKVPacking, Residual, RopeStyle
from attnstab_cli.model.blocks import explicit_attention, run_attention
from attnstab_cli.model.config import ModelConfig, RopeConfig
from attnstab_cli.model.rope import compute_rope_cos_sin
from attnstab_cli.model.weights import LayerWeights, NormWeights

F64 = torch.float64
D_MODEL, H, H_KV, D, T, WINDOW = 16, 4, 2, 8, 11, 4


def _config(window: int | None) -> ModelConfig:
    layout = Layout(orientation=Orientation.OUT_IN, qkv_packing=QKVPacking.SEPARATE, norm=NormKind.RMSNORM,
                    residual=Residual.PRE, positions=Positions.ROPE, rope_style=RopeStyle.HALF_SPLIT, causal=True,
                    ffn=FFNKind.GATED, attn_sinks=True)
    return ModelConfig(family="sinks", model_type="sinks", layout=layout, n_layers=1, d_model=D_MODEL, n_heads=H,
                       n_kv_heads=H_KV, head_dim=D, d_ff=8, vocab_size=11, max_positions=64, norm_eps=1e-5,
                       activation="silu", rope=RopeConfig(theta=1e4, rotary_dim=D, style=RopeStyle.HALF_SPLIT),
                       sliding_windows=(window,))


def _module(window: int | None, seed: int) -> GptOssAttention:
    hf = GptOssConfig(hidden_size=D_MODEL, num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D,
                      num_hidden_layers=1, sliding_window=WINDOW, attention_bias=True,
                      layer_types=["sliding_attention" if window else "full_attention"],
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    hf._attn_implementation = "eager"
    mod = GptOssAttention(hf, 0).to(F64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=F64))
        mod.sinks.copy_(2.0 * torch.randn(H, generator=g, dtype=F64) + 1.0)   # some heads park most mass on the sink
    return mod


def _weights(mod: GptOssAttention) -> LayerWeights:
    t = lambda lin: lin.weight.detach().T.contiguous()                # nn.Linear (out, in) -> row convention
    ident = NormWeights(None, None)
    return LayerWeights(layer=0, wq=t(mod.q_proj), wk=t(mod.k_proj), wv=t(mod.v_proj), wo=t(mod.o_proj),
                        bq=mod.q_proj.bias.detach(), bk=mod.k_proj.bias.detach(), bv=mod.v_proj.bias.detach(),
                        bo=mod.o_proj.bias.detach(), norm_attn=ident, norm_ffn=ident, ffn={},
                        sinks=mod.sinks.detach())


def _additive_mask(window: int | None) -> torch.Tensor:
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (j <= i) & ((i - j) < window if window else True)
    return torch.where(allowed, 0.0, float("-inf")).to(F64)[None, None]   # [1, 1, T, T]


@pytest.mark.parametrize("window", [None, WINDOW])
def test_sink_attention_matches_gpt_oss_eager(window: int | None) -> None:
    """Outputs and the real-key probabilities of the eager module (sink column dropped) equal the package's layer
    in float64; rows sum to m < 1 and the sink's share is 1 - m."""
    mod = _module(window, seed=3 + (window or 0))
    cfg = _config(window)
    x = torch.randn(2, T, D_MODEL, generator=torch.Generator().manual_seed(7), dtype=F64)
    cos, sin = compute_rope_cos_sin(cfg.rope, torch.arange(T), F64)                  # [T, D/2]
    with torch.no_grad():
        want, probs = mod(x, (cos[None], sin[None]), _additive_mask(window))
    got = run_attention(x, _weights(mod), cfg, 0, (cos, sin), None)
    torch.testing.assert_close(got.out, want, rtol=1e-12, atol=1e-12)
    assert got.sinks is not None and torch.equal(got.sinks, mod.sinks.detach())
    mass = probs.sum(-1)                                                              # [B, H, T]
    assert float(mass.max()) < 1.0
    s = got.scale * got.q @ got.k.repeat_interleave(H // H_KV, 1).transpose(-1, -2)   # [B, H, T, T]
    s = s + _additive_mask(window)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    e_sink = torch.exp(got.sinks.view(1, H, 1) - s.amax(-1))                         # [B, H, T]
    by_hand = e / (e.sum(-1) + e_sink)[..., None]                                      # the n + 1 outcomes
    torch.testing.assert_close(by_hand, probs, rtol=1e-12, atol=1e-14)


def test_explicit_attention_blocks_and_empty_rows(monkeypatch) -> None:
    """One query block at a time (3 rows per block) equals the dense softmax over keys and sink; a row with every
    key masked gives all its weight to the sink (output 0, no NaN)."""
    from attnstab_cli.model import blocks

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, generator=g, dtype=F64) for h in (H, H_KV, H_KV))
    sinks = torch.randn(H, generator=g, dtype=F64)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[4] = False                                                                 # row 4 sees no key
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    full = torch.cat([s, sinks.view(1, H, 1, 1).expand(1, H, T, 1)], dim=-1).softmax(-1)[..., :T]
    want = full @ v.repeat_interleave(2, 1)
    monkeypatch.setattr(blocks, "_EXPLICIT_BLOCK_ELEMENTS", 3 * H * T)
    got = explicit_attention(q, k, v, allowed[None, None], 0.3, None, sinks)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    assert torch.equal(got[:, :, 4], torch.zeros_like(got[:, :, 4]))
