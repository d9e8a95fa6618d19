"""Layout functions on ``arange`` weights: splits and permutations are checked exactly (STYLE.md, "Tests")."""
from __future__ import annotations

import pytest
import torch

from attnstab_cli.arch.layouts import orient, packed_qkv_width, split_packed_ffn, split_packed_qkv
from attnstab_cli.arch.registry import builtin_specs, infer_spec_from_tensors, spec_by_name
from attnstab_cli.arch.spec import FFNPacking, Orientation, QKVPacking, parse_spec
from attnstab_cli.errors import UnsupportedError


def test_concat_split_is_column_blocks() -> None:
    d, h, hkv, dh = 3, 4, 2, 2
    w = torch.arange(d * packed_qkv_width(QKVPacking.CONCAT, h, hkv, dh)).view(d, -1)
    q, k, v = split_packed_qkv(w, QKVPacking.CONCAT, h, hkv, dh)
    assert torch.equal(q, w[:, :8]) and torch.equal(k, w[:, 8:12]) and torch.equal(v, w[:, 12:16])


def test_interleaved_per_head_split() -> None:
    """NeoX: the fused output dim is [H, 3, D]; head h's q is the first D of its 3D block."""
    d, h, dh = 2, 3, 4
    w = torch.arange(d * 3 * h * dh).view(d, 3 * h * dh)
    q, k, v = split_packed_qkv(w, QKVPacking.INTERLEAVED_PER_HEAD, h, h, dh)
    for head in range(h):
        base = head * 3 * dh
        assert torch.equal(q[:, head * dh:(head + 1) * dh], w[:, base:base + dh])
        assert torch.equal(k[:, head * dh:(head + 1) * dh], w[:, base + dh:base + 2 * dh])
        assert torch.equal(v[:, head * dh:(head + 1) * dh], w[:, base + 2 * dh:base + 3 * dh])
    bq, _, _ = split_packed_qkv(torch.arange(3 * h * dh), QKVPacking.INTERLEAVED_PER_HEAD, h, h, dh)
    assert bq.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]


def test_concat_split_with_gqa_from_out_in_rows() -> None:
    """Phi-3 qkv_proj stores rows [Q (H D); K (H_kv D); V (H_kv D)]: after orientation, column blocks."""
    d, h, hkv, dh = 3, 4, 1, 2
    stored = torch.arange((h + 2 * hkv) * dh * d).view(-1, d)                  # [(H + 2 H_kv) D, d]
    q, k, v = split_packed_qkv(orient(stored, Orientation.OUT_IN), QKVPacking.CONCAT, h, hkv, dh)
    assert torch.equal(q, stored[:8].t()) and torch.equal(k, stored[8:10].t()) and torch.equal(v, stored[10:12].t())


def test_gate_up_split() -> None:
    """Stored rows [activated half; multiplying half] (gate_up_proj, Wi) -> W_g, W_u column halves."""
    d, m = 3, 4
    stored = torch.arange(2 * m * d).view(2 * m, d)                             # [2m, d]
    w_gate, w_up = split_packed_ffn(orient(stored, Orientation.OUT_IN), FFNPacking.GATE_UP, m)
    assert torch.equal(w_gate, stored[:m].t()) and torch.equal(w_up, stored[m:].t())
    with pytest.raises(ValueError):
        split_packed_ffn(stored, FFNPacking.SEPARATE, m)


def test_orientation() -> None:
    w = torch.arange(6).view(2, 3)
    assert torch.equal(orient(w, Orientation.OUT_IN), w.t())
    assert orient(w, Orientation.IN_OUT) is w


def test_specs_load_and_reject_unknown_keys() -> None:
    specs = builtin_specs()
    assert set(specs) >= {"gpt2", "llama", "gpt_neox", "bert", "gptj", "phi", "distilbert", "roberta"}
    assert spec_by_name("qwen2").name == "llama"
    import json
    from importlib import resources

    raw = json.loads(resources.files("attnstab_cli.arch").joinpath("specs/gpt2.json").read_text())
    raw["colour"] = "blue"
    with pytest.raises(ValueError, match="unknown keys"):
        parse_spec(raw)
    with pytest.raises(UnsupportedError, match="supported"):
        spec_by_name("t5")


def test_infer_family_from_tensor_names() -> None:
    gpt2 = ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight",
            "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias", "h.0.ln_2.weight",
            "h.0.ln_2.bias", "h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias", "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"]
    assert infer_spec_from_tensors(gpt2).name == "gpt2"
    assert infer_spec_from_tensors(["transformer." + n for n in gpt2]).name == "gpt2"
    with pytest.raises(UnsupportedError, match="best partial match: gpt2"):
        infer_spec_from_tensors(gpt2[:-3])
