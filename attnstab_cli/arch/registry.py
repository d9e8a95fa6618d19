"""Find the family spec for a checkpoint and bind its tensor templates to the checkpoint's real tensor names."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

from attnstab_cli.arch.spec import (MOE_EXPERT_ROLES, MOE_FUSED_BIAS_ROLES, MOE_FUSED_ROLES, MOE_ROLES, ArchSpec,
                                    Layout, load_builtin_specs)
from attnstab_cli.errors import InputError, UnsupportedError


@lru_cache(maxsize=1)
def builtin_specs() -> dict[str, ArchSpec]:
    """The shipped family specs (loaded once)."""
    return load_builtin_specs()


def supported_model_types() -> list[str]:
    return sorted(t for spec in builtin_specs().values() for t in spec.model_types)


def spec_by_name(name: str) -> ArchSpec:
    """Look a family up by spec name or by any of its ``model_type`` values (for ``--arch``)."""
    for spec in builtin_specs().values():
        if name == spec.name or name in spec.model_types:
            return spec
    raise UnsupportedError(f"unknown architecture {name!r}; supported: {', '.join(supported_model_types())}")


def match_spec(config: dict[str, Any]) -> ArchSpec:
    """The spec whose ``model_type`` (else ``architectures``) matches ``config.json``."""
    model_type = config.get("model_type")
    for spec in builtin_specs().values():
        if model_type in spec.model_types:
            return spec
    archs = config.get("architectures") or []
    for spec in builtin_specs().values():
        if any(a in spec.architectures for a in archs):
            return spec
    raise UnsupportedError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}",
        hint="--arch FAMILY reads a look-alike (a qwen2-layout model under another name, say) as a supported family; "
             "every tensor is then checked against that family's names and shapes, and a checkpoint with tensors the "
             "family does not read is refused. A new layout needs a spec: README, \"Adding a family\"",
    )


class TensorNames:
    """A spec bound to one checkpoint: canonical role (+ layer) -> the tensor name actually stored."""

    def __init__(self, spec: ArchSpec, keys: Iterable[str]) -> None:
        self.spec = spec
        self.ordered = list(dict.fromkeys(keys))    # file order, for messages
        self.keys = set(self.ordered)
        self.prefix = self._find_prefix()
        self.qk_norm = spec.layout.qk_norm is not None      # q/k norm roles exist (a config switch may turn them on)
        self.unused_roles: frozenset[str] = frozenset()     # role stems the resolved config leaves without tensors
        self.skipped_from: int | None = None                # layers from here on are the spec's trailing part
        self.moe_layers: tuple[bool, ...] | None = None     # per layer, once the config is known (use_moe)
        self.n_experts: int | None = None

    def use_layout(self, layout: Layout, low_rank_q: bool | None = None) -> None:
        """Bind the layout the config resolved: a q/k norm a config switch left off has no tensors; latent attention
        stores either one q projection or the low-rank q_a, q_a_norm, q_b (``low_rank_q``, from the q rank)."""
        self.qk_norm = layout.qk_norm is not None
        if low_rank_q is not None:
            self.unused_roles = frozenset({"q"} if low_rank_q else {"q_a", "q_a_norm", "q_b"})

    def skip_layers_from(self, layer: int) -> None:
        """Treat every stored layer from ``layer`` on as the spec's ``trailing_layer_part``: counted, never read."""
        self.skipped_from = layer

    def use_moe(self, moe_layers: tuple[bool, ...] | None, n_experts: int | None) -> None:
        """Bind the layers the config makes mixtures of experts and their number of experts: MoE roles exist in those
        layers only, the dense FFN roles in the others (THEORY §18.7)."""
        self.moe_layers, self.n_experts = moe_layers, n_experts

    def is_moe_layer(self, layer: int) -> bool:
        """Per the bound config; before it is known, whether the layer's router tensor is stored."""
        if self.spec.moe is None:
            return False
        if self.moe_layers is not None:
            return layer < len(self.moe_layers) and self.moe_layers[layer]
        return any(self.prefix + t.format(layer=layer) in self.keys for t in self.spec.layer_tensors["router.weight"])

    def stores_routers(self) -> bool:
        """Whether any layer stores a router tensor: what tells a mixture-of-experts checkpoint from a dense one of
        the same attention layout when there is no config to say."""
        templates = tuple(self.spec.layer_tensors.get("router.weight", ()))
        return any(self._matches(templates, name, 1 << 30) for name in self.keys)

    def fused_experts(self, layer: int) -> bool:
        """Whether the layer stores its experts fused (one tensor over all experts) rather than one per expert."""
        if not self.spec.moe or not MOE_FUSED_ROLES <= set(self.spec.layer_tensors):
            return False
        if not MOE_EXPERT_ROLES <= set(self.spec.layer_tensors):
            return True
        return any(self.prefix + t.format(layer=layer) in self.keys
                   for role in MOE_FUSED_ROLES for t in self.spec.layer_tensors[role])

    def is_expert_role(self, role: str) -> bool:
        """A role stored once per expert (its templates hold ``{expert}``)."""
        return role in MOE_EXPERT_ROLES

    def layer_roles(self, layer: int) -> list[tuple[str, int | None]]:
        """``(role, expert)`` of every layer role that applies to ``layer`` (one entry per expert for a per-expert
        role, expert None otherwise)."""
        out: list[tuple[str, int | None]] = []
        for role in self.spec.layer_tensors:
            if not self._templates(role, layer):
                continue
            if self.is_expert_role(role):
                out.extend((role, e) for e in range(self.n_experts or 1))
            else:
                out.append((role, None))
        return out

    def _find_prefix(self) -> str:
        for prefix in self.spec.prefixes:
            if any(prefix + t in self.keys for t in self.spec.tensors["embed_tokens.weight"]):
                return prefix
        expected = [p + t for p in self.spec.prefixes for t in self.spec.tensors["embed_tokens.weight"]]
        raise InputError(f"no token-embedding tensor of family {self.spec.name!r} (expected one of {expected}); "
                         f"the checkpoint holds e.g. {name_examples(self.ordered)}")

    def _templates(self, role: str, layer: int | None, expert: int | None = None) -> list[str]:
        if not self.qk_norm and role.split(".")[0] in ("q_norm", "k_norm") or role.split(".")[0] in self.unused_roles:
            return []
        if layer is not None and role.startswith("norm_attn.") and layer in self.spec.layout.identity_norm_attn:
            return []                                       # this layer's N1 is the identity: no tensor exists
        if layer is not None and self.spec.moe is not None and not self._applies(role, layer):
            return []
        if layer is not None:
            return [self.prefix + t.format(layer=layer, expert=expert or 0)
                    for t in self.spec.layer_tensors.get(role, ())]
        if role in self.spec.head_tensors:
            return [p + t for t in self.spec.head_tensors[role] for p in ("", self.prefix)]
        return [self.prefix + t for t in self.spec.tensors.get(role, ())]

    def _applies(self, role: str, layer: int) -> bool:
        """In a mixture-of-experts family: MoE roles in MoE layers (the stored expert set, per expert or fused),
        the dense FFN roles in the other layers (THEORY §18.7)."""
        moe = self.is_moe_layer(layer)
        if role.startswith("ffn_"):
            return not moe
        if role not in MOE_ROLES:
            return True
        if not moe:
            return False
        if role in MOE_EXPERT_ROLES:
            return not self.fused_experts(layer)
        return role not in MOE_FUSED_ROLES | MOE_FUSED_BIAS_ROLES or self.fused_experts(layer)

    def declares(self, role: str, layer: int | None = None) -> bool:
        """Whether the family has a tensor for ``role`` (in ``layer``) at all."""
        return bool(self._templates(role, layer)) or role in self.spec.tied

    def find(self, role: str, layer: int | None = None, expert: int | None = None) -> str | None:
        """Stored name for ``role`` (of ``expert`` for a per-expert role; following ``tied``), or None when absent."""
        for name in self._templates(role, layer, expert):
            if name in self.keys:
                return name
        if role in self.spec.tied:
            return self.find(self.spec.tied[role], layer)
        return None

    def require(self, role: str, layer: int | None = None, expert: int | None = None) -> str | None:
        """Like :meth:`find`, but a declared, non-optional role that is absent is an :class:`InputError`.

        A role the family does not declare at all (an RMSNorm bias, say) is simply None.
        """
        name = self.find(role, layer, expert)
        if name is None and role not in self.spec.optional and self._templates(role, layer, expert):
            raise InputError(f"missing tensor for {role}" + (f" of expert {expert}" if expert is not None else "")
                             + (f" in layer {layer}" if layer is not None else "")
                             + f": expected {' or '.join(self._templates(role, layer, expert))}")
        return name

    def count_layers(self) -> int:
        """Number of layers, from the highest ``{layer}`` index of the first layer template."""
        role = next(r for r in self.spec.layer_tensors if r not in self.spec.optional)
        found = set()
        for template in self.spec.layer_tensors[role]:
            pattern = _template_pattern(self.prefix + template)
            found |= {int(m.group(1)) for k in self.keys if (m := pattern.fullmatch(k))}
        return max(found) + 1 if found else 0

    def required_layer_roles(self) -> list[str]:
        return [r for r in self.spec.layer_tensors if r not in self.spec.optional]

    def check_layers_match(self) -> None:
        """An :class:`InputError` when no stored name matches the family's layer templates (another family)."""
        if self.count_layers():
            return
        role = self.required_layer_roles()[0]
        unbound = [k for k in self.ordered if k not in self.bound(0)]
        raise InputError(f"no tensor matches the layer names of family {self.spec.name!r} (e.g. "
                         f"{self._templates(role, 0)[0]!r}); the checkpoint holds e.g. {name_examples(unbound)}",
                         hint=f"the checkpoint is of another family; supported: {', '.join(supported_model_types())}")

    def bound(self, n_layers: int) -> dict[str, tuple[str, int | None]]:
        """Stored name -> (role, layer or None) of every tensor the spec reads, in layers below ``n_layers``."""
        out: dict[str, tuple[str, int | None]] = {}
        for role in (*self.spec.tensors, *self.spec.head_tensors):
            if (name := self.find(role)) is not None:
                out.setdefault(name, (role, None))
        for layer in range(n_layers):
            for role, expert in self.layer_roles(layer):
                if (name := self.find(role, layer, expert)) is not None:
                    out.setdefault(name, (role, layer))
        return out

    def is_buffer(self, name: str, n_layers: int) -> bool:
        """Whether ``name`` is one of the family's stored constants (a causal mask, a rotary cache)."""
        return self._matches(self.spec.buffers, name, n_layers)

    def unread(self, n_layers: int) -> list[str]:
        """Stored names the spec neither reads nor declares ignorable, a buffer or part of an ignored model part, in
        file order."""
        bound = self.bound(n_layers)
        return [k for k in self.ordered if k not in bound and not self.is_buffer(k, n_layers)
                and not self._matches(self.spec.ignorable, k, n_layers) and self.ignored_part(k) is None]

    def ignored_part(self, name: str) -> str | None:
        """The model part (``ignored_parts``) that tensor ``name`` belongs to, at the top level or under ``model.``;
        or the trailing layer part, for a name in a layer from :attr:`skipped_from` on."""
        for prefix, part in self.spec.ignored_parts.items():
            if name.startswith(prefix) or name.startswith("model." + prefix):
                return part
        if self.skipped_from is not None and (m := self._layer_stem().match(name)) \
                and int(m.group(1)) >= self.skipped_from:
            return self.spec.trailing_layer_part
        return None

    def _layer_stem(self) -> re.Pattern[str]:
        """``<prefix>layers.(N).`` as the family's layer templates begin (every tensor of stored layer N)."""
        template = self.spec.layer_tensors[self.required_layer_roles()[0]][0]
        stem = self.prefix + template.split("{layer}")[0]
        return re.compile(re.escape(stem) + r"(\d+)\.")

    def ignored_parts(self) -> dict[str, int]:
        """Model part -> number of its tensors in the checkpoint, for the parts the family does not analyse."""
        counts: dict[str, int] = {}
        for name in self.ordered:
            if (part := self.ignored_part(name)) is not None:
                counts[part] = counts.get(part, 0) + 1
        return counts

    def _matches(self, templates: tuple[str, ...], name: str, n_layers: int) -> bool:
        for template in templates:
            for prefix in dict.fromkeys(("", self.prefix)):
                m = _template_pattern(prefix + template).fullmatch(name)
                if m and all(int(g) < n_layers for g in m.groups()):
                    return True
        return False


