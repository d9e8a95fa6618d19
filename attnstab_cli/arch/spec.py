"""Architecture families as data (STYLE.md, "Declaring architectures"; idea from mergekit's per-family specs).

Each family is one JSON file in ``specs/``: match rules, a config-key map, ``{layer}`` tensor templates per canonical
role (with aliases, optional and tied tensors), the tensors a scan may leave unread (``ignorable`` weights such as
classifier heads, and ``buffers``: constants such as causal masks and rotary caches, which are not weights) and layout
facts as enums. The loader rejects unknown keys and config fields without a rule in
:data:`~attnstab_cli.arch.config_fields.CONFIG_FIELDS`, so a typo in a spec fails at import time rather than silently
mis-reading a checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from typing import Any

from attnstab_cli.arch.config_fields import CONFIG_FIELDS, FAMILY_ROPE_TYPES, ROPE_SCALING_FIELDS


class Orientation(str, Enum):
    OUT_IN = "out_in"   # nn.Linear stores (out, in): canonical W = stored.T
    IN_OUT = "in_out"   # GPT-2 Conv1D stores (in, out): already x -> xW


class QKVPacking(str, Enum):
    SEPARATE = "separate"
    CONCAT = "concat"                              # [Q | K | V] column blocks (GPT-2)
    INTERLEAVED_PER_HEAD = "interleaved_per_head"  # per head [q; k; v] (GPT-NeoX)


class NormKind(str, Enum):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class NormWeight(str, Enum):
    """How a norm's stored weight w gives its scale gamma (THEORY §18.6)."""

    GAMMA = "gamma"              # gamma = w
    ONE_PLUS = "one_plus"        # gamma = 1 + w (Gemma): converted when loaded, so every formula sees gamma


class EmbedScale(str, Enum):
    """Factor on the token embedding rows, applied in the hidden dtype (THEORY §18.6)."""

    NONE = "none"
    SQRT_D = "sqrt_d"            # x sqrt(d_model) (Gemma)


class Residual(str, Enum):
    PRE = "pre"            # h' = h + MHA(N1 h); h+ = h' + FFN(N2 h')
    POST = "post"          # h' = N1(h + MHA h); h+ = N2(h' + FFN h')
    PARALLEL = "parallel"  # h+ = h + MHA(N1 h) + FFN(N2 h)
    PARALLEL_SHARED = "parallel_shared"  # h+ = h + MHA(N1 h) + FFN(N1 h): one norm feeds both branches (GPT-J, Phi-2)
    SANDWICH = "sandwich"  # h' = h + N1b(MHA(N1a h)); h+ = h' + N2b(FFN(N2a h')) (Gemma 2/3, THEORY §18.3)
    OUTPUT_NORM = "output_norm"  # h' = h + N1b(MHA(h)); h+ = h' + N2b(FFN(h')): no pre-norm (OLMo 2, §18.3)

    @property
    def shared_norm(self) -> bool:
        """One norm per layer feeds both branches; the spec declares no ``norm_ffn`` tensors (THEORY §18.6)."""
        return self is Residual.PARALLEL_SHARED

    @property
    def output_norms(self) -> bool:
        """Each branch output passes a norm (``norm_attn_out``, ``norm_ffn_out``) before the residual add (§18.3)."""
        return self in (Residual.SANDWICH, Residual.OUTPUT_NORM)

    @property
    def input_norms(self) -> bool:
        """Each branch reads a normalized input (``norm_attn``, ``norm_ffn``). Without them (output norms only)
        both are identities, the spec declares no such tensors, and the MHA reads the raw residual stream: no
        magnitude reset bounds it, and its radius grows with depth (§18.3)."""
        return self is not Residual.OUTPUT_NORM

    @property
    def serial(self) -> bool:
        """h' = h + branch_1(h), h+ = h' + branch_2(h'): the pre-norm and branch-output-norm rows of §7, §18.3."""
        return self in (Residual.PRE, Residual.SANDWICH, Residual.OUTPUT_NORM)


