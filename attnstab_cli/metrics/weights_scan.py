"""Weight-only metrics of every layer, computed once per layer while its weights are resident.

In a calibrated scan the layer stream hands each trace its :class:`LayerWeights`; ``--weights-only`` walks the layers
with the loader alone and never runs text. The RoPE-aware ``qk_norm`` (THEORY §5.5) takes its maximum over the
offsets present in the mask: those of the calibration length in a calibrated scan, of the model's maximum positions
in a weights-only scan.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from attnstab_cli.distributed.group import Group
from attnstab_cli.metrics.magnitudes import NO_INPUT_NORM
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.metrics.weights_metrics import compute_depth_budget, compute_weight_metrics
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.traces import LayerTrace
from attnstab_cli.model.weights import LayerWeights


class WeightPass:
    """Per-head and per-layer weight records, one layer at a time."""

    name = "weights"
    needs = ()

    def __init__(self, cfg: ModelConfig, max_offset: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.max_offset = cfg, max_offset
        self.rank, self.world_size = rank, world_size
        self.heads: list[dict[str, Any]] = []
        self.layers: list[dict[str, Any]] = []

    def observe(self, trace: LayerTrace, ctx: Any = None) -> None:
        """Measure a trace's layer once (on its first batch); of several ranks, layer l is measured by rank
        l mod world size alone (every rank holds every layer in turn, and the records are gathered)."""
        if trace.batch == 0 and trace.weights is not None and trace.layer % self.world_size == self.rank:
            self.observe_weights(trace.weights)

    def merge_ranks(self, group: Group) -> None:
        """Every rank's layer records, in layer order."""
        ranks = group.all_gather((self.heads, self.layers), "the weight columns")
        self.heads = sorted((h for heads, _ in ranks for h in heads), key=lambda r: (r["layer"], r["head"]))
        self.layers = sorted((rec for _, layers in ranks for rec in layers), key=lambda r: r["layer"])

    def observe_weights(self, w: LayerWeights) -> None:
        heads, layer = compute_weight_metrics(w, self.cfg, w.layer, max_offset=self.max_offset)
        for h in heads:    # σ_min = σ_max / κ: the smallest singular values behind the condition numbers (§14)
            rec = asdict(h)
            rec.update({f"sigma_min_{m}": rec[f"{m}_norm"] / rec[f"kappa_{m}"] for m in ("wq", "wk", "wv")})
            self.heads.append(rec)
        self.layers.append({**asdict(layer), "attn_window": self.cfg.sliding_windows[w.layer]})

    def finish(self, tables: Tables) -> TableParts:
        return TableParts(layers=self.layers, heads=self.heads, model=self.model_record(), nulls=self.null_reasons())

    def null_reasons(self) -> dict[str, str]:
        """Why this family leaves weight columns null."""
        out = {}
        if self.cfg.mla is not None:
            out["qk_norm"] = ("latent attention: the keys' non-rotary part passes the latent norm N_kv, so no matrix "
                              "W_Q W_K^T is the logit map (THEORY §18.8); logit_bound bounds the logits instead")
        elif self.cfg.layout.qk_norm is not None:
            out["qk_norm"] = ("a q/k norm sits between the projections and the logits, so W_Q W_K^T is not the "
                              "logit map (THEORY §18.2); logit_bound bounds the logits instead")
        if not self.cfg.layout.residual.input_norms:
            out.update(dict.fromkeys(("norm1_gamma_max", "norm1_beta_norm", "norm2_gamma_max", "norm2_beta_norm"),
                                     NO_INPUT_NORM))
        return out

    def model_record(self) -> dict[str, Any]:
        """Model-level totals (THEORY §10): ``depth_budget`` = N · max_l Π_l."""
        return {"n_layers": self.cfg.n_layers,
                "depth_budget": compute_depth_budget(self.layers, self.cfg.n_layers) if self.layers else None}
