"""Gemma 2 conventions that change no bound formula but every number (THEORY §18.6): gamma = 1 + w (T35), the
embedding scale sqrt(d) in the hidden dtype, s = query_pre_attn_scalar^(-1/2), the alternation of sliding and global
layers, and a float64 forward match per layer against ``transformers`` made float64 throughout (its RMSNorm and its
eager softmax compute in float32, which would cap the comparison near 1e-7)."""
from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from cli.helpers import invoke


def _f64_rmsnorm(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm, x / sqrt(ms + eps) * (1 + w), in the input's dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _f64_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Eager soft-capped attention with the softmax in the inputs' dtype (the reference's own upcasts to float32)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = query @ key.transpose(2, 3) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if attention_mask is not None:
        logits = logits + attention_mask
    weights = logits.softmax(-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def test_float64_layers_match(tiny_checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every h_{l+1} (sliding and global layers, sandwich norms, soft-capped logits) and the final hidden state match
    the float64 reference to 1e-10 relative."""
    from transformers.models.gemma2 import modeling_gemma2

    path, ref = tiny_checkpoints["gemma2"]
    ref64 = copy.deepcopy(ref).double()
    for module in ref64.modules():
        if isinstance(module, modeling_gemma2.Gemma2RMSNorm):
            module.forward = types.MethodType(_f64_rmsnorm, module)
    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", _f64_attention)
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref64(ids, output_hidden_states=True).hidden_states
    stream = LayerStream(model, [ids], dtype=torch.float64)
    h0 = stream.embed()[0]
    assert (h0 - expected[0]).norm() / expected[0].norm() < 1e-15          # embedding times sqrt(d)
    for trace in stream.layers():
        if trace.layer + 1 < model.cfg.n_layers:
            want = expected[trace.layer + 1]
            err = (trace.resid_out - want).norm() / want.norm()
            assert err < 1e-10, f"layer {trace.layer}: relative error {float(err):.3g}"
    got, want = stream.final_hidden()[0], expected[-1]
    assert (got - want).norm() / want.norm() < 1e-10


def test_embedding_scale_is_rounded_in_the_hidden_dtype(tiny_checkpoints: dict) -> None:
    """h_0 = E[ids] * sqrt(d) with sqrt(d) rounded to the hidden dtype (bfloat16: sqrt(64) = 8 exactly, so a width
    whose root is not representable is used): 8.0 for d = 64 in every dtype, 55.5 for d = 3072 in bfloat16."""
    model = open_model(tiny_checkpoints["gemma2"][0])
    assert model.cfg.embed_multiplier(torch.float32) == 8.0
    cfg = type(model.cfg)
    wide = cfg(**{**model.cfg.__dict__, "d_model": 3072})
    assert wide.embed_multiplier(torch.bfloat16) == 55.5
    assert wide.embed_multiplier(torch.float32) == pytest.approx(math.sqrt(3072), rel=1e-7)


def test_config_conventions(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """s = query_pre_attn_scalar^(-1/2) (24 here, head_dim 16); caps read; layer_types sliding, full, sliding; without
    layer_types the older rule (every second layer global) gives the same."""
    path, ref = tiny_checkpoints["gemma2"]
    cfg = open_model(path).cfg
    assert cfg.attn_scale(0) == pytest.approx(24 ** -0.5, rel=1e-15) and cfg.head_dim == 16
    assert (cfg.attn_logit_cap, cfg.final_logit_cap) == (5.0, 3.0)
    assert cfg.sliding_windows == (7, None, 7)
    old = tmp_path / "old"
    old.mkdir()
    for f in path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "config.json").read_text())
    del config["layer_types"]
    (old / "config.json").write_text(json.dumps(config))
    assert open_model(old).cfg.sliding_windows == (7, None, 7)


def test_gamma_columns_are_one_plus_w(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """T35: norm1_gamma_max of the Gemma tiny model is max |1 + w| of the stored input_layernorm weight (read here
    from the file; 1 + w formed in float32, as the model forms it and as the default scan computes), exactly, and
    likewise for the other three norms of each layer."""
    path, _ = tiny_checkpoints["gemma2"]
    out = tmp_path / "report"
    result = invoke("scan", path, "--weights-only", "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = pq.read_table(out / "layers.parquet").to_pylist()
    columns = {"norm1_gamma_max": "input_layernorm", "norm1_out_gamma_max": "post_attention_layernorm",
               "norm2_gamma_max": "pre_feedforward_layernorm", "norm2_out_gamma_max": "post_feedforward_layernorm"}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for row in rows:
            for column, module in columns.items():
                w = f.get_tensor(f"model.layers.{row['layer']}.{module}.weight").float()
                assert row[column] == float((1.0 + w).abs().max())
                assert row[column] != float(w.abs().max())
            assert row["norm1_beta_norm"] is None and row["norm1_out_beta_norm"] is None
