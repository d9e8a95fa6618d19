"""Shared float64 references for the Lipschitz tests: exact theta, dense Jacobians, dense alternating maximisation,
and an independent multi-head attention with biases, rotations, GQA, any scale and any mask (THEORY §17)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

F64 = torch.float64


def theta_exact(p: torch.Tensor) -> torch.Tensor:
    """Brute-force theta of rows ``p [..., n]`` (n <= 14): ``max_S 4 P Q / (P + Q)^2`` over all subsets."""
    n = p.shape[-1]
    subsets = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=F64)    # [2^n, n]
    big_p = p.to(F64) @ subsets.T                                                        # [..., 2^n]
    big_q = p.to(F64) @ (1.0 - subsets).T
    return (4 * big_p * big_q / (big_p + big_q).pow(2)).amax(dim=-1)


def jacobian_inf_to_one(p: torch.Tensor) -> torch.Tensor:
    """``||diag(p) - p p^T||_{inf->1}`` of rows ``p [..., n]`` (n <= 12) by its 2^n vertices v in {-1, 1}^n:
    ``sum_j |p_j (v_j - p.v)|``. For rows summing to 1 this is theta (Thm 4.2); for the sub-stochastic rows of a
    sink head it is the quantity theta_sink must equal (THEORY §18.4)."""
    n = p.shape[-1]
    v = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=F64)          # [2^n, n]
    pv = p.to(F64) @ v.T                                                                 # [..., 2^n]
    return (p.to(F64)[..., None, :] * (v - pv[..., None])).abs().sum(-1).amax(-1)


def row_theta(p: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """The exact per-row factor the bounds take: theta of full rows, the inf->1 norm of sink rows."""
    return theta_exact(p) if sinks is None else jacobian_inf_to_one(p)


def jacobian_blocks(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Exact Jacobian blocks ``T[i, j] = d f_i / d x_j`` as ``[T_out, T_in, d_out, d_in]``."""
    jac = torch.autograd.functional.jacobian(f, x, vectorize=True)                      # [T, d_out, T, d_in]
    return jac.permute(0, 2, 1, 3)


def block_sum_bound(blocks: torch.Tensor) -> float:
    """``max_i sum_j ||T_ij||_2`` (§1.1), an upper bound of the block-(inf,2) norm."""
    return float(torch.linalg.matrix_norm(blocks, ord=2).sum(dim=1).max())


def dense_alternating_max(blocks: torch.Tensor, rows: list[int], restarts: int = 3, seed: int = 0,
                          max_iter: int = 100, rtol: float = 1e-6) -> tuple[float, list[list[float]]]:
    """The alternating maximisation of §8.3 on explicit blocks, with the same start vectors as the matrix-free code."""
    d_out = blocks.shape[2]
    lanes = [i for i in rows for _ in range(restarts)]
    y0 = torch.randn(len(lanes), d_out, generator=torch.Generator().manual_seed(seed), dtype=F64)
    y0 = y0 / torch.linalg.vector_norm(y0, dim=-1, keepdim=True)
    best, history = 0.0, []
    for lane, i in enumerate(lanes):
        y, prev, its = y0[lane], -1.0, []
        for _ in range(max_iter):
            g = torch.einsum("jab,a->jb", blocks[i], y)                                  # [T, d_in]
            n = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
            delta = torch.where(n > 0, g / n.clamp_min(1e-300), torch.zeros_like(g))
            z = torch.einsum("jab,jb->a", blocks[i], delta)
            v = float(torch.linalg.vector_norm(z))
            its.append(v)
            if v > 0:
                y = z / v
            if v - prev <= rtol * v:
                break
            prev = max(prev, v)
        history.append(its)
        best = max(best, max(its))
    return best, history


def random_unit_ball_rows(t: int, d: int, radius: float, gen: torch.Generator) -> torch.Tensor:
    """``[t, d]`` rows drawn inside the l2 ball of ``radius`` (random directions and radii)."""
    x = torch.randn(t, d, generator=gen, dtype=F64)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * radius * torch.rand(t, 1, generator=gen, dtype=F64).pow(0.3)


