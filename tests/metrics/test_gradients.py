"""Streamed gradient flow (issue 4, item 4) against plain autograd on the whole ``transformers`` model, float64."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from attnstab_cli.metrics.gradients import LOSS_CE, LOSS_MLM, LOSS_PROBE, GradientFlow, make_probe, plan_loss
from attnstab_cli.model.load import open_model
from grad_helpers import assert_mlm_gradients_match

# HF submodules of one layer: attention projections, FFN, norms
GROUPS = {
    "gpt2": (lambda m: m.transformer.h, ("attn",), ("mlp",), ("ln_1", "ln_2")),
    "llama": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "mistral": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "qwen2": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "qwen3": (lambda m: m.model.layers, tuple(f"self_attn.{p}_proj" for p in "qkvo"), ("mlp",),   # q/k norms count
              ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")),  # as norms
    # mixtures of experts: the router, every expert and the shared expert (with its gate) are FFN parameters; the
    # routing is piecewise constant, so autograd through transformers gives the same piecewise derivative
    "mixtral": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "qwen2_moe": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "qwen3_moe": (lambda m: m.model.layers, tuple(f"self_attn.{p}_proj" for p in "qkvo"), ("mlp",),
                  ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")),
    # gpt-oss: the sink logits are attention parameters; the router (with its bias) and the fused experts (with
    # theirs) FFN parameters; autograd through the clamps as through transformers' own
    "gpt_oss": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "neox": (lambda m: m.gpt_neox.layers, ("attention",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "neox_serial": (lambda m: m.gpt_neox.layers, ("attention",), ("mlp",),
                    ("input_layernorm", "post_attention_layernorm")),
    "gptj": (lambda m: m.transformer.h, ("attn",), ("mlp",), ("ln_1",)),
    "phi": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm",)),
    "phi_qk": (lambda m: m.model.layers, tuple(f"self_attn.{p}_proj" for p in "qkv") + ("self_attn.dense",), ("mlp",),
               ("input_layernorm", "self_attn.q_layernorm", "self_attn.k_layernorm")),
    "gemma3": (lambda m: m.model.layers, tuple(f"self_attn.{p}_proj" for p in "qkvo"), ("mlp",),
               ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")),
    "gemma2": (lambda m: m.model.layers, ("self_attn",), ("mlp",),     # final-logit soft-cap in the loss
               ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")),
    "phi3": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "olmo2": (lambda m: m.model.layers, tuple(f"self_attn.{p}_proj" for p in "qkvo"), ("mlp",),   # output norms
              ("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")),
    "phi3_longrope": (lambda m: m.model.layers, ("self_attn",), ("mlp",),
                      ("input_layernorm", "post_attention_layernorm")),
    "bert": (lambda m: m.bert.encoder.layer, ("attention.self", "attention.output.dense"),
             ("intermediate", "output.dense"), ("attention.output.LayerNorm", "output.LayerNorm")),
    "roberta": (lambda m: m.roberta.encoder.layer, ("attention.self", "attention.output.dense"),
                ("intermediate", "output.dense"), ("attention.output.LayerNorm", "output.LayerNorm")),
    "xlm_roberta": (lambda m: m.roberta.encoder.layer, ("attention.self", "attention.output.dense"),
                    ("intermediate", "output.dense"), ("attention.output.LayerNorm", "output.LayerNorm")),
    "modernbert": (lambda m: m.model.layers, ("attn",), ("mlp",), ("attn_norm", "mlp_norm")),
    "distilbert": (lambda m: m.distilbert.transformer.layer, ("attention",), ("ffn",),
                   ("sa_layer_norm", "output_layer_norm")),
    # latent attention (THEORY §18.8): the projections are attention parameters, the latent norms norm parameters
    "deepseek_v2": (lambda m: m.model.layers, tuple(f"self_attn.{p}" for p in ("q_proj", "kv_a_proj_with_mqa",
                                                                             "kv_b_proj", "o_proj")), ("mlp",),
                    ("input_layernorm", "post_attention_layernorm", "self_attn.kv_a_layernorm")),
    "deepseek_v3": (lambda m: m.model.layers, tuple(f"self_attn.{p}" for p in ("q_a_proj", "q_b_proj",
                                                                             "kv_a_proj_with_mqa", "kv_b_proj",
                                                                             "o_proj")), ("mlp",),
                    ("input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm",
                     "self_attn.kv_a_layernorm")),
}
# DeepSeek with MoE layers: the router, the routed and the shared experts are FFN parameters (the selection bias is
# a buffer, with no gradient)
GROUPS["deepseek_v2_moe"], GROUPS["deepseek_v3_moe"] = GROUPS["deepseek_v2"], GROUPS["deepseek_v3"]
POST_LN = ("bert", "distilbert", "roberta", "xlm_roberta")


def _grad_norm(module: torch.nn.Module, paths: tuple[str, ...]) -> float:
    total = 0.0
    for path in paths:
        sub = module.get_submodule(path)
        total += sum(float(p.grad.double().pow(2).sum()) for p in sub.parameters() if p.grad is not None)
    return math.sqrt(total)


@pytest.mark.parametrize("family", sorted(GROUPS))
def test_streamed_gradients_match_autograd(family: str, tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints[family]
    model = open_model(path)
    ids = torch.randint(5, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(6))
    flow = GradientFlow(model, [ids], torch.device("cpu"), torch.float64, seed=3)
    layers, totals = flow.run()

    ref = copy.deepcopy(ref).double()                  # the fixture's model is shared: never change it in place
    ref.zero_grad(set_to_none=True)
    setup = plan_loss(model, [ids], seed=3)
    if setup.kind == LOSS_PROBE:                       # tiny encoder test models ship no tokenizer: the probe loss
        out = ref.base_model(setup.inputs[0], output_hidden_states=True)
        h_top = out.last_hidden_state
        loss = 0.5 * (h_top @ make_probe(model.cfg.d_model, 3)).pow(2).sum() / h_top.shape[0] / h_top.shape[1]
        hidden = out.hidden_states
    else:
        out = ref(setup.inputs[0], labels=setup.targets[0] if setup.kind == LOSS_MLM else setup.inputs[0],
                  output_hidden_states=True)
        loss, hidden = out.loss, out.hidden_states
    for h in hidden:
        h.retain_grad()
    loss.backward()
    # transformers computes its loss on float32 logits even for a float64 model: agreement to float32 rounding
    assert totals["grad_loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert totals["identity_grad_path"] == (family not in POST_LN)
    blocks, attn, ffn, norms = GROUPS[family]
    for layer, row in enumerate(layers):
        assert row["grad_h_in"] == pytest.approx(float(hidden[layer].grad.norm()), rel=1e-5)
        block = blocks(ref)[layer]
        assert row["grad_attn_params"] == pytest.approx(_grad_norm(block, attn), rel=1e-5)
        assert row["grad_ffn_params"] == pytest.approx(_grad_norm(block, ffn), rel=1e-5)
        assert row["grad_norm_params"] == pytest.approx(_grad_norm(block, norms), rel=1e-5)


def test_loss_choice_on_samples() -> None:
    """The sample BERT ships an MLM head and a tokenizer with [MASK]: masked-LM loss; causal samples: CE."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sample_checkpoints"
    ids = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    bert = plan_loss(open_model(root / "bert-tiny"), [ids], seed=0)
    assert bert.kind == LOSS_MLM
    masked = bert.targets[0] != -100
    assert masked.any(dim=1).all() and (bert.inputs[0][~masked] == ids[~masked]).all()
    assert (bert.targets[0][masked] == ids[masked]).all()
    assert plan_loss(open_model(root / "gpt2-tiny"), [ids], seed=0).kind == LOSS_CE


def test_masked_lm_gradients_match_autograd_on_the_sample_bert() -> None:
    """The MLM head path (dense, GELU, LayerNorm, tied decoder + bias) against BertForMaskedLM itself."""
    from pathlib import Path

    import transformers

    path = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "bert-tiny"
    model = open_model(path)
    ids = torch.randint(5, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(8))
    ref = transformers.BertForMaskedLM.from_pretrained(path, attn_implementation="eager").double().eval()
    assert_mlm_gradients_match(model, ref, ids)
