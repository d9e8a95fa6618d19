"""Softmax row statistics: reference vs brute force, kernel vs reference (THEORY §2.4, §3.5, test T8).

The reference is checked against a 50-digit `decimal` softmax and an exhaustive θ over all subsets (n ≤ 12); the
§3.5 streaming update, written key by key, and the fused kernel (interpreted on CPU, float64) must agree with it to
rel 1e-12; the kernel in float32/float16/bfloat16 must match it within `tests/tolerances.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from tolerances import TOLERANCES

from attnstab_cli.reference.row_stats import FLOAT_FIELDS, RowStats, attn_row_stats_ref

try:
    from attnstab_kernels.row_stats import attn_row_stats, is_interpreted
except ImportError:  # triton is Linux-only
    attn_row_stats, is_interpreted = None, lambda: False

INTERPRETED = attn_row_stats is not None and is_interpreted()
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
requires_kernel = pytest.mark.skipif(
    attn_row_stats is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton, and TRITON_INTERPRET=1 or a CUDA device")
REL = 1e-12  # T8


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Case:
    B: int
    H: int
    H_kv: int
    T_q: int
    T_k: int
    D: int = 16
    causal: bool = True
    pad: bool = False
    window: int | None = None
    logit_sd: float = 3.0
    seed: int = 0


def make_inputs(c: Case, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q `# [B, H, T_q, D]`, k `# [B, H_kv, T_k, D]`, logits ≈ N(0, logit_sd²) at scale D^-½; padding `# [B, T_k]`."""
    g = torch.Generator().manual_seed(c.seed)
    q = torch.randn(c.B, c.H, c.T_q, c.D, generator=g, dtype=torch.float64) * c.logit_sd
    k = torch.randn(c.B, c.H_kv, c.T_k, c.D, generator=g, dtype=torch.float64)
    pad = None
    if c.pad:
        pad = torch.rand(c.B, c.T_k, generator=g) > 0.3  # [B, T_k]
        pad[0, -1] = True
    return q.to(dtype), k.to(dtype), pad


def brute_allowed(c: Case, pad: torch.Tensor | None, b: int, i: int) -> list[int]:
    """Keys query i may see, by the definitions in the docstring of `attn_row_stats_ref`."""
    pos = i + c.T_k - c.T_q
    return [j for j in range(c.T_k)
            if (not c.causal or j <= pos) and (c.window is None or pos - j < c.window)
            and (pad is None or bool(pad[b, j]))]


# ---------------------------------------------------------------------------------------------------- brute force
def _dec_log1p(r: Decimal) -> Decimal:
    """log(1 + r) for r ≥ 0 in the context precision, also when 1 + r would round to 1."""
    if r > Decimal("1e-6"):
        return (1 + r).ln()
    total, term, j = Decimal(0), r, 1
    while term > r * Decimal("1e-45"):
        total += term / j if j % 2 else -term / j
        term *= r
        j += 1
    return total


def brute_row(s: list[float]) -> dict[str, float]:
    """Every field of one row from its allowed logits (n ≥ 1), in 50-digit decimal arithmetic.

    Works relative to the maximum (e_argmax = 1, rest = Σ of the others) so that no quantity below 1 is ever formed
    as 1 − something: tiny 1 − p_max and tiny entropies keep all their digits.
    """
    with localcontext() as ctx:
        ctx.prec = 50
        d = [Decimal(x) for x in s]
        m = max(d)
        a = d.index(m)
        e = [(x - m).exp() for x in d]
        rest = sum((x for j, x in enumerate(e) if j != a), Decimal(0))
        log_z = _dec_log1p(rest)  # log Σ e
        p = [x / (1 + rest) for x in e]
        c, j_star = Decimal(0), len(p) - 1
        for j, x in enumerate(p):
            c += x
            if c >= Decimal("0.5"):
                j_star = j
                break
        before, after = sum(p[:j_star], Decimal(0)), sum(p[j_star + 1:], Decimal(0))
        total = before + p[j_star] + after
        prefix = 4 * max(before * (p[j_star] + after), (before + p[j_star]) * after) / total ** 2
        return {"row_max": float(m), "lse": float(m + log_z), "pmax": float(p[a]),
                "one_minus_pmax": float(rest / (1 + rest)),
                "entropy": float(sum((x * (log_z - (v - m)) for x, v in zip(p, d)), Decimal(0))),
                "theta_prefix": float(prefix), "p_star": float(p[j_star]), "p": np.array([float(x) for x in p])}


