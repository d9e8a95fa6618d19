"""The shape each canonical role's tensor must have under a model config: one table, read by the check at open and by
the weight loader.

Shapes are canonical (row convention x -> xW, THEORY §0.2); a ``matrix`` role is stored in the family's orientation,
so an ``out_in`` family stores it transposed. Vocabulary and position tables may hold spare rows (``min_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass

from attnstab_cli.arch.layouts import packed_qkv_width
from attnstab_cli.arch.spec import Orientation, QKNorm
from attnstab_cli.model.config import ModelConfig


@dataclass(frozen=True)
class ExpectedShape:
    dims: tuple[int, ...]      # canonical shape
    matrix: bool = False       # stored in the family orientation (a stack of matrices [E, in, out]: each one)
    min_rows: bool = False     # dims[0] is a lower bound (never a matrix role)
    orientation: Orientation | None = None   # stored in this orientation rather than the family's (fused experts)

    def stored(self, orientation: Orientation) -> tuple[int, ...]:
        """The shape as the checkpoint stores it."""
        orientation = self.orientation or orientation
        if not self.matrix or orientation is not Orientation.OUT_IN:
            return self.dims
        return (*self.dims[:-2], self.dims[-1], self.dims[-2])

    def accepts(self, shape: tuple[int, ...], orientation: Orientation | None = None) -> bool:
        """Whether ``shape`` (stored, or canonical when ``orientation`` is None) fits."""
        want = self.dims if orientation is None else self.stored(orientation)
        if len(shape) != len(want):
            return False
        if self.min_rows:
            return shape[0] >= want[0] and tuple(shape[1:]) == want[1:]
        return tuple(shape) == want

    def describe(self, orientation: Orientation | None = None) -> str:
        want = self.dims if orientation is None else self.stored(orientation)
        return "[" + ", ".join(f">={w}" if self.min_rows and i == 0 else str(w) for i, w in enumerate(want)) + "]"


def _vector(n: int) -> ExpectedShape:
    return ExpectedShape((n,))


def _matrix(d_in: int, d_out: int) -> ExpectedShape:
    return ExpectedShape((d_in, d_out), matrix=True)


def _table(rows: int, *rest: int) -> ExpectedShape:
    return ExpectedShape((rows, *rest), min_rows=True)


def _mla_shapes(cfg: ModelConfig) -> dict[str, ExpectedShape]:
    """Latent attention (THEORY §18.8): W_qa [d, r_q], W_qb [r_q, H (nope + rope)], W_kva [d, r_kv + rope] (columns
    [c_kv; k_rope]), W_kvb [r_kv, H (nope + v)] (per head [k_nope; v]); none without MLA."""
    if cfg.mla is None:
        return {}
    m, d = cfg.mla, cfg.d_model
    rq, rkv, kva = m.q_lora_rank or 1, m.kv_lora_rank, m.kv_lora_rank + m.rope
    return {"q_a.weight": _matrix(d, rq), "q_a.bias": _vector(rq), "q_a_norm.weight": _vector(rq),
            "q_b.weight": _matrix(rq, cfg.n_heads * cfg.head_dim),
            "kv_a.weight": _matrix(d, kva), "kv_a.bias": _vector(kva), "kv_a_norm.weight": _vector(rkv),
            "kv_b.weight": _matrix(rkv, cfg.n_heads * (m.nope + m.v))}


def _moe_shapes(cfg: ModelConfig) -> dict[str, ExpectedShape]:
    """The router, expert and shared-expert roles (THEORY §18.7); the fused expert tensors are stacks ``[E, in,
    out]`` in the family's ``fused_orientation`` (placeholder sizes for families without experts)."""
    d, moe = cfg.d_model, cfg.moe
    n, m = (moe.n_experts, moe.d_ff_expert) if moe else (1, cfg.d_ff)
    ms = (moe.d_ff_shared if moe else None) or cfg.d_ff
    fused = cfg.fused_expert_orientation
    return {
        "router.weight": _matrix(d, n), "router.bias": _vector(n), "router.score_bias": _vector(n),
        "expert_gate.weight": _matrix(d, m), "expert_up.weight": _matrix(d, m), "expert_out.weight": _matrix(m, d),
        "experts_gate_up.weight": ExpectedShape((n, d, 2 * m), matrix=True, orientation=fused),
        "experts_out.weight": ExpectedShape((n, m, d), matrix=True, orientation=fused),
        "experts_gate_up.bias": ExpectedShape((n, 2 * m)), "experts_out.bias": ExpectedShape((n, d)),
        "shared_gate.weight": _matrix(d, ms), "shared_up.weight": _matrix(d, ms), "shared_out.weight": _matrix(ms, d),
        "shared_router.weight": _matrix(d, 1),
    }


def expected_shapes(cfg: ModelConfig) -> dict[str, ExpectedShape]:
    """Role -> expected shape for every role any family spec declares."""
    d, m, vocab = cfg.d_model, cfg.d_ff, cfg.vocab_size
    hd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    width = packed_qkv_width(cfg.layout.qkv_packing, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    full = cfg.layout.qk_norm is QKNorm.FULL_WIDTH
    qn, kn = (hd, kvd) if full else (cfg.head_dim, cfg.head_dim)
    vd = cfg.n_heads * cfg.v_head_dim                  # attention context width, the rows of W_O
    return {**_mla_shapes(cfg),
        "embed_tokens.weight": _table(vocab, d),
        "embed_positions.weight": _table(cfg.max_positions or 1, d),
        "embed_types.weight": _table(cfg.type_vocab_size or 1, d),
        "embed_norm.weight": _vector(d), "embed_norm.bias": _vector(d),
        "norm_final.weight": _vector(d), "norm_final.bias": _vector(d),
        "mlm_dense.weight": _matrix(d, d), "mlm_dense.bias": _vector(d),
        "mlm_norm.weight": _vector(d), "mlm_norm.bias": _vector(d),
        "lm_head.weight": _table(vocab, d), "lm_head.bias": _table(vocab),
        "q.weight": _matrix(d, hd), "q.bias": _vector(hd), "k.weight": _matrix(d, kvd), "k.bias": _vector(kvd),
        "v.weight": _matrix(d, kvd), "v.bias": _vector(kvd), "o.weight": _matrix(vd, d), "o.bias": _vector(d),
        "sinks": _vector(cfg.n_heads),
        "q_norm.weight": _vector(qn), "k_norm.weight": _vector(kn),
        "q_norm.bias": _vector(qn), "k_norm.bias": _vector(kn),
        "qkv.weight": _matrix(d, width), "qkv.bias": _vector(width),
        "norm_attn.weight": _vector(d), "norm_attn.bias": _vector(d),
        "norm_ffn.weight": _vector(d), "norm_ffn.bias": _vector(d),
        "norm_attn_out.weight": _vector(d), "norm_attn_out.bias": _vector(d),
        "norm_ffn_out.weight": _vector(d), "norm_ffn_out.bias": _vector(d),
        "ffn_in.weight": _matrix(d, m), "ffn_in.bias": _vector(m),
        "ffn_out.weight": _matrix(m, d), "ffn_out.bias": _vector(d),
        "ffn_gate.weight": _matrix(d, m), "ffn_up.weight": _matrix(d, m), "ffn_gate_up.weight": _matrix(d, 2 * m),
        **_moe_shapes(cfg),
    }
