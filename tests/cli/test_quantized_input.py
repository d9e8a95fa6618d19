"""Broken FP8 block quantization and quantization formats attnstab does not read (MXFP4, GPTQ, ...): exit 2 with one
``Error:`` line naming the file and the tensor or the format, from ``info`` and ``scan`` alike, before any work."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.helpers import assert_input_error, copy_checkpoint, invoke
from fp8_helpers import save_fp8_checkpoint
from tiny_models import save_tiny_model

SCAN = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0",
        "--quiet")
BLOCK = (24, 40)
Q_SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant") / "llama"
    save_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def fp8(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant") / "fp8"
    save_fp8_checkpoint(llama, path, BLOCK)
    return path


def _index(ck: Path) -> dict[str, str]:
    return json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]


def _edit_shard(ck: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Apply ``edit`` to the shard holding ``name``; the index follows the shard's new tensor names."""
    shard = ck / _index(ck)[name]
    state = load_file(shard)
    edit(state)
    save_file(state, shard, metadata={"format": "pt"})
    doc = json.loads((ck / "model.safetensors.index.json").read_text())
    doc["weight_map"] = {n: f for n, f in doc["weight_map"].items() if f != shard.name} | {n: shard.name for n in state}
    (ck / "model.safetensors.index.json").write_text(json.dumps(doc))
    return shard


def _edit_config(ck: Path, **changes: object) -> None:
    config = json.loads((ck / "config.json").read_text())
    config.update(changes)
    (ck / "config.json").write_text(json.dumps(config))


def _both(ck: Path, *needles: str) -> None:
    for args in (("info", ck), ("scan", ck, *SCAN)):
        assert_input_error(invoke(*args), *needles)


def test_the_intact_fp8_checkpoint_scans(fp8: Path) -> None:
    """The checkpoint the other tests break is itself accepted (so each refusal is the edit's doing)."""
    assert invoke("scan", fp8, *SCAN).exit_code == 0


def test_scale_of_the_wrong_block_grid(fp8: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    shard = _edit_shard(ck, Q_SCALE, lambda s: s.update({Q_SCALE: torch.ones(3, 3)}))
    _both(ck, str(shard), Q_SCALE, "[3, 3]", "24x40 blocks needs [3, 2]")


def test_scale_grid_of_128_blocks_without_the_config_block(fp8: Path, tmp_path: Path) -> None:
    """Without weight_block_size the 128 x 128 default applies: the 24 x 40 grids no longer fit."""
    ck = copy_checkpoint(fp8, tmp_path)
    _edit_config(ck, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"})
    _both(ck, "_scale_inv", "128x128 blocks needs [1, 1]")


def test_missing_scale(fp8: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_shard(ck, name + "_scale_inv", lambda s: s.pop(name + "_scale_inv"))
    _both(ck, str(ck / _index(ck)[name]), f"FP8 tensor {name!r} has no block scale")


def test_scale_on_a_weight_that_is_not_fp8(fp8: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    shard = _edit_shard(ck, name, lambda s: s.update({name: s[name].float().to(torch.bfloat16)}))
    _both(ck, str(shard), name, "dtype BF16", "float8_e4m3fn weights only")


def test_scale_without_its_weight(fp8: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    orphan = "model.layers.0.mlp.extra.weight_scale_inv"
    shard = _edit_shard(ck, Q_SCALE, lambda s: s.update({orphan: torch.ones(1, 1)}))
    _both(ck, str(shard), orphan, "has no weight")


def test_scale_of_an_integer_dtype(fp8: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    _edit_shard(ck, Q_SCALE, lambda s: s.update({Q_SCALE: torch.ones(3, 2, dtype=torch.int32)}))
    _both(ck, Q_SCALE, "dtype I32", "expected float32")


def test_infinite_scale_is_a_non_finite_weight(fp8: Path, tmp_path: Path) -> None:
    """The value check reads the dequantized weight: an infinite scale makes it infinite (or NaN on a zero)."""
    ck = copy_checkpoint(fp8, tmp_path)
    _edit_shard(ck, Q_SCALE, lambda s: s[Q_SCALE].__setitem__((1, 0), float("inf")))
    assert_input_error(invoke("scan", ck, *SCAN), "model.layers.0.self_attn.q_proj.weight", "NaN/Inf")


def test_bad_weight_block_size(fp8: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    _edit_config(ck, quantization_config={"quant_method": "fp8", "weight_block_size": [0, 128]})
    _both(ck, str(ck / "config.json"), "weight_block_size", "[0, 128]")


def _mxfp4_tensors(state: dict[str, torch.Tensor]) -> None:
    """gpt-oss's expert layout: 16-byte blocks of 32 E2M1 values and one E8M0 exponent per block, all uint8."""
    state["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(4, 192, 2, 16, dtype=torch.uint8)
    state["model.layers.0.mlp.experts.gate_up_proj_scales"] = torch.full((4, 192, 2), 127, dtype=torch.uint8)


def test_mxfp4_checkpoint_names_the_format(llama: Path, tmp_path: Path) -> None:
    """A gpt-oss-style config and tensors: refused as MXFP4 before the family is looked up."""
    ck = copy_checkpoint(llama, tmp_path)
    state = load_file(ck / "model.safetensors")
    _mxfp4_tensors(state)
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    _edit_config(ck, model_type="gpt_oss", architectures=["GptOssForCausalLM"],
                 quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]})
    _both(ck, str(ck / "config.json"), "MXFP4", "*_blocks / *_scales")


def test_mxfp4_tensors_in_a_bare_file(llama: Path, tmp_path: Path) -> None:
    state = load_file(llama / "model.safetensors")
    _mxfp4_tensors(state)
    save_file(state, tmp_path / "model.safetensors")
    _both(tmp_path / "model.safetensors", "MXFP4")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_other_quantization_methods_are_named(llama: Path, tmp_path: Path, method: str) -> None:
    ck = copy_checkpoint(llama, tmp_path)
    _edit_config(ck, quantization_config={"quant_method": method, "bits": 4})
    _both(ck, str(ck / "config.json"), f"quant_method is {method!r}")


@pytest.mark.parametrize("key, value", [("fmt", "e5m2"), ("activation_scheme", "static")])
def test_fp8_of_another_kind(fp8: Path, tmp_path: Path, key: str, value: str) -> None:
    ck = copy_checkpoint(fp8, tmp_path)
    _edit_config(ck, quantization_config={"quant_method": "fp8", key: value, "weight_block_size": list(BLOCK)})
    _both(ck, str(ck / "config.json"), f"{key} is {value!r}")