class Positions(str, Enum):
    LEARNED = "learned"                        # token t reads row t of the learned table
    LEARNED_PAD_OFFSET = "learned_pad_offset"  # fairseq numbering (RoBERTa): the k-th non-pad token of a row reads
                                               # row pad_token_id + k, a pad token row pad_token_id
    ROPE = "rope"


class RopeStyle(str, Enum):
    HALF_SPLIT = "half_split"    # rotate-half: pairs (i, i + r/2)
    INTERLEAVED = "interleaved"  # pairs (2i, 2i + 1), rotated in place
    INTERLEAVED_COMPLEX = "interleaved_complex"  # the same rotation as a complex product, cos and sin formed by
                                                 # torch.polar (DeepSeek-V2; 1 ulp from cos, sin in float32)
    INTERLEAVED_SPLIT = "interleaved_split"  # pairs (2i, 2i + 1) in, written out as [first members; second members]
                                             # (DeepSeek-V3's rope_interleave): the same logits, another layout


class Attention(str, Enum):
    """How the per-head q, k, v are formed from the attention input (THEORY §5.1, §18.8)."""

    PROJECTIONS = "projections"  # q, k, v = x W + b per head (separate or fused tensors, qkv_packing)
    MLA = "mla"                  # multi-head latent attention (DeepSeek V2/V3): low-rank q (q_a, q_a_norm, q_b; or one
                                 # q projection), a shared latent c_kv (kv_a, kv_a_norm) expanded per head by kv_b into
                                 # [k_nope; v], one rotary key part shared by all heads; q_h, k_h = [nope; rope]


class QKNorm(str, Enum):
    """Where a norm sits between the q/k projections and the logits (THEORY §18.2); the family's norm kind."""

    PER_HEAD = "per_head"      # over each head's D coordinates, one weight [D] shared by the heads (Qwen3, Gemma 3)
    FULL_WIDTH = "full_width"  # over all H*D (H_kv*D) coordinates before the split into heads (OLMo 2)


class FFNKind(str, Enum):
    MLP = "mlp"      # act(x W1 + b1) W2 + b2
    GATED = "gated"  # (act(x Wg) * x Wu) Wd


class FFNPacking(str, Enum):
    """How a gated FFN stores W_g and W_u (THEORY §18.6, fused projections)."""

    SEPARATE = "separate"  # roles ffn_gate.weight, ffn_up.weight
    GATE_UP = "gate_up"    # one role ffn_gate_up.weight, outputs [activated half; multiplying half] (Phi-3
                           # gate_up_proj [gate; up], ModernBERT Wi [input; gate]); split into W_g, W_u at load


class RouterScore(str, Enum):
    """The score a mixture-of-experts router ranks experts by and takes its gates from (THEORY §18.7)."""

    SOFTMAX = "softmax"    # p = softmax(l) over all experts (Mixtral, Qwen-MoE, gpt-oss)
    SIGMOID = "sigmoid"    # p = sigmoid(l) per expert (DeepSeek V3)


class ExpertSelection(str, Enum):
    """How the k experts of a token are chosen from the selection scores (the score plus a selection-only bias)."""

    TOP_K = "top_k"              # the k largest scores
    GROUP_TOP_K = "group_top_k"  # DeepSeek-V3: the topk_group best of n_group groups (by the sum of each group's two
                                 # largest scores), then the k largest scores inside them
    GROUP_MAX_TOP_K = "group_max_top_k"  # DeepSeek-V2 (topk_method group_limited_greedy): the same with a group
                                         # ranked by its largest score

    @property
    def group_rank_terms(self) -> int | None:
        """How many of a group's largest scores sum to its rank; None for a selection without groups."""
        return {ExpertSelection.GROUP_TOP_K: 2, ExpertSelection.GROUP_MAX_TOP_K: 1}.get(self)


class SharedGate(str, Enum):
    """The weight of the shared experts' output (THEORY §18.7: omega_s)."""

    CONSTANT = "constant"  # weight 1 (DeepSeek)
    SIGMOID = "sigmoid"    # sigmoid(x w_s) with w_s [d] (Qwen2-MoE shared_expert_gate)


