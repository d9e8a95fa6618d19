"""The canonical model description every later stage reads, built from a family spec plus ``config.json``.

For a bare ``.safetensors`` file there is no config: sizes come from tensor shapes and the values shapes cannot tell
(number of heads, norm epsilon, RoPE base) must be given as overrides, else the error names what is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from attnstab_cli.arch.registry import TensorNames
from attnstab_cli.arch.spec import ArchSpec, FFNKind, Layout, Positions, RopeStyle
from attnstab_cli.checkpoints.safetensors_header import TensorInfo
from attnstab_cli.errors import InputError, UnsupportedError
from attnstab_cli.model.activations import ACTIVATIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


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

    def attn_scale(self, layer: int) -> float:
        """Softmax scale s of layer ``layer`` (0-based): logits are s * q.k (THEORY §5.6)."""
        s = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        return s / (layer + 1) if self.scale_by_inverse_layer_idx else s

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def _lookup(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """First non-null value among ``keys``; a dotted key reads into nested dicts (``rope_parameters.rope_theta``)."""
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def build_model_config(spec: ArchSpec, config: dict[str, Any] | None, names: TensorNames,
                       infos: dict[str, TensorInfo], overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Resolve every canonical field from config keys, overrides, spec defaults and tensor shapes (in that order)."""
    raw = {key: _lookup(config, keys) for key, keys in spec.config.items()} if config else {}
    raw = {k: v for k, v in raw.items() if v is not None}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    missing = [k for k in spec.required_without_config if k not in raw and (config is None or k not in spec.defaults)]
    for key, value in spec.defaults.items():
        raw.setdefault(key, value)
    shape = lambda role, layer=None: infos[names.find(role, layer)].shape if names.find(role, layer) else None
    emb = shape("embed_tokens.weight")
    raw.setdefault("vocab_size", emb[0])
    raw.setdefault("d_model", emb[1])
    raw.setdefault("n_layers", names.count_layers())
    if missing and config is None:
        raise InputError(f"a bare .safetensors file has no config; cannot infer {', '.join(missing)}",
                         hint="pass " + " ".join(f"--{m.replace('_', '-')} VALUE" for m in missing))
    if "n_heads" not in raw:
        raise InputError("config does not give the number of attention heads")
    if "norm_eps" not in raw:
        raise InputError("config does not give the normalisation epsilon")
    d, h = int(raw["d_model"]), int(raw["n_heads"])
    head_dim = int(raw.get("head_dim") or d // h)
    n_kv = int(raw.get("n_kv_heads") or _infer_kv_heads(spec, names, infos, head_dim, h))
    pos = shape("embed_positions.weight")
    layout = _resolve_layout(spec, raw)
    d_ff = raw.get("d_ff") or _infer_d_ff(spec, shape) or 4 * d
    activation = str(raw["activation"])
    if activation not in ACTIVATIONS:
        raise UnsupportedError(f"unsupported activation {activation!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    n_layers = int(raw["n_layers"])
    cfg = ModelConfig(
        family=spec.name, model_type=(config or {}).get("model_type"), layout=layout, n_layers=n_layers,
        d_model=d, n_heads=h, n_kv_heads=n_kv, head_dim=head_dim, d_ff=int(d_ff), vocab_size=int(raw["vocab_size"]),
        max_positions=int(raw["max_positions"]) if raw.get("max_positions") else (pos[0] if pos else None),
        norm_eps=float(raw["norm_eps"]), activation=activation, rope=_build_rope(spec, raw, head_dim),
        sliding_windows=_sliding_windows(raw, n_layers),
        scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
        scale_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        type_vocab_size=int(raw["type_vocab_size"]) if raw.get("type_vocab_size") else None,
        tie_embeddings=bool(raw.get("tie_embeddings", False)),
        config_dtype=str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "") or None,
    )
    _validate(cfg, names)
    return cfg


def _resolve_layout(spec: ArchSpec, raw: dict[str, Any]) -> Layout:
    switch = spec.residual_switch
    if switch is None:
        return spec.layout
    return replace(spec.layout, residual=switch.if_true if raw.get(switch.key, True) else switch.if_false)


def _infer_kv_heads(spec: ArchSpec, names: TensorNames, infos: dict[str, TensorInfo], head_dim: int, h: int) -> int:
    """K/V heads from the k-projection shape when the config is silent (output dim / head_dim)."""
    k = names.find("k.weight", 0)
    if k is None:
        return h
    out_dim = infos[k].shape[0] if spec.layout.orientation.value == "out_in" else infos[k].shape[1]
    return max(1, out_dim // head_dim)


def _infer_d_ff(spec: ArchSpec, shape: Any) -> int | None:
    role = "ffn_gate.weight" if spec.layout.ffn is FFNKind.GATED else "ffn_in.weight"
    s = shape(role, 0)
    if s is None:
        return None
    return s[0] if spec.layout.orientation.value == "out_in" else s[1]


def _build_rope(spec: ArchSpec, raw: dict[str, Any], head_dim: int) -> RopeConfig | None:
    if spec.layout.positions is not Positions.ROPE:
        return None
    scaling = dict(raw.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    fraction = float(raw.get("rotary_fraction", scaling.get("partial_rotary_factor", 1.0)))
    if "rope_theta" not in raw:
        raise InputError("config does not give the RoPE base (rope_theta)")
    kept = tuple(sorted((k, v) for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")
                        and not isinstance(v, (dict, list))))
    return RopeConfig(theta=float(raw["rope_theta"]), rotary_dim=int(head_dim * fraction),
                      style=spec.layout.rope_style or RopeStyle.HALF_SPLIT,
                      scaling=() if rope_type == "default" else kept)


def _sliding_windows(raw: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window (Mistral; Qwen2 only with ``use_sliding_window``; ``layer_types`` when given)."""
    window = raw.get("sliding_window")
    if not window or not raw.get("use_sliding_window", True):
        return (None,) * n_layers
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (int(window),) * n_layers


def _validate(cfg: ModelConfig, names: TensorNames) -> None:
    """Cheap consistency checks between config and layer count (shapes are checked when a layer is loaded)."""
    if cfg.n_heads % cfg.n_kv_heads:
        raise InputError(f"num_attention_heads {cfg.n_heads} is not a multiple of the K/V heads {cfg.n_kv_heads}")
    found = names.count_layers()
    if found != cfg.n_layers:
        raise InputError(f"config says {cfg.n_layers} layers but the weights hold {found}")
    if cfg.rope and (cfg.rope.rotary_dim % 2 or cfg.rope.rotary_dim > cfg.head_dim):
        raise InputError(f"rotary dimension {cfg.rope.rotary_dim} is not an even number <= head_dim {cfg.head_dim}")
