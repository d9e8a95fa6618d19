"""Gradient flow, streamed layer by layer (THEORY §9; issue 4, item 4).

Forward: the layer stream keeps only the boundary activations h_0 … h_N of the calibration batch (one layer's weights
resident). Loss at the top: next-token cross-entropy for causal LMs with an LM head; the masked-LM loss for encoders
that ship an MLM head (15% of positions, seeded, replaced by the tokenizer's mask token; no 80/10/10 split);
otherwise the probe loss ½·mean_t ‖h_N,t P‖² with P a seeded Gaussian d × 16 matrix scaled by 1/√d. Backward: for
l = N−1 … 0 the layer is loaded again and recomputed from h_l under autograd, and the gradient flowing into h_{l+1}
is pulled back to h_l and to the layer's parameters; then the layer is dropped.

Per layer: ``grad_h_in`` = ‖∂L/∂h_l‖_F over all calibration tokens, and the parameter-gradient norms of the attention
projections, the FFN and the norm layers. Per model: the loss, its kind, and whether the wiring has an identity
gradient path (pre-LN, parallel residual) or not (post-LN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnstab_cli.arch.spec import Residual
from attnstab_cli.model.activations import ACTIVATIONS
from attnstab_cli.model.blocks import apply_norm, run_layer
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.model.weights import LayerWeights, NormWeights

PROBE_WIDTH = 16
MLM_FRACTION = 0.15
LOSS_CE = "next-token cross-entropy (mean over predicted tokens)"
LOSS_MLM = "masked-LM cross-entropy (15% of positions, seeded, all replaced by the mask token)"
LOSS_PROBE = "probe 0.5 * mean_t ||h_N,t P||^2, P ~ N(0, 1)^(d x 16) / sqrt(d), seeded"


def make_probe(d_model: int, seed: int) -> torch.Tensor:
    """The probe matrix P [d, 16] of the probe loss (float64; cast to the compute dtype by the caller)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_model, PROBE_WIDTH, generator=g, dtype=torch.float64) / math.sqrt(d_model)


def mask_token_id(tokenizer_path: Path | None) -> int | None:
    """The id of ``[MASK]`` (or ``<mask>``) in the checkpoint's tokenizer.json, if there is one."""
    if tokenizer_path is None:
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    for name in ("[MASK]", "<mask>"):
        if (i := tok.token_to_id(name)) is not None:
            return i
    return None


@dataclass
class LossSetup:
    """What the top of the backward pass needs: the kind, the (possibly masked) inputs and the targets."""

    kind: str
    inputs: list[torch.Tensor]                 # token ids fed to the model, per batch
    targets: list[torch.Tensor | None]         # CE targets per batch ([B, T], −100 = ignored), None for the probe


def plan_loss(model: OpenModel, batches: list[torch.Tensor], seed: int) -> LossSetup:
    """Pick the loss the checkpoint supports (see the module docstring) and prepare its inputs and targets."""
    names, cfg = model.names, model.cfg
    has_head = names.find("lm_head.weight") is not None
    if cfg.layout.causal and has_head:
        targets = [torch.cat([b[:, 1:], torch.full_like(b[:, :1], -100)], dim=1) for b in batches]
        return LossSetup(LOSS_CE, list(batches), targets)
    mask_id = mask_token_id(model.tokenizer_path)
    if not cfg.layout.causal and has_head and names.find("mlm_dense.weight") and mask_id is not None:
        g = torch.Generator().manual_seed(seed)
        inputs, targets = [], []
        for b in batches:
            pick = torch.rand(b.shape, generator=g) < MLM_FRACTION
            pick[:, 0] |= ~pick.any(dim=1)                                   # at least one position per sequence
            inputs.append(torch.where(pick, mask_id, b))
            targets.append(torch.where(pick, b, -100))
        return LossSetup(LOSS_MLM, inputs, targets)
    return LossSetup(LOSS_PROBE, list(batches), [None] * len(batches))


def _parameters(w: LayerWeights) -> dict[str, list[torch.Tensor]]:
    """The layer's tensors grouped as attention projections, FFN and norm layers."""
    groups: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": [], "norm": []}
    for f in fields(w):
        value = getattr(w, f.name)
        if isinstance(value, torch.Tensor):
            groups["attn"].append(value)
        elif isinstance(value, NormWeights):
            groups["norm"] += [t for t in (value.weight, value.bias) if t is not None]
        elif isinstance(value, dict):
            groups["ffn"] += [t for t in value.values() if t is not None]
    return groups


def _group_norm(tensors: list[torch.Tensor]) -> float:
    """‖(g_1, g_2, …)‖₂ of the gradients of a parameter group (0 for parameters that got none)."""
    return math.sqrt(sum(float(t.grad.double().pow(2).sum()) for t in tensors if t.grad is not None))


