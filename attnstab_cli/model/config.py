"""The canonical model description every later stage reads, built from a family spec plus ``config.json``.

For a bare ``.safetensors`` file there is no config: sizes come from tensor shapes and the values shapes cannot tell
(number of heads, norm epsilon, RoPE base) must be given as overrides, else the error names what is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from attnstab_cli.arch.config_fields import (
    CONFIG_FIELDS, ROPE_SCALING_FIELDS, check_field, check_rope_scaling, rope_type_of,
)
from attnstab_cli.arch.registry import TensorNames
from attnstab_cli.arch.spec import (ArchSpec, Attention, EmbedScale, ExpertGLU, ExpertPacking, ExpertSelection, FFNKind,
                                    FFNPacking, Layout, Orientation, Positions, RopeStyle, RouterScore, SharedGate)
from attnstab_cli.checkpoints.safetensors_header import TensorInfo
from attnstab_cli.errors import InputError, UnsupportedError, UsageError
from attnstab_cli.model.activations import ACTIVATIONS

SUPPORTED_ROPE_TYPES = tuple(ROPE_SCALING_FIELDS)
ROPE_LISTS = ROPE_SCALING_FIELDS["longrope"][1]["short_factor"]    # the rule of LongRoPE's factor lists


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base, rotated dims per head (partial rotary), pairing style and frequency scaling.

    LongRoPE (``longrope``) divides the base frequencies by ``short_factor`` for sequences of at most
    ``original_max`` tokens and by ``long_factor`` beyond (one set per forward pass, chosen by its length), and
    multiplies cos and sin by an ``attention_factor`` m: the rotary coordinates of q and k are scaled by m, the
    pass-through ones (partial rotary) are not, so with partial rotary m is no scalar on the logits. Write the
    model's map as P_i = diag(m R_i, I) and factor it as sqrt(c) diag(a R_i, b I) with c = max(m, 1)^2,
    a = min(m, 1), b = 1 / max(m, 1): logits s (q P_i).(k P_j) = (s c) (q P'_i).(k P'_j) with
    P'_i = diag(a R_i, b I). Here P'_i is the rotation (``rot_scale`` a, ``pass_scale`` b) and c joins the softmax
    scale (:meth:`ModelConfig.attn_scale`). Since a, b <= 1, ||P'_i||_2 <= 1 and P'_i maps the pass-through
    coordinates by the position-independent b I, which is all THEORY §5.3 uses of orthogonality (||q_i||, ||δq_i||
    bounded as unrotated; the pass-through part of b^K a row constant): every bound, θ row and logit bound then
    sees the true logits. With full rotary and m >= 1 this is "fold m^2 into s" (§5.5) with orthogonal P.
    """

    theta: float
    rotary_dim: int
    style: RopeStyle
    scaling: tuple[tuple[str, Any], ...] = ()
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max: int | None = None
    attention_factor: float = 1.0
    rotary_last: bool = False          # the rotated coordinates are the last rotary_dim of a head (MLA's [nope; rope])
    softmax_factor: float = 1.0        # a factor on the softmax scale itself (DeepSeek's YaRN mscale^2, §18.6)

    @property
    def scaling_dict(self) -> dict[str, Any]:
        return dict(self.scaling)

    @property
    def logit_scale(self) -> float:
        """c = max(m, 1)^2, the part of the attention factor carried by the softmax scale."""
        return max(self.attention_factor, 1.0) ** 2

    @property
    def rot_scale(self) -> float:
        """a = min(m, 1), the factor on cos and sin."""
        return min(self.attention_factor, 1.0)

    @property
    def pass_scale(self) -> float:
        """b = 1 / max(m, 1), the factor on the pass-through coordinates."""
        return 1.0 / max(self.attention_factor, 1.0)

    def uses_long_factor(self, seq_len: int | None) -> bool:
        """Whether a forward pass over ``seq_len`` positions uses the long LongRoPE factors (None: the short set,
        as the model is initialised)."""
        return self.long_factor is not None and seq_len is not None and self.original_max is not None \
            and seq_len > self.original_max


