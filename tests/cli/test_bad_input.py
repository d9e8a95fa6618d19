"""Issue 2, item 9: every kind of bad input gives one ``Error:`` line naming the file and exit code 2."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.helpers import assert_input_error, copy_checkpoint, invoke




def test_missing_config(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "config.json").unlink()
    assert_input_error(invoke("info", ck), str(ck), "missing config.json")


def test_malformed_config(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "config.json").write_text("{not json")
    assert_input_error(invoke("info", ck), "config.json", "malformed")


def test_unknown_family(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (ck / "config.json").write_text(json.dumps(cfg))
    assert_input_error(invoke("info", ck), "config.json", "unsupported model_type 't5'", "gpt2", "llama", "bert")


def test_truncated_safetensors(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_input_error(invoke("info", ck), "model.safetensors", "truncated")


def test_header_claims_more_bytes_than_file(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + data[8:])
    assert_input_error(invoke("info", ck), "model.safetensors", "claims")


def test_corrupted_header_json(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe\x00!"
    (ck / "model.safetensors").write_bytes(bytes(data))
    assert_input_error(invoke("info", ck), "model.safetensors", "corrupted")


def test_shard_index_path_traversal(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    shutil.copy(ck / "model.safetensors", tmp_path / "evil.safetensors")
    (ck / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": "../evil.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_input_error(invoke("info", ck), "model.safetensors.index.json", "outside the checkpoint", "refused")


def test_shard_index_symlink_escape(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(ck / "model.safetensors", outside)
    (ck / "shard.safetensors").symlink_to(outside)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard.safetensors"}}))
    assert_input_error(invoke("info", ck), "index.json", "outside the checkpoint")


class _Evil:
    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def test_bin_needing_arbitrary_pickle_is_refused(good: Path, tmp_path: Path, capsys) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2), "payload": _Evil()}, ck / "pytorch_model.bin")
    result = invoke("info", ck)
    assert_input_error(result, "pytorch_model.bin", "refused", "arbitrary pickle")
    assert "PICKLE CODE RAN" not in capsys.readouterr().out + result.stdout


def test_shape_mismatch_between_config_and_tensors(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["n_inner"] = 100                  # the FFN width disagrees with the tensors
    (ck / "config.json").write_text(json.dumps(cfg))
    assert_input_error(invoke("scan", ck, "--calib", "random", "--seq-len", "8", "--quiet"),
                       "model.safetensors", "shape")


def test_layer_count_mismatch(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["n_layer"] = 5
    (ck / "config.json").write_text(json.dumps(cfg))
    assert_input_error(invoke("info", ck), "config.json", "5 layers", "2")


def test_nan_in_weights(good: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ck = copy_checkpoint(good, tmp_path)
    state = load_file(ck / "model.safetensors")
    state["transformer.h.1.attn.c_attn.weight"][0, 0] = float("nan")
    state["transformer.h.1.attn.c_attn.weight"][0, 1] = float("inf")
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    assert_input_error(invoke("scan", ck, "--calib", "random", "--seq-len", "8", "--quiet"),
                       "model.safetensors", "transformer.h.1.attn.c_attn.weight", "2 NaN/Inf")


def test_tokens_out_of_vocabulary(good: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.array([[1, 2, 3, 500]], dtype=np.int64))
    assert_input_error(invoke("scan", good, "--tokens", tokens, "--quiet"), "ids.npy", "500", "vocabulary")


def test_token_file_that_is_not_integers(good: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.array([[0.5, 1.5]]))
    assert_input_error(invoke("scan", good, "--tokens", tokens, "--quiet"), "ids.npy", "integer")


def test_empty_calibration_file(good: Path, tmp_path: Path) -> None:
    text = tmp_path / "empty.txt"
    text.write_text("  \n")
    assert_input_error(invoke("scan", good, "--calib", text, "--quiet"), "empty.txt", "empty")


def test_checkpoint_without_tokenizer_needs_tokens(good: Path) -> None:
    result = invoke("scan", good, "--quiet")
    assert_input_error(result, "no tokenizer.json")
    assert "--tokens" in result.stderr


def test_sequence_longer_than_max_positions(good: Path) -> None:
    assert_input_error(invoke("scan", good, "--calib", "random", "--seq-len", "65", "--quiet"),
                       "65", "maximum positions (64)")


def test_bare_safetensors_names_missing_config_values(good: Path) -> None:
    result = invoke("info", good / "model.safetensors")
    assert_input_error(result, "model.safetensors", "n_heads", "norm_eps")
    assert "--n-heads" in result.stderr


def test_nonexistent_path() -> None:
    assert_input_error(invoke("info", "/no/such/dir/"), "/no/such/dir", "no such file")


def test_repo_id_not_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert_input_error(invoke("info", "someorg/not-cached"), "not in the Hugging Face cache")


def test_debug_shows_traceback(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "config.json").write_text("[]")
    result = invoke("--debug", "info", ck)
    assert result.exit_code != 0 and result.exception is not None
    from attnstab_cli.cli.output import STATE

    STATE["debug"] = False
