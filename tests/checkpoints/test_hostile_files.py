"""Files that are not what their names say: FIFOs, devices, directories and symlinks out of the checkpoint are refused
before opening (exit 2, one line naming the file), weight formats attnstab does not read are named by their magic
bytes, and token files are never unpickled."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.helpers import assert_input_error, copy_checkpoint, invoke
from hang_guard import deadline

SCAN = ("--calib", "random", "--seq-len", "8", "--batch-size", "1", "--batches", "1", "--quiet")




def run(*args: object):
    """``attnstab ARGS`` in-process, failing (exit 3) instead of hanging when an input blocks."""
    with deadline(30, f"attnstab {' '.join(map(str, args))}"):
        return invoke(*args)


def _replace_with_fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


# --- only regular files are opened ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["info", "scan"])
def test_fifo_named_model_safetensors(command: str, good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    _replace_with_fifo(ck / "model.safetensors")
    args = (command, ck) + (SCAN if command == "scan" else ())
    assert_input_error(run(*args), str(ck / "model.safetensors"), "named pipe (FIFO)", "not a regular file")
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "pytorch_model.bin.index.json"])
def test_fifo_for_any_checkpoint_file(name: str, good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    _replace_with_fifo(ck / name)
    assert_input_error(run("info", ck), str(ck / name), "named pipe (FIFO)")


def test_directory_named_model_safetensors(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").mkdir()
    assert_input_error(run("info", ck), str(ck / "model.safetensors"), "is a directory")


def test_device_and_fifo_as_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_input_error(run("info", "/dev/zero"), "/dev/zero", "character device", "not a regular file")
    monkeypatch.chdir(tmp_path)
    _replace_with_fifo(tmp_path / "weights")         # a name that also looks like a repo id
    assert_input_error(run("info", "weights"), "weights", "named pipe (FIFO)")
    assert_input_error(run("info", str(tmp_path / "weights")), "named pipe (FIFO)")


def test_broken_symlink_in_checkpoint(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "tokenizer.json").symlink_to(ck / "gone.json")
    assert_input_error(run("info", ck), str(ck / "tokenizer.json"), "broken symbolic link")


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_fifo_as_token_file(suffix: str, good: Path, tmp_path: Path) -> None:
    fifo = _replace_with_fifo(tmp_path / f"tokens{suffix}")
    assert_input_error(run("scan", good, "--tokens", fifo, "--quiet"), str(fifo), "named pipe (FIFO)")


def test_fifo_as_calibration_text(good: Path, tmp_path: Path) -> None:
    fifo = _replace_with_fifo(tmp_path / "calib.txt")
    assert_input_error(run("scan", good, "--calib", fifo, "--seq-len", "8", "--quiet"), str(fifo), "named pipe")


def test_fifo_as_gate_rules(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = _replace_with_fifo(tmp_path / "rules.toml")
    assert_input_error(run("gate", good, "--config", fifo, *SCAN), str(fifo), "named pipe (FIFO)")
    monkeypatch.chdir(tmp_path)
    _replace_with_fifo(tmp_path / "attnstab.toml")   # found by discovery: refused, not skipped
    assert_input_error(run("gate", good, "--rule", "theta_p05 >= 0", *SCAN), "attnstab.toml", "named pipe")


# --- files are read only inside the checkpoint directory ------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_symlink_out_of_checkpoint_is_refused(name: str, good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if (ck / name).exists():
        shutil.move(ck / name, outside)
    else:
        outside.write_text('{"version": "1.0"}')
    (ck / name).symlink_to(outside)
    result = run("info", ck)
    assert_input_error(result, str(ck / name), "outside the checkpoint directory", "refused")
    assert str(outside) in result.stderr


def test_symlink_inside_checkpoint_is_read(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "weights").mkdir()
    shutil.move(ck / "model.safetensors", ck / "weights" / "real.safetensors")
    (ck / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    result = run("info", ck, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["n_layers"] == 2


def test_checkpoint_directory_given_through_a_symlink(good: Path, tmp_path: Path) -> None:
    """The directory itself may be a link: containment is judged inside the directory it resolves to."""
    (tmp_path / "link").symlink_to(good)
    result = run("info", tmp_path / "link", "--json")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("kind", ["symlink out", "fifo"])
def test_trainer_state_of_a_tracked_checkpoint(kind: str, good: Path, tmp_path: Path) -> None:
    """``track`` reads ``trainer_state.json`` under the same rule as the checkpoint's other files."""
    ck = copy_checkpoint(good, tmp_path)
    state = ck / "trainer_state.json"
    if kind == "fifo":
        _replace_with_fifo(state)
    else:
        (tmp_path / "outside.json").write_text('{"global_step": 5}')
        state.symlink_to(tmp_path / "outside.json")
    result = run("track", ck, "--out", tmp_path / "track", *SCAN)
    assert_input_error(result, str(state), "outside the checkpoint directory" if kind != "fifo" else "named pipe")
    assert not (tmp_path / "track").exists()


