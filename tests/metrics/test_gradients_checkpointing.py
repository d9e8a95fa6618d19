"""Checkpointed gradient flow: every ``checkpoint_every`` gives the same gradients as whole-model autograd, the held
boundaries stay within ⌈N/k⌉ + k + 1, and checkpoints handed in from a ``LayerStream`` replace the forward stream."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from attnstab_cli.metrics.gradients import LOSS_MLM, LOSS_PROBE, GradientFlow, make_probe, plan_loss
from attnstab_cli.model.load import OpenModel, open_model
from attnstab_cli.model.stream import LayerStream
from tiny_models import build_tiny_model

CPU, F64 = torch.device("cpu"), torch.float64
DEPTH = 5                                              # not divisible by k = 2 or 3
LAYERS_KEY = {"gpt2": "n_layer", "llama": "num_hidden_layers", "bert": "num_hidden_layers"}
# HF submodules of one layer: attention projections, FFN, norms
GROUPS = {
    "gpt2": (lambda m: m.transformer.h, ("attn",), ("mlp",), ("ln_1", "ln_2")),
    "llama": (lambda m: m.model.layers, ("self_attn",), ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "bert": (lambda m: m.bert.encoder.layer, ("attention.self", "attention.output.dense"),
             ("intermediate", "output.dense"), ("attention.output.LayerNorm", "output.LayerNorm")),
}
COLUMNS = ("grad_h_in", "grad_attn_params", "grad_ffn_params", "grad_norm_params")


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[Path, torch.nn.Module]]:
    """(family, depth) -> (checkpoint directory, reference model): deeper than the session's 2-layer models."""
    root = tmp_path_factory.mktemp("deep")
    out = {}
    for family, depth in [(f, DEPTH) for f in LAYERS_KEY] + [("gpt2", 9)]:
        ref = build_tiny_model(family, seed=1, **{LAYERS_KEY[family]: depth})
        ref.save_pretrained(root / f"{family}{depth}")
        out[family, depth] = (root / f"{family}{depth}", ref)
    return out


def _batches(model: OpenModel, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(5, model.cfg.vocab_size, (2, 12), generator=g) for _ in range(n)]


def _reference(family: str, ref: torch.nn.Module, model: OpenModel, ids: torch.Tensor) -> tuple[float, list[dict]]:
    """Loss and per-layer gradient norms from plain autograd on the whole ``transformers`` model (one batch)."""
    ref = copy.deepcopy(ref).double()
    setup = plan_loss(model, [ids], seed=3)
    if setup.kind == LOSS_PROBE:
        out = ref.bert(setup.inputs[0], output_hidden_states=True)
        h_top = out.last_hidden_state                                  # [B, T, d]
        loss = 0.5 * (h_top @ make_probe(model.cfg.d_model, 3)).pow(2).sum() / h_top.shape[0] / h_top.shape[1]
    else:
        out = ref(setup.inputs[0], labels=setup.inputs[0], output_hidden_states=True)
        loss = out.loss
    for h in out.hidden_states:
        h.retain_grad()
    loss.backward()
    blocks, *groups = GROUPS[family]

    def norm(block: torch.nn.Module, paths: tuple[str, ...]) -> float:
        return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for path in paths
                             for p in block.get_submodule(path).parameters() if p.grad is not None))

    rows = [{"grad_h_in": float(out.hidden_states[layer].grad.norm()),
             **{c: norm(block, paths) for c, paths in zip(COLUMNS[1:], groups)}}
            for layer, block in enumerate(blocks(ref))]
    return float(loss.detach()), rows


def _stream_checkpoints(model: OpenModel, batches: list[torch.Tensor], wanted: set[int]
                        ) -> dict[int, list[torch.Tensor]]:
    """What the main scan holds back from its own stream: h_0 after embed, h_{l+1} = layer l's resid_out."""
    stream = LayerStream(model, batches, CPU, F64)
    kept: dict[int, list[torch.Tensor]] = {0: list(stream.embed())} if 0 in wanted else {}
    for trace in stream.layers():
        if trace.layer + 1 in wanted:
            kept.setdefault(trace.layer + 1, []).append(trace.resid_out)      # [B, T, d], batch order
        del trace
    return kept


