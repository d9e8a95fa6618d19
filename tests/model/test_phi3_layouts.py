"""Phi-3 layout primitives (THEORY §18.6 fused projections; §5.5 LongRoPE): the packed gated FFN, LongRoPE's factor
sets and attention factor, against ``transformers`` and brute force."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from attnstab_cli.arch.spec import parse_spec
from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.metrics.weights_metrics import compute_qk_norms, slice_heads
from attnstab_cli.model.load import open_model
from attnstab_cli.model.rope import compute_rope_cos_sin
from attnstab_cli.scan import ScanOptions, run_scan
from metrics.test_lipschitz_scan import assert_tiers_ordered


def _phi3_spec_data() -> dict:
    from importlib import resources

    return json.loads(resources.files("attnstab_cli.arch").joinpath("specs/phi3.json").read_text())


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["layout"].update(ffn="mlp"), "needs ffn 'gated'"),
    (lambda d: d["layer_tensors"].update({"ffn_up.weight": "layers.{layer}.mlp.up_proj.weight"}),
     "declares FFN weights"),
    (lambda d: d["layer_tensors"].pop("ffn_gate_up.weight"), "declares FFN weights"),
    (lambda d: d["layout"].update(ffn_packing="up_gate"), "'up_gate' is not a valid FFNPacking"),
    (lambda d: d["layout"].update(qkv_order="qkv"), "unknown layout keys"),
])
def test_ffn_packing_is_validated(edit, needle: str) -> None:
    data = _phi3_spec_data()
    edit(data)
    with pytest.raises(ValueError, match=needle):
        parse_spec(data)


def test_gate_up_split_is_the_models_chunk(tiny_checkpoints: dict) -> None:
    """W_g is the first half of gate_up_proj's rows (the activated one), W_u the second: act(x W_g) * x W_u."""
    path, ref = tiny_checkpoints["phi3"]
    model = open_model(path)
    w = model.loader("cpu", torch.float64).layer(1)
    stored = ref.model.layers[1].mlp.gate_up_proj.weight.detach().double()          # [2m, d]
    m = model.cfg.d_ff
    assert torch.equal(w.ffn["w_gate"], stored[:m].t()) and torch.equal(w.ffn["w_up"], stored[m:].t())
    x = torch.randn(5, 64, dtype=torch.float64)
    mlp = copy.deepcopy(ref.model.layers[1].mlp).double()
    want = mlp(x)
    got = (torch.nn.functional.silu(x @ w.ffn["w_gate"]) * (x @ w.ffn["w_up"])) @ w.ffn["w_out"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_prefix_rotation_keeps_the_full_sequences_factors(tiny_checkpoints: dict) -> None:
    """Tier 3 searches a prefix of a longer sequence: its rotations are the full sequence's (long factors here), not
    those a sequence of the prefix's length would use."""
    rope = open_model(tiny_checkpoints["phi3_longrope"][0]).cfg.rope
    full = compute_rope_cos_sin(rope, torch.arange(40), torch.float64)
    prefix = compute_rope_cos_sin(rope, torch.arange(12), torch.float64, seq_len=40)
    own = compute_rope_cos_sin(rope, torch.arange(12), torch.float64)
    assert torch.equal(prefix[0], full[0][:12]) and torch.equal(prefix[1], full[1][:12])
    assert not torch.allclose(own[0], prefix[0])


def test_qk_norm_under_longrope_matches_the_models_rotations(tiny_checkpoints: dict) -> None:
    """s * qk_norm = max over reachable offsets of s_model ||W^Q_h P_i P_j^T W^K_g^T|| with the model's own
    rotations (m cos, m sin on the rotary part, pass-through unscaled): short factors up to 15 offsets, long up to
    39 (sequences of 16 and 40), brute force over (i, 0) pairs through ``transformers``' rotary embedding."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    path, ref = tiny_checkpoints["phi3_longrope"]
    model = open_model(path)
    cfg = model.cfg
    w = model.loader("cpu", torch.float64).layer(0)
    sl = slice_heads(w, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    ours = compute_qk_norms(sl.wq, sl.wk, sl.kv_of_head, cfg.rope, torch.arange(40)) * cfg.attn_scale(0)
    emb = copy.deepcopy(ref.model.rotary_emb)
    s_model = cfg.head_dim ** -0.5
    brute = torch.zeros(cfg.n_heads, dtype=torch.float64)
    for t in (16, 40):
        cos, sin = (c.double() for c in emb(torch.zeros(1), torch.arange(t)[None]))      # [1, T, r]
        for h in range(cfg.n_heads):
            wq, wk = sl.wq[h][None, :, None, :], sl.wk[sl.kv_of_head[h]][None, :, None, :]   # [1, d, 1, D]
            for i in range(t):
                q_i, _ = apply_rotary_pos_emb(wq, wq, cos[:, i:i + 1], sin[:, i:i + 1])
                _, k_0 = apply_rotary_pos_emb(wk, wk, cos[:, :1], sin[:, :1])
                form = q_i[0, :, 0] @ k_0[0, :, 0].t()                                   # [d, d]
                brute[h] = max(brute[h], s_model * torch.linalg.matrix_norm(form, ord=2))
    torch.testing.assert_close(ours, brute, rtol=1e-6, atol=0)     # the model's cos, sin are float32-rounded
    assert cfg.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))


def test_tiers_ordered_in_the_long_regime(tiny_checkpoints: dict) -> None:
    """Tiers 3 <= 2r <= 2 <= 1 on sequences beyond the original context (long factors, attention factor > 1 with
    partial rotary)."""
    model = open_model(tiny_checkpoints["phi3_longrope"][0])
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=40),
                      ScanOptions(device="cpu", dtype="float64", empirical_seqs=1)).tables
    for row in tables["layers"]:
        assert_tiers_ordered(row)


@pytest.mark.parametrize("old_type", ["su", "yarn"])
def test_older_longrope_type_names(old_type: str, tiny_checkpoints: dict, tmp_path) -> None:
    """Phi-3 configs of the hub's first revisions name LongRoPE "su" (or "yarn") under ``type``: transformers reads
    both as longrope, so does the phi3 spec (``rope_type_aliases``)."""
    import shutil

    path = tiny_checkpoints["phi3_longrope"][0]
    ck = tmp_path / "old"
    shutil.copytree(path, ck)
    data = json.loads((ck / "config.json").read_text())
    scaling = dict(data.pop("rope_parameters"))
    scaling.pop("rope_type")
    data.update(rope_theta=scaling.pop("rope_theta"), partial_rotary_factor=scaling.pop("partial_rotary_factor"))
    data["rope_scaling"] = {**scaling, "type": old_type}
    (ck / "config.json").write_text(json.dumps(data))
    assert open_model(ck).cfg.rope == open_model(path).cfg.rope