class GradientFlow:
    """Runs the streamed forward and backward passes and returns per-layer and model records."""

    def __init__(self, model: OpenModel, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> None:
        self.model, self.cfg, self.device, self.dtype, self.seed = model, model.cfg, device, dtype, seed
        self.loss = plan_loss(model, batches, seed)

    def load_top(self, stream: LayerStream) -> dict[str, Any]:
        """The tensors above the last layer, loaded once for every batch: final norm, MLM transform, head, probe."""
        names, load = self.model.names, stream.loader.tensor
        top: dict[str, Any] = {"norm_final": stream.loader.norm("norm_final") if names.find("norm_final.weight")
                               else None}
        if self.loss.kind == LOSS_PROBE:
            top["probe"] = make_probe(self.cfg.d_model, self.seed).to(self.device, self.dtype)
            return top
        if self.loss.kind == LOSS_MLM:
            top.update(mlm_w=load("mlm_dense.weight", matrix=True), mlm_b=load("mlm_dense.bias"),
                       mlm_norm=stream.loader.norm("mlm_norm"))
        top["head"] = load("lm_head.weight")                                  # [vocab, d]
        top["head_b"] = load("lm_head.bias") if names.find("lm_head.bias") else None
        return top

    def top_loss(self, top: dict[str, Any], h: torch.Tensor, b: int) -> torch.Tensor:
        """Loss of batch ``b`` from the last hidden state (final norm, head) — a sum, normalised by the caller."""
        cfg = self.cfg
        if top["norm_final"] is not None:
            h = apply_norm(h, top["norm_final"], cfg.layout.norm, cfg.norm_eps).out
        target = self.loss.targets[b]
        if target is None:
            return 0.5 * (h @ top["probe"].to(h.dtype)).pow(2).sum()
        if self.loss.kind == LOSS_MLM:
            h = h @ top["mlm_w"] + (top["mlm_b"] if top["mlm_b"] is not None else 0)
            h = apply_norm(ACTIVATIONS[cfg.activation](h), top["mlm_norm"], cfg.layout.norm, cfg.norm_eps).out
        logits = h @ top["head"].T + (top["head_b"] if top["head_b"] is not None else 0)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()                                           # the loss itself in float32 at least
        return F.cross_entropy(logits.flatten(0, 1), target.to(self.device).flatten(), ignore_index=-100,
                               reduction="sum")

    def count(self) -> int:
        """The loss normaliser: predicted tokens (CE, MLM) or token count (probe)."""
        return sum(int((t != -100).sum()) if t is not None else t_in.numel()
                   for t, t_in in zip(self.loss.targets, self.loss.inputs))

    def run(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        stream = LayerStream(self.model, self.loss.inputs, self.device, self.dtype)
        boundaries = [[h.detach() for h in stream.embed()]]                 # h_0 per batch
        for layer in range(self.cfg.n_layers):
            w = stream.loader.layer(layer)
            boundaries.append([run_layer(h, w, self.cfg, layer, b, stream.rope(h.shape[1]), stream.masks[b])
                               .resid_out.detach() for b, h in enumerate(boundaries[-1])])
            del w
        count = self.count()
        grads, total, top = [], 0.0, self.load_top(stream)
        for b, h in enumerate(boundaries[-1]):
            h = h.clone().requires_grad_(True)
            loss = self.top_loss(top, h, b) / count
            loss.backward()
            total += float(loss.detach())
            grads.append(h.grad)
        del top
        records: list[dict[str, Any]] = []
        for layer in reversed(range(self.cfg.n_layers)):
            w = stream.loader.layer(layer)
            groups = _parameters(w)
            for t in (t for ts in groups.values() for t in ts):
                t.requires_grad_(True)
            new_grads = []
            for b, h in enumerate(boundaries[layer]):
                h = h.clone().requires_grad_(True)
                out = run_layer(h, w, self.cfg, layer, b, stream.rope(h.shape[1]), stream.masks[b]).resid_out
                out.backward(grads[b])
                new_grads.append(h.grad)
            grads = new_grads
            records.append({"layer": layer,
                            "grad_h_in": math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)),
                            "grad_attn_params": _group_norm(groups["attn"]),
                            "grad_ffn_params": _group_norm(groups["ffn"]), "grad_norm_params": _group_norm(groups["norm"])})
            del w, groups
        model_rec = {"grad_loss": total, "grad_loss_kind": self.loss.kind,
                     "identity_grad_path": self.cfg.layout.residual is not Residual.POST}
        return records[::-1], model_rec