class ExpertPacking(str, Enum):
    """How fused expert tensors (one tensor over all experts, [E, ...]) hold W_g and W_u of each expert."""

    GATE_UP = "gate_up"          # [gate; up] halves of the 2m outputs (transformers' Mixtral, Qwen-MoE)
    INTERLEAVED = "interleaved"  # outputs alternate gate, up, gate, ... (gpt-oss)


class ExpertGLU(str, Enum):
    """The experts' gated unit ``h = phi_g(a) * phi_u(b)`` on ``a = x W_g + b_g``, ``b = x W_u + b_u`` (THEORY §6.2,
    §18.7)."""

    GATED = "gated"                    # act(a) * b with the family's activation (§6.2)
    CLAMPED_SWIGLU = "clamped_swiglu"  # gpt-oss: a' = min(a, limit), b' = clip(b, +-limit), h = a' sigma(alpha a')
                                       # (b' + 1) (config fields swiglu_alpha, swiglu_limit)


@dataclass(frozen=True)
class SelectionSwitch:
    """A text config key whose value chooses the expert selection (DeepSeek-V2's ``topk_method``); a value outside
    ``values`` is refused."""

    key: str
    values: tuple[tuple[str, ExpertSelection], ...]


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts FFN (THEORY §18.7), declared per family; the sizes and the switches that vary between
    checkpoints (``n_experts``, ``n_experts_per_token``, ``moe_renormalize``, dense layers) are config fields.

    The roles: ``router.weight`` (+ optional ``router.bias``, and ``router.score_bias``, a bias added to the scores
    for the selection only), per-expert ``expert_gate/up/out.weight`` with an ``{expert}`` placeholder, or the fused
    ``experts_gate_up.weight`` / ``experts_out.weight`` over all experts (either set may be stored; the fused set
    may carry biases ``experts_gate_up.bias`` / ``experts_out.bias``, gpt-oss), and for shared
    experts ``shared_gate/up/out.weight`` (+ ``shared_router.weight`` for a sigmoid shared gate). A layer the
    config makes dense reads the family's plain FFN roles instead."""

    score: RouterScore
    selection: ExpertSelection = ExpertSelection.TOP_K
    shared_gate: SharedGate | None = None        # None: no shared experts
    fused_orientation: Orientation = Orientation.OUT_IN   # of each expert's slice of the fused tensors
    fused_packing: ExpertPacking = ExpertPacking.GATE_UP
    selection_switch: SelectionSwitch | None = None   # a config key that overrides ``selection``
    router_float32: bool = False   # the router's weights, selection bias and logits in float32 or wider, whatever the
                                   # compute dtype (DeepSeek keeps its router in float32)
    expert_glu: ExpertGLU = ExpertGLU.GATED


MOE_ROUTER_ROLES = {"router.weight", "router.bias", "router.score_bias"}
MOE_EXPERT_ROLES = {"expert_gate.weight", "expert_up.weight", "expert_out.weight"}
MOE_FUSED_ROLES = {"experts_gate_up.weight", "experts_out.weight"}
MOE_FUSED_BIAS_ROLES = {"experts_gate_up.bias", "experts_out.bias"}   # [E, 2m] (packed as the weight), [E, d]
MOE_SHARED_ROLES = {"shared_gate.weight", "shared_up.weight", "shared_out.weight", "shared_router.weight"}
MOE_ROLES = MOE_ROUTER_ROLES | MOE_EXPERT_ROLES | MOE_FUSED_ROLES | MOE_FUSED_BIAS_ROLES | MOE_SHARED_ROLES
CLAMPED_GLU_CONFIG = {"swiglu_alpha", "swiglu_limit"}


@dataclass(frozen=True)
class Layout:
    """Layout facts that decide how tensors are sliced and how the layer is wired."""

    orientation: Orientation
    qkv_packing: QKVPacking
    norm: NormKind
    residual: Residual
    positions: Positions
    rope_style: RopeStyle | None
    causal: bool
    ffn: FFNKind
    qk_norm: QKNorm | None = None   # None: logits are linear in the projections
    norm_weight: NormWeight = NormWeight.GAMMA
    embed_scale: EmbedScale = EmbedScale.NONE
    ffn_packing: FFNPacking = FFNPacking.SEPARATE
    identity_norm_attn: tuple[int, ...] = ()  # layers whose norm_attn is the identity (ModernBERT's layer 0)
    attn_sinks: bool = False  # a learned per-head logit (role ``sinks``, [H]) joins every softmax row and carries
                              # no value, so rows sum to less than 1 (gpt-oss, THEORY §18.4)
    attention: Attention = Attention.PROJECTIONS
    yarn_softmax_mscale: bool = False  # the softmax scale carries YaRN's mscale(factor, mscale_all_dim)^2 (DeepSeek)


