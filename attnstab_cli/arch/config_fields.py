"""The type and range of every canonical config field a family spec may read, and the one check that applies them.

A spec's ``config`` map names, per canonical field, the ``config.json`` keys to read it from; this table says what a
valid value of that field is. :func:`parse_spec` refuses a spec that reads a field without a rule here, so a new
family gets the checks for free and a new field cannot be read unchecked. Null means absent everywhere.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from attnstab_cli.errors import AttnstabError, InputError, UnsupportedError


@dataclass(frozen=True)
class Integer:
    """A JSON integer from ``min`` to 2^53, the largest a JSON number holds exactly (an integral float such as ``4.0``
    is accepted, a bool or a string is not)."""

    min: int = 1

    @property
    def expected(self) -> str:
        return f"an integer from {self.min} to 2^53"

    def convert(self, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        return int(value) if self.min <= value <= 2**53 else None


@dataclass(frozen=True)
class Real:
    """A finite JSON number in ``[min, max]`` (``(min, max]`` when ``min_open``)."""

    min: float = 0.0
    min_open: bool = False
    max: float = math.inf

    @property
    def expected(self) -> str:
        low = f"> {self.min:g}" if self.min_open else f">= {self.min:g}"
        return f"a finite number {low}" + (f" and <= {self.max:g}" if self.max < math.inf else "")

    def convert(self, value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        x = float(value)
        if not math.isfinite(x) or x > self.max or x < self.min or (self.min_open and x == self.min):
            return None
        return x


@dataclass(frozen=True)
class Boolean:
    expected: str = "true or false"

    def convert(self, value: Any) -> bool | None:
        return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class Text:
    expected: str = "a string"

    def convert(self, value: Any) -> str | None:
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TextList:
    """A list of strings, each one of ``choices``."""

    choices: tuple[str, ...]

    @property
    def expected(self) -> str:
        return f"a list of {' / '.join(repr(c) for c in self.choices)}"

    def convert(self, value: Any) -> list[str] | None:
        if not isinstance(value, list) or not all(isinstance(v, str) and v in self.choices for v in value):
            return None
        return list(value)


@dataclass(frozen=True)
class IntegerList:
    """A JSON list (possibly empty) of integers, each per ``item`` (layer indices such as ``mlp_only_layers``)."""

    item: Integer

    @property
    def expected(self) -> str:
        return f"a list of integers from {self.item.min} to 2^53"

    def convert(self, value: Any) -> tuple[int, ...] | None:
        if not isinstance(value, list):
            return None
        items = [self.item.convert(v) for v in value]
        return None if any(v is None for v in items) else tuple(items)


@dataclass(frozen=True)
class RealList:
    """A non-empty JSON list of finite numbers, each per ``item`` (LongRoPE's per-frequency factors)."""

    item: Real

    @property
    def expected(self) -> str:
        return f"a non-empty list of numbers, each {self.item.expected.removeprefix('a finite number ')}"

    def convert(self, value: Any) -> tuple[float, ...] | None:
        if not isinstance(value, list) or not value:
            return None
        items = [self.item.convert(v) for v in value]
        return None if any(v is None for v in items) else tuple(items)


@dataclass(frozen=True)
class Object:
    """A JSON object; its entries are checked by :func:`check_rope_scaling`."""

    expected: str = "an object"

    def convert(self, value: Any) -> dict[str, Any] | None:
        return dict(value) if isinstance(value, dict) else None


Rule = Integer | Real | Boolean | Text | TextList | IntegerList | RealList | Object

POSITIVE = Integer(1)
FRACTION = Real(0.0, min_open=True, max=1.0)
CONFIG_FIELDS: dict[str, Rule] = {
    "n_layers": POSITIVE, "d_model": POSITIVE, "n_heads": POSITIVE, "n_kv_heads": POSITIVE, "head_dim": POSITIVE,
    "d_ff": POSITIVE, "vocab_size": POSITIVE, "max_positions": POSITIVE, "type_vocab_size": POSITIVE,
    # 0 is no window (Qwen2-MoE writes 0 when use_sliding_window is false)
    "sliding_window": Integer(0), "pad_token_id": Integer(0), "original_max_positions": POSITIVE,
    "local_attention": POSITIVE, "global_every": POSITIVE, "rope_theta_sliding": Real(1.0),
    "rope_scaling_sliding": Object(), "head_activation": Text(), "mlp_bias": Boolean(),
    "norm_eps": Real(0.0, min_open=True), "rope_theta": Real(1.0), "rotary_fraction": FRACTION, "rotary_dim": POSITIVE,
    "activation": Text(), "rope_scaling": Object(),
    "layer_types": TextList(("full_attention", "sliding_attention")),
    "tie_embeddings": Boolean(), "use_sliding_window": Boolean(), "use_parallel_residual": Boolean(),
    "scale_attn_weights": Boolean(), "scale_attn_by_inverse_layer_idx": Boolean(), "qk_layernorm": Boolean(),
    # Gemma 2 (THEORY §18.5, §18.6): s = query_pre_attn_scalar^(-1/2); logit caps c tanh(x / c); without
    # layer_types, every sliding_period-th layer (1-based) is global and the others slide
    "query_pre_attn_scalar": Real(0.0, min_open=True), "attn_logit_cap": Real(0.0, min_open=True),
    "final_logit_cap": Real(0.0, min_open=True), "sliding_period": POSITIVE,
    "bidirectional_attention": Boolean(),
    # multi-head latent attention (DeepSeek, THEORY §18.8): q and kv latent ranks (no q rank: one q projection),
    # the per-head non-rotary q/k width (the rotary width is rotary_dim) and the value width
    "q_lora_rank": POSITIVE, "kv_lora_rank": POSITIVE, "qk_nope_dim": POSITIVE, "v_head_dim": POSITIVE,
    "rope_interleave": Boolean(),
    # layers stored after the n_layers analysed ones (DeepSeek's multi-token-prediction layer): never read
    "trailing_layers": Integer(0),
    # mixture-of-experts FFNs (THEORY §18.7): E experts, k per token, the experts' (and shared experts') hidden
    # width, whether the k gates are renormalized to sum 1, the dense layers (listed, every layer whose 1-based index
    # is not a multiple of moe_sparse_step, the first moe_first_dense), a factor on the routed gates, and DeepSeek's
    # groups (n_group groups, the best topk_group of them searched); DeepSeek: n_shared_experts shared experts of
    # width d_ff_expert, run as one FFN n_shared_experts * d_ff_expert wide, the selection's name (topk_method) and
    # moe_layer_freq (read to refuse any value but 1, which transformers ignores)
    "n_experts": POSITIVE, "n_experts_per_token": POSITIVE, "d_ff_expert": POSITIVE, "d_ff_shared": POSITIVE,
    "moe_renormalize": Boolean(), "moe_dense_layers": IntegerList(Integer(0)), "moe_sparse_step": POSITIVE,
    "moe_first_dense": Integer(0), "routed_scaling_factor": Real(0.0, min_open=True), "n_group": POSITIVE,
    "topk_group": POSITIVE, "n_shared_experts": POSITIVE, "moe_topk_method": Text(), "moe_layer_freq": POSITIVE,
    # gpt-oss's clamped SwiGLU experts: the sigmoid's gain alpha and the clamp limit (THEORY §18.7)
    "swiglu_alpha": Real(0.0, min_open=True), "swiglu_limit": Real(0.0, min_open=True),
}

# Entries of ``rope_scaling`` / ``rope_parameters`` per rope type: (required, rules). Other entries are not read.
# A RoPE base or scaling factor below 1 (Hugging Face requires factor >= 1) would make float32 angles overflow.
FACTOR = Real(1.0)
ROPE_SCALING_FIELDS: dict[str, tuple[tuple[str, ...], dict[str, Rule]]] = {
    "default": ((), {}),
    "linear": (("factor",), {"factor": FACTOR}),
    "dynamic": (("factor",), {"factor": FACTOR}),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               {"factor": FACTOR, "low_freq_factor": Real(0.0, min_open=True),
                "high_freq_factor": Real(0.0, min_open=True), "original_max_position_embeddings": POSITIVE}),
    # LongRoPE (Phi-3): per-frequency divisors, short for sequences up to the original context, long beyond it;
    # original_max_position_embeddings may instead sit at the top level of the config (it then takes priority)
    "longrope": (("short_factor", "long_factor"),
                 {"short_factor": RealList(Real(0.0, min_open=True)), "long_factor": RealList(Real(0.0, min_open=True)),
                  "factor": FACTOR, "attention_factor": Real(0.0, min_open=True),
                  "original_max_position_embeddings": POSITIVE}),
    # YaRN (DeepSeek): NTK-by-parts frequencies between the original and the scaled ones; cos and sin times an attention
    # factor (given, or from mscale / mscale_all_dim and factor); DeepSeek's softmax scale also carries
    # mscale(factor, mscale_all_dim)^2 (layout yarn_softmax_mscale)
    "yarn": (("factor", "original_max_position_embeddings"),
             {"factor": FACTOR, "original_max_position_embeddings": POSITIVE,
              "attention_factor": Real(0.0, min_open=True), "beta_fast": Real(0.0, min_open=True),
              "beta_slow": Real(0.0, min_open=True), "mscale": Real(0.0), "mscale_all_dim": Real(0.0),
              "truncate": Boolean()}),
}
# Rope types a family reads only when its spec lists them (``rope_types``): their conventions were checked against
# that family's reference alone.
FAMILY_ROPE_TYPES = frozenset({"yarn"})
ROPE_SCALING_COMMON: dict[str, Rule] = {"rope_theta": Real(1.0), "partial_rotary_factor": FRACTION}