def exhaustive_theta(p: np.ndarray) -> float:
    """θ(p) = max_S 4 p(S) p(Sᶜ) / (p(S) + p(Sᶜ))² over all 2ⁿ subsets (Definition 4.1, §3.1 evaluation)."""
    n = len(p)
    masks = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)  # [2ⁿ, n]
    P, Q = masks @ p, (~masks) @ p
    return float(np.max(4 * P * Q / (P + Q) ** 2))


def brute_force(c: Case, q: torch.Tensor, k: torch.Tensor, pad: torch.Tensor | None) -> list[tuple[tuple, dict]]:
    """((b, h, i), fields) for every row; logits in float64 numpy, the rest in `brute_row`."""
    qn, kn, G, rows = q.double().numpy(), k.double().numpy(), c.H // c.H_kv, []
    for b in range(c.B):
        for h in range(c.H):
            s = qn[b, h] @ kn[b, h // G].T * c.D ** -0.5  # [T_q, T_k]
            for i in range(c.T_q):
                keys = brute_allowed(c, pad, b, i)
                row = brute_row([float(s[i, j]) for j in keys]) if keys else {}
                rows.append(((b, h, i), {**row, "n_keys": len(keys)}))
    return rows


def assert_rel(got: float, want: float, rtol: float = REL, what: str = "") -> None:
    assert abs(got - want) <= rtol * abs(want) + 1e-300, f"{what}: got {got!r}, want {want!r}"


# ------------------------------------------------------------------------------------------ reference vs brute force
REF_CASES = [
    Case(1, 2, 1, 12, 12, logit_sd=0.3),
    Case(1, 2, 1, 12, 12, logit_sd=3.0),
    Case(1, 2, 1, 12, 12, logit_sd=30.0),
    Case(2, 2, 2, 9, 9, causal=False, pad=True, seed=1),
    Case(1, 4, 2, 11, 11, window=4, seed=2),
    Case(2, 2, 1, 3, 10, window=6, pad=True, seed=3),  # T_q < T_k: bottom-right causal alignment
    Case(1, 2, 2, 6, 4, seed=4),  # T_q > T_k: the first rows see no key
]


def case_id(c: Case) -> str:
    masks = "".join(x for x, on in (("c", c.causal), ("p", c.pad), (f"w{c.window}", c.window)) if on)
    return f"B{c.B}H{c.H}kv{c.H_kv}q{c.T_q}k{c.T_k}{masks}sd{c.logit_sd}"


@pytest.mark.parametrize("case", REF_CASES, ids=case_id)
def test_reference_matches_brute_force(case: Case) -> None:
    q, k, pad = make_inputs(case)
    ref = attn_row_stats_ref(q, k, case.D ** -0.5, causal=case.causal, key_padding_mask=pad, window=case.window,
                             block_q=4)
    for (b, h, i), want in brute_force(case, q, k, pad):
        got = {name: getattr(ref, name)[b, h, i].item() for name in (*FLOAT_FIELDS, "n_keys")}
        assert got["n_keys"] == want["n_keys"]
        if want["n_keys"] == 0:
            assert got["row_max"] == got["lse"] == -math.inf
            assert all(math.isnan(got[f]) for f in ("pmax", "one_minus_pmax", "entropy"))
            assert all(got[f] == 0.0 for f in FLOAT_FIELDS if f.startswith("theta"))
            continue
        assert abs(got["row_max"] - want["row_max"]) <= 1e-13 * max(1.0, abs(want["row_max"]))
        assert abs(got["lse"] - want["lse"]) <= REL * max(1.0, abs(want["lse"]))
        for f in ("pmax", "one_minus_pmax", "entropy", "theta_prefix"):
            assert_rel(got[f], want[f], what=f"{f} at {(b, h, i)}")


def _guarantee_rows() -> list[tuple[dict, dict]]:
    """(reference row, brute row) for many rows with n ≤ 12: random, near one-hot, uniform, tied."""
    out: list[tuple[dict, dict]] = []
    cases = [Case(1, 12, 12, 12, 12, logit_sd=sd, seed=10 + i) for i, sd in enumerate((0.3, 1.0, 3.0, 8.0, 30.0))]
    uniform = Case(1, 1, 1, 12, 12, logit_sd=0.0)
    for c in [*cases, uniform, Case(1, 2, 1, 12, 12, causal=False, logit_sd=5.0, seed=99)]:
        q, k, pad = make_inputs(c)
        if c.seed == 99:
            k[:, :, 6:] = k[:, :, :6]  # ties: every logit appears twice
        ref = attn_row_stats_ref(q, k, c.D ** -0.5, causal=c.causal, key_padding_mask=pad, window=c.window)
        for (b, h, i), want in brute_force(c, q, k, pad):
            out.append(({f: getattr(ref, f)[b, h, i].item() for f in (*FLOAT_FIELDS, "n_keys")}, want))
    return out


def test_reference_theta_guarantees() -> None:
    """T8 guarantees against the exhaustive θ: stream bracket, natural prefix, entropy; 0 violations."""
    checked_entropy = 0
    for got, want in _guarantee_rows():
        n = want["n_keys"]
        theta = exhaustive_theta(want["p"]) if n > 1 else 0.0
        up = theta * (1 + REL) + 1e-300
        assert got["theta_lo_stream"] <= up and got["theta_prefix"] <= up and got["theta_lo"] <= up
        assert got["theta_prefix"] <= got["theta_prefix_plus"] <= up  # the completion is a concrete subset too
        assert theta <= got["theta_hi_stream"] * (1 + REL) + 1e-300
        if n <= 1:
            assert got["theta_lo"] == got["theta_hi_stream"] == 0.0
            continue
        if want["pmax"] >= 0.5:  # exact (§2.3, case 3)
            assert_rel(got["theta_lo_stream"], theta, what="exact peaked θ")
            assert_rel(got["theta_lo"], theta, what="exact peaked θ")
        else:
            assert got["theta_hi_stream"] == 1.0
            assert got["theta_lo_stream"] >= (1 - want["pmax"] ** 2) * (1 - REL)
            assert got["theta_lo_stream"] >= 4 * want["pmax"] * want["one_minus_pmax"] * (1 - REL)
        assert got["theta_prefix"] >= (1 - want["p_star"] ** 2) * (1 - REL) - 1e-15  # §2.4(2), natural order
        assert got["theta_lo"] == max(got["theta_lo_stream"], got["theta_prefix_plus"]) or want["pmax"] >= 0.5
        H = got["entropy"]
        if H <= math.log(2):  # §2.4(6)
            checked_entropy += 1
            e_H = math.exp(-H)
            assert theta <= 4 * e_H * -math.expm1(-H) * (1 + REL) + 1e-300
    assert checked_entropy > 20


def test_reference_uniform_rows_are_exact() -> None:
    """Uniform causal rows (T11): θ = 1 − ((i+1) mod 2)/(i+1)², reached by the stream or the prefix bound."""
    c = Case(1, 1, 1, 12, 12, logit_sd=0.0)
    q, k, _ = make_inputs(c)
    ref = attn_row_stats_ref(q, k, 0.25, causal=True)
    n = torch.arange(1, 13, dtype=torch.float64)
    want = torch.where(n == 1, 0.0, 1 - (n % 2) / n ** 2)
    torch.testing.assert_close(ref.theta_lo[0, 0], want, rtol=0, atol=1e-15)


def _stream_row(s: list[float]) -> tuple[float, float, float, float]:
    """§3.5 key by key: (pmax, 1 − pmax, lse, H) from the running m, z_rest and t."""
    m, z, t = -math.inf, 0.0, 0.0
    for x in s:
        if x > m:
            if m > -math.inf:
                a = math.exp(m - x)
                t = a * (t + (1 + z) * (m - x))
                z = a * (z + 1)
            m = x
        else:
            e = math.exp(x - m)
            z += e
            t += e * (x - m)
    return 1 / (1 + z), z / (1 + z), m + math.log1p(z), math.log1p(z) - t / (1 + z)


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
@pytest.mark.parametrize("logit_sd", [0.3, 3.0, 30.0])
def test_streaming_update_matches_two_pass(order: str, logit_sd: float) -> None:
    """T8: the per-key rescaling of §3.5 reproduces the two-pass reference to rel 1e-12.

    Ascending logits move the maximum at every key, the hardest case for the rescaling.
    """
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 40, generator=g, dtype=torch.float64) * logit_sd  # [H, T_k]
    if order != "random":
        s = s.sort(dim=-1, descending=order == "descending").values
    q = torch.zeros(1, 4, 1, 2, dtype=torch.float64)  # [B, H, T_q, D]
    q[..., 0] = 1.0
    k = torch.stack([s, torch.zeros_like(s)], dim=-1)[None]  # [B, H, T_k, D]: logits are exactly s at scale 1
    ref = attn_row_stats_ref(q, k, 1.0, causal=False)
    for h in range(4):
        got = _stream_row(s[h].tolist())
        want = (ref.pmax[0, h, 0].item(), ref.one_minus_pmax[0, h, 0].item(), ref.lse[0, h, 0].item(),
                ref.entropy[0, h, 0].item())
        for g_, w, name in zip(got, want, ("pmax", "one_minus_pmax", "lse", "entropy")):
            assert_rel(g_, w, what=f"{name} head {h}")


