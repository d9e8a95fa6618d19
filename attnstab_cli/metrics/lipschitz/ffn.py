"""Lipschitz bounds of the feed-forward blocks (THEORY §6), per token and therefore block-(inf,2) (§1.1).

* GELU-style MLP ``phi(x W1 + b1) W2 + b2``: ``J = W1 diag(phi'(a)) W2``, so
  ``||J(x)|| <= ||W1|| max_k |phi'(a_k)| ||W2||`` (tier 2; ReLU's kink counts with slope 1) and
  ``L_phi ||W1|| ||W2||`` with ``L_phi = 1.129`` for GELU (tier 1; erf max slope 1.12890, tanh 1.12899).
* SwiGLU ``(silu(x Wg) * x Wu) Wd``: not globally Lipschitz; local, stacked and ball bounds of §6.2. SiLU constants:
  ``max silu' = 1.0998393`` at ``z* = 2.399357``; ``sup_{|z|<=A} |silu| = A sigma(A)``.
* Gated GELU (GeGLU, ModernBERT's ``Wi``): the same forms with the exact GELU (§18.6): ``max gelu' = 1.1289042`` at
  ``z* = sqrt 2``, ``sup_{|z|<=A} |gelu| = A Phi(A)``. Both activations satisfy ``act'(z) + act'(-z) = 1`` with
  ``act'`` increasing on ``[0, z*]``, so ``sup_{|z|<=A} |act'| = act'(min(A, z*))`` and ``sup |act| = act(A)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from attnstab_cli.arch.spec import FFNKind
from attnstab_cli.errors import UnsupportedError
from attnstab_cli.metrics.spectral import norm_2_to_inf, spectral_norm_value as spectral_norm

F64 = torch.float64
GELU_LIPSCHITZ = 1.129                    # >= max |GELU'| for the erf (1.128904) and tanh (1.128993) forms
SILU_ZSTAR = 2.399357280537518            # argmax of silu'
SILU_DMAX = 1.0998393201289               # max silu' (1.09983932012887 rounded up)
SILU_DMIN = 1.0 - SILU_DMAX               # min silu' at -z*, since silu'(z) + silu'(-z) = 1
_TANH_C = math.sqrt(2.0 / math.pi)
GELU_ZSTAR = math.sqrt(2.0)               # argmax of the exact gelu'
GELU_DMAX = 1.1289042                     # max exact gelu' (1.128904145..., rounded up)


def gelu_erf_derivative(a: torch.Tensor) -> torch.Tensor:
    """``d/da [a Phi(a)] = Phi(a) + a N(a)`` (exact GELU)."""
    return 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0))) + a * torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def gelu_tanh_derivative(a: torch.Tensor) -> torch.Tensor:
    """Derivative of ``0.5 a (1 + tanh(c (a + 0.044715 a^3)))`` (GPT-2 ``gelu_new``)."""
    t = torch.tanh(_TANH_C * (a + 0.044715 * a.pow(3)))
    return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * a * a)


def silu_derivative(z: torch.Tensor) -> torch.Tensor:
    """``silu'(z) = sigma(z) (1 + z (1 - sigma(z)))``."""
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_erf_derivative, "gelu_new": gelu_tanh_derivative, "gelu_pytorch_tanh": gelu_tanh_derivative,
    "gelu_fast": gelu_tanh_derivative, "silu": silu_derivative, "swish": silu_derivative,
    "relu": lambda a: (a >= 0).to(a.dtype),      # slope 1 at the kink: the local constant sees both sides
}
_LIPSCHITZ = {"gelu": GELU_LIPSCHITZ, "gelu_new": GELU_LIPSCHITZ, "gelu_pytorch_tanh": GELU_LIPSCHITZ,
              "gelu_fast": GELU_LIPSCHITZ, "silu": SILU_DMAX, "swish": SILU_DMAX, "relu": 1.0}


