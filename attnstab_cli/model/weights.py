"""Load one layer's weights (or the embeddings) in canonical orientation, checking every shape against the config
(:func:`~attnstab_cli.model.shapes.expected_shapes`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnstab_cli.arch.layouts import orient, split_fused_experts, split_packed_ffn, split_packed_qkv
from attnstab_cli.arch.registry import TensorNames
from attnstab_cli.arch.spec import FFNKind, FFNPacking, NormWeight, QKVPacking
from attnstab_cli.checkpoints.reader import TensorReader
from attnstab_cli.errors import InputError
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.shapes import expected_shapes


@dataclass
class NormWeights:
    weight: torch.Tensor | None    # [d]  gamma; None: the norm is the identity (``identity_norm_attn``)
    bias: torch.Tensor | None      # [d]  beta (LayerNorm only)

    @property
    def identity(self) -> bool:
        return self.weight is None


@dataclass
class MoEWeights:
    """A mixture-of-experts FFN (THEORY §18.7) in the row convention: logits ``x W_r + b_r``, the selection-only
    score bias, the E experts' gated FFNs stacked, and the shared experts (None without)."""

    router: torch.Tensor                      # [d, E]
    router_bias: torch.Tensor | None          # [E]
    score_bias: torch.Tensor | None           # [E]  added to the scores for the selection only
    experts: dict[str, torch.Tensor]          # w_gate, w_up [E, d, m], w_out [E, m, d]
    shared: dict[str, torch.Tensor] | None = None   # w_gate, w_up [d, m_s], w_out [m_s, d]
    shared_router: torch.Tensor | None = None       # [d, 1]  the sigmoid shared gate's weight

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s FFN weights as a dense gated FFN's (``w_gate``, ``w_up``, ``w_out``)."""
        return {k: v[e] for k, v in self.experts.items()}


@dataclass
class LayerWeights:
    """One layer in the row convention x -> xW; biases are None when the family has none."""

    layer: int
    wq: torch.Tensor               # [d, H*D]
    wk: torch.Tensor               # [d, H_kv*D]
    wv: torch.Tensor               # [d, H_kv*D]
    wo: torch.Tensor               # [H*D, d]
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    norm_attn: NormWeights
    norm_ffn: NormWeights          # the norm_attn object itself where one norm feeds both branches
    ffn: dict[str, torch.Tensor]   # mlp: w_in [d,m], b_in, w_out [m,d], b_out; gated: w_gate, w_up [d,m], w_out [m,d]
    q_norm: NormWeights | None = None   # q/k norms (THEORY §18.2): [D] per head or [H*D] / [H_kv*D] full width
    k_norm: NormWeights | None = None
    norm_attn_out: NormWeights | None = None   # branch-output norms (THEORY §18.3); None without them
    norm_ffn_out: NormWeights | None = None
    moe: MoEWeights | None = None       # a mixture-of-experts FFN (THEORY §18.7); ``ffn`` is then empty