@dataclass
class RandomHeads:
    """A random attention layer in the row convention; rotations act on the first ``rotary_dim`` coordinates."""

    wq: torch.Tensor            # [d, H*D]
    wk: torch.Tensor            # [d, H_kv*D]
    wv: torch.Tensor            # [d, H_kv*D]
    wo: torch.Tensor            # [H*D, d]
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    rotary_dim: int
    angles: torch.Tensor        # [T, rotary_dim / 2] rotation angle per position and pair
    scale: float
    allowed: torch.Tensor       # [T, T] bool
    logit_cap: float | None = None   # logits c tanh(s q.k / c) (THEORY §18.5)
    sinks: torch.Tensor | None = None   # [H] sink logit per head: joins each softmax row, no value (§18.4)

    @property
    def head_dim(self) -> int:
        return self.wq.shape[1] // self.n_heads


def make_random_heads(d: int, head_dim: int, n_heads: int, n_kv_heads: int, t: int, *, biases: bool,
                      rotary_dim: int, scale_factor: float, mask: str, seed: int) -> RandomHeads:
    """Random weights (scaled so attention is neither flat nor one-hot), rotations and one of the masks
    ``none | causal | window | padding``."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=F64)
    hd, kvd = n_heads * head_dim, n_kv_heads * head_dim
    allowed = torch.ones(t, t, dtype=torch.bool)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    if mask in ("causal", "window"):
        allowed &= j <= i
    if mask == "window":
        allowed &= (i - j) < 3
    if mask == "padding":
        allowed &= (j < t - 2) | (i == j)
    return RandomHeads(
        wq=rnd(d, hd, s=d ** -0.5 * 1.5), wk=rnd(d, kvd, s=d ** -0.5 * 1.5), wv=rnd(d, kvd, s=d ** -0.5),
        wo=rnd(hd, d, s=hd ** -0.5), bq=rnd(hd, s=0.5) if biases else None, bk=rnd(kvd, s=0.5) if biases else None,
        bv=rnd(kvd, s=0.5) if biases else None, bo=rnd(d, s=0.5) if biases else None, n_heads=n_heads,
        n_kv_heads=n_kv_heads, rotary_dim=rotary_dim, angles=3.0 * torch.rand(t, rotary_dim // 2, generator=g,
                                                                               dtype=F64),
        scale=scale_factor / head_dim ** 0.5, allowed=allowed,
    )


def _rotate(x: torch.Tensor, angles: torch.Tensor, r: int) -> torch.Tensor:
    """Rotate-half pairs ``(c, c + r/2)`` of ``x [heads, T, D]`` by ``angles [T, r/2]``; other coordinates pass."""
    if r == 0:
        return x
    a, b, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def heads_qkv(x: torch.Tensor, m: RandomHeads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [H, T, D]`` and ``k, v [H_kv, T, D]`` (biased, rotated)."""
    t, dh = x.shape[0], m.head_dim
    proj = lambda w, b, n: (x @ w + (0 if b is None else b)).reshape(t, n, dh).transpose(0, 1)
    q = _rotate(proj(m.wq, m.bq, m.n_heads), m.angles, m.rotary_dim)
    k = _rotate(proj(m.wk, m.bk, m.n_kv_heads), m.angles, m.rotary_dim)
    return q, k, proj(m.wv, m.bv, m.n_kv_heads)


def heads_mha(x: torch.Tensor, m: RandomHeads) -> torch.Tensor:
    """Reference MHA ``[T, d]`` of §5.1 for ``x [T, d]``."""
    q, k, v = heads_qkv(x, m)
    group = m.n_heads // m.n_kv_heads
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)                  # [H, T, D]
    logits = capped(m.scale * q @ k.transpose(-1, -2), m.logit_cap).masked_fill(~m.allowed, float("-inf"))
    ctx = softmax_with_sinks(logits, m.sinks) @ v                                        # [H, T, D]
    out = ctx.transpose(0, 1).reshape(x.shape[0], -1) @ m.wo
    return out if m.bo is None else out + m.bo


