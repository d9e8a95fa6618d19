"""What makes the open-time checks data-driven: every config field a spec reads has a rule, every role it declares
has an expected shape, and a spec reading an unruled field is refused when it is loaded."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from attnstab_cli.arch.config_fields import CONFIG_FIELDS
from attnstab_cli.arch.registry import builtin_specs
from attnstab_cli.arch.spec import Attention, parse_spec
from attnstab_cli.model.config import MLADims, ModelConfig
from attnstab_cli.model.shapes import expected_shapes


@pytest.mark.parametrize("family", sorted(builtin_specs()))
def test_every_declared_role_has_an_expected_shape(family: str) -> None:
    spec = builtin_specs()[family]
    cfg = ModelConfig(family=family, model_type=None, layout=spec.layout, n_layers=1, d_model=8, n_heads=2,
                      n_kv_heads=2, head_dim=4, d_ff=16, vocab_size=11, max_positions=32, norm_eps=1e-5,
                      activation="gelu", rope=None, sliding_windows=(None,),
                      mla=MLADims(3, 5, 2, 2, 3) if spec.layout.attention is Attention.MLA else None)
    roles = {*spec.tensors, *spec.head_tensors, *spec.layer_tensors}
    assert roles <= set(expected_shapes(cfg)), roles - set(expected_shapes(cfg))
    assert set(spec.config) <= set(CONFIG_FIELDS)


def test_a_spec_reading_a_field_without_a_rule_is_refused() -> None:
    text = resources.files("attnstab_cli.arch").joinpath("specs", "gpt2.json").read_text(encoding="utf-8")
    data = json.loads(text)
    data["config"]["attn_softcap"] = ["attn_logit_softcapping"]
    with pytest.raises(ValueError, match="attn_softcap"):
        parse_spec(data)
    assert parse_spec(json.loads(text)).name == "gpt2"


def _spec_data(name: str) -> dict:
    return json.loads(resources.files("attnstab_cli.arch").joinpath("specs", f"{name}.json").read_text(encoding="utf-8"))


def test_a_shared_norm_spec_declaring_a_second_norm_is_refused() -> None:
    data = _spec_data("gptj")
    data["layer_tensors"]["norm_ffn.weight"] = "h.{layer}.ln_2.weight"
    with pytest.raises(ValueError, match="shares norm_attn"):
        parse_spec(data)


def test_unsupported_if_true_must_name_a_field_the_spec_reads() -> None:
    data = _spec_data("gemma2")
    assert parse_spec(data).unsupported_if_true == {
        "bidirectional_attention": "bidirectional attention (use_bidirectional_attention)"}
    del data["config"]["bidirectional_attention"]
    with pytest.raises(ValueError, match="bidirectional_attention"):
        parse_spec(data)


def test_qk_norm_switch_reads_a_config_field_and_needs_the_norm_tensors() -> None:
    """Phi-2's ``qk_layernorm`` switch: a field the spec reads, and q_norm/k_norm roles to go with it."""
    data = _spec_data("phi")
    assert parse_spec(data).qk_norm_switch.key == "qk_layernorm"
    no_field = _spec_data("phi")
    del no_field["config"]["qk_layernorm"]
    with pytest.raises(ValueError, match="qk_norm_switch reads 'qk_layernorm'"):
        parse_spec(no_field)
    no_roles = _spec_data("phi")
    for role in ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"):
        del no_roles["layer_tensors"][role]
    with pytest.raises(ValueError, match="go together"):
        parse_spec(no_roles)


def test_branch_output_norm_roles_go_with_the_sandwich_wiring() -> None:
    """§18.3: residual 'sandwich' needs both branch-output norms; another wiring may not declare them."""
    data = _spec_data("gemma2")
    spec = parse_spec(data)
    assert spec.layout.residual.output_norms and spec.layout.residual.input_norms
    assert (spec.layout.norm_weight.value, spec.layout.embed_scale.value) == ("one_plus", "sqrt_d")
    del data["layer_tensors"]["norm_ffn_out.weight"]
    with pytest.raises(ValueError, match="norm_ffn_out"):
        parse_spec(data)
    llama = _spec_data("llama")
    llama["layer_tensors"]["norm_attn_out.weight"] = "layers.{layer}.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="no branch-output norms"):
        parse_spec(llama)