def test_legacy_torch_bin_is_read(good: Path, tmp_path: Path) -> None:
    """A pre-zip ``torch.save`` file cannot be memory-mapped; it is read (still ``weights_only``), not refused."""
    from safetensors.torch import load_file

    ck = copy_checkpoint(good, tmp_path)
    torch.save(load_file(ck / "model.safetensors"), ck / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (ck / "model.safetensors").unlink()
    result = run("info", ck, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "bin"


# --- shard indexes ---------------------------------------------------------------------------------------------------

def _index(ck: Path, doc: object | str) -> None:
    (ck / "model.safetensors").rename(ck / "model-00001-of-00001.safetensors")
    (ck / "model.safetensors.index.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))


@pytest.mark.parametrize("doc, needle", [
    ({"weight_map": {"transformer.wte.weight": "model-00001\u0000-of-00001.safetensors"}}, "not a file name"),
    ({"weight_map": {"transformer.wte.weight\u0000": "model-00001-of-00001.safetensors"}}, "with a NUL byte"),
    ({"weight_map": {"transformer.wte.weight": 7}}, "not a file name"),
    ({"weight_map": ["model-00001-of-00001.safetensors"]}, "weight_map"),
    ({"weight_map": {}}, "weight_map"),
    ([1, 2], "weight_map"),
    ('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + ', "weight_map": {"a": "b"}}', "nested"),
    ('{"weight_map": {"a": "model-00001-of-00001.safetensors", "a": "x"}}', "duplicate key"),
])
def test_malformed_shard_index(doc: object, needle: str, good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    _index(ck, doc)
    for args in (("info", ck), ("scan", ck, *SCAN)):
        assert_input_error(run(*args), "model.safetensors.index.json", needle)


def test_index_shard_resolving_inside_is_read(good: Path, tmp_path: Path) -> None:
    """The rule is where a name resolves, not how it is spelt: ``sub/../shard`` stays inside."""
    ck = copy_checkpoint(good, tmp_path)
    (ck / "sub").mkdir()
    names = json.loads((ck / "model.safetensors").read_bytes()[8:8 + struct.unpack("<Q", (ck / "model.safetensors")
                                                                                   .read_bytes()[:8])[0]])
    _index(ck, {"weight_map": {k: "sub/../model-00001-of-00001.safetensors" for k in names}})
    assert run("info", ck).exit_code == 0


@pytest.mark.parametrize("extra, needle", [("[" * 100_000 + "]" * 100_000, "nested 100001 levels deep"),
                                           ('{"a": 1, "a": 2}', "duplicate key 'a'")])
def test_config_json_nesting_and_duplicates(extra: str, needle: str, good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    text = (ck / "config.json").read_text().rstrip().removesuffix("}")
    (ck / "config.json").write_text(text + ', "deep": ' + extra + "}")
    assert_input_error(run("info", ck), str(ck / "config.json"), "malformed config.json", needle)


# --- weight formats attnstab does not read ---------------------------------------------------------------------------

def test_directory_of_gguf_files(tmp_path: Path) -> None:
    ck = tmp_path / "quantised"
    ck.mkdir()
    (ck / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(64))
    result = run("info", ck)
    assert_input_error(result, str(ck), "model-Q4_K_M.gguf is a GGUF file", "does not read")


def test_raw_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(64))
    assert_input_error(run("info", path), str(path), "GGUF file", "does not read")


def test_ctranslate2_model_bin(good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "model.safetensors").unlink()
    spec = b"TransformerDecoderModelSpec\0"
    (ck / "model.bin").write_bytes(struct.pack("<IH", 6, len(spec)) + spec + struct.pack("<I", 1) + bytes(64))
    assert_input_error(run("info", ck), "model.bin is a CTranslate2 model (TransformerDecoderModelSpec)",
                       "does not read")


@pytest.mark.parametrize("content, needle", [(b"", "empty file (0 bytes)"),
                                             (bytes(range(7, 47)), "unknown format (first bytes 07 08"),
                                             (b"not weights\n", "text file")])
def test_bin_that_is_not_a_torch_file(content: bytes, needle: str, good: Path, tmp_path: Path) -> None:
    ck = copy_checkpoint(good, tmp_path)
    (ck / "model.safetensors").unlink()
    (ck / "pytorch_model.bin").write_bytes(content)
    result = run("info", ck)
    assert_input_error(result, str(ck / "pytorch_model.bin"), needle, "not a torch.save file")
    assert "mmap" not in result.stderr


class _Payload:
    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def test_pickled_token_file_never_suggests_unsafe_loading(good: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "tokens.pt"
    torch.save({"ids": torch.zeros(2, 8, dtype=torch.int64), "payload": _Payload()}, path)
    result = run("scan", good, "--tokens", path, "--quiet")
    assert_input_error(result, str(path), "refused", "never runs pickle code")
    assert "weights_only" not in result.stderr and "PICKLE CODE RAN" not in capsys.readouterr().out + result.stdout


@pytest.mark.parametrize("content, needle", [(b"1 2 3 4 5 6 7 8\n", "is a text file, not a NumPy .npy array"),
                                             (None, "holds Python objects")])
def test_npy_token_file_is_never_unpickled(content: bytes | None, needle: str, good: Path, tmp_path: Path) -> None:
    path = tmp_path / "tokens.npy"
    if content is None:
        np.save(path, np.array([[1, 2], [3, None]], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    result = run("scan", good, "--tokens", path, "--quiet")
    assert_input_error(result, str(path), needle)
    assert "unsafe" not in result.stderr and "allow_pickle" not in result.stderr


# --- reports, comparisons and tracks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile-report") / "report"
    result = invoke("scan", good, *SCAN, "--out", out)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("name", ["manifest.json", "layers.parquet", "tokens.npy"])
def test_fifo_in_a_report(name: str, report: Path, tmp_path: Path) -> None:
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    _replace_with_fifo(copy / name)
    assert_input_error(run("show", copy), str(copy / name), "named pipe (FIFO)")


@pytest.mark.parametrize("marker", ["compare.json", "track.json"])
def test_fifo_as_plot_input_marker(marker: str, tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    _replace_with_fifo(tmp_path / "input" / marker)
    result = run("plot", tmp_path / "input", "--out", tmp_path / "plot.svg")
    assert_input_error(result, str(tmp_path / "input" / marker), "named pipe (FIFO)")
    assert not (tmp_path / "plot.svg").exists()