@pytest.mark.parametrize("family", sorted(LAYERS_KEY))
def test_every_checkpoint_spacing_matches_autograd(family: str, deep: dict) -> None:
    path, ref = deep[family, DEPTH]
    model = open_model(path)
    ids = _batches(model, 1)[0]
    loss, expected = _reference(family, ref, model, ids)
    baseline = GradientFlow(model, [ids], CPU, F64, seed=3, checkpoint_every=1).run()   # every boundary kept
    for k in (1, 2, 3, DEPTH, None):
        flow = GradientFlow(model, [ids], CPU, F64, seed=3, checkpoint_every=k)
        layers, totals = flow.run()
        assert flow.checkpoint_every == (k or math.ceil(math.sqrt(DEPTH)))
        assert (layers, totals) == baseline                        # same operations on the same inputs: bit-equal
        assert totals["grad_loss"] == pytest.approx(loss, rel=1e-6)
        assert [row["layer"] for row in layers] == list(range(DEPTH))
        for row, want in zip(layers, expected, strict=True):
            for column in COLUMNS:
                assert row[column] == pytest.approx(want[column], rel=1e-5), (k, row["layer"], column)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 9, None])
def test_held_boundaries_are_bounded(k: int | None, deep: dict) -> None:
    depth = 9
    model = open_model(deep["gpt2", depth][0])
    flow = GradientFlow(model, _batches(model), CPU, F64, checkpoint_every=k)
    flow.run()
    k = flow.checkpoint_every
    segments = math.ceil(depth / k)
    assert flow.boundaries() == sorted(set(range(0, depth, k)) | {depth})
    assert flow.peak_boundaries <= depth / k + k + 2
    assert flow.peak_boundaries <= segments + k + 1
    if k == 1:
        assert flow.peak_boundaries == depth + 1                   # the counter sees every boundary held
    if k == 3:
        assert flow.peak_boundaries < depth + 1
    assert flow.layer_loads == {"forward": depth, "recompute": depth - segments, "backward": depth}
    assert flow.streams == {"forward": 1, "recompute": int(k > 1), "backward": 1}


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("k", [2, None])
def test_handed_in_checkpoints_replace_the_forward_stream(family: str, k: int | None, deep: dict) -> None:
    model = open_model(deep[family, DEPTH][0])
    batches = _batches(model)
    own = GradientFlow(model, batches, CPU, F64, seed=3, checkpoint_every=k)
    expected = own.run()
    flow = GradientFlow(model, batches, CPU, F64, seed=3, checkpoint_every=k)
    wanted = flow.checkpoint_layers()
    assert wanted == set(flow.boundaries()) and {0, DEPTH} <= wanted
    got = flow.run(_stream_checkpoints(model, batches, wanted))
    assert got == expected
    assert flow.streams == {"forward": 0, "recompute": 1, "backward": 1}
    assert flow.layer_loads["forward"] == 0 and own.layer_loads["forward"] == DEPTH
    assert flow.peak_boundaries <= DEPTH / flow.checkpoint_every + flow.checkpoint_every + 2


def test_missing_checkpoints_are_refused(deep: dict) -> None:
    model = open_model(deep["llama", DEPTH][0])
    batches = _batches(model)
    flow = GradientFlow(model, batches, CPU, F64, checkpoint_every=2)
    kept = _stream_checkpoints(model, batches, flow.checkpoint_layers() - {DEPTH})
    with pytest.raises(ValueError, match=str(DEPTH)):
        flow.run(kept)
    with pytest.raises(ValueError):
        GradientFlow(model, batches, CPU, F64, checkpoint_every=0)


def test_masked_lm_streams_its_own_forward() -> None:
    """The MLM loss runs masked inputs the main scan never sees: it wants no checkpoints and streams itself."""
    path = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "bert-tiny"
    model = open_model(path)
    ids = torch.randint(5, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(8))
    flow = GradientFlow(model, [ids], CPU, F64, seed=1)
    assert flow.loss.kind == LOSS_MLM and flow.checkpoint_layers() == set()
    handed: dict[int, Any] = _stream_checkpoints(model, [ids], set(flow.boundaries()))   # unmasked: must be ignored
    got = flow.run(handed)
    assert flow.streams["forward"] == 1
    assert got == GradientFlow(model, [ids], CPU, F64, seed=1).run()