def test_reference_chunking_and_gqa_view() -> None:
    """Chunk size does not change the result; H_kv < H equals repeating each key head."""
    c = Case(2, 4, 2, 13, 13, window=5, pad=True, seed=5)
    q, k, pad = make_inputs(c)
    runs = [attn_row_stats_ref(q, k, 0.25, causal=True, key_padding_mask=pad, window=5, block_q=bq)
            for bq in (1, 4, None)]
    expanded = attn_row_stats_ref(q, k.repeat_interleave(2, dim=1), 0.25, causal=True, key_padding_mask=pad,
                                  window=5)
    for other in (*runs[1:], expanded):
        assert_stats_close(other, runs[0], rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------- kernel vs reference
def assert_stats_close(got: RowStats, want: RowStats, **tol: float) -> None:
    assert torch.equal(got.n_keys.cpu(), want.n_keys.cpu())
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name).cpu(), equal_nan=True, **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def run_both(c: Case, dtype: torch.dtype, block_q: int | None = None) -> tuple[RowStats, RowStats]:
    q, k, pad = make_inputs(c, dtype)
    q, k = q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE)
    pad = pad.to(KERNEL_DEVICE) if pad is not None else None
    kw = dict(causal=c.causal, key_padding_mask=pad, window=c.window, block_q=block_q)
    return attn_row_stats(q, k, c.D ** -0.5, **kw), attn_row_stats_ref(q, k, c.D ** -0.5, **kw)