def activation_derivative(a: torch.Tensor, activation: str) -> torch.Tensor:
    """Exact ``phi'(a)`` of the model's activation (config name, as in ``model/activations.py``).

    At ReLU's kink ``a = 0`` this is the larger one-sided slope, 1: the tier-2 bound must cover the local Lipschitz
    constant there (both sides of the kink lie in every neighbourhood), not autograd's convention ``relu'(0) = 0``.
    """
    return _DERIVATIVES[activation](a)


def activation_lipschitz(activation: str) -> float:
    """Global Lipschitz constant ``L_phi`` used by the weights-only MLP bound (§6.1)."""
    return _LIPSCHITZ[activation]


def compute_mlp_bound_weights(w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> float:
    """Tier 1: ``L_phi ||W1||_2 ||W2||_2`` for ``w_in [d, m]``, ``w_out [m, d]``."""
    return activation_lipschitz(activation) * float(spectral_norm(w_in) * spectral_norm(w_out))


def compute_ffn_norms(ffn: dict[str, torch.Tensor]) -> dict[str, float]:
    """Spectral norms of the FFN's matrices (``w_in``, ``w_gate``, ``w_up``, ``w_out``, whichever exist): they depend
    on the weights alone, so a scan computes them once per layer and hands them to every per-token bound."""
    return {name: float(spectral_norm(ffn[name])) for name in ("w_in", "w_gate", "w_up", "w_out") if name in ffn}


def _norm(w: torch.Tensor, norms: dict[str, float] | None, name: str) -> float:
    return norms[name] if norms is not None else float(spectral_norm(w))


def compute_mlp_bound_tokens(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                             w_out: torch.Tensor, activation: str,
                             norms: dict[str, float] | None = None) -> torch.Tensor:
    """Tier 2 per token: ``||W1|| max_k |phi'(a_{t,k})| ||W2||`` for FFN inputs ``x [T, d]``: ``[T]``
    (``norms`` from :func:`compute_ffn_norms`, else computed here)."""
    a = x.to(F64) @ w_in.to(F64)                                                   # [T, m]
    if b_in is not None:
        a = a + b_in.to(F64)
    slope = activation_derivative(a, activation).abs().amax(dim=-1)                # [T]
    return _norm(w_in, norms, "w_in") * slope * _norm(w_out, norms, "w_out")


@dataclass(frozen=True)
class GatedActivation:
    """What the gated-FFN bounds need of the activation: the function, its derivative, the argmax z* of the
    derivative and its maximum (rounded up)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    zstar: float
    dmax: float


def _gelu_erf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


GATED_ACTIVATIONS: dict[str, GatedActivation] = {
    "silu": GatedActivation(torch.nn.functional.silu, silu_derivative, SILU_ZSTAR, SILU_DMAX),
    "swish": GatedActivation(torch.nn.functional.silu, silu_derivative, SILU_ZSTAR, SILU_DMAX),
    "gelu": GatedActivation(_gelu_erf, gelu_erf_derivative, GELU_ZSTAR, GELU_DMAX),
}


def _gated_preacts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.to(F64)
    return x64 @ w_gate.to(F64), x64 @ w_up.to(F64)                                # [T, m] each


def compute_swiglu_local_tokens(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                                w_out: torch.Tensor, norms: dict[str, float] | None = None,
                                activation: str = "silu") -> torch.Tensor:
    """Tier 2 per token (§6.2): ``||Wd|| (||Wg|| ||act'(a) b||_inf + ||Wu|| ||act(a)||_inf)``: ``[T]``
    (``norms`` from :func:`compute_ffn_norms`, else computed here)."""
    act = GATED_ACTIVATIONS[activation]
    a, b = _gated_preacts(x, w_gate, w_up)
    gate_term = _norm(w_gate, norms, "w_gate") * (act.derivative(a) * b).abs().amax(dim=-1)
    up_term = _norm(w_up, norms, "w_up") * act.fn(a).abs().amax(dim=-1)
    return _norm(w_out, norms, "w_out") * (gate_term + up_term)


def compute_swiglu_stacked_tokens(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                                  w_out: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Stacked form (§6.2): ``||[Wg Wu]|| ||Wd|| max_k ((act'(a_k) b_k)^2 + act(a_k)^2)^(1/2)``: ``[T]``."""
    act = GATED_ACTIVATIONS[activation]
    a, b = _gated_preacts(x, w_gate, w_up)
    coef = torch.sqrt((act.derivative(a) * b).pow(2) + act.fn(a).pow(2)).amax(dim=-1)
    return spectral_norm(torch.cat([w_gate, w_up], dim=1)) * spectral_norm(w_out) * coef


def compute_swiglu_ball(r2: float, w_gate: torch.Tensor, w_up: torch.Tensor, w_out: torch.Tensor,
                        b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
                        activation: str = "silu") -> float:
    """Lipschitz constant on the ball ``||x||_2 <= r2`` (§6.2, tier 1)."""
    act = GATED_ACTIVATIONS[activation]
    col_g = r2 * torch.linalg.vector_norm(w_gate.to(F64), dim=0)                  # [m] bound on |a_k|
    col_u = r2 * torch.linalg.vector_norm(w_up.to(F64), dim=0)                    # [m] bound on |b_k|
    if b_gate is not None:
        col_g = col_g + b_gate.to(F64).abs()
    if b_up is not None:
        col_u = col_u + b_up.to(F64).abs()
    big_a, big_b = float(col_g.max()), float(col_u.max())
    slope = act.dmax if big_a >= act.zstar else float(act.derivative(torch.tensor(big_a, dtype=F64)))
    sup_act = float(act.fn(torch.tensor(big_a, dtype=F64)))                     # A sigma(A) | A Phi(A)
    inner = slope * float(spectral_norm(w_gate)) * big_b + float(spectral_norm(w_up)) * sup_act
    return float(spectral_norm(w_out)) * inner


def compute_swiglu_ball_simple(r2: float, w_gate: torch.Tensor, w_up: torch.Tensor, w_out: torch.Tensor) -> float:
    """The cruder closed form of §6.2: ``||Wd|| R2 (1.0999 ||Wg|| ||Wu||_{2->inf} + ||Wu|| ||Wg||_{2->inf})``."""
    gate, up = float(spectral_norm(w_gate)), float(spectral_norm(w_up))
    return float(spectral_norm(w_out)) * r2 * (1.0999 * gate * float(norm_2_to_inf(w_up))
                                               + up * float(norm_2_to_inf(w_gate)))


def _check_gated(activation: str) -> None:
    if activation not in GATED_ACTIVATIONS:
        raise UnsupportedError(f"gated FFN with activation {activation!r}: bounds are implemented for "
                               f"{', '.join(sorted(GATED_ACTIVATIONS))} (§6.2, §18.6)")


def compute_ffn_bound_weights(ffn: dict[str, torch.Tensor], kind: FFNKind, activation: str, r2: float) -> float:
    """Tier-1 FFN bound (§8.1): GELU weights-only, or the SwiGLU ball bound at the radius ``r2`` of its input."""
    if kind is FFNKind.GATED:
        _check_gated(activation)
        return compute_swiglu_ball(r2, ffn["w_gate"], ffn["w_up"], ffn["w_out"], activation=activation)
    return compute_mlp_bound_weights(ffn["w_in"], ffn["w_out"], activation)


def compute_ffn_bound_tokens(ffn: dict[str, torch.Tensor], kind: FFNKind, activation: str,
                             x: torch.Tensor, norms: dict[str, float] | None = None) -> torch.Tensor:
    """Tier-2 per-token FFN bound at the FFN inputs ``x [T, d]`` (§6.1, §6.2 local form): ``[T]``."""
    if kind is FFNKind.GATED:
        _check_gated(activation)
        return compute_swiglu_local_tokens(x, ffn["w_gate"], ffn["w_up"], ffn["w_out"], norms, activation)
    return compute_mlp_bound_tokens(x, ffn["w_in"], ffn.get("b_in"), ffn["w_out"], activation, norms)
