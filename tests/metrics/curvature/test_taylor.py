"""The Taylor account of a loss change (issue 6, item 3): on B = A + t·D the second-order prediction at A misses the
actual change by O(t³), the symmetric one by O(t⁵), the first-order one by O(t²); block terms sum to the totals."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnstab_cli.metrics.curvature.loss import ModelLoss
from attnstab_cli.metrics.curvature.taylor import PREDICTIONS, compute_taylor
from attnstab_cli.model.load import open_model

F64 = torch.float64


def perturbed(src: Path, dst: Path, t: float, seed: int = 0, layers_only: bool = True) -> Path:
    """A copy of checkpoint ``src`` with every (layer) tensor moved by t times a fixed random direction."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(tensors):
        w = tensors[name]
        d = torch.randn(w.shape, generator=gen) * (w.float().std() if w.numel() > 1 else 1.0)
        move = w.is_floating_point() and (".h." in name or ".layers." in name or ".layer." in name or not layers_only)
        out[name] = (w.double() + t * d.double()).to(w.dtype) if move else w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory) -> tuple[Path, torch.Tensor, Path]:
    src = tiny_checkpoints["gpt2"][0]
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(7))
    return src, ids, tmp_path_factory.mktemp("taylor")


def _run(src: Path, other: Path, ids: torch.Tensor) -> tuple[list[dict], dict]:
    return compute_taylor(ModelLoss(open_model(src), [ids], "cpu", F64), ModelLoss(open_model(other), [ids], "cpu",
                                                                                   F64))


def test_orders_of_the_residuals_and_block_sums(setup) -> None:
    src, ids, root = setup
    res = {}
    for t in (4e-2, 2e-2):
        rows, tot = _run(src, perturbed(src, root / f"t{t}", t), ids)
        assert tot["embeddings_and_head"] == 0.0 and tot["delta_loss"] == tot["delta_loss_layers"]
        for p in PREDICTIONS:
            assert sum(r[p] for r in rows) == pytest.approx(tot[p], rel=1e-12, abs=1e-15)
        assert {r["block"] for r in rows} >= {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_in", "ffn_out", "norm_attn.gamma"}
        res[t] = {p: abs(tot[f"residual_{p}"]) for p in PREDICTIONS} | {"delta": abs(tot["delta_loss"])}
    ratio = {p: res[4e-2][p] / res[2e-2][p] for p in PREDICTIONS}
    assert 3.0 < ratio["first_order"] < 5.5, ratio                 # O(t²): halving t divides by 4
    assert 6.0 < ratio["second_order"] < 11.0, ratio               # O(t³): by 8
    assert ratio["symmetric"] > 20.0, ratio                        # O(t⁵): by 32
    small = res[2e-2]
    assert small["second_order"] < 0.05 * small["delta"] and small["symmetric"] < small["second_order"]


def test_embedding_changes_are_reported_apart(setup) -> None:
    src, ids, root = setup
    _, tot = _run(src, perturbed(src, root / "all", 1e-2, layers_only=False), ids)
    assert tot["embeddings_and_head"] != 0.0
    assert tot["delta_loss"] == pytest.approx(tot["delta_loss_layers"] + tot["embeddings_and_head"], abs=1e-14)


def test_different_architectures_are_refused(setup, tiny_checkpoints) -> None:
    src, ids, _ = setup
    from attnstab_cli.errors import UsageError
    with pytest.raises(UsageError, match="same architecture"):
        _run(src, tiny_checkpoints["gpt2_scaled"][0], ids)