KERNEL_SHAPES = [  # (B, H, H_kv, T_q, T_k, D): tails, T = 1, GQA and MQA, T_q ≠ T_k
    (1, 2, 2, 1, 1, 16),
    (1, 2, 1, 7, 7, 32),
    (1, 4, 2, 33, 33, 16),
    (1, 1, 1, 70, 70, 32),
    (2, 4, 1, 5, 40, 16),
]


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape: tuple[int, ...], causal: bool, dtype: torch.dtype) -> None:
    got, want = run_both(Case(*shape, causal=causal, seed=sum(shape)), dtype)
    assert_stats_close(got, want, **TOLERANCES[dtype])


MASK_CASES = {
    "padding": dict(pad=True),
    "window": dict(window=5),
    "padding+window": dict(pad=True, window=9),
}


@requires_kernel
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", MASK_CASES)
def test_kernel_masks(mask: str, causal: bool) -> None:
    got, want = run_both(Case(2, 2, 1, 37, 37, causal=causal, seed=11, **MASK_CASES[mask]), torch.float32)
    assert_stats_close(got, want, **TOLERANCES[torch.float32])


@requires_kernel
@pytest.mark.parametrize("logit_sd", [0.3, 30.0])
def test_kernel_float64_matches_reference_T8(logit_sd: float) -> None:
    """T8 on the fused kernel: block-wise streaming in float64 vs the two-pass reference, rel 1e-12."""
    c = Case(1, 2, 1, 40, 40, causal=True, pad=True, logit_sd=logit_sd, seed=13)
    got, want = run_both(c, torch.float64)
    assert_stats_close(got, want, **TOLERANCES[torch.float64])


@requires_kernel
def test_kernel_empty_rows_and_block_q() -> None:
    """Fully padded batch items and T_q > T_k give empty rows with the reference's conventions; BLOCK_Q override."""
    c = Case(2, 2, 2, 20, 17, causal=True, pad=True, seed=17)
    q, k, pad = make_inputs(c, torch.float32)
    pad[1] = False
    kw = dict(causal=True, key_padding_mask=pad.to(KERNEL_DEVICE), window=None, block_q=32)
    got = attn_row_stats(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), 0.25, **kw)
    want = attn_row_stats_ref(q, k, 0.25, **{**kw, "key_padding_mask": pad})
    assert (want.n_keys[1] == 0).all() and (want.n_keys[0, :, :3] == 0).all()
    assert_stats_close(got, want, **TOLERANCES[torch.float32])


@requires_kernel
def test_kernel_strided_inputs() -> None:
    """Non-contiguous q and k (a [B, T, H, D] layout seen through transpose) are read through their strides."""
    g = torch.Generator().manual_seed(19)
    q = torch.randn(1, 9, 2, 16, generator=g).transpose(1, 2).to(KERNEL_DEVICE)  # [B, H, T_q, D], strided
    k = torch.randn(1, 9, 1, 16, generator=g).transpose(1, 2).to(KERNEL_DEVICE)  # [B, H_kv, T_k, D], strided
    got = attn_row_stats(q, k, 0.25, causal=True)
    want = attn_row_stats_ref(q.contiguous(), k.contiguous(), 0.25, causal=True)
    assert_stats_close(got, want, **TOLERANCES[torch.float32])


