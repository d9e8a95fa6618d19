"""Tiny randomly initialised ``transformers`` models, one per supported family, saved offline to a directory.

``transformers`` is a test-time reference only: these models are the independent computation the streaming forward
pass is checked against (issue 2, item 6).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=97)),
    "gpt2_scaled": ("GPT2Config", "GPT2LMHeadModel",
                    dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=97,
                         scale_attn_by_inverse_layer_idx=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5,
                   rope_theta=500.0)),
    "llama3_scaled": ("LlamaConfig", "LlamaForCausalLM",
                      dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                           intermediate_size=96, vocab_size=97, max_position_embeddings=64,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                           rope_theta=1000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, vocab_size=97, max_position_embeddings=64, sliding_window=7,
                     head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, vocab_size=97, max_position_embeddings=64,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",              # per-head q/k RMSNorm, head_dim != d / H, biases
              dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                   intermediate_size=96, vocab_size=97, max_position_embeddings=64, attention_bias=True)),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
             dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                  vocab_size=97, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True)),
    "neox_serial": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                    dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                         vocab_size=97, max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False)),
    "bert": ("BertConfig", "BertForMaskedLM",
             dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                  vocab_size=97, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM",         # MHA only; 2 + 64 position rows (pad id 1)
                dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=97, max_position_embeddings=66, type_vocab_size=1)),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM",  # another pad id: positions start at row 4
                    dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                         vocab_size=97, max_position_embeddings=68, pad_token_id=3)),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",  # MHA only, no token types
                   dict(n_layers=2, dim=64, n_heads=4, hidden_dim=128, vocab_size=97, max_position_embeddings=64)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",                 # no GQA in GPT-J; partial rotary (8 of 16)
             dict(n_layer=2, n_embd=64, n_head=4, n_inner=96, rotary_dim=8, n_positions=64, vocab_size=97)),
    "phi": ("PhiConfig", "PhiForCausalLM",                    # GQA, biases everywhere, partial rotary (8 of 16)
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=97, max_position_embeddings=64, partial_rotary_factor=0.5)),
    "phi_qk": ("PhiConfig", "PhiForCausalLM",                 # Phi-2 with its optional per-head q/k LayerNorm
               dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=97, max_position_embeddings=64, partial_rotary_factor=0.5,
                    qk_layernorm=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",           # sliding, global, sliding; raw logits beyond the cap
               dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=96, vocab_size=97, max_position_embeddings=64, sliding_window=7,
                    query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                    rms_norm_eps=1e-6, pad_token_id=0, initializer_range=0.06)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",      # sliding, global, sliding, with a local RoPE base
               dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=96, vocab_size=97, max_position_embeddings=64, sliding_window=20,
                    query_pre_attn_scalar=24, rms_norm_eps=1e-6, pad_token_id=0,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",                 # fused qkv (GQA) and gate_up, rotary 12 of 16, window 7
             dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=97, max_position_embeddings=64, sliding_window=7,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.75},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM",        # LongRoPE: tests run beyond the original 16 positions
                      dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                           intermediate_size=96, vocab_size=97, max_position_embeddings=64,
                           original_max_position_embeddings=16, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 1000.0,
                                            "partial_rotary_factor": 0.75,
                                            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                            "long_factor": [1.5, 2.0, 3.0, 4.5, 7.0, 11.0]},
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM",              # output norms only, full-width q/k norms, biases
              dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, vocab_size=97, max_position_embeddings=64, attention_bias=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0}, pad_token_id=0,
                   eos_token_id=2)),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",  # MHA only; layers global, local (|i-j| <= 4), global
                   dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                        vocab_size=97, max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8,
                        attention_bias=True,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 60.0}},
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    # multi-head latent attention, every layer dense (first_k_dense_replace = num_hidden_layers); d_v != d_k
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",   # one q_proj, latent biases, YaRN with mscale
                    dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,  # != all
                         vocab_size=97, max_position_embeddings=64, q_lora_rank=None, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=2,
                         attention_bias=True, initializer_range=0.06, pad_token_id=0,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                          "original_max_position_embeddings": 16, "mscale": 1.0,
                                          "mscale_all_dim": 0.5, "beta_fast": 8.0, "beta_slow": 1.0})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",   # low-rank q, interleaved pairs written split
                    dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=96, vocab_size=97, max_position_embeddings=64, q_lora_rank=24,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=2,
                         initializer_range=0.08, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rms_norm_eps=1e-5,        # the latent norms keep their own 1e-6
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "deepseek_v3_yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM",  # V3's YaRN (mscale = mscale_all_dim) and
                         dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                              intermediate_size=96, vocab_size=97, max_position_embeddings=64, q_lora_rank=24,
                              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                              first_k_dense_replace=2, initializer_range=0.08, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, rope_interleave=False,     # rotate-half on q_rope, k_rope
                              rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                               "original_max_position_embeddings": 16, "mscale": 1.0,
                                               "mscale_all_dim": 1.0})),
    # DeepSeek with mixture-of-experts layers 1 and 2 (first_k_dense_replace = 1): V2's softmax router, 8 experts in
    # 4 groups, top-3 within the 2 groups with the largest best score, scaled gates, 2 shared experts as one FFN
    "deepseek_v2_moe": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                             vocab_size=97, max_position_embeddings=64, q_lora_rank=None, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1,
                             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                             topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                             initializer_range=0.06, pad_token_id=0,
                             rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # V3's sigmoid router: the selection adds e_score_correction_bias (random here), 2 of 4 groups ranked by their
    # two best, top-2, renormalized gates times 2.5, one shared expert
    "deepseek_v3_moe": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=96, vocab_size=97, max_position_embeddings=64, q_lora_rank=24,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                             first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=16, n_shared_experts=1, n_group=4, topk_group=2,
                             norm_topk_prob=True, routed_scaling_factor=2.5, initializer_range=0.08, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",          # 6 experts, top-2, renormalized gates, GQA
                dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=32, num_local_experts=6, num_experts_per_tok=2, vocab_size=97,
                     max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",      # layer 1 dense; shared expert with a sigmoid gate;
                  dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,  # gates
                       intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,  # not
                       num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=False,  # renormalized
                       vocab_size=97, max_position_embeddings=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",      # q/k norms, 8 experts, top-2, renormalized gates
                  dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, vocab_size=97, max_position_embeddings=64)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",          # sinks, biases, sliding (window 6) / full, YaRN;
                dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=32, num_local_experts=5, num_experts_per_tok=2, vocab_size=97,  # 5 experts,
                     max_position_embeddings=64, sliding_window=6, swiglu_limit=2.0,   # top-2; about a sixth of
                     initializer_range=0.06,            # the gate and a third of the up pre-activations clamped
                     rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 8.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
                     bos_token_id=1, eos_token_id=2)),                 # no pad row: every embedding row non-zero
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2_moe", "deepseek_v3_moe", "gpt_oss")


def build_tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A seeded eager-attention model of ``family`` with non-trivial norms and biases (so they are exercised)."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    if family in MOE_FAMILIES:
        config._experts_implementation = "eager"          # a loop over experts; grouped_mm refuses float64
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln" in name.split(".")[-2]:
                p.add_(0.3 * torch.randn_like(p))          # gamma != 1, beta != 0
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.mul_(3.0)                            # q/k norms fix the logits' scale: sharpen them too
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("sinks"):
                p.copy_(2.0 * torch.randn_like(p) + 3.0)   # sink logits that take a visible share of the rows
            else:
                p.mul_(4.0)                                # larger logits: sharper, non-uniform attention
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # DeepSeek-V3's selection-only bias (zeros at init)
                buf.copy_(0.2 * torch.randn_like(buf))
    return model


def save_tiny_model(family: str, directory: Path, seed: int = 0, **save_kwargs: Any) -> torch.nn.Module:
    """Build and save ``family`` as a Hugging Face directory; returns the in-memory reference model."""
    model = build_tiny_model(family, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model
