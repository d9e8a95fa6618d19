"""Load one layer's weights (or the embeddings) in canonical orientation, checking every shape against the config."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnstab_cli.arch.layouts import orient, packed_qkv_width, split_packed_qkv
from attnstab_cli.arch.registry import TensorNames
from attnstab_cli.arch.spec import FFNKind, QKVPacking
from attnstab_cli.checkpoints.reader import TensorReader
from attnstab_cli.errors import InputError
from attnstab_cli.model.config import ModelConfig


@dataclass
class NormWeights:
    weight: torch.Tensor           # [d]  gamma
    bias: torch.Tensor | None      # [d]  beta (LayerNorm only)


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
    norm_ffn: NormWeights
    ffn: dict[str, torch.Tensor]   # mlp: w_in [d,m], b_in, w_out [m,d], b_out; gated: w_gate, w_up [d,m], w_out [m,d]


class WeightLoader:
    """Reads canonical tensors for one model, one layer at a time."""

    def __init__(self, cfg: ModelConfig, names: TensorNames, reader: TensorReader,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.names, self.reader, self.device, self.dtype = cfg, names, reader, device, dtype

    def tensor(self, role: str, layer: int | None = None, shape: tuple[int, ...] | None = None,
               matrix: bool = False) -> torch.Tensor | None:
        """Load ``role``; ``matrix`` applies the family orientation; ``shape`` is checked after orientation."""
        name = self.names.require(role, layer)
        if name is None:
            return None
        t = self.reader.load(name, device=self.device, dtype=self.dtype)
        if matrix:
            t = orient(t, self.cfg.layout.orientation)
        if shape is not None and tuple(t.shape) != shape:
            raise InputError(f"tensor {name!r} has shape {list(t.shape)} but the config implies {list(shape)}",
                             path=self.reader.infos[name].file)
        return t

    def norm(self, role: str, layer: int | None = None) -> NormWeights:
        d = self.cfg.d_model
        return NormWeights(self.tensor(f"{role}.weight", layer, (d,)), self.tensor(f"{role}.bias", layer, (d,)))

    def layer(self, layer: int) -> LayerWeights:
        """All weights of one layer; only these are resident while the layer runs."""
        c = self.cfg
        d, hd, kvd = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        if c.layout.qkv_packing is QKVPacking.SEPARATE:
            wq, wk, wv = (self.tensor(f"{r}.weight", layer, (d, n), True) for r, n in (("q", hd), ("k", kvd), ("v", kvd)))
            bq, bk, bv = (self.tensor(f"{r}.bias", layer, (n,)) for r, n in (("q", hd), ("k", kvd), ("v", kvd)))
        else:
            width = packed_qkv_width(c.layout.qkv_packing, c.n_heads, c.n_kv_heads, c.head_dim)
            packed = self.tensor("qkv.weight", layer, (d, width), True)
            wq, wk, wv = split_packed_qkv(packed, c.layout.qkv_packing, c.n_heads, c.n_kv_heads, c.head_dim)
            bias = self.tensor("qkv.bias", layer, (width,))
            bq, bk, bv = (split_packed_qkv(bias, c.layout.qkv_packing, c.n_heads, c.n_kv_heads, c.head_dim)
                          if bias is not None else (None, None, None))
        return LayerWeights(
            layer=layer, wq=wq, wk=wk, wv=wv, wo=self.tensor("o.weight", layer, (hd, d), True),
            bq=bq, bk=bk, bv=bv, bo=self.tensor("o.bias", layer, (d,)),
            norm_attn=self.norm("norm_attn", layer), norm_ffn=self.norm("norm_ffn", layer), ffn=self._ffn(layer),
        )

    def _ffn(self, layer: int) -> dict[str, torch.Tensor]:
        d, m = self.cfg.d_model, self.cfg.d_ff
        if self.cfg.layout.ffn is FFNKind.GATED:
            roles = {"w_gate": ("ffn_gate.weight", (d, m)), "w_up": ("ffn_up.weight", (d, m)),
                     "w_out": ("ffn_out.weight", (m, d))}
        else:
            roles = {"w_in": ("ffn_in.weight", (d, m)), "w_out": ("ffn_out.weight", (m, d)),
                     "b_in": ("ffn_in.bias", (m,)), "b_out": ("ffn_out.bias", (d,))}
        out = {}
        for key, (role, shape) in roles.items():
            t = self.tensor(role, layer, shape, matrix=key.startswith("w"))
            if t is not None:
                out[key] = t
        return out