@dataclass(frozen=True)
class MLADims:
    """Sizes of multi-head latent attention (THEORY §18.8): q_h, k_h = [nope; rope] of width nope + rope, v_h of
    width v; the q map is low rank through ``q_lora_rank`` (None: one q projection), the keys and values share the
    latent c_kv of width ``kv_lora_rank``."""

    q_lora_rank: int | None
    kv_lora_rank: int
    nope: int
    rope: int
    v: int
    latent_eps: float = 1e-6   # the latent norms' epsilon: fixed in the reference (its RMSNorm default), not
                               # rms_norm_eps


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts FFN as one checkpoint configures it (THEORY §18.7): the router's score and selection,
    E experts of hidden width ``d_ff_expert`` with k chosen per token, the gates (the selected scores, divided by
    their sum when ``renormalize``, times ``scaling``), the shared experts, and which layers have it at all."""

    score: RouterScore
    selection: ExpertSelection
    n_experts: int
    top_k: int
    d_ff_expert: int
    renormalize: bool
    moe_layers: tuple[bool, ...]          # per layer: True for a mixture-of-experts FFN, False for a dense one
    shared_gate: SharedGate | None = None
    d_ff_shared: int | None = None
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    fused_orientation: Orientation = Orientation.OUT_IN
    fused_packing: ExpertPacking = ExpertPacking.GATE_UP
    router_float32: bool = False          # router weights, selection bias and logits in float32 or wider
    glu: ExpertGLU = ExpertGLU.GATED      # the experts' gated unit
    glu_alpha: float = 1.0                # clamped SwiGLU: the sigmoid's gain and the clamp limit (gpt-oss)
    glu_limit: float | None = None

    @property
    def gates_sum_to_one(self) -> bool:
        """The gates of a token sum to ``scaling`` whatever the logits, so their perturbations sum to 0 (§18.7)."""
        return self.renormalize


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
    sliding_windows: tuple[int | None, ...]     # per layer; key j visible from query i iff |i - j| < window
    scale_attn_weights: bool = True
    scale_by_inverse_layer_idx: bool = False
    type_vocab_size: int | None = None
    tie_embeddings: bool = False
    config_dtype: str | None = None
    pad_token_id: int | None = None
    query_pre_attn_scalar: float | None = None   # s = query_pre_attn_scalar^(-1/2) when given (THEORY §18.6)
    attn_logit_cap: float | None = None          # attention logits c tanh(s q.k / c) (THEORY §18.5)
    final_logit_cap: float | None = None         # output logits c tanh(z / c): the --grad / --curvature loss only
    moe: MoEConfig | None = None                 # mixture-of-experts FFNs (THEORY §18.7); None: every FFN is dense

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer``'s FFN is a mixture of experts."""
        return self.moe is not None and self.moe.moe_layers[layer]

    @property
    def fused_expert_orientation(self) -> Orientation | None:
        return None if self.moe is None else self.moe.fused_orientation

    def embed_multiplier(self, dtype: torch.dtype) -> float:
        """Factor on the token embedding rows, rounded to ``dtype`` as the model applies it (THEORY §18.6)."""
        if self.layout.embed_scale is EmbedScale.NONE:
            return 1.0
        return float(torch.tensor(math.sqrt(self.d_model), dtype=torch.float32).to(dtype))
    head_activation: str | None = None          # the MLM head's activation when it is not ``activation``
    layer_types: tuple[str, ...] | None = None   # per layer: full_attention | sliding_attention
    rope_by_type: tuple[tuple[str, RopeConfig], ...] = ()   # layer type -> its own RoPE (else ``rope``)
    mla: MLADims | None = None                  # multi-head latent attention (head_dim = nope + rope)

    @property
    def v_head_dim(self) -> int:
        """Width of one head's value (and context) vector: MLA's v, else head_dim."""
        return self.head_dim if self.mla is None else self.mla.v

    def rope_at(self, layer: int) -> RopeConfig | None:
        """The RoPE of layer ``layer``: its layer type's own (ModernBERT's and Gemma 3's local base), else ``rope``."""
        if self.rope is None or not self.layer_types or not self.rope_by_type:
            return self.rope
        return dict(self.rope_by_type).get(self.layer_types[layer], self.rope)

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
        """Softmax scale s of layer ``layer`` (0-based): logits are s * q.k (THEORY §5.6), with a RoPE attention
        factor's part c folded in (§5.5; see :class:`RopeConfig`)."""
        base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        s = 1.0 / math.sqrt(base) if self.scale_attn_weights else 1.0
        rope = self.rope_at(layer)
        if rope is not None:
            s *= rope.logit_scale * rope.softmax_factor
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
        if name.startswith("rope_scaling"):
            entry, rope_type = rope_type_of(values[name])
            if isinstance(rope_type, str) and rope_type in spec.rope_type_aliases:   # Phi-3's older "su"
                values[name] = {**{k: v for k, v in values[name].items() if k != entry},
                                "rope_type": spec.rope_type_aliases[rope_type]}
            check_rope_scaling(key, values[name], spec.rope_types)
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
    found_layers = _skip_trailing_layers(names, raw)
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
    mla = _mla_dims(spec, raw, subject)
    head_dim = mla.nope + mla.rope if mla else raw.get("head_dim") or d // h
    n_kv = h if mla else raw.get("n_kv_heads") or _infer_kv_heads(spec, names, infos, head_dim, h)
    if mla and raw.get("n_kv_heads", h) != h:
        raise InputError(f"{subject('n_kv_heads')} is {raw['n_kv_heads']}; latent attention expands one key and value "
                         f"per query head, so expected {key('n_heads')} {h}")
    if h % n_kv:
        raise InputError(f"{subject('n_kv_heads')} is {n_kv}; expected a divisor of {key('n_heads')} {h}")
    for field, role in (("vocab_size", "embed_tokens.weight"), ("max_positions", "embed_positions.weight"),
                        ("type_vocab_size", "embed_types.weight")):
        rows = shape(role)
        if field in keys and rows and rows[0] < raw[field]:
            raise InputError(f"{subject(field)} is {raw[field]}; expected at most {rows[0]}, the rows of tensor "
                             f"{names.find(role)!r}")
    types = raw.get("layer_types")
    if types is None and "global_every" in raw:            # ModernBERT: layer i is global iff i % n == 0
        types = ["full_attention" if i % raw["global_every"] == 0 else "sliding_attention" for i in range(found_layers)]
        raw["layer_types"] = types
    if types is None and raw.get("sliding_period") and raw.get("sliding_window"):   # Gemma: every p-th (1-based)
        period = raw["sliding_period"]                                              # layer is global
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(found_layers)]
        raw["layer_types"] = types
    if types is not None and len(types) != found_layers:
        raise InputError(f"{subject('layer_types')} has {len(types)} entries; expected one per layer "
                         f"({found_layers})")
    pos = shape("embed_positions.weight")
    layout = _resolve_layout(spec, raw)
    d_ff = raw.get("d_ff") or _infer_d_ff(spec, shape) or 4 * d
    activation = raw["activation"]
    for name in ("activation", "head_activation"):
        if name in raw and raw[name] not in ACTIVATIONS:
            raise UnsupportedError(f"unsupported activation {raw[name]!r} ({subject(name)}); "
                                   f"supported: {', '.join(sorted(ACTIVATIONS))}")
    cfg = ModelConfig(
        family=spec.name, model_type=(config or {}).get("model_type"), layout=layout, n_layers=found_layers,
        d_model=d, n_heads=h, n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff, vocab_size=raw["vocab_size"],
        max_positions=raw.get("max_positions") or (pos[0] if pos else None),
        norm_eps=float(raw["norm_eps"]), activation=activation,
        rope=_build_rope(spec, layout, raw, head_dim, key("rope_scaling")),
        sliding_windows=_sliding_windows(raw, found_layers),
        head_activation=raw.get("head_activation"),
        layer_types=tuple(types) if types is not None else None,
        rope_by_type=_rope_by_type(spec, layout, raw, head_dim, key("rope_scaling_sliding")),
        scale_attn_weights=raw.get("scale_attn_weights", True),
        scale_by_inverse_layer_idx=raw.get("scale_attn_by_inverse_layer_idx", False),
        type_vocab_size=raw.get("type_vocab_size"),
        tie_embeddings=raw.get("tie_embeddings", False),
        pad_token_id=raw.get("pad_token_id"),
        config_dtype=str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "") or None,
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar"), attn_logit_cap=raw.get("attn_logit_cap"),
        final_logit_cap=raw.get("final_logit_cap"), mla=mla, moe=_build_moe(spec, raw, found_layers, subject),
    )
    if cfg.rope and (cfg.rope.rotary_dim % 2 or not 0 < cfg.rope.rotary_dim <= cfg.head_dim):
        source = subject("rotary_dim") if "rotary_dim" in raw else f"rotary fraction times head_dim {cfg.head_dim}"
        raise InputError(f"rotary dimension {cfg.rope.rotary_dim} ({source}) is not an even number in "
                         f"2..{cfg.head_dim}")
    if cfg.max_seq_len is not None and cfg.max_seq_len < 1:
        raise InputError(f"{subject('pad_token_id')} is {cfg.pad_token_id}; its position numbering starts at row "
                         f"{cfg.position_offset}, beyond the {cfg.max_positions} rows of the position table")
    return cfg


