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
    experts: dict[str, torch.Tensor]          # w_gate, w_up [E, d, m], w_out [E, m, d]; b_gate, b_up [E, m] and
                                              # b_out [E, d] where the experts have biases
    shared: dict[str, torch.Tensor] | None = None   # w_gate, w_up [d, m_s], w_out [m_s, d]
    shared_router: torch.Tensor | None = None       # [d, 1]  the sigmoid shared gate's weight

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s FFN weights as a dense gated FFN's (``w_gate``, ``w_up``, ``w_out``)."""
        return {k: v[e] for k, v in self.experts.items()}


@dataclass
class LayerWeights:
    """One layer in the row convention x -> xW; biases are None when the family has none."""

    layer: int
    wq: torch.Tensor | None        # [d, H*D]; MLA: the one q projection, None with a low-rank q
    wk: torch.Tensor | None        # [d, H_kv*D]; None under MLA
    wv: torch.Tensor | None        # [d, H_kv*D]; None under MLA
    wo: torch.Tensor               # [H*D_v, d]
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
    sinks: torch.Tensor | None = None   # [H] learned sink logit per query head (THEORY §18.4); None without sinks
    moe: MoEWeights | None = None       # a mixture-of-experts FFN (THEORY §18.7); ``ffn`` is then empty
    # multi-head latent attention (THEORY §18.8); None without it. q = N_qa(x W_qa + b_qa) W_qb (or x W_q),
    # [c_kv; k_rope] = x W_kva + b_kva, per head [k_nope; v] = N_kv(c_kv) W_kvb
    wq_a: torch.Tensor | None = None           # [d, r_q]
    bq_a: torch.Tensor | None = None           # [r_q]
    q_a_norm: NormWeights | None = None        # [r_q]
    wq_b: torch.Tensor | None = None           # [r_q, H*(nope + rope)]
    wkv_a: torch.Tensor | None = None          # [d, r_kv + rope]
    bkv_a: torch.Tensor | None = None          # [r_kv + rope]
    kv_a_norm: NormWeights | None = None       # [r_kv]
    wkv_b: torch.Tensor | None = None          # [r_kv, H*(nope + v)]

    @property
    def latent(self) -> bool:
        """Whether the layer's attention is multi-head latent attention."""
        return self.wkv_a is not None


