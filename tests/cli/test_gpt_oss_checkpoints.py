"""gpt-oss checkpoints through the CLI: ``info`` names the sinks, the windows, YaRN and the clamped SwiGLU experts;
a bf16 checkpoint scans; an MXFP4 release (hub format: ``*_blocks`` / ``*_scales`` experts and an ``mxfp4``
quantization_config) exits 2 naming the format, before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.helpers import assert_input_error, copy_checkpoint, invoke


def test_info_names_the_gpt_oss_layout(tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints["gpt_oss"]
    result = invoke("info", path, "--json")
    assert result.exit_code == 0, result.stderr
    data, cfg = json.loads(result.stdout), ref.config
    assert data["family"] == "gpt_oss" and data["attn_sinks"] is True
    assert data["layer_types"] == cfg.layer_types and data["sliding_window"] == cfg.sliding_window
    assert data["rope"]["scaling"]["rope_type"] == "yarn"
    assert data["rope"]["attention_factor"] == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-15)
    moe = data["moe"]
    assert (moe["n_experts"], moe["experts_per_token"], moe["renormalize"]) == (cfg.num_local_experts,
                                                                              cfg.num_experts_per_tok, True)
    assert (moe["expert_unit"], moe["swiglu_alpha"], moe["swiglu_limit"]) == ("clamped_swiglu", cfg.swiglu_alpha,
                                                                            cfg.swiglu_limit)


def test_a_bf16_checkpoint_scans(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """transformers' bf16 save (the form of the dequantized community releases): every table written, the source
    dtype recorded, sink mass and routing columns reported."""
    _, ref = tiny_checkpoints["gpt_oss"]
    bf16 = tmp_path / "bf16"
    import copy

    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(bf16)
    result = invoke("scan", bf16, "--calib", "random", "--seq-len", "16", "--batches", "1", "--out", tmp_path / "rep",
                    "--quiet", "--empirical-seqs", "0")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "rep" / "manifest.json").read_text())
    assert manifest["checkpoint"]["family"] == "gpt_oss"
    assert set(manifest["checkpoint"]["dtypes"]) == {"BF16"}
    layers = pq.read_table(tmp_path / "rep" / "layers.parquet").to_pylist()
    assert all(r["moe_piecewise"] and r["router_margin_min"] is not None for r in layers)
    heads = pq.read_table(tmp_path / "rep" / "heads.parquet").to_pylist()
    assert all(r["sink_mass_mean"] is not None for r in heads if r["n_rows"] > 0)
    assert (tmp_path / "rep" / "experts.parquet").exists()


def test_an_mxfp4_release_is_refused_naming_the_format(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """The hub layout of gpt-oss: experts as uint8 E2M1 blocks and E8M0 scales, attention in bf16."""
    path, _ = tiny_checkpoints["gpt_oss"]
    ck = copy_checkpoint(path, tmp_path)
    state = load_file(ck / "model.safetensors")
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, rows = state[name].shape[0], state[name].shape[-1]
        del state[name]
        state[name + "_blocks"] = torch.zeros(e, rows, 2, 16, dtype=torch.uint8)
        state[name + "_scales"] = torch.full((e, rows, 2), 127, dtype=torch.uint8)
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ck / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (ck / "config.json").write_text(json.dumps(config))
    for command in ("info", "scan"):
        assert_input_error(invoke(command, ck, *(("--quiet",) if command == "scan" else ())), "MXFP4")
