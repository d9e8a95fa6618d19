"""Every tensor of a checkpoint accounted for by its family, required tensors present and well typed, every weight
finite and of a magnitude the scan can carry, and every config field of the expected type and range: each refused
through the CLI with exit 2 and one ``Error:`` line, before any work."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.helpers import assert_input_error, invoke
from tiny_models import save_tiny_model

SCAN = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0",
        "--quiet")
FAMILIES = ("gpt2", "llama", "neox", "bert", "mistral", "gptj", "phi", "gemma2", "gemma3", "phi3", "modernbert",
            "olmo2", "mixtral", "qwen2_moe", "deepseek_v3_moe")


def _save_transformers(directory: Path, config_cls: str, model_cls: str, **kwargs: object) -> Path:
    import transformers

    torch.manual_seed(0)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILIES:
        save_tiny_model(fam, root / fam)
        out[fam] = root / fam
    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=97,
                 max_position_embeddings=66)
    out["qwen3"] = _save_transformers(root / "qwen3", "Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2,
                                      head_dim=16, **small)
    out["mpnet"] = _save_transformers(root / "mpnet", "MPNetConfig", "MPNetModel", **small)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(ck: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = load_file(ck / "model.safetensors")
    edit(state)
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


def _edit_config(ck: Path, **changes: object) -> Path:
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(changes)
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


# unread tensors -------------------------------------------------------------------------------------------------------

def test_gemma3_without_its_qk_norms_names_the_missing_tensor(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """A known family with an expected tensor absent exits 2 naming the tensor."""
    ck = _edit_weights(_copy(ckpts["gemma3"], tmp_path), lambda s: s.pop("model.layers.0.self_attn.q_norm.weight"))
    for args in (("info", ck), ("scan", ck, *SCAN)):
        assert_input_error(invoke(*args), "missing tensor", "model.layers.0.self_attn.q_norm.weight")


def test_qwen3_without_its_qk_norms_names_the_missing_tensor(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """A known family with an expected tensor absent exits 2 naming the tensor."""
    ck = _edit_weights(_copy(ckpts["qwen3"], tmp_path), lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"))
    assert_input_error(invoke("scan", ck, *SCAN), "missing tensor", "model.layers.1.self_attn.k_norm.weight")


def test_forced_llama_on_qwen3_names_the_unread_qk_norms(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = invoke("scan", ckpts["qwen3"], "--arch", "llama", "--out", out, *SCAN)
    assert_input_error(result, "model.safetensors", "4 tensors not read by family 'llama'",
                       "model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight")
    assert not out.exists()


def test_phi_qk_layernorm_tensors_without_the_switch_are_refused(tmp_path: Path) -> None:
    """Phi's q/k LayerNorm is read only when the config switches it on: with ``qk_layernorm: false`` its tensors
    are unread and the checkpoint is refused, never scanned without them."""
    ck = _save_transformers(tmp_path / "phi_qk", "PhiConfig", "PhiForCausalLM", num_hidden_layers=2, hidden_size=64,
                            num_attention_heads=4, intermediate_size=96, vocab_size=97, max_position_embeddings=64,
                            qk_layernorm=True)
    assert invoke("info", ck).exit_code == 0
    _edit_config(ck, qk_layernorm=False)
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", "not read by family 'phi'",
                       "model.layers.0.self_attn.q_layernorm.weight")


def test_a_layer0_attention_norm_in_modernbert_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """ModernBERT's layer 0 has no attention norm: a stored one is a layout the family does not describe."""
    ck = _edit_weights(_copy(ckpts["modernbert"], tmp_path),
                       lambda s: s.update({"model.layers.0.attn_norm.weight": torch.ones(64)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", "1 tensor not read by family 'modernbert'",
                       "model.layers.0.attn_norm.weight")


def test_a_pre_norm_in_olmo2_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """OLMo 2 has no norm before its branches: a stored input_layernorm is a layout the family does not describe."""
    ck = _edit_weights(_copy(ckpts["olmo2"], tmp_path),
                       lambda s: s.update({"model.layers.1.input_layernorm.weight": torch.ones(64)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", "1 tensor not read by family 'olmo2'",
                       "model.layers.1.input_layernorm.weight")


def test_a_per_head_qk_norm_in_olmo2_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """OLMo 2's q norm spans all H*D = 64 query coordinates; a per-head [D] weight is the wrong layout."""
    ck = _edit_weights(_copy(ckpts["olmo2"], tmp_path),
                       lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.layers.0.self_attn.q_norm.weight", "[16]", "64")


def test_modernbert_with_mlp_biases_is_refused_naming_the_key(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_config(_copy(ckpts["modernbert"], tmp_path), mlp_bias=True)
    assert_input_error(invoke("info", ck), "config.json", "'mlp_bias' is true", "not supported for family 'modernbert'")


def test_unsupported_model_type_hint_says_the_tensors_are_checked(ckpts: dict[str, Path]) -> None:
    result = invoke("info", ckpts["mpnet"])
    assert_input_error(result, "config.json", "unsupported model_type 'mpnet'", "qwen3")
    assert "--arch" in result.stderr and "every tensor is then checked" in result.stderr
    assert "Adding a family" in result.stderr


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "bert", "gptj", "gemma2", "olmo2"])
def test_an_extra_unknown_tensor_is_refused(family: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_weights(_copy(ckpts[family], tmp_path), lambda s: s.update({"adapter.lora_A.weight": torch.ones(4, 64)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", "1 tensor not read", "adapter.lora_A.weight")


def test_at_most_five_unread_tensors_are_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    extra = {f"extra.{i}.weight": torch.ones(2) for i in range(7)}
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), lambda s: s.update(extra))
    result = invoke("info", ck)
    assert_input_error(result, "7 tensors not read", "extra.0.weight", "extra.4.weight", "(and 2 more)")
    assert "extra.5.weight" not in result.stderr


def test_a_layer_tensor_beyond_the_layer_count_is_unread(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Buffers are declared per layer: a causal mask of a third layer in a two-layer model is not one of them."""
    mask = torch.tril(torch.ones(1, 1, 64, 64))
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), lambda s: s.update({"transformer.h.2.attn.bias": mask}))
    assert_input_error(invoke("info", ck), "not read", "transformer.h.2.attn.bias")


def test_declared_buffers_and_unused_heads_are_accepted(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2's causal-mask buffers (masked_bias may be -inf when saved in float16: it is not a weight) and a
    classification head the scan does not use."""
    mask = torch.tril(torch.ones(1, 1, 64, 64))

    def add(s: dict[str, torch.Tensor]) -> None:
        for layer in range(2):
            s[f"transformer.h.{layer}.attn.bias"] = mask.clone()
            s[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-float("inf"))
        s["score.weight"] = torch.ones(2, 64)

    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), add)
    result = invoke("scan", ck, *SCAN, "--json")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("model_cls", ["LlamaForSequenceClassification", "LlamaForTokenClassification",
                                       "LlamaForQuestionAnswering"])
def test_task_heads_the_scan_does_not_use_are_accepted(model_cls: str, tmp_path: Path) -> None:
    """A LLaMA checkpoint saved with a task head instead of the LM head (score, classifier, qa_outputs) scans: the
    head is declared ignorable, and the body is still read in full."""
    ck = _save_transformers(tmp_path / "task", "LlamaConfig", model_cls, num_hidden_layers=2, hidden_size=64,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=97,
                            max_position_embeddings=64, num_labels=3, pad_token_id=0)
    result = invoke("scan", ck, *SCAN, "--json")
    assert result.exit_code == 0, result.stderr


def test_forced_bert_on_mpnet_says_no_tensor_matches(ckpts: dict[str, Path]) -> None:
    result = invoke("info", ckpts["mpnet"], "--arch", "bert")
    assert_input_error(result, "model.safetensors", "no tensor matches the layer names of family 'bert'",
                       "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.")
    assert "weights hold 0" not in result.stderr


# required tensors: present, floating, expected shape -----------------------------------------------------------------

@pytest.mark.parametrize("family, removed, needle", [
    ("gpt2", ("transformer.wpe.weight",), "transformer.wpe.weight"),
    ("gpt2", ("transformer.ln_f.weight", "transformer.ln_f.bias"), "transformer.ln_f.weight"),
    ("llama", ("model.norm.weight",), "model.norm.weight"),
    ("gptj", ("transformer.h.1.ln_1.bias",), "transformer.h.1.ln_1.bias"),       # the one norm both branches read
    ("bert", ("bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"), "embeddings.LayerNorm.weight"),
    ("gemma2", ("model.layers.2.post_feedforward_layernorm.weight",), "layers.2.post_feedforward_layernorm.weight"),
    ("phi3", ("model.layers.1.mlp.gate_up_proj.weight",), "model.layers.1.mlp.gate_up_proj.weight"),
    ("olmo2", ("model.layers.2.self_attn.k_norm.weight",), "model.layers.2.self_attn.k_norm.weight"),
    ("olmo2", ("model.layers.0.post_attention_layernorm.weight",), "layers.0.post_attention_layernorm.weight"),
    ("mixtral", ("model.layers.1.block_sparse_moe.experts.5.w3.weight",), "of expert 5 in layer 1"),
    ("qwen2_moe", ("model.layers.2.mlp.shared_expert_gate.weight",), "layers.2.mlp.shared_expert_gate.weight"),
    ("qwen2_moe", ("model.layers.1.mlp.down_proj.weight",), "model.layers.1.mlp.down_proj.weight"),   # dense layer
    # the selection-only bias changes every choice it shifts: required, never read as zero
    ("deepseek_v3_moe", ("model.layers.2.mlp.gate.e_score_correction_bias",),
     "layers.2.mlp.gate.e_score_correction_bias"),
    ("deepseek_v3_moe", ("model.layers.1.mlp.shared_experts.up_proj.weight",),
     "layers.1.mlp.shared_experts.up_proj.weight"),
])
def test_a_missing_required_tensor_is_refused_before_any_work(family: str, removed: tuple[str, ...], needle: str,
                                                              ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_weights(_copy(ckpts[family], tmp_path), lambda s: [s.pop(n) for n in removed])
    for args in (("scan", ck, *SCAN), ("scan", ck, "--weights-only", "--quiet")):
        assert_input_error(invoke(*args), "model.safetensors", "missing tensor", needle)


@pytest.mark.parametrize("name, shape, needle", [
    ("model.layers.0.mlp.gate_up_proj.weight", (96, 64), "[192, 64]"),       # [gate; up]: twice intermediate_size
    ("model.layers.0.self_attn.qkv_proj.weight", (192, 64), "[128, 64]"),    # Q (4 x 16) + K, V (2 x 16 each)
])
def test_a_fused_phi3_tensor_of_the_wrong_shape_is_refused(name: str, shape: tuple[int, int], needle: str,
                                                           ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_weights(_copy(ckpts["phi3"], tmp_path), lambda s: s.update({name: torch.ones(shape)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", name, needle)


def test_an_integer_weight_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    name = "transformer.h.0.attn.c_attn.weight"
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), lambda s: s.update({name: s[name].to(torch.int32)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", name, "dtype I32", "floating-point")


def test_a_head_tensor_of_the_wrong_shape_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The LM head is read only by --grad, but its shape is checked at open like every tensor the spec binds."""
    ck = _edit_weights(_copy(ckpts["llama"], tmp_path), lambda s: s.update({"lm_head.weight": torch.ones(97, 32)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", "lm_head.weight", "[97, 32]", "[>=97, 64]")


# weight values --------------------------------------------------------------------------------------------------------

def _set(name: str, index: tuple[int, ...], value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(s: dict[str, torch.Tensor]) -> None:
        s[name][index] = value
    return edit


@pytest.mark.parametrize("family, name, args", [
    ("llama", "lm_head.weight", SCAN),                                          # never read by a plain scan
    ("gpt2", "transformer.ln_f.weight", ("--weights-only", "--quiet")),        # not read under --weights-only
])
def test_nan_in_a_tensor_the_scan_does_not_read_is_reported(family: str, name: str, args: tuple[str, ...],
                                                            ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_weights(_copy(ckpts[family], tmp_path), _set(name, (0,), float("nan")))
    assert_input_error(invoke("scan", ck, *args), "model.safetensors", name, "NaN/Inf")


def test_nan_in_an_ignorable_weight_is_reported(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path),
                       lambda s: s.update({"score.weight": torch.tensor([[float("inf")] * 64] * 2)}))
    assert_input_error(invoke("scan", ck, *SCAN), "score.weight", "128 NaN/Inf")


def test_gate_on_a_broken_checkpoint_exits_2(ckpts: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ck = _edit_weights(_copy(ckpts["llama"], tmp_path), _set("lm_head.weight", (3, 3), float("inf")))
    assert_input_error(invoke("gate", ck, "--rule", "model.n_layers == 2", *SCAN), "lm_head.weight", "1 NaN/Inf")


def test_broken_weights_stop_before_the_scan_and_its_grad_pass(ckpts: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import attnstab_cli.scan as scan_module

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan started on broken weights")

    monkeypatch.setattr(scan_module, "run_scan", must_not_run)
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), _set("transformer.h.1.mlp.c_proj.weight", (5, 5), float("nan")))
    assert_input_error(invoke("scan", ck, *SCAN, "--grad"), "transformer.h.1.mlp.c_proj.weight", "1 NaN/Inf")


def test_a_huge_finite_weight_is_refused_naming_tensor_and_value(ckpts: dict[str, Path], tmp_path: Path) -> None:
    name = "transformer.h.0.mlp.c_fc.weight"
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), _set(name, (0,), 1e30))
    result = invoke("scan", ck, *SCAN)
    assert_input_error(result, "model.safetensors", name, "1e+30")
    assert "corrupted or mis-scaled" in result.stderr


def test_a_weight_beyond_float16_under_dtype_float16_says_use_float32(ckpts: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    name = "transformer.h.1.attn.c_attn.weight"
    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), _set(name, (0, 0), 1e5))
    result = invoke("scan", ck, *SCAN, "--dtype", "float16")
    assert_input_error(result, name, "1e+05", "beyond the range of float16")
    assert "--dtype float32" in result.stderr and "numerically broken" not in result.stderr
    assert invoke("scan", ck, *SCAN, "--json").exit_code == 0                   # float32 carries it


def test_a_float16_value_at_the_limit_is_a_warning(ckpts: dict[str, Path], tmp_path: Path) -> None:
    name = "transformer.h.0.mlp.c_fc.weight"

    def to_half(s: dict[str, torch.Tensor]) -> None:
        for key in s:
            s[key] = s[key].half()
        s[name][0, 0] = 65504.0

    ck = _edit_weights(_copy(ckpts["gpt2"], tmp_path), to_half)
    result = invoke("scan", ck, *SCAN, "--json")
    assert result.exit_code == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and name in warnings[0] and "65504" in warnings[0], result.stderr
    json.loads(result.stdout)


# config fields --------------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    ("gpt2", "n_head", "4", "expected an integer from 1 to 2^53"),
    ("gpt2", "n_head", 0, "expected an integer from 1 to 2^53"),
    ("gpt2", "n_head", 3, "expected a divisor of n_embd 64"),
    ("gpt2", "n_layer", 10**12, "says 1000000000000 layers but the weights hold 2"),
    ("gpt2", "n_embd", 10**400, "expected an integer from 1 to 2^53"),
    ("gpt2", "layer_norm_epsilon", -1e-5, "expected a finite number > 0"),
    ("gpt2", "layer_norm_epsilon", 0, "expected a finite number > 0"),
    ("gpt2", "vocab_size", 1000, "expected at most 97, the rows of tensor 'transformer.wte.weight'"),
    ("gpt2", "n_positions", 128, "expected at most 64, the rows of tensor 'transformer.wpe.weight'"),
    ("gpt2", "scale_attn_weights", "yes", "expected true or false"),
    ("llama", "num_key_value_heads", 3, "expected a divisor of num_attention_heads 4"),
    ("llama", "num_attention_heads", -4, "expected an integer from 1 to 2^53"),
    ("llama", "rms_norm_eps", float("nan"), "expected a finite number > 0"),
    ("llama", "rms_norm_eps", float("inf"), "expected a finite number > 0"),
    ("llama", "rope_parameters", {"rope_type": "linear", "rope_theta": 500.0}, "lacks 'factor'"),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": "2", "rope_theta": 500.0},
     "'rope_parameters.factor' is \"2\""),
    ("llama", "rope_parameters", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                  "high_freq_factor": 1.0, "original_max_position_embeddings": 16,
                                  "rope_theta": 500.0}, "expected a number > low_freq_factor"),
    ("llama", "rope_parameters", {"rope_theta": 1e-300}, "expected a finite number >= 1"),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 1e-300, "rope_theta": 500.0},
     "expected a finite number >= 1"),
    ("llama", "head_dim", "16", "expected an integer from 1 to 2^53"),
    ("mistral", "sliding_window", -7, "expected an integer from 0 to 2^53"),
    ("mistral", "layer_types", ["sliding_attention"], "has 1 entries; expected one per layer (2)"),
    ("neox", "rotary_pct", 1.5, "expected a finite number > 0 and <= 1"),
    ("gptj", "rotary_dim", 7, "is not an even number in 2..16"),
    ("gptj", "rotary_dim", 32, "is not an even number in 2..16"),
    ("gptj", "rotary_dim", "8", "expected an integer from 1 to 2^53"),
    ("phi", "qk_layernorm", "yes", "expected true or false"),
    ("phi3", "rope_parameters", {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0] * 6},
     "lacks 'long_factor'"),
    ("phi3", "rope_parameters", {"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.75,
                                 "short_factor": [1.0] * 6, "long_factor": [1.0, "2"]}, "non-empty list of numbers"),
    ("phi3", "rope_parameters", {"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.75,
                                 "short_factor": [1.0] * 6, "long_factor": [1.0] * 5}, "expected rotary_dim / 2 = 6"),
    ("phi3", "rope_parameters", {"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.75,
                                 "short_factor": [1.0] * 6, "long_factor": [1.0] * 6, "attention_factor": 0},
     "expected a finite number > 0"),
    ("neox", "use_parallel_residual", "false", "expected true or false"),
    ("neox", "intermediate_size", "128", "expected an integer from 1 to 2^53"),
    ("bert", "type_vocab_size", 5, "expected at most 2"),
    ("bert", "layer_norm_eps", -1.0, "expected a finite number > 0"),
    ("bert", "hidden_size", 65, "expected 64, the width of tensor 'bert.embeddings.word_embeddings.weight'"),
]


@pytest.mark.parametrize("family, key, value, needle", CONFIG_CASES,
                         ids=[f"{c[0]}-{c[1]}-{json.dumps(c[2])[:20]}" for c in CONFIG_CASES])
def test_config_field_of_wrong_type_or_range(family: str, key: str, value: object, needle: str,
                                             ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = _edit_config(_copy(ckpts[family], tmp_path), **{key: value})
    for args in (("info", ck), ("scan", ck, *SCAN)):
        assert_input_error(invoke(*args), "config.json", f"'{key}", needle)


def test_an_option_of_the_wrong_range_is_a_usage_error(ckpts: dict[str, Path]) -> None:
    result = invoke("info", ckpts["gpt2"] / "model.safetensors", "--n-heads", "4", "--norm-eps", "nan")
    assert_input_error(result, "option --norm-eps is NaN", "expected a finite number > 0")


def test_a_forward_pass_that_overflows_the_compute_dtype_is_refused(tmp_path: Path) -> None:
    """Finite float32 weights within float16's range whose activations are not (embeddings of 60000 plus positions
    of 60000): under --dtype float16 one line names the checkpoint and the dtype and says to use float32, exit 2;
    the same checkpoint scans under float32."""
    ck = tmp_path / "loud"
    shutil.copytree(Path(__file__).resolve().parents[2] / "sample_checkpoints" / "gpt2-tiny", ck)

    def loud(s: dict[str, torch.Tensor]) -> None:
        s["transformer.wte.weight"] = torch.full_like(s["transformer.wte.weight"], 60000.0)
        s["transformer.wpe.weight"] = torch.full_like(s["transformer.wpe.weight"], 60000.0)

    _edit_weights(ck, loud)
    assert_input_error(invoke("scan", ck, *SCAN, "--dtype", "float16"), str(ck), "overflowed float16",
                       "every weight is finite")
    assert invoke("scan", ck, *SCAN, "--json").exit_code == 0



@pytest.mark.parametrize("family, added", [
    ("mixtral", {"model.layers.0.block_sparse_moe.experts.6.w1.weight": (32, 64)}),   # a 7th expert of 6
    ("qwen2_moe", {"model.layers.1.mlp.gate.weight": (6, 64)}),                       # a router in the dense layer
    ("qwen2_moe", {"model.layers.0.mlp.gate_proj.weight": (96, 64)}),                 # a dense FFN in a MoE layer
    ("deepseek_v3_moe", {"model.layers.0.mlp.gate.weight": (8, 64)}),                 # a router before
    ("deepseek_v3_moe", {"model.layers.2.mlp.up_proj.weight": (96, 64)}),             # first_k_dense_replace; a
])                                                                                    # dense FFN after it
def test_tensors_outside_the_layer_kind_are_refused(family: str, added: dict, ckpts: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """MoE layers read the router and the configured number of experts, dense layers (mlp_only_layers) the plain FFN:
    anything else is unread and refused (THEORY §18.7)."""
    ck = _edit_weights(_copy(ckpts[family], tmp_path), lambda s: s.update({k: torch.ones(v) for k, v in added.items()}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", "not read by family", next(iter(added)))


def test_a_router_of_the_wrong_width_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.0.block_sparse_moe.gate.weight"
    ck = _edit_weights(_copy(ckpts["mixtral"], tmp_path), lambda s: s.update({name: torch.ones(5, 64)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", name, "[6, 64]")


def test_a_shared_expert_of_the_wrong_width_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """DeepSeek's shared experts run as one FFN n_shared_experts x moe_intermediate_size wide (16 here)."""
    name = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    ck = _edit_weights(_copy(ckpts["deepseek_v3_moe"], tmp_path), lambda s: s.update({name: torch.ones(32, 64)}))
    assert_input_error(invoke("scan", ck, *SCAN), "model.safetensors", name, "[16, 64]")
