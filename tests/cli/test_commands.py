"""CLI behaviour: help, ``info --json``, ``scan`` end to end on every tiny family, report files and atomicity."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from cli.helpers import invoke
from tiny_models import FAMILIES, MOE_FAMILIES


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "scan" in result.stdout and "info" in result.stdout
    scan_help = invoke("scan", "--help")
    assert scan_help.exit_code == 0
    for option in ("--calib", "--tokens", "--seq-len", "--batch-size", "--batches", "--seed", "--device",
                   "--dtype", "--out", "--quiet", "--json"):
        assert option in scan_help.stdout


def test_no_args_shows_help() -> None:
    result = invoke()
    assert "Usage" in result.stdout + result.stderr


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "bert", "distilbert", "roberta", "xlm_roberta",
                                    "gptj", "phi", "qwen3", "gemma2", "gemma3", "phi3", "phi3_longrope",
                                    "modernbert", "olmo2"])
def test_info_json_matches_config(family: str, tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints[family]
    result = invoke("info", path, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    cfg = ref.config
    assert data["n_layers"] == cfg.num_hidden_layers
    assert data["d_model"] == cfg.hidden_size
    assert data["n_heads"] == cfg.num_attention_heads
    assert data["n_kv_heads"] == getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert data["vocab_size"] == cfg.vocab_size
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:   # independent header reader
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert data["n_params"] == stored
    assert data["tied_embeddings"] == bool(cfg.tie_word_embeddings)
    expected = {"gpt2": "pre-norm", "llama": "pre-norm", "neox": "parallel residual (pre-norm)", "bert": "post-norm",
                "gptj": "parallel residual (one shared pre-norm)", "phi": "parallel residual (one shared pre-norm)",
                "qwen3": "pre-norm", "gemma2": "sandwich (pre-norm and a norm on each branch output)",
                "gemma3": "sandwich (pre-norm and a norm on each branch output)",
                "phi3": "pre-norm", "phi3_longrope": "pre-norm", "modernbert": "pre-norm",
                "olmo2": "output norms (a norm on each branch output, none before the branches)"}
    expected.update(dict.fromkeys(("distilbert", "roberta", "xlm_roberta"), "post-norm"))
    assert data["placement"] == expected[family]
    assert (data["window_rule"] is None) == (not any(data["sliding_windows"]))
    assert data["norm"] == ("rmsnorm" if family in ("llama", "qwen3", "gemma2", "gemma3", "phi3", "phi3_longrope",
                                                    "olmo2") else "layernorm")
    assert data["qk_norm"] == {"qwen3": "per_head", "gemma3": "per_head", "olmo2": "full_width"}.get(family)
    assert data["attn_sinks"] is False                       # no shipped family has sinks yet (gpt-oss needs the MoE)
    assert data["attn_input_normalized"] == (family != "olmo2")
    if family == "olmo2":                                      # the layout facts OLMo 2 adds (THEORY §18.2, §18.3)
        assert data["residual"] == "output_norm" and data["norm_attn_identity_layers"] == []
        text = invoke("info", path).stdout
        assert "full width, before RoPE" in text and "raw residual stream" in text
    assert data["head_dim"] == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert data["norm_weight"] == ("one_plus" if family in ("gemma2", "gemma3") else "gamma")
    if family == "gemma3":                       # local layers rotate with their own base (THEORY §18.6)
        assert data["rope"]["theta"] == cfg.rope_parameters["full_attention"]["rope_theta"]
        assert data["rope_by_layer_type"]["sliding_attention"]["theta"] == \
            cfg.rope_parameters["sliding_attention"]["rope_theta"]
        assert data["attn_logit_cap"] is None and data["sliding_layers"] == [0, 2]
    if family == "gemma2":                                     # the layout facts Gemma 2 adds (THEORY §18.5, §18.6)
        assert data["residual"] == "sandwich" and data["embed_scale"] == "sqrt_d"
        assert data["attn_scale"] == pytest.approx(cfg.query_pre_attn_scalar ** -0.5)
        assert (data["attn_logit_cap"], data["final_logit_cap"]) == (cfg.attn_logit_softcapping,
                                                                     cfg.final_logit_softcapping)
        assert data["sliding_layers"] == [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
        text = invoke("info", path).stdout
        assert "logit soft-cap 5" in text and "gamma = 1 + stored weight" in text and "layers 0, 2" in text
    assert data["ffn_packing"] == ("gate_up" if family.startswith("phi3") or family == "modernbert" else "separate")
    assert data["qkv_packing"] == {"gpt2": "concat", "neox": "interleaved_per_head", "phi3": "concat",
                                   "phi3_longrope": "concat", "modernbert": "concat"}.get(family, "separate")
    if family == "modernbert":                            # global, local, global; window |i - j| <= 8 // 2
        assert data["layer_types"] == list(cfg.layer_types) and data["sliding_windows"] == [None, 5, None]
        assert data["rope"]["theta"] == cfg.rope_parameters["full_attention"]["rope_theta"]
        assert data["rope_by_layer_type"]["sliding_attention"]["theta"] == \
            cfg.rope_parameters["sliding_attention"]["rope_theta"]
        assert data["norm_attn_identity_layers"] == [0] and "bidirectional" in data["window_rule"]
        text = invoke("info", path)
        assert "full_attention: 2, sliding_attention: 1" in text.stdout and "theta=60" in text.stdout
    longrope = (data["rope"] or {}).get("longrope")
    if family == "phi3_longrope":
        rp = cfg.rope_parameters
        assert longrope["short_factor"] == rp["short_factor"] and longrope["long_factor"] == rp["long_factor"]
        assert longrope["original_max_positions"] == cfg.original_max_position_embeddings
        assert longrope["attention_factor"] == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-15)
    else:
        assert longrope is None
    assert sum(data["files"].values()) == data["total_bytes"] > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scan_runs_end_to_end(family: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    path, ref = tiny_checkpoints[family]
    out = tmp_path / "report"
    result = invoke("scan", path, "--calib", "random", "--seq-len", "24", "--batch-size", "2", "--batches", "2",
                    "--out", out, "--json", "--quiet", "--empirical-seqs", "0")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["layer"] for r in data["layers"]] == list(range(ref.config.num_hidden_layers))
    assert data["manifest"]["calibration"]["n_tokens"] == 4 * 24
    table = pq.read_table(out / "layers.parquet")
    assert table.num_rows == ref.config.num_hidden_layers
    assert all(r["lip_layer_empirical"] is None and r["lip_layer_calibrated"] <= r["lip_layer_weights"]
               for r in table.to_pylist())                     # --empirical-seqs 0: no tier 3, tiers 1/2 always
    assert table.schema.field("r2_in").metadata[b"unit"] == b"l2"
    reasons = json.loads((out / "manifest.json").read_text())["run"]["null_columns"]
    moe = family in MOE_FAMILIES
    assert (out / "experts.parquet").exists() == moe      # mixture-of-experts models only (THEORY §18.7)
    for name in ("layers", "heads", "model", *(("experts",) if moe else ())):   # every value finite, or null with
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()                  # its reason in the manifest
        for column in rows[0]:
            values = [r[column] for r in rows]
            assert all(math.isfinite(v) for v in values if isinstance(v, float)), (family, column)
            if all(v is None for v in values):
                assert reasons.get(column), (family, name, column)
    assert reasons["lip_layer_empirical"].endswith("(--empirical-seqs 0)") and "grad_h_in" in reasons
    assert json.loads((out / "manifest.json").read_text())["checkpoint"]["family"] == data["manifest"]["checkpoint"]["family"]
    heads = pq.read_table(out / "heads.parquet").to_pylist()
    n_heads, n_kv = ref.config.num_attention_heads, getattr(ref.config, "num_key_value_heads", None) or \
        ref.config.num_attention_heads
    assert [(r["layer"], r["head"], r["kv_head"]) for r in heads] == [
        (layer, h, h // (n_heads // n_kv)) for layer in range(ref.config.num_hidden_layers) for h in range(n_heads)]
    assert heads == data["heads"]
    window = getattr(ref.config, "sliding_window", None)
    for r in heads:   # causal rows 0..14 are short; a window of 7 keys (Mistral, Phi-3, Gemma 2's sliding layers)
        assert r["n_rows"] + r["n_rows_short"] == 4 * 24          # makes every row short
        assert 0.0 <= r["theta_tilde_lo"] <= r["theta_tilde_hi"] <= 1.0
        if r["n_rows"] == 0:
            assert window is not None and window < 16 and r["theta_mean"] is None
            continue
        assert 0.0 <= r["theta_mean"] <= r["theta_hi_mean"] <= 1.0
        assert r["theta_p05_lo"] <= r["theta_p05"] <= r["theta_p05_hi"] <= r["theta_p50_lo"] + 1e-3


def test_scan_magnitudes_match_transformers_hidden_states(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """r_resid_* are the token norms of the hidden states ``transformers`` returns (independent computation)."""
    import numpy as np

    path, ref = tiny_checkpoints["gpt2"]
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(9))
    np.save(tmp_path / "ids.npy", ids.numpy())
    result = invoke("scan", path, "--tokens", tmp_path / "ids.npy", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["layers"]
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states
    for row in rows:
        norms = hs[row["layer"]].double().norm(dim=-1)
        assert row["r_resid_max"] == pytest.approx(float(norms.max()), rel=1e-5)
        assert row["r_resid_mean"] == pytest.approx(float(norms.mean()), rel=1e-5)


def test_existing_report_is_not_overwritten_without_force(tiny_checkpoints: dict, tmp_path: Path) -> None:
    path, _ = tiny_checkpoints["gpt2"]
    out = tmp_path / "report"
    args = ("scan", path, "--calib", "random", "--seq-len", "8", "--out", out, "--quiet")
    assert invoke(*args).exit_code == 0
    before = (out / "manifest.json").read_text()
    result = invoke(*args)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (out / "manifest.json").read_text() == before
    assert invoke(*args, "--force", "--seed", "1").exit_code == 0
    assert (out / "manifest.json").read_text() != before


def test_interrupted_scan_leaves_no_report(tiny_checkpoints: dict, tmp_path: Path, monkeypatch) -> None:
    """An exception while the report is being written leaves neither the report nor a staging directory."""
    import attnstab_cli.report.write as write

    path, _ = tiny_checkpoints["gpt2"]
    out = tmp_path / "report"

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_publish", explode)
    result = invoke("scan", path, "--calib", "random", "--seq-len", "8", "--out", out, "--quiet")
    assert result.exit_code == 130 and result.stderr == "Interrupted; nothing was written.\n"
    assert list(tmp_path.iterdir()) == []


def test_unknown_device_and_dtype_are_usage_errors(tiny_checkpoints: dict, monkeypatch) -> None:
    path, _ = tiny_checkpoints["gpt2"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the kernel tests' interpreter would make triton work
    for args in (("--device", "tpu"), ("--dtype", "float8"), ("--kernel", "cuda"), ("--theta-rows", "some"),
                 ("--theta-rows", "-3"), ("--device", "cpu", "--kernel", "triton")):
        result = invoke("scan", path, "--calib", "random", *args, "--quiet")
        assert result.exit_code == 2 and result.stderr.startswith("Error:")


def test_weights_only_scan(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """--weights-only reads no text (the model has no tokenizer) and writes the weight columns only."""
    path, ref = tiny_checkpoints["llama"]
    out = tmp_path / "report"
    result = invoke("scan", path, "--weights-only", "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["manifest"]["calibration"] is None
    heads = pq.read_table(out / "heads.parquet").to_pylist()
    assert len(heads) == ref.config.num_hidden_layers * ref.config.num_attention_heads
    assert all(r["wq_norm"] > 0 and r["theta_mean"] is None for r in heads)
    model = pq.read_table(out / "model.parquet").to_pylist()
    assert model[0]["n_layers"] == ref.config.num_hidden_layers and model[0]["depth_budget"] > 0
    assert "weights only" in invoke("scan", path, "--weights-only").stdout
    assert data["manifest"]["run"]["null_columns"]["theta_mean"] == "no calibration text (--weights-only)"


def test_qk_norm_family_reports_why_qk_norm_is_null(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """Qwen3's q/k norms: ``qk_norm`` is null with its reason, the q/k gains are those of the stored weights."""
    path, ref = tiny_checkpoints["qwen3"]
    result = invoke("scan", path, "--weights-only", "--out", tmp_path / "r", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert "THEORY §18.2" in data["manifest"]["run"]["null_columns"]["qk_norm"]
    assert all(r["qk_norm"] is None and r["wq_norm"] > 0 for r in data["heads"])
    for r in data["layers"]:
        attn = ref.model.layers[r["layer"]].self_attn
        assert r["qnorm_gamma_max"] == pytest.approx(float(attn.q_norm.weight.detach().abs().max()), rel=1e-6)
        assert r["knorm_gamma_max"] == pytest.approx(float(attn.k_norm.weight.detach().abs().max()), rel=1e-6)


def test_grad_scan_writes_gradient_columns(tiny_checkpoints: dict, tmp_path: Path) -> None:
    path, ref = tiny_checkpoints["gpt2"]
    out = tmp_path / "report"
    result = invoke("scan", path, "--calib", "random", "--seq-len", "16", "--batch-size", "2", "--batches", "1",
                    "--grad", "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    layers = pq.read_table(out / "layers.parquet").to_pylist()
    assert all(r["grad_h_in"] > 0 and r["grad_attn_params"] > 0 for r in layers)
    model = pq.read_table(out / "model.parquet").to_pylist()[0]
    assert model["grad_loss_kind"].startswith("next-token") and model["identity_grad_path"] is True
    plain = pq.read_table(invoke_report(path, tmp_path / "plain") / "layers.parquet").to_pylist()
    assert all(r["grad_h_in"] is None for r in plain)          # without --grad the columns are null


def invoke_report(path, out: Path) -> Path:
    assert invoke("scan", path, "--calib", "random", "--seq-len", "16", "--batches", "1", "--out", out,
                  "--quiet").exit_code == 0
    return out