def _build_moe(spec: ArchSpec, raw: dict[str, Any], n_layers: int, subject: Any) -> MoEConfig | None:
    """The mixture-of-experts configuration (THEORY §18.7), checked: k <= E, dense layers inside the stack, groups
    that divide E and hold at least k experts; None when the config makes every layer dense (the MoE sizes are then
    not needed)."""
    moe = spec.moe
    if moe is None:
        return None
    dense = set(raw.get("moe_dense_layers", ()))
    if dense - set(range(n_layers)):
        raise InputError(f"{subject('moe_dense_layers')} names layers {sorted(dense - set(range(n_layers)))} beyond "
                         f"the {n_layers} layers")
    if raw.get("moe_layer_freq", 1) != 1:       # DeepSeek's own code: MoE where i % freq == 0; transformers: every
        raise UnsupportedError(f"{subject('moe_layer_freq')} is {raw['moe_layer_freq']}: mixture-of-experts layers "
                               "only every few layers are not read (transformers ignores the key and makes every "
                               "layer from the first sparse one a mixture of experts)")
    step, first = raw.get("moe_sparse_step", 1), raw.get("moe_first_dense", 0)
    layers = tuple(i not in dense and (i + 1) % step == 0 and i >= first for i in range(n_layers))
    if not any(layers):
        return None
    for name in ("n_experts", "n_experts_per_token", "d_ff_expert"):
        if name not in raw:
            raise InputError(f"config does not give {name} of the mixture-of-experts FFN")
    n, k = raw["n_experts"], raw["n_experts_per_token"]
    if k > n:
        raise InputError(f"{subject('n_experts_per_token')} is {k}; expected at most {subject('n_experts')} {n}")
    selection = _moe_selection(spec, raw, subject)
    groups, top_groups = raw.get("n_group", 1), raw.get("topk_group", 1)
    if selection.group_rank_terms is not None and not {"n_group", "topk_group"} <= set(raw):
        raise InputError(f"group-limited expert selection ({selection.value}) needs n_group and topk_group")
    if n % groups or top_groups > groups:
        raise InputError(f"{subject('n_group')} {groups} must divide the {n} experts and be at least topk_group "
                         f"{top_groups}")
    if selection.group_rank_terms is not None and k > top_groups * (n // groups):
        raise InputError(f"{subject('n_experts_per_token')} is {k}; the {top_groups} searched groups hold only "
                         f"{top_groups * (n // groups)} experts")
    shared = raw.get("d_ff_shared") if moe.shared_gate is not None else None
    if shared is None and moe.shared_gate is not None and "n_shared_experts" in raw:
        shared = raw["n_shared_experts"] * raw["d_ff_expert"]       # DeepSeek: the shared experts as one FFN
    if moe.shared_gate is not None and shared is None:
        raise InputError("config does not give the shared experts' width (d_ff_shared)")
    clamped = moe.expert_glu is ExpertGLU.CLAMPED_SWIGLU
    if clamped and ("swiglu_alpha" not in raw or "swiglu_limit" not in raw):
        raise InputError("config does not give the clamped SwiGLU's swiglu_alpha and swiglu_limit")
    return MoEConfig(score=moe.score, selection=selection, n_experts=n, top_k=k, d_ff_expert=raw["d_ff_expert"],
                     renormalize=bool(raw.get("moe_renormalize", False)), moe_layers=layers,
                     shared_gate=moe.shared_gate, d_ff_shared=shared,
                     scaling=float(raw.get("routed_scaling_factor", 1.0)), n_group=groups, topk_group=top_groups,
                     fused_orientation=moe.fused_orientation, fused_packing=moe.fused_packing,
                     router_float32=moe.router_float32, glu=moe.expert_glu,
                     glu_alpha=float(raw["swiglu_alpha"]) if clamped else 1.0,
                     glu_limit=float(raw["swiglu_limit"]) if clamped else None)


def _moe_selection(spec: ArchSpec, raw: dict[str, Any], subject: Any) -> ExpertSelection:
    """The spec's expert selection, or the one its selection switch's config value names (refused otherwise)."""
    moe, switch = spec.moe, spec.moe.selection_switch
    if switch is None or switch.key not in raw:
        return moe.selection
    chosen = dict(switch.values).get(raw[switch.key])
    if chosen is None:
        raise UnsupportedError(f"{subject(switch.key)} is {raw[switch.key]!r}: not a supported expert selection for "
                               f"family {spec.name!r}; supported: {', '.join(v for v, _ in switch.values)}")
    return chosen


def _resolve_layout(spec: ArchSpec, raw: dict[str, Any]) -> Layout:
    """The spec's layout with its config switches applied (NeoX's residual wiring, Phi-2's q/k LayerNorm)."""
    layout, switch, qk = spec.layout, spec.residual_switch, spec.qk_norm_switch
    if switch is not None:
        layout = replace(layout, residual=switch.if_true if raw.get(switch.key, True) else switch.if_false)
    if qk is not None and raw.get(qk.key):
        layout = replace(layout, qk_norm=qk.if_true)
    style = spec.rope_style_switch
    if style is not None:
        layout = replace(layout, rope_style=style.if_true if raw.get(style.key, True) else style.if_false)
    return layout


def _skip_trailing_layers(names: TensorNames, raw: dict[str, Any]) -> int:
    """The number of analysed layers: the stored ones less the family's trailing part (DeepSeek's multi-token-
    prediction layer, ``trailing_layers`` of them after ``n_layers``), whose tensors are then reported, never read."""
    stored = names.count_layers()
    extra, n_layers = raw.get("trailing_layers") or 0, raw.get("n_layers")
    if extra and n_layers is not None and n_layers < stored <= n_layers + extra:
        names.skip_layers_from(n_layers)
        return n_layers
    return stored


def _mla_dims(spec: ArchSpec, raw: dict[str, Any], subject: Any) -> MLADims | None:
    """MLA sizes from the config (THEORY §18.8); every one but the q rank is required."""
    if spec.layout.attention is not Attention.MLA:
        return None
    for name in ("kv_lora_rank", "qk_nope_dim", "rotary_dim", "v_head_dim"):
        if name not in raw:
            raise InputError(f"latent attention needs {subject(name)}")
    return MLADims(raw.get("q_lora_rank"), raw["kv_lora_rank"], raw["qk_nope_dim"], raw["rotary_dim"],
                   raw["v_head_dim"])


def _infer_kv_heads(spec: ArchSpec, names: TensorNames, infos: dict[str, TensorInfo], head_dim: int, h: int) -> int:
    """K/V heads from the k-projection shape when the config is silent (output dim / head_dim)."""
    k = names.find("k.weight", 0)
    if k is None or len(infos[k].shape) != 2:
        return h
    out_dim = infos[k].shape[0] if spec.layout.orientation.value == "out_in" else infos[k].shape[1]
    return max(1, out_dim // head_dim)


def _infer_d_ff(spec: ArchSpec, shape: Any) -> int | None:
    packed = spec.layout.ffn_packing is FFNPacking.GATE_UP
    role = "ffn_gate_up.weight" if packed else "ffn_gate.weight" if spec.layout.ffn is FFNKind.GATED else \
        "ffn_in.weight"
    s = shape(role, 0)
    if s is None or len(s) != 2:
        return None
    width = s[0] if spec.layout.orientation.value == "out_in" else s[1]
    return width // 2 if packed else width


def _build_rope(spec: ArchSpec, layout: Layout, raw: dict[str, Any], head_dim: int, key: str) -> RopeConfig | None:
    if layout.positions is not Positions.ROPE:
        return None
    scaling = dict(raw.get("rope_scaling") or {})
    _, rope_type = rope_type_of(scaling)
    fraction = raw.get("rotary_fraction") or scaling.get("partial_rotary_factor") or 1.0
    if "rope_theta" not in raw:
        raise InputError("config does not give the RoPE base (rope_theta)")
    kept = tuple(sorted((k, v) for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")
                        and not isinstance(v, (dict, list))))
    rotary_dim = raw["rotary_dim"] if "rotary_dim" in raw else int(head_dim * fraction)  # GPT-J: absolute
    rope = RopeConfig(theta=float(raw["rope_theta"]), rotary_dim=rotary_dim,
                      style=layout.rope_style or RopeStyle.HALF_SPLIT,
                      scaling=() if rope_type == "default" else kept,
                      rotary_last=layout.attention is Attention.MLA)
    if layout.yarn_softmax_mscale and rope_type != "default" and scaling.get("mscale_all_dim"):
        rope = replace(rope, softmax_factor=yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2)
    if rope_type == "yarn":
        return replace(rope, attention_factor=_yarn_attention_factor(scaling))
    return _longrope(rope, scaling, raw, key) if rope_type == "longrope" else rope


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 mscale ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """The factor on YaRN's cos and sin, as Hugging Face resolves it: ``attention_factor`` if given, else
    mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set (non-zero), else mscale(f)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
    return yarn_mscale(factor)


def _longrope(rope: RopeConfig, scaling: dict[str, Any], raw: dict[str, Any], key: str) -> RopeConfig:
    """LongRoPE factors, original context and attention factor, resolved as Hugging Face does: a top-level
    ``original_max_position_embeddings`` wins over the rope entry; ``attention_factor`` if given, else from
    ``factor`` (else max_positions / original) as sqrt(1 + ln f / ln original), 1 when f <= 1."""
    original = raw.get("original_max_positions") or scaling.get("original_max_position_embeddings")
    if original is None:
        raise InputError(f"config key {key!r} of rope type 'longrope' needs original_max_position_embeddings (there "
                         "or at the top level)")
    original = int(original)
    short, long = (check_field(ROPE_LISTS, f"config key '{key}.{n}'", scaling[n])
                   for n in ("short_factor", "long_factor"))
    half = rope.rotary_dim // 2
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if len(factors) != half:
            raise InputError(f"config key '{key}.{name}' has {len(factors)} factors; expected rotary_dim / 2 = {half}")
    factor = scaling.get("factor")
    if factor is None and raw.get("max_positions") is not None:
        factor = raw["max_positions"] / original
    attention = scaling.get("attention_factor")
    if attention is None:
        if factor is None:
            raise InputError("rope type 'longrope' without attention_factor or factor needs max_position_embeddings")
        if factor > 1.0 and original < 2:
            raise InputError(f"original_max_position_embeddings is {original}; the LongRoPE attention factor "
                             "needs at least 2")
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return replace(rope, short_factor=short, long_factor=long, original_max=original,
                   attention_factor=float(attention))


def _rope_by_type(spec: ArchSpec, layout: Layout, raw: dict[str, Any], head_dim: int,
                  key: str) -> tuple[tuple[str, RopeConfig], ...]:
    """The sliding layers' own RoPE when the config gives a base or scaling for them (``rope_theta_sliding``,
    ``rope_scaling_sliding``); rotary dimension and style are the model's."""
    if spec.layout.positions is not Positions.ROPE or not ({"rope_theta_sliding", "rope_scaling_sliding"} & set(raw)):
        return ()
    local = {**raw, "rope_theta": raw.get("rope_theta_sliding", raw.get("rope_theta")),
             "rope_scaling": raw.get("rope_scaling_sliding", raw.get("rope_scaling"))}
    return (("sliding_attention", _build_rope(spec, layout, local, head_dim, key)),)


def _sliding_windows(raw: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window (Mistral; Qwen2 only with ``use_sliding_window``; ``layer_types`` when given or derived
    from ``sliding_period`` / ``global_every``).

    ``local_attention`` (ModernBERT) is a bidirectional window of that many keys: |i - j| <= local_attention // 2,
    i.e. window local_attention // 2 + 1 under the rule |i - j| < window."""
    window = raw.get("sliding_window")
    if "local_attention" in raw:
        window = raw["local_attention"] // 2 + 1
    if not window or not raw.get("use_sliding_window", True):
        return (None,) * n_layers
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (int(window),) * n_layers