def test_the_output_norm_wiring_declares_no_input_norms() -> None:
    """§18.3, OLMo 2: residual 'output_norm' has branch-output norms and no norm before the branches; it needs both
    output norms, refuses a norm_attn / norm_ffn tensor and an identity-layer list (every layer is one already)."""
    data = _spec_data("olmo2")
    spec = parse_spec(data)
    r = spec.layout.residual
    assert r.output_norms and not r.input_norms and r.serial and not r.shared_norm
    assert spec.layout.qk_norm.value == "full_width"
    for role in ("norm_attn.weight", "norm_ffn.weight"):
        bad = _spec_data("olmo2")
        bad["layer_tensors"][role] = "layers.{layer}.input_layernorm.weight"
        with pytest.raises(ValueError, match="no norms before the branches"):
            parse_spec(bad)
    bad = _spec_data("olmo2")
    del bad["layer_tensors"]["norm_attn_out.weight"]
    with pytest.raises(ValueError, match="norm_attn_out"):
        parse_spec(bad)
    bad = _spec_data("olmo2")
    bad["layout"]["norm_attn_identity_layers"] = [0]
    bad["tensors"]["embed_norm.weight"] = "embed_norm.weight"
    with pytest.raises(ValueError, match="norm_attn_identity_layers"):
        parse_spec(bad)


def test_an_unknown_layout_key_or_value_is_refused() -> None:
    data = _spec_data("gemma2")
    data["layout"]["norm_weight"] = "one_minus"
    with pytest.raises(ValueError, match="one_minus"):
        parse_spec(data)
    data = _spec_data("llama")
    data["layout"]["embed_scaling"] = "sqrt_d"
    with pytest.raises(ValueError, match="embed_scaling"):
        parse_spec(data)
    assert parse_spec(_spec_data("llama")).layout.norm_weight.value == "gamma"


def test_attention_sinks_and_the_sinks_tensor_go_together() -> None:
    """``attn_sinks`` (§18.4) needs the per-head ``sinks`` layer tensor, never optional; the tensor alone is refused."""
    data = _spec_data("llama")
    data["layout"]["attn_sinks"] = True
    data["layer_tensors"]["sinks"] = "layers.{layer}.self_attn.sinks"
    spec = parse_spec(data)
    assert spec.layout.attn_sinks and parse_spec(_spec_data("llama")).layout.attn_sinks is False
    bad = dict(data, optional=[*data["optional"], "sinks"])
    with pytest.raises(ValueError, match="cannot be optional"):
        parse_spec(bad)
    data["layout"]["attn_sinks"] = False
    with pytest.raises(ValueError, match="go together"):
        parse_spec(data)
    data = _spec_data("llama")
    data["layout"]["attn_sinks"] = True
    with pytest.raises(ValueError, match="go together"):
        parse_spec(data)


def test_clamped_swiglu_experts_need_their_config_fields_and_fused_biases_their_weights() -> None:
    """``expert_glu: clamped_swiglu`` reads swiglu_alpha / swiglu_limit; fused expert biases need the fused weights."""
    spec = parse_spec(_spec_data("gpt_oss"))
    assert spec.moe is not None and spec.moe.expert_glu.value == "clamped_swiglu"
    assert parse_spec(_spec_data("mixtral")).moe.expert_glu.value == "gated"
    data = _spec_data("gpt_oss")
    del data["config"]["swiglu_limit"]
    with pytest.raises(ValueError, match="swiglu_alpha"):
        parse_spec(data)
    data = _spec_data("mixtral")
    for role in ("experts_gate_up.weight", "experts_out.weight"):
        del data["layer_tensors"][role]
    data["layer_tensors"]["experts_out.bias"] = "layers.{layer}.mlp.experts.down_proj_bias"
    with pytest.raises(ValueError, match="need the fused expert weights"):
        parse_spec(data)
    data = _spec_data("gpt_oss")
    data["moe"]["expert_glu"] = "clamped"
    with pytest.raises(ValueError):
        parse_spec(data)


def test_fused_expert_biases_are_read_with_the_clamped_unit_only() -> None:
    """The gated experts' bounds (§6.2) take no biases, so a spec giving such experts biases is refused."""
    data = _spec_data("gpt_oss")
    data["moe"]["expert_glu"] = "gated"
    with pytest.raises(ValueError, match="clamped_swiglu"):
        parse_spec(data)
