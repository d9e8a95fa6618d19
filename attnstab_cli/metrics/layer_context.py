"""What every metric pass of one layer shares, built once per layer while its weights are resident.

The context holds the head and full-matrix norms, the FFN norms, tier 1 (the weights-only Lipschitz bound, §7), the
magnitude-reset radius of the attention input (§4, §7) and the embedding radius behind it for post-norm models (and,
without norms before the branches, the depth-linear radius of the residual stream, §18.3), plus
what a pass publishes for the trace in hand: the per-row θ_hi of the θ pass (the bound input of tier 2, §5.2).
Weights are kept on the host, where the bound arithmetic runs; tier 3's float32 / float64 copies are made on demand.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch

from attnstab_cli.arch.spec import Residual
from attnstab_cli.metrics.lipschitz import (HeadNorms, WeightsTier, advance_stream_radius, compute_first_layer_radius,
                                            compute_layer_head_norms, compute_r2_in_reset, compute_weights_tier)
from attnstab_cli.metrics.lipschitz.layer import FFNNorms, compute_layer_ffn_norms
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.traces import LayerTrace
from attnstab_cli.model.weights import LayerWeights, NormWeights


def to_cpu(obj: Any) -> Any:
    """A CPU copy of a trace, its weights and everything in them (the bound arithmetic runs on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: to_cpu(getattr(obj, f.name)) for f in fields(obj) if f.init})
    return obj


def to_dtype(w: LayerWeights, dtype: torch.dtype) -> LayerWeights:
    """A CPU copy of one layer's weights in ``dtype`` (tier 3 searches in float32 and certifies in float64, §8.3)."""
    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to("cpu", dtype)
        if isinstance(value, NormWeights):
            return NormWeights(cast(value.weight), None if value.bias is None else cast(value.bias))
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        if is_dataclass(value) and not isinstance(value, type):          # the MoE weights
            return replace(value, **{f.name: cast(getattr(value, f.name)) for f in fields(value)})
        return value
    return replace(w, **{f.name: cast(getattr(w, f.name)) for f in fields(w)})


@dataclass
class LayerContext:
    """One layer's shared quantities (module docstring); ``theta_hi`` is replaced for every trace by the θ pass."""

    layer: int
    weights: LayerWeights                      # host copy
    norms: HeadNorms
    ffn_norms: FFNNorms
    weights_tier: WeightsTier
    r2_reset: float
    first_radius: float | None                 # the radius of h_0 where a layer reads it (post-norm; identity N1)
    theta_hi: list[torch.Tensor] | None = None     # per sequence of the current trace: θ_hi + slack, [H, T]
    copies: dict[torch.dtype, LayerWeights] = field(default_factory=dict)

    def weights_in(self, dtype: torch.dtype) -> LayerWeights:
        """A CPU copy of the layer's weights in ``dtype``, made once and only when tier 3 runs."""
        if dtype not in self.copies:
            self.copies[dtype] = to_dtype(self.weights, dtype)
        return self.copies[dtype]


class LayerContexts:
    """Builds each layer's context once, in stream order; the reset radius of layer l reads layer l-1's last norm,
    or, without norms before the branches, the radius of h_l accumulated over layers 0..l-1."""

    def __init__(self, model: OpenModel) -> None:
        self.model, self.cfg = model, model.cfg
        self.first_radius: float | None = None
        self.prev_norm_ffn: NormWeights | None = None
        self.stream_radius: float | None = None     # radius of h_l for the layer about to be built (§18.3)
        self.current: LayerContext | None = None

    def for_trace(self, trace: LayerTrace) -> LayerContext:
        """The context of ``trace``'s layer, built on the layer's first trace."""
        w = trace.weights
        assert w is not None, "the layer stream hands every trace its weights"
        if self.current is not None and self.current.layer == w.layer:
            return self.current
        if w.wo.device.type != "cpu":
            w = to_cpu(w)
        first = self._first_radius(w)
        if not self.cfg.layout.residual.input_norms:
            if w.layer == 0:
                self.stream_radius = first
            r2_reset = compute_r2_in_reset(self.cfg, w, stream_radius=self.stream_radius)
            self.stream_radius = advance_stream_radius(self.cfg, w, r2_reset)
        else:
            r2_reset = compute_r2_in_reset(self.cfg, w, self.prev_norm_ffn, first)
            self.prev_norm_ffn = NormWeights(w.norm_ffn.weight.detach().clone(),
                                             None if w.norm_ffn.bias is None else w.norm_ffn.bias.detach().clone())
        norms = compute_layer_head_norms(w, self.cfg).to("cpu")
        ffn_norms = compute_layer_ffn_norms(w)
        tier1 = compute_weights_tier(w, self.cfg, r2_reset, norms, ffn_norms)
        self.current = LayerContext(w.layer, w, norms, ffn_norms, tier1, r2_reset, self.first_radius)
        return self.current

    def start_at(self, layer: int) -> None:
        """Prepare to build layer ``layer``'s context first (a scan of one layer): the state the stream would have
        left, read from the weights of layers 0..layer-1 (post-LN: the previous LN2; without norms before the
        branches: the radius of h_layer)."""
        if layer == 0:
            return
        loader = self.model.loader()
        if self.cfg.layout.residual.input_norms:
            self.prev_norm_ffn = loader.layer(layer - 1).norm_ffn
            return
        radius = self._first_radius(loader.layer(0))
        for m in range(layer):
            radius = advance_stream_radius(self.cfg, loader.layer(m), radius)
        self.stream_radius = radius

    def release(self) -> None:
        """Forget the current layer's context (the next trace of the same layer would rebuild it)."""
        self.current = None

    def _first_radius(self, w: LayerWeights) -> float | None:
        """The radius of h_0 (§8.1), read from the embedding tensors once, at layer 0: for post-norm stacks, for
        a layer 0 whose N1 is the identity and for stacks without norms before the branches (R_emb of §18.3)."""
        reads_h0 = self.cfg.layout.residual is Residual.POST or w.norm_attn.identity
        if reads_h0 and w.layer == 0 and self.first_radius is None:
            loader, names = self.model.loader(), self.model.names
            norm = loader.norm("embed_norm") if names.find("embed_norm.weight") else None
            tok = loader.tensor("embed_tokens.weight") if norm is None else None
            pos = loader.tensor("embed_positions.weight") if norm is None and names.find("embed_positions.weight") \
                else None
            scale = 1.0 if tok is None else self.cfg.embed_multiplier(tok.dtype)
            self.first_radius = compute_first_layer_radius(self.cfg.layout.norm, norm, tok, pos, tok_scale=scale)
        return self.first_radius