def show_value(value: Any, limit: int = 60) -> str:
    """A value as it appears in JSON, shortened for an error line."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_field(rule: Rule, subject: str, value: Any, error: type[AttnstabError] = InputError) -> Any:
    """``value`` converted per ``rule``; otherwise ``error`` naming the subject (``config key 'n_head'``, ``option
    --n-heads``), the value and what was expected."""
    converted = rule.convert(value)
    if converted is None:
        raise error(f"{subject} is {show_value(value)}; expected {rule.expected}")
    return converted


def rope_type_of(scaling: Mapping[str, Any]) -> tuple[str, Any]:
    """``(entry, rope type)`` of a rope scaling object (``rope_type``, or the older ``type``; default ``default``)."""
    entry = "rope_type" if "rope_type" in scaling else "type"
    value = scaling.get(entry)
    return entry, "default" if value is None else value


def check_rope_scaling(key: str, scaling: Mapping[str, Any], family_types: tuple[str, ...] = ()) -> None:
    """Check the entries of the rope scaling object read from config key ``key`` against its rope type's rules; a
    type of :data:`FAMILY_ROPE_TYPES` only where the family lists it (``family_types``)."""
    entry, rope_type = rope_type_of(scaling)
    if not isinstance(rope_type, str):
        raise InputError(f"config key '{key}.{entry}' is {show_value(rope_type)}; expected a string")
    supported = [t for t in ROPE_SCALING_FIELDS if t not in FAMILY_ROPE_TYPES or t in family_types]
    if rope_type not in supported:
        raise UnsupportedError(f"unsupported rope_scaling type {rope_type!r} (config key '{key}.{entry}'); "
                               f"supported: {', '.join(supported)}")
    required, rules = ROPE_SCALING_FIELDS[rope_type]
    for name in required:
        if scaling.get(name) is None:
            raise InputError(f"config key {key!r} of rope type {rope_type!r} lacks {name!r}; expected "
                             f"{rules[name].expected}")
    for name, rule in {**ROPE_SCALING_COMMON, **rules}.items():
        if scaling.get(name) is not None:
            check_field(rule, f"config key '{key}.{name}'", scaling[name])
    if rope_type == "llama3" and float(scaling["high_freq_factor"]) <= float(scaling["low_freq_factor"]):
        raise InputError(f"config key '{key}.high_freq_factor' is {show_value(scaling['high_freq_factor'])}; "
                         f"expected a number > low_freq_factor {show_value(scaling['low_freq_factor'])}")
