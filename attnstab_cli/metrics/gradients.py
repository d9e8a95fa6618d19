"""Gradient flow, streamed layer by layer (THEORY §9; issue 4, item 4).

Forward: one layer's weights resident; of the boundary activations h_0 … h_N of the calibration batches only the
checkpoints h_0, h_k, h_2k, … and h_N are kept (k = ⌈√N⌉ by default), taken from the main scan's stream when it hands
them over, else from a stream of this pass's own. Loss at the top: next-token cross-entropy for causal LMs with an LM
head; the masked-LM loss for encoders that ship an MLM head (15% of positions, seeded per sequence, replaced by the
tokenizer's mask token; no 80/10/10 split); otherwise the probe loss ½·mean_t ‖h_N,t P‖² with P a seeded Gaussian
d × 16 matrix scaled by 1/√d. Backward: segment by segment from the top, the boundaries between two checkpoints are
recomputed from the lower one; then for each layer l of the segment, top down, the layer is loaded again and
recomputed from h_l under autograd, and the gradient flowing into h_{l+1} is pulled back to h_l and to the layer's
parameters; then the layer and h_l are dropped. Of several ranks, each runs its own sequences and the loss, its
normaliser and the gradients are summed over the ranks.

Per layer: ``grad_h_in`` = ‖∂L/∂h_l‖_F over all calibration tokens, and the parameter-gradient norms of the attention
projections, the FFN and the norm layers. Per model: the loss, its kind, and whether the wiring has an identity
gradient path (pre-LN, parallel residual) or not (post-LN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnstab_cli.arch.spec import Residual
from attnstab_cli.distributed.group import SOLO, Group
from attnstab_cli.metrics.seeding import sequence_rand
from attnstab_cli.model.activations import ACTIVATIONS
from attnstab_cli.model.blocks import apply_norm, run_layer
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.stream import LayerStream
from attnstab_cli.model.weights import LayerWeights, MoEWeights, NormWeights

PROBE_WIDTH = 16
MLM_FRACTION = 0.15
LOSS_CE = "next-token cross-entropy (mean over predicted tokens)"
LOSS_MLM = "masked-LM cross-entropy (15% of positions, seeded, all replaced by the mask token)"
LOSS_PROBE = "probe 0.5 * mean_t ||h_N,t P||^2, P ~ N(0, 1)^(d x 16) / sqrt(d), seeded"
PASSES = ("forward", "recompute", "backward")   # the streams of the model a run may make


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


def plan_loss(model: OpenModel, batches: list[torch.Tensor], seed: int,
              first_seqs: list[int] | None = None) -> LossSetup:
    """Pick the loss the checkpoint supports (see the module docstring) and prepare its inputs and targets; the
    masked positions are drawn per sequence (``first_seqs``: the global index of each batch's first)."""
    names, cfg = model.names, model.cfg
    has_head = names.find("lm_head.weight") is not None
    if cfg.layout.causal and has_head:
        targets = [torch.cat([b[:, 1:], torch.full_like(b[:, :1], -100)], dim=1) for b in batches]
        return LossSetup(LOSS_CE, list(batches), targets)
    mask_id = mask_token_id(model.tokenizer_path)
    if not cfg.layout.causal and has_head and names.find("mlm_dense.weight") and mask_id is not None:
        starts = first_seqs if first_seqs is not None else [sum(len(b) for b in batches[:i])
                                                            for i in range(len(batches))]
        inputs, targets = [], []
        for b, start in zip(batches, starts):
            pick = sequence_rand(seed, "mlm", start, tuple(b.shape)) < MLM_FRACTION
            pick[:, 0] |= ~pick.any(dim=1)                                   # at least one position per sequence
            inputs.append(torch.where(pick, mask_id, b))
            targets.append(torch.where(pick, b, -100))
        return LossSetup(LOSS_MLM, inputs, targets)
    return LossSetup(LOSS_PROBE, list(batches), [None] * len(batches))


def _parameters(w: LayerWeights) -> dict[str, list[torch.Tensor]]:
    """The layer's tensors grouped as attention projections, FFN and norm layers, each tensor once (a norm shared
    by both branches is one parameter, not two)."""
    groups: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": [], "norm": []}
    seen: set[int] = set()
    for f in fields(w):
        value = getattr(w, f.name)
        if isinstance(value, torch.Tensor):
            group, tensors = "attn", [value]
        elif isinstance(value, NormWeights):
            group, tensors = "norm", [value.weight, value.bias]
        elif isinstance(value, dict):
            group, tensors = "ffn", list(value.values())
        elif isinstance(value, MoEWeights):                   # router, experts and shared experts (THEORY §18.7)
            group = "ffn"
            tensors = [value.router, value.router_bias, *value.experts.values(),
                       *(value.shared or {}).values(), value.shared_router]
        else:
            continue
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                groups[group].append(t)
    return groups


def _group_norm(tensors: list[torch.Tensor]) -> float:
    """‖(g_1, g_2, …)‖₂ of the gradients of a parameter group (0 for parameters that got none)."""
    return math.sqrt(sum(float(t.grad.double().pow(2).sum()) for t in tensors if t.grad is not None))


class _Boundaries:
    """The boundary activations held at one time, l -> h_l per batch ([B, T, d] each), and the peak count held."""

    def __init__(self) -> None:
        self.held: dict[int, list[torch.Tensor]] = {}
        self.peak = 0

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        self.held[layer] = hidden
        self.peak = max(self.peak, len(self.held))

    def get(self, layer: int) -> list[torch.Tensor]:
        return self.held[layer]

    def drop(self, layer: int) -> None:
        del self.held[layer]


class GradientFlow:
    """Runs the streamed forward and backward passes and returns per-layer and model records.

    Memory: activation checkpointing every k layers (``checkpoint_every``, default ⌈√N⌉). Only h_0, h_k, h_2k, … and
    h_N are kept; for each segment [s, min(s+k, N)), top down, its inner boundaries are recomputed from h_s just before
    its backward and dropped as the backward passes them. At most ⌈N/k⌉ + k boundaries (plus one in flight) are held
    instead of N+1; ``peak_boundaries`` records the most held at once.

    Streams of the model (``streams``: 1 when the pass loaded any layer, else 0; ``layer_loads``: layer loads per pass):

    * ``forward`` — produces the checkpoints. Skipped when ``run`` is handed them: the main scan's stream already
      computes every h_l. Needed for the masked-LM loss, whose masked inputs the main scan never runs
      (``checkpoint_layers`` is then empty), and when no checkpoints are given.
    * ``recompute`` — the price of bounded memory: the boundaries between checkpoints were not kept, so each segment's
      are computed again from its checkpoint (layers s … s+k−2; none for k = 1).
    * ``backward`` — one layer resident means each layer's weights are gone by the time the reverse pass reaches it,
      so they are loaded again and the layer recomputed from h_l under autograd to pull the gradient back.
    """

    def __init__(self, model: OpenModel, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
                 seed: int = 0, checkpoint_every: int | None = None, first_seqs: list[int] | None = None,
                 group: Group = SOLO) -> None:
        self.model, self.cfg, self.device, self.dtype, self.seed = model, model.cfg, device, dtype, seed
        self.group = group                  # of several ranks: the loss, its normaliser and the gradients are summed
        self.loss = plan_loss(model, batches, seed, first_seqs)
        n = self.cfg.n_layers
        k = math.ceil(math.sqrt(n)) if checkpoint_every is None else checkpoint_every
        if k < 1:
            raise ValueError(f"checkpoint_every must be at least 1, not {k}")
        self.checkpoint_every = min(k, max(n, 1))
        self.shares_inputs = len(batches) == len(self.loss.inputs) and all(
            a is b or torch.equal(a, b) for a, b in zip(batches, self.loss.inputs))   # False for the MLM loss
        self.streams: dict[str, int] = dict.fromkeys(PASSES, 0)
        self.layer_loads: dict[str, int] = dict.fromkeys(PASSES, 0)
        self.on_layer: Callable[[str, int, int], None] | None = None   # progress: (stage, done, total)
        self.peak_boundaries = 0

    def boundaries(self) -> list[int]:
        """The checkpoint boundaries 0, k, 2k, … below N, and N itself (the loss needs h_N)."""
        n = self.cfg.n_layers
        return sorted(set(range(0, n, self.checkpoint_every)) | {n})

    def checkpoint_layers(self) -> set[int]:
        """The boundaries ``run`` wants handed in from a stream of the calibration batches (h_0 = the stream's
        hidden states after ``embed``, h_{l+1} = layer l's ``resid_out``); empty when the loss runs other inputs
        (masked LM), so that ``run`` streams its own forward."""
        return set(self.boundaries()) if self.shares_inputs else set()

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
            act = ACTIVATIONS[cfg.head_activation or cfg.activation]
            h = apply_norm(act(h), top["mlm_norm"], cfg.layout.norm, cfg.norm_eps).out
        logits = h @ top["head"].T + (top["head_b"] if top["head_b"] is not None else 0)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()                                           # the loss itself in float32 at least
        if cfg.final_logit_cap is not None:                                   # Gemma 2: c tanh(z / c) (§18.5)
            logits = cfg.final_logit_cap * torch.tanh(logits / cfg.final_logit_cap)
        return F.cross_entropy(logits.flatten(0, 1), target.to(self.device).flatten(), ignore_index=-100,
                               reduction="sum")

    def count(self) -> int:
        """The loss normaliser: predicted tokens (CE, MLM) or token count (probe), over every rank."""
        local = sum(int((t != -100).sum()) if t is not None else t_in.numel()
                    for t, t_in in zip(self.loss.targets, self.loss.inputs))
        return int(self.group.all_reduce(torch.tensor([local], dtype=torch.int64), "sum", "the loss normaliser"))

    def run(self, checkpoints: dict[int, list[torch.Tensor]] | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-layer gradient records (layer order) and the model record. ``checkpoints`` maps a boundary l to h_l
        per calibration batch ([B, T, d] each) and must hold every l of ``checkpoint_layers()``; with them (and a
        non-empty ``checkpoint_layers()``) no forward stream is made, else this pass streams its own forward."""
        n, k = self.cfg.n_layers, self.checkpoint_every
        self.layer_loads = dict.fromkeys(PASSES, 0)
        stream = LayerStream(self.model, self.loss.inputs, self.device, self.dtype)
        held = _Boundaries()
        if checkpoints is not None and self.checkpoint_layers():
            self._adopt(checkpoints, held)
        else:
            self._forward(stream, held)
        grads, total = self._top_grads(stream, held.get(n))                # ∂L/∂h_N per batch, [B, T, d]
        held.drop(n)
        records: list[dict[str, Any]] = []
        for start in reversed(self.boundaries()[:-1]):
            end = min(start + k, n)
            self._recompute(stream, held, start, end)
            for layer in reversed(range(start, end)):
                grads, record = self._backward_layer(stream, layer, held.get(layer), grads)
                held.drop(layer)                                            # below here, h_layer is not needed
                records.append(record)
        self.peak_boundaries = held.peak
        self.streams = {name: int(loads > 0) for name, loads in self.layer_loads.items()}
        model_rec = {"grad_loss": total, "grad_loss_kind": self.loss.kind,
                     "identity_grad_path": self.cfg.layout.residual is not Residual.POST}
        return records[::-1], model_rec

    def _load(self, stream: LayerStream, layer: int, stream_name: str) -> LayerWeights:
        """Layer ``layer``'s weights, counted against the pass ``stream_name`` (and reported to ``on_layer``)."""
        self.layer_loads[stream_name] += 1
        if self.on_layer is not None:
            n = self.cfg.n_layers
            total = n - math.ceil(n / self.checkpoint_every) if stream_name == "recompute" else n
            self.on_layer(f"grad: {stream_name}", self.layer_loads[stream_name], total)
        return stream.loader.layer(layer)

    def _step(self, stream: LayerStream, w: LayerWeights, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """h_{l+1} from h_l for every batch (no autograd graph: the weights do not require grad here)."""
        return [run_layer(h, w, self.cfg, w.layer, b, stream.rope(h.shape[1], w.layer),
                          stream.masks[b]).resid_out.detach()
                for b, h in enumerate(hidden)]                              # [B, T, d] each

    def _forward(self, stream: LayerStream, held: _Boundaries) -> None:
        """Own forward stream: h_0 … h_N, keeping only the checkpoint boundaries."""
        keep = set(self.boundaries())
        held.put(0, [h.detach() for h in stream.embed()])                  # h_0, [B, T, d] each
        for layer in range(self.cfg.n_layers):
            w = self._load(stream, layer, "forward")
            held.put(layer + 1, self._step(stream, w, held.get(layer)))
            if layer not in keep:
                held.drop(layer)
            del w

    def _adopt(self, checkpoints: dict[int, list[torch.Tensor]], held: _Boundaries) -> None:
        """Take the wanted boundaries from outside (detached, on this pass's device and dtype)."""
        wanted = self.checkpoint_layers()
        if missing := wanted - checkpoints.keys():
            raise ValueError(f"checkpoints lack the boundaries {sorted(missing)} (wanted {sorted(wanted)})")
        for layer in sorted(wanted):
            hidden = checkpoints[layer]
            if len(hidden) != len(self.loss.inputs):
                raise ValueError(f"checkpoint h_{layer} has {len(hidden)} batches, not {len(self.loss.inputs)}")
            held.put(layer, [h.detach().to(self.device, self.dtype) for h in hidden])

    def _recompute(self, stream: LayerStream, held: _Boundaries, start: int, end: int) -> None:
        """h_{start+1} … h_{end−1} again from the checkpoint h_start (layers start … end−2 loaded once more)."""
        for layer in range(start, end - 1):
            w = self._load(stream, layer, "recompute")
            held.put(layer + 1, self._step(stream, w, held.get(layer)))
            del w

    def _top_grads(self, stream: LayerStream, h_top: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """∂L/∂h_N per batch and the loss L (mean over the normaliser of ``count``)."""
        count, top = self.count(), self.load_top(stream)
        grads, total = [], 0.0
        for b, h in enumerate(h_top):
            h = h.clone().requires_grad_(True)                             # [B, T, d]
            loss = self.top_loss(top, h, b) / count
            loss.backward()
            total += float(loss.detach())
            grads.append(h.grad)
        total = float(self.group.all_reduce(torch.tensor([total], dtype=torch.float64), "sum", "the loss"))
        return grads, total

    def _backward_layer(self, stream: LayerStream, layer: int, inputs: list[torch.Tensor],
                        grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Pull ∂L/∂h_{l+1} back through layer l (recomputed from h_l under autograd): ∂L/∂h_l and the record."""
        w = self._load(stream, layer, "backward")
        groups = _parameters(w)
        for t in (t for ts in groups.values() for t in ts):
            t.requires_grad_(True)
        new_grads = []
        for b, h in enumerate(inputs):
            h = h.clone().requires_grad_(True)                             # [B, T, d]
            out = run_layer(h, w, self.cfg, layer, b, stream.rope(h.shape[1], layer), stream.masks[b]).resid_out
            (out * grads[b]).sum().backward()      # = out.backward(grads[b]), without torch's symbolic-shapes import
            new_grads.append(h.grad)
        square = torch.tensor([sum(float(g.double().pow(2).sum()) for g in new_grads)], dtype=torch.float64)
        if self.group.world_size > 1:           # the whole run's gradient, every rank reducing the same tensors
            for t in (t for ts in groups.values() for t in ts):
                if t.grad is None:              # e.g. an expert no token of this rank was routed to
                    t.grad = torch.zeros_like(t)
                self.group.all_reduce(t.grad, "sum", f"the gradients of layer {layer}")
        square = self.group.all_reduce(square, "sum", f"the gradients of layer {layer}")
        record = {"layer": layer, "grad_h_in": math.sqrt(float(square)),
                  "grad_attn_params": _group_norm(groups["attn"]), "grad_ffn_params": _group_norm(groups["ffn"]),
                  "grad_norm_params": _group_norm(groups["norm"])}
        return new_grads, record