class WeightLoader:
    """Reads canonical tensors for one model, one layer at a time."""

    def __init__(self, cfg: ModelConfig, names: TensorNames, reader: TensorReader,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.names, self.reader, self.device, self.dtype = cfg, names, reader, device, dtype
        self.shapes = expected_shapes(cfg)

    def tensor(self, role: str, layer: int | None = None, matrix: bool | None = None,
               expert: int | None = None) -> torch.Tensor | None:
        """Load ``role`` (of ``expert`` for a per-expert role) in canonical orientation (``matrix`` defaults to the
        role's :func:`expected_shapes` entry); its shape is checked against that entry."""
        name = self.names.require(role, layer, expert)
        if name is None:
            return None
        expected = self.shapes[role]
        t = self.reader.load(name, device=self.device, dtype=self.dtype)
        if expected.matrix if matrix is None else matrix:
            t = orient(t, expected.orientation or self.cfg.layout.orientation)
        if not expected.accepts(tuple(t.shape)):
            raise InputError(f"tensor {name!r} has shape {list(t.shape)} but the config implies "
                             f"{expected.describe()}", path=self.reader.infos[name].file)
        return t

    def norm(self, role: str, layer: int | None = None) -> NormWeights:
        """A norm's gamma and beta; a stored ``w`` of a ``one_plus`` family becomes ``gamma = 1 + w``, formed in
        float32 or wider (THEORY §18.6; the model forms it so and scales its float32 statistics by it)."""
        weight = self.tensor(f"{role}.weight", layer)
        if weight is not None and self.cfg.layout.norm_weight is NormWeight.ONE_PLUS:
            weight = 1.0 + (weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight)
        return NormWeights(weight, self.tensor(f"{role}.bias", layer))

    def layer(self, layer: int) -> LayerWeights:
        """All weights of one layer; only these are resident while the layer runs."""
        c = self.cfg
        if c.layout.qkv_packing is QKVPacking.SEPARATE:
            wq, wk, wv = (self.tensor(f"{r}.weight", layer) for r in ("q", "k", "v"))
            bq, bk, bv = (self.tensor(f"{r}.bias", layer) for r in ("q", "k", "v"))
        else:
            packed = self.tensor("qkv.weight", layer)
            wq, wk, wv = split_packed_qkv(packed, c.layout.qkv_packing, c.n_heads, c.n_kv_heads, c.head_dim)
            bias = self.tensor("qkv.bias", layer)
            bq, bk, bv = (split_packed_qkv(bias, c.layout.qkv_packing, c.n_heads, c.n_kv_heads, c.head_dim)
                          if bias is not None else (None, None, None))
        norm_attn = self.norm("norm_attn", layer)
        norm_ffn = norm_attn if c.layout.residual.shared_norm else self.norm("norm_ffn", layer)
        qk = (self.norm("q_norm", layer), self.norm("k_norm", layer)) if c.layout.qk_norm else (None, None)
        return LayerWeights(
            layer=layer, wq=wq, wk=wk, wv=wv, wo=self.tensor("o.weight", layer),
            bq=bq, bk=bk, bv=bv, bo=self.tensor("o.bias", layer),
            norm_attn=norm_attn, norm_ffn=norm_ffn, ffn={} if c.is_moe(layer) else self._ffn(layer),
            moe=self._moe(layer) if c.is_moe(layer) else None, q_norm=qk[0], k_norm=qk[1],
            norm_attn_out=self.norm("norm_attn_out", layer) if c.layout.residual.output_norms else None,
            norm_ffn_out=self.norm("norm_ffn_out", layer) if c.layout.residual.output_norms else None,
        )

    def _moe(self, layer: int) -> MoEWeights:
        """Router, experts (per-expert tensors stacked, or the fused ones split) and shared experts of one layer."""
        moe = self.cfg.moe
        assert moe is not None
        if self.names.fused_experts(layer):
            w_gate, w_up = split_fused_experts(self.tensor("experts_gate_up.weight", layer), moe.fused_packing)
            experts = {"w_gate": w_gate, "w_up": w_up, "w_out": self.tensor("experts_out.weight", layer)}
        else:
            roles = {"w_gate": "expert_gate.weight", "w_up": "expert_up.weight", "w_out": "expert_out.weight"}
            experts = {k: torch.stack([self.tensor(r, layer, expert=e) for e in range(moe.n_experts)])
                       for k, r in roles.items()}                                   # [E, d, m] / [E, m, d]
        shared = None
        if moe.shared_gate is not None:
            shared = {k: self.tensor(f"shared_{r}.weight", layer) for k, r in
                      (("w_gate", "gate"), ("w_up", "up"), ("w_out", "out"))}
        return MoEWeights(router=self.tensor("router.weight", layer), router_bias=self.tensor("router.bias", layer),
                          score_bias=self.tensor("router.score_bias", layer), experts=experts, shared=shared,
                          shared_router=self.tensor("shared_router.weight", layer)
                          if self.names.declares("shared_router.weight", layer) else None)

    def _ffn(self, layer: int) -> dict[str, torch.Tensor]:
        if self.cfg.layout.ffn_packing is FFNPacking.GATE_UP:
            w_gate, w_up = split_packed_ffn(self.tensor("ffn_gate_up.weight", layer), self.cfg.layout.ffn_packing,
                                            self.cfg.d_ff)                    # THEORY §18.6

            return {"w_gate": w_gate, "w_up": w_up, "w_out": self.tensor("ffn_out.weight", layer)}
        if self.cfg.layout.ffn is FFNKind.GATED:
            roles = {"w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_out": "ffn_out.weight"}
        else:
            roles = {"w_in": "ffn_in.weight", "w_out": "ffn_out.weight", "b_in": "ffn_in.bias",
                     "b_out": "ffn_out.bias"}
        out = {}
        for key, role in roles.items():
            t = self.tensor(role, layer)
            if t is not None:
                out[key] = t
        return out
