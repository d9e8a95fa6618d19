"""A header-only description of a checkpoint for ``attnstab info`` (no weight data is read)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from attnstab_cli.arch.spec import Residual
from attnstab_cli.model.config import MLADims, RopeConfig
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.memory import compute_resident_bytes

PLACEMENT = {Residual.PRE: "pre-norm", Residual.POST: "post-norm", Residual.PARALLEL: "parallel residual (pre-norm)",
             Residual.PARALLEL_SHARED: "parallel residual (one shared pre-norm)",
             Residual.SANDWICH: "sandwich (pre-norm and a norm on each branch output)",
             Residual.OUTPUT_NORM: "output norms (a norm on each branch output, none before the branches)"}


def _describe_rope(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"theta": rope.theta, "rotary_dim": rope.rotary_dim, "style": rope.style.value,
                           "scaling": rope.scaling_dict or None}
    if rope.rotary_last:
        out["rotary_coordinates"] = "last"
    if rope.attention_factor != 1.0 and rope.long_factor is None:
        out["attention_factor"] = rope.attention_factor                 # YaRN's factor on cos and sin
    if rope.softmax_factor != 1.0:
        out["softmax_factor"] = rope.softmax_factor                     # DeepSeek's YaRN mscale^2 on the scale
    if rope.long_factor is not None:
        out["longrope"] = {"original_max_positions": rope.original_max, "attention_factor": rope.attention_factor,
                           "short_factor": list(rope.short_factor or ()), "long_factor": list(rope.long_factor),
                           "long_factor_beyond": rope.original_max}
    return out


def _describe_mla(m: MLADims) -> dict[str, Any]:
    """Latent attention's sizes (THEORY §18.8)."""
    return {"q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.nope,
            "qk_rope_head_dim": m.rope, "v_head_dim": m.v, "latent_norm_eps": m.latent_eps,
            "q_map": "q_proj" if m.q_lora_rank is None else "q_a_proj, q_a_layernorm, q_b_proj",
            "rotary_key": "one per token, shared by all heads", "head_layout": "[nope; rope]"}


def _describe_moe(cfg: Any) -> dict[str, Any]:
    """The mixture-of-experts FFN (THEORY §18.7) as plain JSON data."""
    moe = cfg.moe
    return {"n_experts": moe.n_experts, "experts_per_token": moe.top_k, "d_ff_expert": moe.d_ff_expert,
            "score": moe.score.value, "selection": moe.selection.value, "renormalize": moe.renormalize,
            "scaling": moe.scaling, "shared_gate": None if moe.shared_gate is None else moe.shared_gate.value,
            "d_ff_shared": moe.d_ff_shared, "moe_layers": [i for i, m in enumerate(moe.moe_layers) if m],
            "dense_layers": [i for i, m in enumerate(moe.moe_layers) if not m],
            "groups": None if moe.selection.group_rank_terms is None else
            {"n_group": moe.n_group, "topk_group": moe.topk_group, "rank_terms": moe.selection.group_rank_terms},
            "router_float32": moe.router_float32,
            "expert_unit": moe.glu.value,                       # clamped_swiglu: its sigmoid gain and clamp limit
            "swiglu_alpha": None if moe.glu_limit is None else moe.glu_alpha, "swiglu_limit": moe.glu_limit}


def describe_checkpoint(model: OpenModel, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Family, sizes, norm and placement, positions, dtypes, quantization, parameter count, files and the bytes a
    scan at ``dtype`` keeps resident, as plain JSON data."""
    cfg, infos = model.cfg, model.reader.infos
    dtypes: Counter[str] = Counter()
    for info in infos.values():
        dtypes[info.dtype] += math.prod(info.shape)
    files = {str(f): f.stat().st_size for f in model.files.weight_files}
    rope = cfg.rope
    return {
        "checkpoint": model.files.source,
        "family": cfg.family,
        "model_type": cfg.model_type,
        "description": model.spec.description,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "ffn": cfg.layout.ffn.value,
        "ffn_packing": cfg.layout.ffn_packing.value,
        "n_experts": None if cfg.moe is None else cfg.moe.n_experts,
        "moe": None if cfg.moe is None else _describe_moe(cfg),
        "qkv_packing": cfg.layout.qkv_packing.value,
        "activation": cfg.activation,
        "norm": cfg.layout.norm.value,
        "norm_eps": cfg.norm_eps,
        "norm_weight": cfg.layout.norm_weight.value,
        "placement": PLACEMENT[cfg.layout.residual],
        "residual": cfg.layout.residual.value,
        "attn_input_normalized": cfg.layout.residual.input_norms or cfg.layout.residual is Residual.POST,
        "causal": cfg.layout.causal,
        "qk_norm": None if cfg.layout.qk_norm is None else cfg.layout.qk_norm.value,
        "attn_sinks": cfg.layout.attn_sinks,
        "attention": cfg.layout.attention.value,
        "mla": None if cfg.mla is None else _describe_mla(cfg.mla),
        "v_head_dim": cfg.v_head_dim,
        "ignored_parts": model.names.ignored_parts() or None,
        "positions": cfg.layout.positions.value,
        "rope": None if rope is None else _describe_rope(rope),
        "sliding_window": next((w for w in cfg.sliding_windows if w), None),
        "sliding_layers": [i for i, w in enumerate(cfg.sliding_windows) if w],
        "attn_scale": cfg.attn_scale(0) if not cfg.scale_by_inverse_layer_idx else None,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attn_logit_cap": cfg.attn_logit_cap,
        "final_logit_cap": cfg.final_logit_cap,
        "embed_scale": cfg.layout.embed_scale.value,
        "window_rule": None if not any(cfg.sliding_windows) else
        "key j visible from query i iff |i - j| < window" + ("" if cfg.layout.causal else " (bidirectional)"),
        "layer_types": None if cfg.layer_types is None else list(cfg.layer_types),
        "sliding_windows": list(cfg.sliding_windows),
        "rope_by_layer_type": {t: _describe_rope(r) for t, r in cfg.rope_by_type} or None,
        "norm_attn_identity_layers": list(cfg.layout.identity_norm_attn),
        "vocab_size": cfg.vocab_size,
        "max_positions": cfg.max_positions,
        "position_offset": cfg.position_offset,
        "max_seq_len": cfg.max_seq_len,
        "dtypes": {k: v for k, v in sorted(dtypes.items())},        # as stored; scale tensors are not parameters
        "quantization": model.reader.block_scales.describe(infos),
        "n_params": sum(dtypes.values()),
        "tied_embeddings": model.names.find("lm_head.weight") == model.names.find("embed_tokens.weight"),
        "format": model.files.fmt,
        "files": files,
        "total_bytes": sum(files.values()),
        "resident": compute_resident_bytes(model, dtype).describe(),
        "tokenizer": str(model.files.tokenizer_path) if model.files.tokenizer_path else None,
    }
