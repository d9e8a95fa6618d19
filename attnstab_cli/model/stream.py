"""Layer-streaming forward pass: embeddings, then one layer's weights at a time over every calibration batch.

Only the current layer's weights are resident on the compute device; the hidden states of all calibration batches
are carried from layer to layer. Each (layer, batch) yields a :class:`LayerTrace` for the metrics, which must not
keep references to it beyond what they aggregate (memory stays flat in depth).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from attnstab_cli.arch.spec import NormKind, Positions
from attnstab_cli.errors import UsageError
from attnstab_cli.model.blocks import apply_norm, run_layer
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.rope import compute_rope_cos_sin
from attnstab_cli.model.traces import LayerTrace
from attnstab_cli.model.weights import WeightLoader


def position_ids(ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The row of the learned position table each token of ``ids [B, T]`` reads, ``[B, T]`` long.

    ``learned_pad_offset`` numbers from the token ids, as fairseq does: the k-th non-pad token of a row reads row
    pad_token_id + k, every pad token row pad_token_id (a pad inside a row shifts the tokens after it).
    """
    if cfg.layout.positions is Positions.LEARNED_PAD_OFFSET:
        real = ids.ne(cfg.pad_token_id).long()
        return real.cumsum(dim=1) * real + cfg.pad_token_id
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)


def check_finite_hidden(hidden: torch.Tensor, dtype: torch.dtype, where: str, source: str | None = None) -> None:
    """A :class:`UsageError` when ``hidden`` holds inf or NaN. Every weight was checked finite and within the
    compute dtype before the scan, so this is the forward pass overflowing ``dtype``: the numbers that would follow
    are not the model's, and a narrower dtype than the activations need is the user's choice to change."""
    bad = ~torch.isfinite(hidden)
    if bool(bad.any()):
        name = str(dtype).removeprefix("torch.")
        hint = "rerun with --dtype float32 (the default)" if dtype in (torch.float16, torch.bfloat16) else \
            "rerun with --dtype float64"
        raise UsageError(f"{where}: {int(bad.sum())} hidden values overflowed {name} in the forward pass, although "
                         f"every weight is finite", hint=hint, path=source)


class LayerStream:
    """Runs ``batches`` (each ``[B, T]`` token ids) through ``model`` layer by layer."""

    def __init__(self, model: OpenModel, batches: list[torch.Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, key_padding_masks: list[torch.Tensor | None] | None = None,
                 first_seqs: list[int] | None = None) -> None:
        self.model, self.cfg, self.device, self.dtype = model, model.cfg, torch.device(device), dtype
        self.loader: WeightLoader = model.loader(self.device, dtype)
        self.batches = [b.to(self.device) for b in batches]
        # the global index of each batch's first sequence (a rank's share starts past the other ranks')
        self.first_seqs = first_seqs if first_seqs is not None else \
            [sum(int(b.shape[0]) for b in batches[:i]) for i in range(len(batches))]
        self.masks = key_padding_masks or [None] * len(batches)
        self.hidden: list[torch.Tensor] = []

    def embed(self) -> list[torch.Tensor]:
        """h_0 for every batch: token (times the embedding scale) (+ learned position) (+ token-type) embeddings
        (+ embedding norm)."""
        load = self.loader.tensor
        tok = load("embed_tokens.weight")
        pos = load("embed_positions.weight") if self.model.names.find("embed_positions.weight") else None
        types = load("embed_types.weight") if self.model.names.find("embed_types.weight") else None
        norm = self.loader.norm("embed_norm") if self.model.names.find("embed_norm.weight") else None
        self.hidden = []
        scale = self.cfg.embed_multiplier(tok.dtype)                          # Gemma: sqrt(d) in the hidden dtype
        for ids in self.batches:
            h = tok[ids] if scale == 1.0 else tok[ids] * scale                # [B, T, d]
            if pos is not None:
                h = h + pos[position_ids(ids, self.cfg)]                      # [B, T, d]
            if types is not None:
                h = h + types[0][None, None]                                  # token type 0 everywhere
            if norm is not None:
                h = apply_norm(h, norm, NormKind.LAYERNORM, self.cfg.norm_eps).out
            check_finite_hidden(h, self.dtype, "the embeddings", self.model.files.source)
            self.hidden.append(h)
        return self.hidden

    def rope(self, t: int, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``cos, sin`` of layer ``layer``'s RoPE (its layer type's own base, if any) over ``t`` positions."""
        rope = self.cfg.rope_at(layer)
        if rope is None:
            return None
        return compute_rope_cos_sin(rope, torch.arange(t, device=self.device), self.dtype)

    def layers(self, on_layer_start: Callable[[int], None] | None = None) -> Iterator[LayerTrace]:
        """Yield one trace per (layer, batch); weights of layer l are dropped before layer l+1 is loaded."""
        if not self.hidden:
            self.embed()
        for layer in range(self.cfg.n_layers):
            if on_layer_start:
                on_layer_start(layer)
            weights = self.loader.layer(layer)
            for bi, h in enumerate(self.hidden):
                trace = run_layer(h, weights, self.cfg, layer, bi, self.rope(h.shape[1], layer), self.masks[bi])
                check_finite_hidden(trace.resid_out, self.dtype, f"layer {layer}", self.model.files.source)
                trace.weights = weights                                       # a reference: still one layer resident
                trace.first_seq = self.first_seqs[bi]
                self.hidden[bi] = trace.resid_out
                yield trace
                del trace
            del weights

    def final_hidden(self) -> list[torch.Tensor]:
        """Hidden states after the final norm (pre-norm families) or as they are (post-LN)."""
        if not self.model.names.find("norm_final.weight"):
            return list(self.hidden)
        norm = self.loader.norm("norm_final")
        return [apply_norm(h, norm, self.cfg.layout.norm, self.cfg.norm_eps).out for h in self.hidden]
