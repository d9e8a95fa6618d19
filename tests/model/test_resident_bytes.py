"""The resident unit of a streamed scan (THEORY §18.7, "Streaming"): one layer with all its experts, the embeddings
and the head, at the compute dtype, from the tensor headers; against the sizes of ``transformers``' own parameters,
the bytes the reader holds while each layer runs, and an FP8 checkpoint's dequantized size."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attnstab_cli.model.load import open_model
from attnstab_cli.model.memory import compute_resident_bytes
from attnstab_cli.model.stream import LayerStream
from cli.helpers import invoke
from fp8_helpers import load_sharded, save_fp8_checkpoint
from tiny_models import save_tiny_model

SCAN = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0",
        "--quiet")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("resident")
    return {fam: (root / fam, save_tiny_model(fam, root / fam)) for fam in ("mixtral", "qwen2_moe", "llama")}


def _param_bytes(module: torch.nn.Module, size: int) -> int:
    return sum(p.numel() for p in module.parameters()) * size


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_bytes_are_the_reference_layers_parameters(family: str, dtype: torch.dtype, tiny: dict) -> None:
    """Each layer's bytes are those of the reference model's decoder layer (every expert, router, shared expert,
    norms) at the compute dtype; the embeddings are its token table, the head its final norm and LM head."""
    path, ref = tiny[family]
    size = torch.empty((), dtype=dtype).element_size()
    resident = compute_resident_bytes(open_model(path), dtype)
    expected = [_param_bytes(layer, size) for layer in ref.model.layers]
    assert list(resident.layers) == expected
    assert resident.largest_layer_bytes == max(expected) and resident.largest_layer == expected.index(max(expected))
    assert resident.embedding == _param_bytes(ref.model.embed_tokens, size)
    assert resident.head == _param_bytes(ref.lm_head, size) + _param_bytes(ref.model.norm, size)
    if family == "qwen2_moe":                          # its dense layer 1 is smaller than the MoE layers
        assert expected[1] < expected[0] == expected[2]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_reader_holds_exactly_one_layer_while_it_runs(family: str, tiny: dict) -> None:
    """The bytes the reader counts as alive while a layer runs (the stacked experts included) equal the header
    figure: the resident unit is what the scan holds."""
    path, _ = tiny[family]
    model = open_model(path)
    resident = compute_resident_bytes(model, torch.float32)
    stream = LayerStream(model, [torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))])
    stream.embed()
    seen = []
    for trace in stream.layers():
        seen.append(model.reader.live_bytes)
        del trace
    assert seen == list(resident.layers)
    in_flight = max(math.prod(i.shape) for n, i in model.reader.infos.items() if ".experts." in n) * 4
    assert model.reader.peak_live_bytes <= max(max(resident.layers) + in_flight, resident.embedding)


def test_fp8_layers_count_at_the_dequantized_size(tiny: dict, tmp_path: Path) -> None:
    """An FP8 block-quantized checkpoint is resident at the compute dtype: its layers are as large as the float32
    model's, four times their stored FP8 bytes for the matrices."""
    path, ref = tiny["llama"]
    save_fp8_checkpoint(path, tmp_path / "fp8", (24, 40))
    raw = load_sharded(tmp_path / "fp8")
    resident = compute_resident_bytes(open_model(tmp_path / "fp8"), torch.float32)
    assert list(resident.layers) == [_param_bytes(layer, 4) for layer in ref.model.layers]
    for i, nbytes in enumerate(resident.layers):
        tensors = [t for n, t in raw.items() if f".layers.{i}." in n and not n.endswith("_scale_inv")]
        stored = sum(t.numel() * t.element_size() for t in tensors)
        fp8 = sum(t.numel() for t in tensors if t.dtype == torch.float8_e4m3fn)
        assert nbytes == stored + 3 * fp8 and fp8 > 0            # 1 stored byte per FP8 element, 4 resident


def test_info_and_manifest_name_the_largest_layer(tiny: dict, tmp_path: Path) -> None:
    """``info`` (table and --json) and the scan's manifest give the same figures at the scan's dtype."""
    path, ref = tiny["mixtral"]
    info = invoke("info", path, "--json", "--dtype", "float64")
    assert info.exit_code == 0, info.stderr
    resident = json.loads(info.stdout)["resident"]
    assert resident["dtype"] == "float64" and resident["largest_layer"] == 0
    assert resident["largest_layer_bytes"] == _param_bytes(ref.model.layers[0], 8)
    assert resident["embedding_bytes"] == _param_bytes(ref.model.embed_tokens, 8)
    text = invoke("info", path).stdout
    assert f"largest layer 0 (all 6 experts): {_param_bytes(ref.model.layers[0], 4):,} bytes" in text
    result = invoke("scan", path, *SCAN, "--dtype", "float64", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "report" / "manifest.json").read_text())
    assert manifest["checkpoint"]["resident"] == resident
    assert manifest["run"]["peak_resident_weight_bytes"] >= resident["largest_layer_bytes"]
    assert math.isclose(resident["headroom_factor"], 1.25)
