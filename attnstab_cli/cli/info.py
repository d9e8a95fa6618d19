"""``attnstab info``: what a checkpoint is, from headers and config alone."""
from __future__ import annotations

from rich.table import Table

from attnstab_cli.cli.options import (Arch, Checkpoint, Dtype, Json, NHeads, NKVHeads, NormEps, RopeTheta,
                                      config_overrides)
from attnstab_cli.cli.output import handle_errors, print_json, stdout_console
from attnstab_cli.model.describe import describe_checkpoint
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import resolve_dtype


def _quantization(quant: dict) -> str:
    block = quant["weight_block_size"]
    grid = f"{block[0]}x{block[1]}-block" if block else "per-tensor"
    return (f"FP8 block-quantized: {quant['n_tensors']} float8_e4m3fn tensors with {grid} scales "
            f"({', '.join(quant['scale_dtypes'])}), dequantized as read (the analysis describes the dequantized model)")


def _resident(data: dict) -> str:
    r = data["resident"]
    experts = f" (all {data['n_experts']} experts)" if data["moe"] and r["largest_layer"] in data["moe"]["moe_layers"] \
        else ""
    tied = " (the final norm; the LM head is the embedding table)" if data["tied_embeddings"] else ""
    return (f"largest layer {r['largest_layer']}{experts}: {r['largest_layer_bytes']:,} bytes; embeddings "
            f"{r['embedding_bytes']:,} bytes; head {r['head_bytes']:,} bytes{tied} (at {r['dtype']}; a scan holds "
            f"one of these at a time)")


@handle_errors
def info(checkpoint: Checkpoint, arch: Arch = None, n_heads: NHeads = None, n_kv_heads: NKVHeads = None,
         norm_eps: NormEps = None, rope_theta: RopeTheta = None, dtype: Dtype = "float32",
         json_out: Json = False) -> None:
    """Describe a checkpoint (family, sizes, norm placement, dtypes, parameters, files, the bytes a scan at --dtype
    keeps resident) without reading weights."""
    model = open_model(checkpoint, arch, config_overrides(n_heads, n_kv_heads, norm_eps, rope_theta))
    data = describe_checkpoint(model, resolve_dtype(dtype))
    if json_out:
        print_json(data)
        return
    table = Table(title=f"{data['checkpoint']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("family", f"{data['family']} ({data['model_type'] or 'no config'})"),
        ("layers", data["n_layers"]), ("hidden size", data["d_model"]),
        ("heads / kv heads", f"{data['n_heads']} / {data['n_kv_heads']}"), ("head dim", data["head_dim"]),
        ("ffn", f"{data['ffn']} {data['d_ff']} ({data['activation']})"),
        ("norm", f"{data['norm']} eps={data['norm_eps']:g}, {data['placement']}"
                 + (", gamma = 1 + stored weight" if data["norm_weight"] == "one_plus" else "")),
        ("attention", ("causal" if data["causal"] else "bidirectional")
         + (f", scale {data['attn_scale']:.6g}" if data["attn_scale"] is not None else "")
         + (f" (query_pre_attn_scalar {data['query_pre_attn_scalar']:g})" if data["query_pre_attn_scalar"] else "")
         + (f", logit soft-cap {data['attn_logit_cap']:g}" if data["attn_logit_cap"] else "")
         + (f", q/k {data['norm']} on the projections ({data['qk_norm'].replace('_', ' ')}, before RoPE)"
            if data["qk_norm"] else "")
         + (", a learned sink logit per head in every softmax row" if data["attn_sinks"] else "")),
        ("positions", data["positions"] + (f" theta={data['rope']['theta']:g} rotary_dim={data['rope']['rotary_dim']}"
                                            f" {data['rope']['style']}" if data["rope"] else "")),
        ("vocabulary", data["vocab_size"]),
        ("max positions", f"{data['max_positions']}" + (f" (first token at row {data['position_offset']}: sequences "
                                                         f"up to {data['max_seq_len']})" if data["position_offset"]
                                                        else "")),
        ("dtypes", ", ".join(f"{k}: {v:,}" for k, v in data["dtypes"].items())),
        ("parameters", f"{data['n_params']:,}"),
        ("resident", _resident(data)),
        ("files", "\n".join(f"{f} ({b:,} bytes)" for f, b in data["files"].items())),
        ("tokenizer", data["tokenizer"] or "none"),
    ]
    if data["mla"]:
        m = data["mla"]
        q = "one q projection" if m["q_lora_rank"] is None else f"q rank {m['q_lora_rank']} ({m['q_map']})"
        rows.insert(7, ("latent attention", f"{q}, kv rank {m['kv_lora_rank']}, per head q/k [nope "
                                            f"{m['qk_nope_head_dim']}; rope {m['qk_rope_head_dim']}] and v "
                                            f"{m['v_head_dim']}; the rotary key is shared by all heads (THEORY §18.8)"))
    if data["rope"] and data["rope"].get("softmax_factor"):
        rows.insert(7, ("yarn", f"cos, sin x {data['rope'].get('attention_factor', 1.0):.6g}; softmax scale x "
                                f"{data['rope']['softmax_factor']:.6g} (mscale_all_dim)"))
    if data["embed_scale"] != "none":
        rows.insert(7, ("embedding scale", data["embed_scale"]))
    if data["final_logit_cap"]:
        rows.insert(7, ("output logit soft-cap", f"{data['final_logit_cap']:g}"))
    if data["sliding_window"]:
        layers = data["sliding_layers"]
        where = "all layers" if len(layers) == data["n_layers"] else "layers " + ", ".join(map(str, layers))
        rows.insert(7, ("sliding window", f"{data['sliding_window']} ({where})"))
    if data["layer_types"]:
        kinds = ", ".join(f"{t}: {sum(x == t for x in data['layer_types'])}" for t in sorted(set(data["layer_types"])))
        local = "; ".join(f"{t} theta={r['theta']:g}" for t, r in (data["rope_by_layer_type"] or {}).items())
        rows.insert(8, ("layer types", kinds + (f" ({local})" if local else "")))
    if not data["attn_input_normalized"]:
        rows.insert(8, ("attention input", "the raw residual stream (no norm before it): its tier-1 radius grows "
                                           "with depth (THEORY §18.3)"))
    if data["norm_attn_identity_layers"]:
        rows.insert(8, ("no attention norm in layers", ", ".join(map(str, data["norm_attn_identity_layers"]))))
    if data["quantization"]:
        rows.insert([k for k, _ in rows].index("dtypes") + 1, ("quantization", _quantization(data["quantization"])))
    for part, n in (data["ignored_parts"] or {}).items():
        rows.append(("not analysed", f"{part}: {n} tensors (never read)"))
    for k, v in rows:
        table.add_row(k, str(v))
    stdout_console().print(table)
