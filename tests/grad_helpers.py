"""The masked-LM ``--grad`` check shared by the MLM families' tests: streamed gradients against autograd on the
``transformers`` model itself, float64."""
from __future__ import annotations

import pytest
import torch

from attnstab_cli.metrics.gradients import LOSS_MLM, GradientFlow, plan_loss
from attnstab_cli.model.load import OpenModel


def assert_mlm_gradients_match(model: OpenModel, ref64: torch.nn.Module,
                               ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The loss and every ``grad_h_in`` of :class:`GradientFlow` on ``ids`` equal the float64 reference's
    (``ref64``, a masked-LM head model, whose gradients stay for further checks) on the same masked inputs; returns
    the masked inputs and the per-layer records."""
    layers, totals = GradientFlow(model, [ids], torch.device("cpu"), torch.float64, seed=1).run()
    assert totals["grad_loss_kind"] == LOSS_MLM
    setup = plan_loss(model, [ids], seed=1)
    ref64.zero_grad(set_to_none=True)
    out = ref64(setup.inputs[0], labels=setup.targets[0], output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    out.loss.backward()
    assert totals["grad_loss"] == pytest.approx(float(out.loss.detach()), rel=1e-6)
    for layer, row in enumerate(layers):
        assert row["grad_h_in"] == pytest.approx(float(out.hidden_states[layer].grad.norm()), rel=1e-5)
    return setup.inputs[0], layers