class WeightLoader:
    """Reads canonical tensors for one model, one layer at a time."""

    def __init__(self, cfg: ModelConfig, names: TensorNames, reader: TensorReader,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.names, self.reader, self.device, self.dtype = cfg, names, reader, device, dtype
        self.shapes = expected_shapes(cfg)

    def tensor(self, role: str, layer: int | None = None, matrix: bool | None = None,
               expert: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Load ``role`` (of ``expert`` for a per-expert role) in canonical orientation (``matrix`` defaults to the
        role's :func:`expected_shapes` entry) and ``dtype`` (the compute dtype by default); its shape is checked
        against that entry."""
        name = self.names.require(role, layer, expert)
        if name is None:
            return None
        expected = self.shapes[role]
        t = self.reader.load(name, device=self.device, dtype=dtype or self.dtype)
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

    def _mla(self, layer: int) -> dict[str, object]:
        """The latent-attention tensors of one layer (THEORY §18.8), by :class:`LayerWeights` field."""
        low_rank = self.cfg.mla.q_lora_rank is not None
        return {"wq": None if low_rank else self.tensor("q.weight", layer), "wk": None, "wv": None,
                "bq": None, "bk": None, "bv": None,
                "wq_a": self.tensor("q_a.weight", layer) if low_rank else None,
                "bq_a": self.tensor("q_a.bias", layer) if low_rank else None,
                "q_a_norm": self.norm("q_a_norm", layer) if low_rank else None,
                "wq_b": self.tensor("q_b.weight", layer) if low_rank else None,
                "wkv_a": self.tensor("kv_a.weight", layer), "bkv_a": self.tensor("kv_a.bias", layer),
                "kv_a_norm": self.norm("kv_a_norm", layer), "wkv_b": self.tensor("kv_b.weight", layer)}

    def layer(self, layer: int) -> LayerWeights:
        """All weights of one layer; only these are resident while the layer runs."""
        c = self.cfg
        attn = self._mla(layer) if c.mla is not None else self._projections(layer)
        norm_attn = self.norm("norm_attn", layer)
        norm_ffn = norm_attn if c.layout.residual.shared_norm else self.norm("norm_ffn", layer)
        qk = (self.norm("q_norm", layer), self.norm("k_norm", layer)) if c.layout.qk_norm else (None, None)
        return LayerWeights(
            layer=layer, wo=self.tensor("o.weight", layer), bo=self.tensor("o.bias", layer),
            norm_attn=norm_attn, norm_ffn=norm_ffn, ffn={} if c.is_moe(layer) else self._ffn(layer),
            moe=self._moe(layer) if c.is_moe(layer) else None, q_norm=qk[0], k_norm=qk[1],
            norm_attn_out=self.norm("norm_attn_out", layer) if c.layout.residual.output_norms else None,
            norm_ffn_out=self.norm("norm_ffn_out", layer) if c.layout.residual.output_norms else None,
            sinks=self.tensor("sinks", layer) if c.layout.attn_sinks else None, **attn,
        )

    def _projections(self, layer: int) -> dict[str, object]:
        """W_Q, W_K, W_V and their biases, split from a fused tensor where the family packs them."""
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
        return {"wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv}

    def _moe(self, layer: int) -> MoEWeights:
        """Router, experts (per-expert tensors stacked, or the fused ones split) and shared experts of one layer."""
        moe = self.cfg.moe
        assert moe is not None
        if self.names.fused_experts(layer):
            w_gate, w_up = split_fused_experts(self.tensor("experts_gate_up.weight", layer), moe.fused_packing)
            experts = {"w_gate": w_gate, "w_up": w_up, "w_out": self.tensor("experts_out.weight", layer)}
            if self.names.declares("experts_gate_up.bias", layer):
                experts["b_gate"], experts["b_up"] = split_fused_experts(self.tensor("experts_gate_up.bias", layer),
                                                                         moe.fused_packing)          # [E, m] each
            if self.names.declares("experts_out.bias", layer):
                experts["b_out"] = self.tensor("experts_out.bias", layer)                          # [E, d]
        else:
            roles = {"w_gate": "expert_gate.weight", "w_up": "expert_up.weight", "w_out": "expert_out.weight"}
            experts = {k: self._stack_experts(r, layer, moe.n_experts) for k, r in roles.items()}
        shared = None
        if moe.shared_gate is not None:
            shared = {k: self.tensor(f"shared_{r}.weight", layer) for k, r in
                      (("w_gate", "gate"), ("w_up", "up"), ("w_out", "out"))}
        wide = torch.float32 if moe.router_float32 and self.dtype in (torch.float16, torch.bfloat16) else None
        return MoEWeights(router=self.tensor("router.weight", layer, dtype=wide),
                          router_bias=self.tensor("router.bias", layer, dtype=wide),
                          score_bias=self.tensor("router.score_bias", layer, dtype=wide), experts=experts,
                          shared=shared,
                          shared_router=self.tensor("shared_router.weight", layer)
                          if self.names.declares("shared_router.weight", layer) else None)

    def _stack_experts(self, role: str, layer: int, n_experts: int) -> torch.Tensor:
        """Per-expert tensors of ``role`` copied one by one into a stack ``[E, *]`` (``[E, d, m]`` / ``[E, m, d]``),
        so no more than one expert's matrix is resident beside the stack; the stack counts as resident."""
        first = self.tensor(role, layer, expert=0)
        stack = torch.empty((n_experts, *first.shape), dtype=first.dtype, device=first.device)
        stack[0] = first
        del first
        for e in range(1, n_experts):
            stack[e] = self.tensor(role, layer, expert=e)
        self.reader.track(stack)
        return stack

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
