"""T41 (THEORY §18.9): FP8 block-quantized weights, quantized here from the tiny LLaMA and sharded with scales in
other shards than their weights, are dequantized by the reader bit for bit as torch (and ``transformers``' fine-grained
FP8 dequantization) computes them, and a scan of them is the scan of the dequantized model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from attnstab_cli.checkpoints.quantization import dequantize_fp8
from attnstab_cli.checkpoints.reader import TensorReader
from attnstab_cli.checkpoints.resolve import resolve_checkpoint
from attnstab_cli.model.load import open_model
from cli.helpers import invoke
from fp8_helpers import (dequantize_reference, load_sharded, quantize_fp8_blocks, quantized_state,
                         save_fp8_checkpoint)
from tiny_models import save_tiny_model

SCAN = ("--calib", "random", "--seq-len", "16", "--batch-size", "2", "--batches", "2", "--empirical-seqs", "0",
        "--seed", "3", "--quiet")
DIVIDING = (16, 32)        # divides every tiny LLaMA matrix (64, 32, 96 rows and columns)
PARTIAL = (24, 40)         # partial edge tiles along both dimensions of every matrix


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp8") / "llama"
    save_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def fp8_partial(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("fp8") / "partial"
    return path, save_fp8_checkpoint(llama, path, PARTIAL)


def test_some_scales_sit_in_another_shard(fp8_partial: tuple[Path, dict[str, str]]) -> None:
    """The fixture exercises what it claims: scales both in their weight's shard and in others."""
    _, weight_map = fp8_partial
    pairs = [(weight_map[s.removesuffix("_scale_inv")], f) for s, f in weight_map.items() if s.endswith("_scale_inv")]
    assert len(pairs) == 14 and any(a != b for a, b in pairs) and any(a == b for a, b in pairs)


