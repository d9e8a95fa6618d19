"""The canonical model description every later stage reads, built from a family spec plus ``config.json``.

For a bare ``.safetensors`` file there is no config: sizes come from tensor shapes and the values shapes cannot tell
(number of heads, norm epsilon, RoPE base) must be given as overrides, else the error names what is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from attnstab_cli.arch.config_fields import (
    CONFIG_FIELDS, ROPE_SCALING_FIELDS, check_field, check_rope_scaling, rope_type_of,
)
from attnstab_cli.arch.registry import TensorNames
import torch

from attnstab_cli.arch.spec import ArchSpec, EmbedScale, FFNKind, Layout, Positions, RopeStyle
from attnstab_cli.checkpoints.safetensors_header import TensorInfo
from attnstab_cli.errors import InputError, UnsupportedError, UsageError
from attnstab_cli.model.activations import ACTIVATIONS

SUPPORTED_ROPE_TYPES = tuple(ROPE_SCALING_FIELDS)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base, rotated dims per head (partial rotary), pairing style and frequency scaling."""

    theta: float
    rotary_dim: int
    style: RopeStyle
    scaling: tuple[tuple[str, Any], ...] = ()

    @property
    def scaling_dict(self) -> dict[str, Any]:
        return dict(self.scaling)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the streaming forward pass and the metrics need to know about one checkpoint."""

    family: str
    model_type: str | None
    layout: Layout
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    max_positions: int | None
    norm_eps: float
    activation: str
    rope: RopeConfig | None
    sliding_windows: tuple[int | None, ...]
    scale_attn_weights: bool = True
    scale_by_inverse_layer_idx: bool = False
    type_vocab_size: int | None = None
    tie_embeddings: bool = False
    config_dtype: str | None = None
    pad_token_id: int | None = None
    query_pre_attn_scalar: float | None = None   # s = query_pre_attn_scalar^(-1/2) when given (THEORY §18.6)
    attn_logit_cap: float | None = None          # attention logits c tanh(s q.k / c) (THEORY §18.5)
    final_logit_cap: float | None = None         # output logits c tanh(z / c): the --grad / --curvature loss only

    def embed_multiplier(self, dtype: torch.dtype) -> float:
        """Factor on the token embedding rows, rounded to ``dtype`` as the model applies it (THEORY §18.6)."""
        if self.layout.embed_scale is EmbedScale.NONE:
            return 1.0
        return float(torch.tensor(math.sqrt(self.d_model), dtype=torch.float32).to(dtype))

    @property
    def position_offset(self) -> int:
        """Rows of the learned position table below the first unpadded token's: pad_token_id + 1 under fairseq
        numbering (``learned_pad_offset``), else 0."""
        return self.pad_token_id + 1 if self.layout.positions is Positions.LEARNED_PAD_OFFSET else 0

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the position table serves (None when no limit is known)."""
        return None if self.max_positions is None else self.max_positions - self.position_offset

    def attn_scale(self, layer: int) -> float:
        """Softmax scale s of layer ``layer`` (0-based): logits are s * q.k (THEORY §5.6)."""
        base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        s = 1.0 / math.sqrt(base) if self.scale_attn_weights else 1.0
        return s / (layer + 1) if self.scale_by_inverse_layer_idx else s

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def _lookup(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """``(key, value)`` of the first non-null value among ``keys``; a dotted key reads into nested dicts
    (``rope_parameters.rope_theta``)."""
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return key, node
    return None


def read_config_fields(spec: ArchSpec, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Every canonical field the spec reads from ``config.json``, checked against its rule in
    :data:`~attnstab_cli.arch.config_fields.CONFIG_FIELDS`; returns the values and the key each came from."""
    values, keys = {}, {}
    for name, candidates in spec.config.items():
        found = _lookup(config, candidates)
        if found is None:
            continue
        key, value = found
        values[name] = check_field(CONFIG_FIELDS[name], f"config key {key!r}", value)
        if name == "rope_scaling":
            check_rope_scaling(key, values[name])
        keys[name] = key
    return values, keys


def option_name(name: str) -> str:
    """The command-line option that overrides canonical field ``name``."""
    return "--" + name.replace("_", "-")


def check_overrides(overrides: dict[str, Any] | None) -> None:
    """Values given on the command line obey the same rules as config keys (a :class:`UsageError` otherwise)."""
    for name, value in (overrides or {}).items():
        if value is not None:
            check_field(CONFIG_FIELDS[name], f"option {option_name(name)}", value, UsageError)


def build_model_config(spec: ArchSpec, config: dict[str, Any] | None, names: TensorNames,
                       infos: dict[str, TensorInfo], overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Resolve every canonical field from config keys, overrides, spec defaults and tensor shapes (in that order);
    each config value is checked for type and range, then the values against each other and the tensors, before
    any is used."""
    raw, keys = read_config_fields(spec, config) if config else ({}, {})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw.update(given)
    keys.update({k: option_name(k) for k in given})
    missing = [k for k in spec.required_without_config if k not in raw and (config is None or k not in spec.defaults)]
    for name, value in spec.defaults.items():
        raw.setdefault(name, value)
    shape = lambda role, layer=None: infos[names.find(role, layer)].shape if names.find(role, layer) else None
    emb_name = names.find("embed_tokens.weight")
    emb = infos[emb_name].shape
    if len(emb) != 2:
        raise InputError(f"tensor {emb_name!r} has shape {list(emb)}; expected [vocab_size, d_model]",
                         path=infos[emb_name].file)
    raw.setdefault("vocab_size", emb[0])
    raw.setdefault("d_model", emb[1])
    found_layers = names.count_layers()
    raw.setdefault("n_layers", found_layers)
    if missing and config is None:
        raise InputError(f"a bare .safetensors file has no config; cannot infer {', '.join(missing)}",
                         hint="pass " + " ".join(f"{option_name(m)} VALUE" for m in missing))
    if "n_heads" not in raw:
        raise InputError("config does not give the number of attention heads")
    if "norm_eps" not in raw:
        raise InputError("config does not give the normalisation epsilon")

    def key(name: str) -> str:
        return keys.get(name, name)

    def subject(name: str) -> str:
        return f"option {key(name)}" if key(name).startswith("--") else f"config key {key(name)!r}"

    for name, what in spec.unsupported_if_true.items():
        if raw.get(name):
            raise UnsupportedError(f"{subject(name)} is true: {what} is not supported for family {spec.name!r}")
    if raw["n_layers"] != found_layers:
        raise InputError(f"{subject('n_layers')} says {raw['n_layers']} layers but the weights hold {found_layers}")
    d, h = raw["d_model"], raw["n_heads"]
    if d != emb[1]:
        raise InputError(f"{subject('d_model')} is {d}; expected {emb[1]}, the width of tensor {emb_name!r}")
    if "head_dim" not in raw and d % h:
        raise InputError(f"{subject('n_heads')} is {h}; expected a divisor of {key('d_model')} {d}")
    head_dim = raw.get("head_dim") or d // h
    n_kv = raw.get("n_kv_heads") or _infer_kv_heads(spec, names, infos, head_dim, h)
    if h % n_kv:
        raise InputError(f"{subject('n_kv_heads')} is {n_kv}; expected a divisor of {key('n_heads')} {h}")
    for field, role in (("vocab_size", "embed_tokens.weight"), ("max_positions", "embed_positions.weight"),
                        ("type_vocab_size", "embed_types.weight")):
        rows = shape(role)
        if field in keys and rows and rows[0] < raw[field]:
            raise InputError(f"{subject(field)} is {raw[field]}; expected at most {rows[0]}, the rows of tensor "
                             f"{names.find(role)!r}")
    types = raw.get("layer_types")
    if types is not None and len(types) != found_layers:
        raise InputError(f"{subject('layer_types')} has {len(types)} entries; expected one per layer "
                         f"({found_layers})")
    pos = shape("embed_positions.weight")
    layout = _resolve_layout(spec, raw)
    d_ff = raw.get("d_ff") or _infer_d_ff(spec, shape) or 4 * d
    activation = raw["activation"]
    if activation not in ACTIVATIONS:
        raise UnsupportedError(f"unsupported activation {activation!r} ({subject('activation')}); "
                               f"supported: {', '.join(sorted(ACTIVATIONS))}")
    cfg = ModelConfig(
        family=spec.name, model_type=(config or {}).get("model_type"), layout=layout, n_layers=found_layers,
        d_model=d, n_heads=h, n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff, vocab_size=raw["vocab_size"],
        max_positions=raw.get("max_positions") or (pos[0] if pos else None),
        norm_eps=float(raw["norm_eps"]), activation=activation, rope=_build_rope(spec, raw, head_dim),
        sliding_windows=_sliding_windows(raw, found_layers),
        scale_attn_weights=raw.get("scale_attn_weights", True),
        scale_by_inverse_layer_idx=raw.get("scale_attn_by_inverse_layer_idx", False),
        type_vocab_size=raw.get("type_vocab_size"),
        tie_embeddings=raw.get("tie_embeddings", False),
        pad_token_id=raw.get("pad_token_id"),
        config_dtype=str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "") or None,
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar"), attn_logit_cap=raw.get("attn_logit_cap"),
        final_logit_cap=raw.get("final_logit_cap"),
    )
    if cfg.rope and (cfg.rope.rotary_dim % 2 or not 0 < cfg.rope.rotary_dim <= cfg.head_dim):
        source = subject("rotary_dim") if "rotary_dim" in raw else f"rotary fraction times head_dim {cfg.head_dim}"
        raise InputError(f"rotary dimension {cfg.rope.rotary_dim} ({source}) is not an even number in "
                         f"2..{cfg.head_dim}")
    if cfg.max_seq_len is not None and cfg.max_seq_len < 1:
        raise InputError(f"{subject('pad_token_id')} is {cfg.pad_token_id}; its position numbering starts at row "
                         f"{cfg.position_offset}, beyond the {cfg.max_positions} rows of the position table")
    return cfg


def _resolve_layout(spec: ArchSpec, raw: dict[str, Any]) -> Layout:
    switch = spec.residual_switch
    if switch is None:
        return spec.layout
    return replace(spec.layout, residual=switch.if_true if raw.get(switch.key, True) else switch.if_false)


def _infer_kv_heads(spec: ArchSpec, names: TensorNames, infos: dict[str, TensorInfo], head_dim: int, h: int) -> int:
    """K/V heads from the k-projection shape when the config is silent (output dim / head_dim)."""
    k = names.find("k.weight", 0)
    if k is None or len(infos[k].shape) != 2:
        return h
    out_dim = infos[k].shape[0] if spec.layout.orientation.value == "out_in" else infos[k].shape[1]
    return max(1, out_dim // head_dim)


def _infer_d_ff(spec: ArchSpec, shape: Any) -> int | None:
    role = "ffn_gate.weight" if spec.layout.ffn is FFNKind.GATED else "ffn_in.weight"
    s = shape(role, 0)
    if s is None or len(s) != 2:
        return None
    return s[0] if spec.layout.orientation.value == "out_in" else s[1]


def _build_rope(spec: ArchSpec, raw: dict[str, Any], head_dim: int) -> RopeConfig | None:
    if spec.layout.positions is not Positions.ROPE:
        return None
    scaling = dict(raw.get("rope_scaling") or {})
    _, rope_type = rope_type_of(scaling)
    fraction = raw.get("rotary_fraction") or scaling.get("partial_rotary_factor") or 1.0
    if "rope_theta" not in raw:
        raise InputError("config does not give the RoPE base (rope_theta)")
    kept = tuple(sorted((k, v) for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")
                        and not isinstance(v, (dict, list))))
    rotary_dim = raw["rotary_dim"] if "rotary_dim" in raw else int(head_dim * fraction)  # GPT-J: absolute
    return RopeConfig(theta=float(raw["rope_theta"]), rotary_dim=rotary_dim,
                      style=spec.layout.rope_style or RopeStyle.HALF_SPLIT,
                      scaling=() if rope_type == "default" else kept)


def _sliding_windows(raw: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window (Mistral; Qwen2 only with ``use_sliding_window``; ``layer_types`` when given; else
    with ``sliding_period`` p every p-th layer, 1-based, is global: Gemma 2's alternation is p = 2)."""
    window = raw.get("sliding_window")
    if not window or not raw.get("use_sliding_window", True):
        return (None,) * n_layers
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    period = raw.get("sliding_period")
    if period:
        return tuple(None if (i + 1) % period == 0 else int(window) for i in range(n_layers))
    return (int(window),) * n_layers
