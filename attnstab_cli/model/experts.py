"""The gated unit of mixture-of-experts experts (THEORY §6.2, §18.7), written once for the forward and the bounds.

An expert maps ``x [N, d]`` to ``h(x W_g + b_g, x W_u + b_u) W_d + b_d`` with ``h(a, b) = phi_g(a) * phi_u(b)``:

* ``gated`` (§6.2): ``phi_g`` the family's activation, ``phi_u`` the identity;
* ``clamped_swiglu`` (gpt-oss): ``phi_g(a) = psi(min(a, limit))`` with ``psi(z) = z sigmoid(alpha z)``, and
  ``phi_u(b) = clip(b, -limit, limit) + 1`` (transformers' ``GptOssExperts._apply_gate``).

Biases are optional (``b_gate``, ``b_up`` ``[m]``, ``b_out`` ``[d]`` in an expert's dict, ``[E, ...]`` stacked).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnstab_cli.arch.spec import ExpertGLU
from attnstab_cli.model.activations import ACTIVATIONS
from attnstab_cli.model.config import MoEConfig


@dataclass(frozen=True)
class GLUForm:
    """The experts' gated unit of one model: its kind, the gate activation (``gated``), and the clamped SwiGLU's
    sigmoid gain ``alpha`` and clamp ``limit``."""

    kind: ExpertGLU
    activation: str = "silu"
    alpha: float = 1.0
    limit: float | None = None

    def gate(self, a: torch.Tensor) -> torch.Tensor:
        """``phi_g(a)``."""
        if self.kind is ExpertGLU.GATED:
            return ACTIVATIONS[self.activation](a)
        a = a.clamp(max=self.limit)
        return a * torch.sigmoid(self.alpha * a)

    def up(self, b: torch.Tensor) -> torch.Tensor:
        """``phi_u(b)``."""
        if self.kind is ExpertGLU.GATED:
            return b
        return b.clamp(-self.limit, self.limit) + 1.0


def expert_form(moe: MoEConfig | None, activation: str) -> GLUForm:
    """The routed experts' unit of a model (``gated`` with ``activation`` without an MoE config)."""
    if moe is None or moe.glu is ExpertGLU.GATED:
        return GLUForm(ExpertGLU.GATED, activation)
    return GLUForm(moe.glu, activation, moe.glu_alpha, moe.glu_limit)


def preactivations(x: torch.Tensor, ex: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = x W_g + b_g``, ``b = x W_u + b_u`` of one expert for ``x [..., d]``: ``[..., m]`` each."""
    a, b = x @ ex["w_gate"], x @ ex["w_up"]
    if ex.get("b_gate") is not None:
        a = a + ex["b_gate"]
    if ex.get("b_up") is not None:
        b = b + ex["b_up"]
    return a, b


def compute_expert_output(x: torch.Tensor, ex: dict[str, torch.Tensor], form: GLUForm) -> torch.Tensor:
    """One expert on ``x [..., d]``: ``h(a, b) W_d + b_d``, ``[..., d]``."""
    a, b = preactivations(x, ex)
    y = (form.gate(a) * form.up(b)) @ ex["w_out"]
    return y if ex.get("b_out") is None else y + ex["b_out"]
