"""The calibration loss as a pure function of the layers' parameters, for Hessian-vector products (issue 6).

Same loss as ``scan --grad`` (next-token CE, masked-LM CE, or the probe; ``metrics/gradients.py``), same forward pass
(``model/blocks.run_layer``), but every layer's weights are resident at once: curvature couples all layers, so it
cannot stream one layer at a time. Embeddings and the head are constants; the parameters are the per-layer blocks
below, named ``"<layer>.<block>.<tensor>"``:

``attn_q``, ``attn_k``, ``attn_v`` (W_Q, W_K, W_V, each with its bias), ``attn_out`` (W_O, b_O), ``ffn_in`` (W_in, b_in or W_gate, W_up),
``ffn_out`` (W_out, b_out), ``norm_attn.gamma``, ``norm_attn.beta``, ``norm_ffn.gamma``, ``norm_ffn.beta`` (β only for
LayerNorm), with branch-output norms (THEORY §18.3) ``norm_attn_out.gamma``, ``norm_ffn_out.gamma`` (and β), and with
q/k norms on the projections (§18.2) ``q_norm.gamma``, ``k_norm.gamma`` (and β).
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnstab_cli.metrics.gradients import GradientFlow
from attnstab_cli.model.blocks import run_layer
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.model.weights import LayerWeights, NormWeights

BLOCK_FIELDS: dict[str, tuple[str, ...]] = {
    "attn_q": ("wq", "bq", "wq_a", "bq_a", "wq_b"),        # latent attention (THEORY §18.8): the q chain;
    "attn_k": ("wk", "bk", "wkv_a", "bkv_a"),            # the shared latent and rotary key;
    "attn_v": ("wv", "bv", "wkv_b"),                     # the per-head [k_nope; v] up-projection
    "attn_out": ("wo", "bo"),
    "ffn_in": ("ffn.w_in", "ffn.b_in", "ffn.w_gate", "ffn.w_up"),
    "ffn_out": ("ffn.w_out", "ffn.b_out"),
    "norm_attn.gamma": ("norm_attn.weight",),
    "norm_attn.beta": ("norm_attn.bias",),
    "norm_ffn.gamma": ("norm_ffn.weight",),
    "norm_ffn.beta": ("norm_ffn.bias",),
    "norm_attn_out.gamma": ("norm_attn_out.weight",),
    "norm_attn_out.beta": ("norm_attn_out.bias",),
    "norm_ffn_out.gamma": ("norm_ffn_out.weight",),
    "norm_ffn_out.beta": ("norm_ffn_out.bias",),
    "q_norm.gamma": ("q_norm.weight",),
    "q_norm.beta": ("q_norm.bias",),
    "k_norm.gamma": ("k_norm.weight",),
    "k_norm.beta": ("k_norm.bias",),
    "q_a_norm.gamma": ("q_a_norm.weight",),
    "kv_a_norm.gamma": ("kv_a_norm.weight",),
}
Params = dict[str, torch.Tensor]


def extract_params(w: LayerWeights) -> Params:
    """``"<layer>.<block>.<field>" -> tensor`` for every tensor the layer has (absent biases are skipped); a tensor
    reached twice (a norm shared by both branches) is named once, by its first block."""
    out: Params = {}
    seen: set[int] = set()
    for block, names in BLOCK_FIELDS.items():
        for name in names:
            value = _get(w, name)
            if value is not None and id(value) not in seen:
                seen.add(id(value))
                out[f"{w.layer}.{block}.{name}"] = value
    return out


def _get(w: LayerWeights, name: str) -> torch.Tensor | None:
    head, _, tail = name.partition(".")
    value = getattr(w, head)
    if isinstance(value, dict):
        return value.get(tail)
    if isinstance(value, NormWeights):
        return value.weight if tail == "weight" else value.bias
    return value                                   # a tensor, or None (no such norm in this layer)


def split_name(name: str) -> tuple[int, str, str]:
    """``"3.norm_attn.gamma.norm_attn.weight"`` -> ``(3, "norm_attn.gamma", "norm_attn.weight")``."""
    layer, rest = name.split(".", 1)
    block = next(b for b in sorted(BLOCK_FIELDS, key=len, reverse=True) if rest.startswith(b + "."))
    return int(layer), block, rest[len(block) + 1:]


def block_of(name: str) -> tuple[int, str]:
    """``(layer, block)`` of a parameter name."""
    layer, block, _ = split_name(name)
    return layer, block


def with_params(w: LayerWeights, params: Params) -> LayerWeights:
    """``w`` with each tensor named in ``params`` for its layer replaced (the others kept)."""
    given: Params = {}
    for key, value in params.items():
        layer, _, field = split_name(key)
        if layer == w.layer:
            given[field] = value
    if not given:
        return w
    changes: dict[str, Any] = {}
    ffn = dict(w.ffn)
    norms = {f.name: getattr(w, f.name) for f in fields(w) if isinstance(getattr(w, f.name), NormWeights)}
    for name, value in given.items():
        head, _, tail = name.partition(".")
        if head == "ffn":
            ffn[tail] = value
        elif head in norms:
            norm = norms[head]
            norms[head] = NormWeights(value, norm.bias) if tail == "weight" else NormWeights(norm.weight, value)
        else:
            changes[head] = value
    return replace(w, **changes, ffn=ffn, **norms)


class ModelLoss:
    """``L(params)``: the mean calibration loss with all layers resident; call with any subset of the parameters
    (the others keep their checkpoint values)."""

    def __init__(self, model: OpenModel, batches: list[torch.Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        self.cfg = model.cfg
        self.flow = GradientFlow(model, batches, torch.device(device), dtype, seed)
        stream = LayerStream(model, self.flow.loss.inputs, device, dtype)
        self.stream, self.h0 = stream, [h.detach() for h in stream.embed()]
        self.weights = [stream.loader.layer(layer) for layer in range(self.cfg.n_layers)]
        self.top = self.flow.load_top(stream)
        self.count = self.flow.count()
        self.params: Params = {k: v.detach() for w in self.weights for k, v in extract_params(w).items()}
        self.kind = self.flow.loss.kind

    def __call__(self, params: Params | None = None) -> torch.Tensor:
        layers = [with_params(w, params) for w in self.weights] if params else self.weights
        total = torch.zeros((), dtype=self.h0[0].dtype, device=self.h0[0].device)
        with sdpa_kernel([SDPBackend.MATH]):            # the fused kernels have no forward-mode AD (jvp of grad)
            for b, h in enumerate(self.h0):
                for w in layers:
                    h = run_layer(h, w, self.cfg, w.layer, b, self.stream.rope(h.shape[1], w.layer),
                                  self.stream.masks[b]).resid_out
                total = total + self.flow.top_loss(self.top, h, b)
        return total / self.count

    def blocks(self) -> dict[tuple[int, str], list[str]]:
        """(layer, block) -> parameter names, in layer then BLOCK_FIELDS order."""
        out: dict[tuple[int, str], list[str]] = {}
        for name in self.params:
            out.setdefault(block_of(name), []).append(name)
        return out