@dataclass(frozen=True)
class ResidualSwitch:
    """A boolean config key that switches the residual wiring (NeoX ``use_parallel_residual``)."""

    key: str
    if_true: Residual
    if_false: Residual


@dataclass(frozen=True)
class QKNormSwitch:
    """A boolean config key that puts a q/k norm on the projections (Phi-2's ``qk_layernorm``)."""

    key: str
    if_true: QKNorm


@dataclass(frozen=True)
class RopeStyleSwitch:
    """A boolean config key that chooses the rotary pairing (DeepSeek-V3's ``rope_interleave``)."""

    key: str
    if_true: RopeStyle
    if_false: RopeStyle


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family, loaded from ``specs/<name>.json``."""

    name: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    config: dict[str, tuple[str, ...]]
    defaults: dict[str, Any]
    layout: Layout
    prefixes: tuple[str, ...]
    tensors: dict[str, tuple[str, ...]]
    head_tensors: dict[str, tuple[str, ...]]
    layer_tensors: dict[str, tuple[str, ...]]
    optional: frozenset[str] = field(default_factory=frozenset)
    tied: dict[str, str] = field(default_factory=dict)
    required_without_config: tuple[str, ...] = ()
    residual_switch: ResidualSwitch | None = None
    qk_norm_switch: QKNormSwitch | None = None
    ignorable: tuple[str, ...] = ()    # weights a scan does not use (templates, ``{layer}`` below the layer count)
    buffers: tuple[str, ...] = ()      # stored constants that are not weights (same templates); never value-checked
    unsupported_if_true: dict[str, str] = field(default_factory=dict)  # boolean field -> the layout it would switch on
    ignored_parts: dict[str, str] = field(default_factory=dict)  # name prefix -> the model part it holds (a vision
                                                                 # tower): not analysed, counted and reported
    rope_type_aliases: dict[str, str] = field(default_factory=dict)   # older rope type names -> the supported one
    rope_style_switch: RopeStyleSwitch | None = None
    rope_types: tuple[str, ...] = ()   # rope types of FAMILY_ROPE_TYPES this family reads (YaRN: DeepSeek)
    trailing_layer_part: str | None = None   # layers stored beyond n_layers (config field trailing_layers) hold this
                                             # model part: counted, reported and never read (DeepSeek's MTP layer)
    moe: MoESpec | None = None         # a mixture-of-experts FFN (THEORY §18.7); None: every layer is dense


_KEYS = {"name", "description", "match", "config", "defaults", "layout", "prefixes", "tensors", "head_tensors",
         "layer_tensors", "optional", "tied", "required_without_config", "residual_switch", "qk_norm_switch",
         "ignorable", "buffers", "unsupported_if_true", "rope_type_aliases", "ignored_parts", "rope_style_switch",
         "rope_types", "trailing_layer_part", "moe"}
_MOE_KEYS = {"score", "selection", "shared_gate", "fused_orientation", "fused_packing", "selection_switch",
             "router_float32", "expert_glu"}


_LAYOUT_KEYS = {"orientation", "qkv_packing", "norm", "residual", "positions", "rope_style", "causal", "ffn",
                "norm_weight", "embed_scale", "qk_norm", "ffn_packing", "norm_attn_identity_layers",
                "attn_sinks", "attention", "yarn_softmax_mscale"}


def _templates(mapping: dict[str, str | list[str]]) -> dict[str, tuple[str, ...]]:
    return {role: (t,) if isinstance(t, str) else tuple(t) for role, t in mapping.items()}


def parse_spec(data: dict[str, Any]) -> ArchSpec:
    """Build an :class:`ArchSpec` from its JSON form; unknown keys are an error."""
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"spec {data.get('name')!r}: unknown keys {sorted(unknown)}")
    unchecked = set(data["config"]) - set(CONFIG_FIELDS)
    if unchecked:
        raise ValueError(f"spec {data.get('name')!r}: config fields without a rule in CONFIG_FIELDS: {sorted(unchecked)}")
    if Positions(data["layout"]["positions"]) is Positions.LEARNED_PAD_OFFSET and \
            "pad_token_id" not in {**data["config"], **data.get("defaults", {})}:
        raise ValueError(f"spec {data.get('name')!r}: positions 'learned_pad_offset' need pad_token_id (config or "
                         "defaults)")
    lay = data["layout"]
    layout = Layout(
        orientation=Orientation(lay["orientation"]), qkv_packing=QKVPacking(lay["qkv_packing"]),
        norm=NormKind(lay["norm"]), residual=Residual(lay["residual"]), positions=Positions(lay["positions"]),
        rope_style=RopeStyle(lay["rope_style"]) if lay.get("rope_style") else None,
        causal=bool(lay["causal"]), ffn=FFNKind(lay["ffn"]),
        qk_norm=QKNorm(lay["qk_norm"]) if lay.get("qk_norm") else None,
        norm_weight=NormWeight(lay.get("norm_weight", "gamma")), embed_scale=EmbedScale(lay.get("embed_scale", "none")),
        ffn_packing=FFNPacking(lay.get("ffn_packing", FFNPacking.SEPARATE.value)),
        identity_norm_attn=tuple(lay.get("norm_attn_identity_layers", ())),
        attn_sinks=bool(lay.get("attn_sinks", False)),
        attention=Attention(lay.get("attention", Attention.PROJECTIONS.value)),
        yarn_softmax_mscale=bool(lay.get("yarn_softmax_mscale", False)),
    )
    unknown_layout = set(lay) - _LAYOUT_KEYS
    if unknown_layout:
        raise ValueError(f"spec {data.get('name')!r}: unknown layout keys {sorted(unknown_layout)}")
    _check_ffn_roles(data.get("name"), layout, set(data["layer_tensors"]), "moe" in data)
    if layout.identity_norm_attn:
        _check_identity_norm(data.get("name"), layout, set(data["tensors"]))
    switch = data.get("residual_switch")
    refused = dict(data.get("unsupported_if_true", {}))
    if set(refused) - set(data["config"]):
        raise ValueError(f"spec {data.get('name')!r}: unsupported_if_true names fields it does not read: "
                         f"{sorted(set(refused) - set(data['config']))}")
    qk_switch = data.get("qk_norm_switch")
    if qk_switch and qk_switch["key"] not in data["config"]:
        raise ValueError(f"spec {data.get('name')!r}: qk_norm_switch reads {qk_switch['key']!r}, not a config field")
    norm_roles = {r for r in data["layer_tensors"] if r in ("q_norm.weight", "k_norm.weight")}
    if (layout.qk_norm is None and not qk_switch) != (not norm_roles) or (norm_roles and len(norm_roles) != 2):
        raise ValueError(f"spec {data.get('name')!r}: a q/k norm (layout qk_norm or qk_norm_switch) and the "
                         "q_norm/k_norm tensors go together")
    if layout.attn_sinks != ("sinks" in data["layer_tensors"]):
        raise ValueError(f"spec {data.get('name')!r}: layout attn_sinks and the sinks layer tensor go together")
    if "sinks" in data.get("optional", ()):
        raise ValueError(f"spec {data.get('name')!r}: the sinks tensor cannot be optional (a missing sink logit "
                         "would silently change every softmax row)")
    if layout.residual.shared_norm and any(r.startswith("norm_ffn.") for r in data["layer_tensors"]):
        raise ValueError(f"spec {data.get('name')!r}: residual {layout.residual.value!r} shares norm_attn; "
                         "it declares no norm_ffn tensors")
    out_roles = {"norm_attn_out.weight", "norm_ffn_out.weight"}
    if layout.residual.output_norms and not out_roles <= set(data["layer_tensors"]):
        raise ValueError(f"spec {data.get('name')!r}: residual {layout.residual.value!r} needs layer tensors "
                         f"{sorted(out_roles)}")
    if not layout.residual.output_norms and any(r.split(".")[0] in ("norm_attn_out", "norm_ffn_out")
                                                for r in data["layer_tensors"]):
        raise ValueError(f"spec {data.get('name')!r}: residual {layout.residual.value!r} has no branch-output norms")
    if not layout.residual.input_norms and any(r.split(".")[0] in ("norm_attn", "norm_ffn")
                                               for r in data["layer_tensors"]):
        raise ValueError(f"spec {data.get('name')!r}: residual {layout.residual.value!r} has no norms before the "
                         "branches; it declares no norm_attn / norm_ffn tensors")
    if layout.attention is Attention.MLA:
        _check_mla(data.get("name"), layout, data)
    style_switch = data.get("rope_style_switch")
    if style_switch and style_switch["key"] not in data["config"]:
        raise ValueError(f"spec {data.get('name')!r}: rope_style_switch reads {style_switch['key']!r}, not a config "
                         "field")
    rope_types = tuple(data.get("rope_types", ()))
    if set(rope_types) - FAMILY_ROPE_TYPES:
        raise ValueError(f"spec {data.get('name')!r}: rope_types names {sorted(set(rope_types) - FAMILY_ROPE_TYPES)}; "
                         f"only {sorted(FAMILY_ROPE_TYPES)} are read per family")
    if bool(data.get("trailing_layer_part")) != ("trailing_layers" in data["config"]):
        raise ValueError(f"spec {data.get('name')!r}: trailing_layer_part and the config field trailing_layers go "
                         "together")
    moe = _parse_moe(data.get("name"), data.get("moe"), set(data["layer_tensors"]), set(data.get("optional", ())),
                     set(data["config"]))
    aliases = dict(data.get("rope_type_aliases", {}))
    if set(aliases.values()) - set(ROPE_SCALING_FIELDS):
        raise ValueError(f"spec {data.get('name')!r}: rope_type_aliases name unsupported rope types "
                         f"{sorted(set(aliases.values()) - set(ROPE_SCALING_FIELDS))}")
    return ArchSpec(
        name=data["name"], description=data["description"],
        model_types=tuple(data["match"].get("model_types", ())),
        architectures=tuple(data["match"].get("architectures", ())),
        config={k: tuple(v) for k, v in data["config"].items()},
        defaults=dict(data.get("defaults", {})), layout=layout, prefixes=tuple(data["prefixes"]),
        tensors=_templates(data["tensors"]), head_tensors=_templates(data.get("head_tensors", {})),
        layer_tensors=_templates(data["layer_tensors"]), optional=frozenset(data.get("optional", ())),
        tied=dict(data.get("tied", {})), required_without_config=tuple(data.get("required_without_config", ())),
        residual_switch=ResidualSwitch(switch["key"], Residual(switch["if_true"]), Residual(switch["if_false"]))
        if switch else None,
        qk_norm_switch=QKNormSwitch(qk_switch["key"], QKNorm(qk_switch["if_true"])) if qk_switch else None,
        ignorable=tuple(data.get("ignorable", ())), buffers=tuple(data.get("buffers", ())),
        unsupported_if_true=refused, rope_type_aliases=aliases, ignored_parts=dict(data.get("ignored_parts", {})),
        rope_style_switch=RopeStyleSwitch(style_switch["key"], RopeStyle(style_switch["if_true"]),
                                          RopeStyle(style_switch["if_false"])) if style_switch else None,
        rope_types=rope_types, trailing_layer_part=data.get("trailing_layer_part"),
        moe=moe,
    )


def _parse_moe(name: str | None, data: dict[str, Any] | None, roles: set[str], optional: set[str],
               fields: set[str]) -> MoESpec | None:
    """The ``moe`` block and the roles it needs: a router weight, a complete per-expert or fused expert set (or
    both), fused expert biases only beside the fused weights, shared-expert roles exactly when a shared gate is
    declared, the clamped SwiGLU's config fields where the experts use it, and a selection switch's config field."""
    declared = roles & MOE_ROLES
    if data is None:
        if declared:
            raise ValueError(f"spec {name!r}: MoE roles {sorted(declared)} need a 'moe' block")
        return None
    unknown = set(data) - _MOE_KEYS
    if unknown:
        raise ValueError(f"spec {name!r}: unknown moe keys {sorted(unknown)}")
    moe = MoESpec(score=RouterScore(data["score"]), selection=ExpertSelection(data.get("selection", "top_k")),
                  shared_gate=SharedGate(data["shared_gate"]) if data.get("shared_gate") else None,
                  fused_orientation=Orientation(data.get("fused_orientation", "out_in")),
                  fused_packing=ExpertPacking(data.get("fused_packing", "gate_up")),
                  selection_switch=_selection_switch(name, data.get("selection_switch"), fields),
                  router_float32=bool(data.get("router_float32", False)),
                  expert_glu=ExpertGLU(data.get("expert_glu", "gated")))
    if "router.weight" not in roles:
        raise ValueError(f"spec {name!r}: a 'moe' block needs the role router.weight")
    experts, fused = declared & MOE_EXPERT_ROLES, declared & MOE_FUSED_ROLES
    if experts not in (set(), MOE_EXPERT_ROLES) or fused not in (set(), MOE_FUSED_ROLES) or not experts | fused:
        raise ValueError(f"spec {name!r}: declare all of {sorted(MOE_EXPERT_ROLES)} (per expert) and/or all of "
                         f"{sorted(MOE_FUSED_ROLES)} (fused)")
    if declared & MOE_FUSED_BIAS_ROLES and not fused:
        raise ValueError(f"spec {name!r}: fused expert biases {sorted(declared & MOE_FUSED_BIAS_ROLES)} need the fused "
                         f"expert weights {sorted(MOE_FUSED_ROLES)}")
    if declared & MOE_FUSED_BIAS_ROLES and moe.expert_glu is ExpertGLU.GATED:
        raise ValueError(f"spec {name!r}: fused expert biases are read with expert_glu 'clamped_swiglu' (the gated "
                         "experts' bounds of THEORY §6.2 take none)")
    if moe.expert_glu is ExpertGLU.CLAMPED_SWIGLU and not CLAMPED_GLU_CONFIG <= fields:
        raise ValueError(f"spec {name!r}: expert_glu 'clamped_swiglu' reads config fields {sorted(CLAMPED_GLU_CONFIG)}")
    shared = declared & MOE_SHARED_ROLES
    want = set() if moe.shared_gate is None else {"shared_gate.weight", "shared_up.weight", "shared_out.weight"} | (
        {"shared_router.weight"} if moe.shared_gate is SharedGate.SIGMOID else set())
    if shared != want:
        raise ValueError(f"spec {name!r}: shared_gate {None if moe.shared_gate is None else moe.shared_gate.value!r} "
                         f"declares shared-expert roles {sorted(want)}; the spec has {sorted(shared)}")
    if declared & optional - {"router.bias", "router.score_bias"}:
        raise ValueError(f"spec {name!r}: only router.bias and router.score_bias may be optional MoE roles")
    return moe


def _selection_switch(name: str | None, data: dict[str, Any] | None, fields: set[str]) -> SelectionSwitch | None:
    if data is None:
        return None
    if set(data) != {"key", "values"} or data["key"] not in fields or not data["values"]:
        raise ValueError(f"spec {name!r}: a moe selection_switch has a 'key' among the config fields and a non-empty "
                         "'values' map")
    return SelectionSwitch(data["key"], tuple((k, ExpertSelection(v)) for k, v in data["values"].items()))


FFN_ROLES = {
    (FFNKind.MLP, FFNPacking.SEPARATE): {"ffn_in.weight", "ffn_out.weight"},
    (FFNKind.GATED, FFNPacking.SEPARATE): {"ffn_gate.weight", "ffn_up.weight", "ffn_out.weight"},
    (FFNKind.GATED, FFNPacking.GATE_UP): {"ffn_gate_up.weight", "ffn_out.weight"},
}
_FFN_WEIGHT_ROLES = {"ffn_in.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_gate_up.weight", "ffn_out.weight"}


def _check_ffn_roles(name: str | None, layout: Layout, roles: set[str], moe: bool = False) -> None:
    """The FFN weight roles a spec declares are exactly those its ``ffn`` kind and ``ffn_packing`` read (for dense
    layers; a mixture-of-experts family without dense layers declares none)."""
    want = FFN_ROLES.get((layout.ffn, layout.ffn_packing))
    if want is None:
        raise ValueError(f"spec {name!r}: ffn_packing {layout.ffn_packing.value!r} needs ffn 'gated'")
    got = roles & _FFN_WEIGHT_ROLES
    if moe and layout.ffn is not FFNKind.GATED:
        raise ValueError(f"spec {name!r}: mixture-of-experts layers need ffn 'gated' (the experts' form)")
    if got != want and not (moe and not got):
        raise ValueError(f"spec {name!r}: ffn {layout.ffn.value!r} with ffn_packing {layout.ffn_packing.value!r} "
                         f"declares FFN weights {sorted(want)}; the spec has {sorted(got)}")


MLA_ROLES = {"q_a.weight", "q_a_norm.weight", "q_b.weight", "kv_a.weight", "kv_a_norm.weight", "kv_b.weight"}
MLA_CONFIG = {"kv_lora_rank", "q_lora_rank", "qk_nope_dim", "rotary_dim", "v_head_dim"}
_PROJECTION_ROLES = {"k.weight", "v.weight", "qkv.weight", "k.bias", "v.bias", "qkv.bias", "q.bias"}


def _check_mla(name: str | None, layout: Layout, data: dict[str, Any]) -> None:
    """An MLA family declares the latent roles (and ``q.weight`` for checkpoints without a q rank), no per-head
    k/v projections, separate tensors, RoPE and the MLA sizes among its config fields (THEORY §18.8)."""
    roles = set(data["layer_tensors"])
    if not MLA_ROLES | {"q.weight"} <= roles or roles & _PROJECTION_ROLES or layout.qk_norm is not None:
        raise ValueError(f"spec {name!r}: attention 'mla' declares {sorted(MLA_ROLES | {'q.weight'})} (biases "
                         "q_a.bias, kv_a.bias optional) and no per-head k/v projections or q/k norms")
    if layout.qkv_packing is not QKVPacking.SEPARATE or layout.positions is not Positions.ROPE or \
            layout.norm is not NormKind.RMSNORM:
        raise ValueError(f"spec {name!r}: attention 'mla' needs qkv_packing 'separate', positions 'rope' and norm "
                         "'rmsnorm'")
    if MLA_CONFIG - set(data["config"]):
        raise ValueError(f"spec {name!r}: attention 'mla' reads config fields {sorted(MLA_CONFIG)}")


def _check_identity_norm(name: str | None, layout: Layout, tensors: set[str]) -> None:
    """An identity in place of N1 is supported in layer 0 of a pre-norm (or parallel) stack after an embedding norm:
    the MHA then reads h_0, the embedding norm's output, whose reset radius bounds it (THEORY §8.1); deeper layers
    would read the unnormalized residual stream, for which no reset radius exists."""
    if layout.identity_norm_attn != (0,):
        raise ValueError(f"spec {name!r}: norm_attn_identity_layers must be [0]; got {list(layout.identity_norm_attn)}")
    if layout.residual is Residual.POST or layout.residual.shared_norm or not layout.residual.input_norms:
        raise ValueError(f"spec {name!r}: norm_attn_identity_layers needs a pre-norm or parallel residual with two "
                         "norms")
    if "embed_norm.weight" not in tensors:
        raise ValueError(f"spec {name!r}: norm_attn_identity_layers needs an embedding norm (embed_norm.weight)")


def load_builtin_specs() -> dict[str, ArchSpec]:
    """All specs shipped as package data, keyed by family name."""
    specs = {}
    for entry in sorted(resources.files("attnstab_cli.arch").joinpath("specs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            spec = parse_spec(json.loads(entry.read_text(encoding="utf-8")))
            specs[spec.name] = spec
    return specs