@lru_cache(maxsize=None)
def _template_pattern(template: str) -> re.Pattern[str]:
    """A ``{layer}`` template as a regular expression whose groups are the layer indices."""
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
                      .replace(re.escape("{expert}"), r"(?:\d+)"))


def name_examples(names: Iterable[str], limit: int = 3) -> str:
    """A few stored tensor names, quoted, for an error line."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (of {len(names)})" if len(names) > limit else "") if names else "no tensors"


def infer_spec_from_tensors(keys: Iterable[str]) -> ArchSpec:
    """Score every family on layer-0 tensor names; exactly one complete match wins (bare ``.safetensors``)."""
    keys = set(keys)
    complete, partial = [], []
    for spec in builtin_specs().values():
        try:
            names = TensorNames(spec, keys)
        except InputError:
            continue
        roles = names.required_layer_roles()
        hits = sum(names.find(r, 0) is not None or not names.declares(r, 0) for r in roles)
        if spec.moe is not None and not names.stores_routers():
            hits = min(hits, len(roles) - 1)          # no expert anywhere: a dense model, not this MoE family
        (complete if hits == len(roles) else partial).append((hits / len(roles), spec.name))
    if len(complete) == 1:
        return builtin_specs()[complete[0][1]]
    if len(complete) > 1:
        raise InputError(f"ambiguous architecture: tensor names match {', '.join(n for _, n in complete)}",
                         hint="pass --arch to choose")
    best = max(partial, default=None)
    detail = f" (best partial match: {best[1]}, {best[0]:.0%} of layer tensors)" if best else ""
    raise UnsupportedError(f"cannot infer the architecture from tensor names{detail}",
                           hint=f"pass --arch; supported: {', '.join(supported_model_types())}")