GPU_CASES = [  # (B, H, H_kv, T_q, T_k, D, causal, pad, window, dtype)
    (2, 8, 2, 1000, 1000, 64, True, False, None, torch.bfloat16),
    (1, 4, 4, 1537, 1537, 128, False, True, None, torch.float16),
    (1, 4, 1, 777, 2048, 64, True, False, 256, torch.float32),
    (1, 32, 8, 8192, 8192, 128, True, False, None, torch.bfloat16),   # a LLaMA-sized layer at real length
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or attn_row_stats is None or INTERPRETED,
                    reason="needs CUDA and the compiled kernel (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_kernel_compiled_matches_reference_on_gpu(case: tuple) -> None:
    B, H, H_kv, T_q, T_k, D, causal, pad, window, dtype = case
    got, want = run_both(Case(B, H, H_kv, T_q, T_k, D, causal=causal, pad=pad, window=window, seed=T_q), dtype)
    assert_stats_close(got, want, **TOLERANCES[dtype])


@pytest.mark.skipif(attn_row_stats is None, reason="needs triton")
def test_logit_theta_err_bounds_float32_logit_rounding() -> None:
    """theta_err = 2(e^{2δ} − 1) with δ ≥ every |ŝ_ij − s_ij| of a float32 dot product (THEORY §3.7): recover δ from
    it and compare with the observed rounding of float32 logits against float64 ones, natural and base 2."""
    from attnstab_kernels.row_stats import compute_logit_theta_err

    g = torch.Generator().manual_seed(23)
    q = torch.randn(2, 4, 50, 64, generator=g) * 8.0                       # large logits: rounding is visible
    k = torch.randn(2, 2, 50, 64, generator=g) * 8.0
    scale = 64 ** -0.5
    err = compute_logit_theta_err(q, k, scale)                             # [B, H, T_q]
    delta = torch.log1p(err / 2.0) / 2.0
    k_full = k.repeat_interleave(2, dim=1)
    s64 = (q.double() @ k_full.double().transpose(-1, -2)) * scale
    base2 = torch.tensor(scale * math.log2(math.e), dtype=torch.float32)   # the kernel's scale, log2 e folded in
    s_nat = ((q @ k_full.transpose(-1, -2)) * scale).double()               # natural float32 logits
    s_b2 = ((q @ k_full.transpose(-1, -2)) * base2).double() / math.log2(math.e)  # the kernel's base-2 ones, in nats
    for s32 in (s_nat, s_b2):
        observed = (s32 - s64).abs().amax(-1)                              # [B, H, T_q]
        assert bool((observed <= delta).all()) and float(observed.max()) > 0


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kernel_with_sinks_matches_reference(dtype: torch.dtype) -> None:
    """Sink logits (THEORY §18.4) through the fused path: the same sink rows as the reference (every float field and
    the sink mass, within the dtype's tolerance), fully padded rows included; the rounding bound θ_err grows by the
    sink factor 1.5 over the plain kernel's."""
    from attnstab_cli.reference.row_stats import SINK_ERR_FACTOR

    c = Case(2, 4, 2, 21, 21, causal=True, pad=True, window=9, seed=23)
    q, k, pad = make_inputs(c, dtype)
    pad[1, :3] = False
    sinks = torch.tensor([-5.0, 0.0, 2.0, 6.0], dtype=torch.float32)
    dev = lambda x: x.to(KERNEL_DEVICE)
    kw = dict(causal=True, key_padding_mask=dev(pad), window=9)
    got = attn_row_stats(dev(q), dev(k), 0.25, sinks=dev(sinks), **kw)
    want = attn_row_stats_ref(dev(q), dev(k), 0.25, sinks=dev(sinks), **kw)
    assert_stats_close(got, want, **TOLERANCES[dtype])
    torch.testing.assert_close(got.sink_mass.cpu(), want.sink_mass.cpu(), **TOLERANCES[dtype])
    plain = attn_row_stats(dev(q), dev(k), 0.25, **kw)
    torch.testing.assert_close(got.theta_err, SINK_ERR_FACTOR * plain.theta_err, rtol=0.0, atol=0.0)
    assert float(got.sink_mass.min()) < 0.01 and float(got.sink_mass.max()) > 0.99