@pytest.mark.parametrize("block", [DIVIDING, PARTIAL], ids=["dividing", "partial"])
def test_reader_dequantizes_bit_for_bit(block: tuple[int, int], llama: Path, tmp_path: Path) -> None:
    """Every quantized tensor equals the brute-force torch dequantization (and transformers' own) exactly, in
    float32, float64 and bfloat16 (one float32 product, then one rounding)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    save_fp8_checkpoint(llama, tmp_path / "ck", block)
    raw = load_sharded(tmp_path / "ck")
    reader = open_model(tmp_path / "ck").reader
    assert len(reader.block_scales.scales) == 14 and not any(n.endswith("_scale_inv") for n in reader.keys())
    for name, scale in reader.block_scales.scales.items():
        q, s = raw[name], raw[scale]
        assert q.dtype == torch.float8_e4m3fn and reader.infos[name].dtype == "F8_E4M3"
        ref = dequantize_reference(q, s, block)
        assert torch.equal(reader.load(name), ref), name
        assert torch.equal(_dequantize_fp8_weight(q, s, list(block), torch.float32), ref), name
        if block == DIVIDING:                  # transformers' loading path requires whole tiles
            assert torch.equal(Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32), ref), name
        for dtype in (torch.float64, torch.bfloat16):
            assert torch.equal(reader.load(name, dtype=dtype), ref.to(dtype)), (name, dtype)
    original = load_file(llama / "model.safetensors")
    for name in reader.keys():
        if name not in reader.block_scales.scales:
            assert torch.equal(reader.load(name), original[name]), name


@pytest.mark.parametrize("shape, block", [((3, 50, 70), (16, 32)), ((2, 128, 256), (128, 128)),
                                          ((5, 7), (128, 128)), ((130, 300), (128, 128))])
def test_dequantize_fp8_on_expert_stacks_and_edges(shape: tuple[int, ...], block: tuple[int, int]) -> None:
    """Leading (expert) dimensions, tensors smaller than one tile, and 128 x 128 tiles with partial edges."""
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])
    q, s = quantize_fp8_blocks(w, block)
    assert s.shape == (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    out = dequantize_fp8(q, s, block)
    assert torch.equal(out, dequantize_reference(q, s, block))
    scale = dequantize_reference(torch.ones_like(q), s, block)          # each element's scale
    # E4M3 rounding: half a unit of the 3-bit mantissa, or half the subnormal step 2^-9, in units of the scale
    assert bool(((out - w).abs() <= torch.maximum(2 ** -4 * w.abs(), 2 ** -10 * scale)).all())


def test_per_tensor_scale() -> None:
    """A weight_block_size of null: one scale for the whole tensor."""
    q = (torch.randn(6, 10, generator=torch.Generator().manual_seed(1)) * 100).to(torch.float8_e4m3fn)
    s = torch.tensor([0.0123])
    assert torch.equal(dequantize_fp8(q, s, None), q.float() * s)


def test_default_block_is_128_on_a_bare_file(llama: Path, tmp_path: Path) -> None:
    """Without a config the 128 x 128 default applies (every tiny matrix is one partial tile)."""
    state = quantized_state(load_file(llama / "model.safetensors"), (128, 128))
    save_file(state, tmp_path / "bare.safetensors")
    reader = TensorReader(resolve_checkpoint(tmp_path / "bare.safetensors"))
    assert reader.block_scales.block == (128, 128) and len(reader.block_scales.scales) == 14
    for name, scale in reader.block_scales.scales.items():
        assert state[scale].shape == (1, 1)
        assert torch.equal(reader.load(name), state[name].float() * state[scale]), name


def test_bin_checkpoint(llama: Path, tmp_path: Path) -> None:
    """A pickle-free ``pytorch_model.bin`` holding FP8 weights and scales is dequantized the same way."""
    state = quantized_state(load_file(llama / "model.safetensors"), PARTIAL)
    ck = tmp_path / "bin"
    ck.mkdir()
    torch.save(state, ck / "pytorch_model.bin")
    config = json.loads((llama / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "fp8", "weight_block_size": list(PARTIAL)}}))
    reader = open_model(ck).reader
    assert reader.files.fmt == "bin" and len(reader.block_scales.scales) == 14
    for name, scale in reader.block_scales.scales.items():
        assert torch.equal(reader.load(name), dequantize_reference(state[name], state[scale], PARTIAL)), name


def test_scan_of_fp8_checkpoint_is_the_scan_of_the_dequantized_model(fp8_partial: tuple[Path, dict[str, str]],
                                                                     tmp_path: Path) -> None:
    """End to end on the sharded FP8 checkpoint: info and the manifest name the quantization and its tensors, and
    every table equals that of a float32 checkpoint holding the torch-dequantized weights."""
    fp8, _ = fp8_partial
    raw = load_sharded(fp8)
    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads((fp8 / "config.json").read_text())
    config.pop("quantization_config")
    (plain / "config.json").write_text(json.dumps(config))
    save_file({n: dequantize_reference(t, raw[n + "_scale_inv"], PARTIAL) if n + "_scale_inv" in raw else t
               for n, t in raw.items() if not n.endswith("_scale_inv")}, plain / "model.safetensors")
    quantized = sorted(n for n in raw if n + "_scale_inv" in raw)

    info = invoke("info", fp8, "--json")
    assert info.exit_code == 0, info.stderr
    quant = json.loads(info.stdout)["quantization"]
    assert quant["tensors"] == quantized and quant["weight_block_size"] == list(PARTIAL)
    assert quant["method"] == "fp8" and quant["scale_dtypes"] == ["F32"]
    assert quant["n_params"] == sum(raw[n].numel() for n in quantized)
    assert json.loads(info.stdout)["dtypes"]["F8_E4M3"] == quant["n_params"]
    assert json.loads(invoke("info", plain, "--json").stdout)["quantization"] is None
    assert "FP8 block-quantized" in invoke("info", fp8).stdout

    tables = {}
    for label, path in (("fp8", fp8), ("plain", plain)):
        out = tmp_path / f"report_{label}"
        result = invoke("scan", path, *SCAN, "--out", out)
        assert result.exit_code == 0, result.stderr
        tables[label] = {t: pq.read_table(out / f"{t}.parquet").to_pylist() for t in ("layers", "heads", "model")}
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["checkpoint"]["quantization"] == (quant if label == "fp8" else None)
    for table, rows in tables["fp8"].items():
        assert rows == tables["plain"][table], table
        assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