def heads_probabilities(x: torch.Tensor, m: RandomHeads) -> torch.Tensor:
    """Attention rows ``[H, T, T]``."""
    q, k, _ = heads_qkv(x, m)
    k = k.repeat_interleave(m.n_heads // m.n_kv_heads, 0)
    logits = capped(m.scale * q @ k.transpose(-1, -2), m.logit_cap).masked_fill(~m.allowed, float("-inf"))
    return softmax_with_sinks(logits, m.sinks)


def softmax_with_sinks(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax rows of ``logits [H, T_q, T_k]``; with ``sinks [H]`` one more outcome of logit ``sinks[h]`` joins every
    row of head h and is dropped afterwards, so the key probabilities sum to m < 1 (THEORY §18.4)."""
    if sinks is None:
        return logits.softmax(-1)
    col = sinks.to(logits.dtype)[:, None, None].expand(*logits.shape[:-1], 1)
    return torch.cat([logits, col], dim=-1).softmax(-1)[..., :-1]


def capped(s: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``c tanh(s / c)``, or ``s`` without a cap."""
    return s if cap is None else cap * torch.tanh(s / cap)


# --- whole layers (THEORY §7, T21, T25) ---------------------------------------------------------------------------

@dataclass
class RandomLayer:
    """One random layer of a family in two independent forms: the package's (``weights``, ``cfg``, RoPE tables,
    padding mask, for :func:`run_layer`) and a plain reference (:meth:`reference`) built on :func:`heads_mha`."""

    family: str
    weights: object             # LayerWeights
    cfg: object                 # ModelConfig
    layer: int
    heads: RandomHeads
    rope_cs: tuple[torch.Tensor, torch.Tensor] | None
    key_padding_mask: torch.Tensor | None    # [T] bool, True = real token
    norm_kind: str              # "layernorm" | "rmsnorm"
    residual: str               # "pre" | "post" | "parallel" | "parallel_shared" | "sandwich" | "output_norm"
    eps: float
    ffn: dict[str, torch.Tensor]
    activation: str

    def norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """Reference LayerNorm / RMSNorm of ``x [T, d]`` with the weights of ``norm_attn``, ``norm_ffn`` (or the
        branch-output norms ``norm_attn_out``, ``norm_ffn_out``); ``x`` itself where the norm is the identity."""
        w = getattr(self.weights, which)
        if w.weight is None:
            return x
        if self.norm_kind == "layernorm":
            c = x - x.mean(-1, keepdim=True)
            out = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + self.eps) * w.weight
            return out if w.bias is None else out + w.bias
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w.weight

    def ffn_map(self, x: torch.Tensor) -> torch.Tensor:
        """Reference FFN of ``x [T, d]``: GELU/ReLU MLP or SwiGLU."""
        f = self.ffn
        if "w_gate" in f:
            return (GATES[self.activation](x @ f["w_gate"]) * (x @ f["w_up"])) @ f["w_out"]
        act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
               "gelu_new": lambda a: torch.nn.functional.gelu(a, approximate="tanh")}[self.activation]
        return act(x @ f["w_in"] + f["b_in"]) @ f["w_out"] + f["b_out"]

    def mha(self, x: torch.Tensor) -> torch.Tensor:
        return heads_mha(x, self.heads)

    def intermediates(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every factor's input and the output for ``h [T, d]``: keys ``n1_in, mha_in, n2_in, ffn_in, out`` (and
        ``n1o_in``, ``n2o_in``, the branch outputs, for sandwich and output-norm layers)."""
        if self.residual == "post":
            u1 = h + self.mha(h)
            h1 = self.norm(u1, "norm_attn")
            u2 = h1 + self.ffn_map(h1)
            return dict(n1_in=u1, mha_in=h, n2_in=u2, ffn_in=h1, out=self.norm(u2, "norm_ffn"))
        a = self.norm(h, "norm_attn")
        if self.residual in ("parallel", "parallel_shared"):
            f_in = self.norm(h, "norm_attn" if self.residual == "parallel_shared" else "norm_ffn")
            return dict(n1_in=h, mha_in=a, n2_in=h, ffn_in=f_in, out=h + self.mha(a) + self.ffn_map(f_in))
        if self.residual in ("sandwich", "output_norm"):     # N1a = N2a = identity without input norms
            attn = self.mha(a)
            mid = h + self.norm(attn, "norm_attn_out")
            f_in = self.norm(mid, "norm_ffn")
            f_out = self.ffn_map(f_in)
            return dict(n1_in=h, mha_in=a, n1o_in=attn, n2_in=mid, ffn_in=f_in, n2o_in=f_out,
                        out=mid + self.norm(f_out, "norm_ffn_out"))
        mid = h + self.mha(a)
        f_in = self.norm(mid, "norm_ffn")
        return dict(n1_in=h, mha_in=a, n2_in=mid, ffn_in=f_in, out=mid + self.ffn_map(f_in))

    def reference(self, h: torch.Tensor) -> torch.Tensor:
        """The layer map ``h [T, d] -> h+ [T, d]``."""
        return self.intermediates(h)["out"]


GATES = {"silu": torch.nn.functional.silu,
         "gelu_pytorch_tanh": lambda a: torch.nn.functional.gelu(a, approximate="tanh")}
GEMMA_SCALAR, GEMMA_CAP = 6.0, 0.75    # s = 6^(-1/2), not D^(-1/2); a cap the raw logits exceed

# family: (norm, residual, ffn activation or "swiglu" / "geglu", d, D, H, H_kv, rotary_dim, biases, causal, window,
# padding); "gemma2": sandwich norms, GeGLU, soft-capped logits, s from query_pre_attn_scalar (THEORY §18.3-18.6);
# "olmo2": norms on the branch outputs only (identity N1a, N2a: the MHA reads h itself, §18.3), biases, GQA
FAMILY_SHAPES = {
    "gpt2": ("layernorm", "pre", "gelu_new", 8, 4, 2, 2, 0, True, True, None, False),
    "llama": ("rmsnorm", "pre", "swiglu", 8, 4, 2, 1, 4, False, True, 3, False),
    "qwen2": ("rmsnorm", "pre", "swiglu", 8, 2, 4, 2, 2, True, True, None, False),
    "neox": ("layernorm", "parallel", "gelu", 8, 4, 2, 2, 2, True, True, None, False),
    "gptj": ("layernorm", "parallel_shared", "gelu_new", 8, 4, 2, 2, 2, False, True, None, False),
    "bert": ("layernorm", "post", "gelu", 8, 4, 2, 2, 0, True, False, None, True),
    "gemma2": ("rmsnorm", "sandwich", "geglu", 8, 4, 2, 1, 4, False, True, None, False),
    "olmo2": ("rmsnorm", "output_norm", "swiglu", 8, 4, 2, 1, 4, True, True, None, False),
    "gptoss": ("rmsnorm", "pre", "swiglu", 8, 4, 4, 2, 4, True, True, None, False),
}
SINK_FAMILIES = {"gptoss"}   # attention sinks (§18.4) with attention biases; a dense SwiGLU stands in for the MoE


def make_random_layer(family: str, t: int, eps: float, seed: int, layer: int = 1) -> RandomLayer:
    """A random layer of ``family`` (see :data:`FAMILY_SHAPES`); GPT-2 uses ``scale_attn_by_inverse_layer_idx`` so
    its scale is ``1 / (2 sqrt(D))`` at ``layer = 1``; Qwen2 biases cover q, k, v only (no output bias)."""
    from attnstab_cli.arch.spec import (FFNKind, Layout, NormKind, Orientation, Positions, QKVPacking, Residual,
                                        RopeStyle)
    from attnstab_cli.model.config import ModelConfig, RopeConfig
    from attnstab_cli.model.weights import LayerWeights, NormWeights

    norm, residual, act, d, dh, h, hkv, rot, biases, causal, window, padding = FAMILY_SHAPES[family]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=F64)
    scale = 1.0 / (dh ** 0.5 * (layer + 1)) if family == "gpt2" else 1.0 / dh ** 0.5
    sandwich = residual == "sandwich"
    if sandwich:
        scale = GEMMA_SCALAR ** -0.5
    heads = make_random_heads(d, dh, h, hkv, t, biases=biases, rotary_dim=rot, scale_factor=scale * dh ** 0.5,
                              mask="none", seed=seed)
    heads.wq, heads.wk = 2.0 * heads.wq, 2.0 * heads.wk                    # sharper attention at unit-RMS inputs
    heads.logit_cap = GEMMA_CAP if sandwich else None
    if family == "qwen2":
        heads.bo = None
    if family in SINK_FAMILIES:
        heads.sinks = 1.5 * rnd(h) + 0.5
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = torch.ones(t, t, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j) < window
    kpm = None
    if padding:
        kpm = torch.ones(t, dtype=torch.bool)
        kpm[-1] = False
        allowed &= kpm[None, :]
    heads.allowed = allowed
    rope_cs = (heads.angles.cos(), heads.angles.sin()) if rot else None
    m = 12
    if act in ("swiglu", "geglu"):
        ffn = {"w_gate": rnd(d, m, s=1.5 * d ** -0.5), "w_up": rnd(d, m, s=d ** -0.5), "w_out": rnd(m, d, s=m ** -0.5)}
    else:
        ffn = {"w_in": rnd(d, m, s=1.5 * d ** -0.5), "b_in": rnd(m, s=0.5), "w_out": rnd(m, d, s=m ** -0.5),
               "b_out": rnd(d, s=0.5)}
    kind = NormKind.LAYERNORM if norm == "layernorm" else NormKind.RMSNORM
    make_norm = lambda: NormWeights(1.0 + 0.3 * rnd(d), 0.2 * rnd(d) if kind is NormKind.LAYERNORM else None)
    if residual == "output_norm":                          # no norms before the branches: identities
        norm_attn, norm_ffn = NormWeights(None, None), NormWeights(None, None)
    else:
        norm_attn = make_norm()
        norm_ffn = norm_attn if residual == "parallel_shared" else make_norm()    # GPT-J: one norm feeds both branches
    outs = dict(norm_attn_out=make_norm(), norm_ffn_out=make_norm()) if residual in ("sandwich", "output_norm") else {}
    weights = LayerWeights(layer=layer, wq=heads.wq, wk=heads.wk, wv=heads.wv, wo=heads.wo, bq=heads.bq, bk=heads.bk,
                           bv=heads.bv, bo=heads.bo, norm_attn=norm_attn, norm_ffn=norm_ffn, ffn=ffn, **outs,
                           sinks=heads.sinks)
    layout = Layout(orientation=Orientation.OUT_IN, qkv_packing=QKVPacking.SEPARATE, norm=kind,
                    residual=Residual(residual), positions=Positions.ROPE if rot else Positions.LEARNED,
                    rope_style=RopeStyle.HALF_SPLIT if rot else None, causal=causal,
                    ffn=FFNKind.GATED if act in ("swiglu", "geglu") else FFNKind.MLP,
                    attn_sinks=heads.sinks is not None)
    cfg = ModelConfig(family=family, model_type=family, layout=layout, n_layers=layer + 1, d_model=d, n_heads=h,
                      n_kv_heads=hkv, head_dim=dh, d_ff=m, vocab_size=11, max_positions=t, norm_eps=eps,
                      activation={"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}.get(act, act),
                      rope=RopeConfig(theta=1e4, rotary_dim=rot, style=RopeStyle.HALF_SPLIT) if rot else None,
                      sliding_windows=(window,) * (layer + 1), scale_by_inverse_layer_idx=family == "gpt2",
                      query_pre_attn_scalar=GEMMA_SCALAR if sandwich else None, attn_logit_cap=heads.logit_cap)
    return RandomLayer(family, weights, cfg, layer, heads, rope_cs, kpm, norm, residual, eps, ffn,
                       cfg.activation)
