"""DeepSeek checkpoints through the CLI (THEORY §18.8, §18.7): ``info`` names the latent-attention and routing facts,
a checkpoint with mixture-of-experts layers scans, the MoE settings transformers and DeepSeek's own code read
differently are refused in one line, and a trailing multi-token-prediction layer is skipped and said so (info,
manifest, summary)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cli.helpers import assert_input_error, copy_checkpoint, invoke

MTP_PART = "multi-token-prediction layers (num_nextn_predict_layers)"


@pytest.mark.parametrize("family,style", [("deepseek_v2", "interleaved_complex"),
                                          ("deepseek_v3", "interleaved_split"), ("deepseek_v3_yarn", "half_split")])
def test_info_names_the_latent_attention(family: str, style: str, tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints[family]
    result = invoke("info", path, "--json")
    assert result.exit_code == 0, result.stderr
    data, cfg = json.loads(result.stdout), ref.config
    assert data["attention"] == "mla" and data["qk_norm"] is None
    m = data["mla"]
    assert (m["q_lora_rank"], m["kv_lora_rank"], m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]) == \
        (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    assert data["head_dim"] == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim and data["v_head_dim"] == cfg.v_head_dim
    assert data["rope"]["style"] == style and data["rope"]["rotary_dim"] == cfg.qk_rope_head_dim
    assert data["rope"]["rotary_coordinates"] == "last"
    rotary = ref.model.rotary_emb.attention_scaling                     # the reference's factor on cos and sin
    assert data["rope"].get("attention_factor", 1.0) == pytest.approx(rotary, rel=1e-15)
    # the scan's scale carries max(m, 1)^2 of the cos/sin factor m (its rotary part is then a contraction)
    scaling = ref.model.layers[0].self_attn.scaling
    assert data["attn_scale"] == pytest.approx(scaling * max(rotary, 1.0) ** 2, rel=1e-14)
    text = invoke("info", path).stdout
    assert "latent attention" in text and "shared by all heads" in text


@pytest.mark.parametrize("family", ["deepseek_v2_moe", "deepseek_v3_moe"])
def test_moe_layers_are_read_and_scanned(family: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    """info names DeepSeek's routing as the reference configures it; a scan writes the experts table with one row
    per (MoE layer, expert) and the routing columns on the MoE layers only."""
    import pyarrow.parquet as pq

    path, ref = tiny_checkpoints[family]
    cfg = ref.config
    data = json.loads(invoke("info", path, "--json").stdout)
    moe = data["moe"]
    assert (moe["n_experts"], moe["experts_per_token"], moe["d_ff_expert"]) == \
        (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size)
    assert moe["dense_layers"] == list(range(cfg.first_k_dense_replace))
    assert moe["d_ff_shared"] == cfg.n_shared_experts * cfg.moe_intermediate_size
    assert moe["scaling"] == cfg.routed_scaling_factor and moe["shared_gate"] == "constant"
    assert moe["groups"] == {"n_group": cfg.n_group, "topk_group": cfg.topk_group,
                             "rank_terms": 2 if family == "deepseek_v3_moe" else 1}
    assert (moe["score"], moe["renormalize"]) == (("sigmoid", True) if family == "deepseek_v3_moe" else
                                                  ("softmax", False))
    out = tmp_path / "r"
    result = invoke("scan", path, "--calib", "random", "--seq-len", "16", "--batches", "1", "--out", out,
                    "--empirical-seqs", "0", "--quiet")
    assert result.exit_code == 0, result.stderr
    experts = pq.read_table(out / "experts.parquet").to_pylist()
    layers = range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    assert [(r["layer"], r["expert"]) for r in experts] == [(i, e) for i in layers for e in range(cfg.n_routed_experts)]
    rows = pq.read_table(out / "layers.parquet").to_pylist()
    assert [r["moe_piecewise"] is True for r in rows] == [i in layers for i in range(cfg.num_hidden_layers)]


@pytest.mark.parametrize("family,key,value,needles", [
    ("deepseek_v3_moe", "moe_layer_freq", 2, ("'moe_layer_freq' is 2", "transformers ignores the key")),
    ("deepseek_v2_moe", "norm_topk_prob", True, ("'norm_topk_prob' is true", "renormalized")),
    ("deepseek_v2_moe", "topk_method", "noaux_tc", ("'topk_method' is 'noaux_tc'", "greedy, group_limited_greedy")),
    ("deepseek_v2_moe", "num_experts_per_tok", 5, ("'num_experts_per_tok' is 5", "hold only 4 experts")),
    ("deepseek_v2_moe", "mlp_bias", True, ("'mlp_bias' is true", "biases")),
])
def test_moe_settings_read_differently_are_refused(family: str, key: str, value: object, needles: tuple[str, ...],
                                                   tiny_checkpoints: dict, tmp_path: Path) -> None:
    """moe_layer_freq other than 1 (DeepSeek's code: MoE every few layers; transformers: every layer) and V2's
    norm_topk_prob (DeepSeek's code renormalizes; transformers' V2 router does not) are refused rather than read one
    way; so are an unknown topk_method, more experts per token than the searched groups hold, and FFN biases."""
    ck = copy_checkpoint(tiny_checkpoints[family][0], tmp_path)
    config = json.loads((ck / "config.json").read_text())
    config[key] = value
    (ck / "config.json").write_text(json.dumps(config))
    for command in (("info",), ("scan", "--calib", "random", "--seq-len", "8", "--batches", "1", "--quiet")):
        assert_input_error(invoke(command[0], ck, *command[1:]), *needles)


def _with_mtp_layer(src: Path, tmp_path: Path, n_predict: int | None) -> tuple[Path, int]:
    """A copy with a DeepSeek-V3-style MTP layer at index n_layers (a decoder layer plus its own norms and
    projection); the config's num_nextn_predict_layers set to ``n_predict`` (removed when None)."""
    ck = copy_checkpoint(src, tmp_path)
    state = load_file(ck / "model.safetensors")
    config = json.loads((ck / "config.json").read_text())
    n = config["num_hidden_layers"]
    extra = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v.clone() for k, v in state.items()
             if k.startswith(f"model.layers.{n - 1}.")}
    d = config["hidden_size"]
    extra[f"model.layers.{n}.enorm.weight"] = state["model.norm.weight"].clone()
    extra[f"model.layers.{n}.eh_proj.weight"] = state[f"model.layers.{n - 1}.mlp.up_proj.weight"][:d].repeat(1, 2)
    save_file({**state, **extra}, ck / "model.safetensors", metadata={"format": "pt"})
    config.pop("num_nextn_predict_layers", None)
    if n_predict is not None:
        config["num_nextn_predict_layers"] = n_predict
    (ck / "config.json").write_text(json.dumps(config))
    return ck, len(extra)


def test_trailing_mtp_layer_is_skipped_and_said_so(tiny_checkpoints: dict, tmp_path: Path) -> None:
    src, ref = tiny_checkpoints["deepseek_v3"]
    ck, n_extra = _with_mtp_layer(src, tmp_path / "a", 1)
    data = json.loads(invoke("info", ck, "--json").stdout)
    assert data["n_layers"] == ref.config.num_hidden_layers
    assert data["ignored_parts"] == {MTP_PART: n_extra}
    assert "not analysed" in invoke("info", ck).stdout
    out = tmp_path / "r"
    result = invoke("scan", ck, "--calib", "random", "--seq-len", "16", "--batches", "1", "--out", out,
                    "--empirical-seqs", "0")
    assert result.exit_code == 0, result.stderr
    assert f"{MTP_PART} not analysed" in " ".join(result.stdout.split())      # rich wraps the line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["ignored_parts"] == {MTP_PART: n_extra}
    unannounced, _ = _with_mtp_layer(src, tmp_path / "b", None)       # no num_nextn_predict_layers: not skipped
    assert_input_error(invoke("info", unannounced), "says 2 layers but the weights hold 3")
