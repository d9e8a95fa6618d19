"""``scan`` refuses, before any work, a model whose largest resident layer (all its experts) does not fit the device's
free memory with the documented headroom: exit 2, one ``Error:`` line naming the layer, its bytes and the free bytes,
nothing written. The free-memory probe is replaced here; the probe itself is read against /proc/meminfo."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from attnstab_cli.checkpoints.reader import TensorReader
from attnstab_cli.model import memory
from attnstab_cli.model.load import open_model
from cli.helpers import assert_input_error, invoke
from tiny_models import save_tiny_model

SCAN = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0",
        "--quiet", "--device", "cpu")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The tiny Mixtral and its largest layer's float32 bytes (its reference layer's parameters)."""
    path = tmp_path_factory.mktemp("refusal") / "mixtral"
    ref = save_tiny_model("mixtral", path)
    return path, max(sum(p.numel() for p in layer.parameters()) * 4 for layer in ref.model.layers)


def _free(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> list[torch.device]:
    asked: list[torch.device] = []

    def probe(device: torch.device) -> int:
        asked.append(device)
        return nbytes

    monkeypatch.setattr(memory, "free_memory_bytes", probe)
    return asked


def _no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: TensorReader, name: str) -> torch.Tensor:
        raise AssertionError(f"weight {name} read before the memory check")

    monkeypatch.setattr(TensorReader, "stored", refuse)


@pytest.mark.parametrize("flags", [SCAN, ("--weights-only", "--quiet", "--device", "cpu")],
                         ids=["calibrated", "weights_only"])
def test_a_layer_larger_than_free_memory_is_refused(flags: tuple[str, ...], mixtral: tuple[Path, int],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, layer_bytes = mixtral
    free = math.ceil(layer_bytes * memory.HEADROOM) - 1
    asked = _free(monkeypatch, free)
    _no_weight_reads(monkeypatch)
    out = tmp_path / "report"
    result = invoke("scan", path, *flags, "--out", out)
    assert_input_error(result, "layer 0", f"{layer_bytes:,} bytes", f"{free:,} bytes free", "all its experts")
    assert asked == [torch.device("cpu")]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_layer_that_fits_with_its_headroom_scans(mixtral: tuple[Path, int], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, layer_bytes = mixtral
    _free(monkeypatch, math.ceil(layer_bytes * memory.HEADROOM))
    result = invoke("scan", path, *SCAN, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "report" / "experts.parquet").is_file()


def test_embeddings_larger_than_every_layer_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample LLaMA's token table (256 x 256) outweighs its layers: the refusal names the embeddings; the LM head
    counts only when --grad loads it."""
    path = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "llama-tiny"
    resident = memory.compute_resident_bytes(open_model(path), torch.float32)
    assert resident.embedding > resident.largest_layer_bytes and resident.head > resident.embedding
    _free(monkeypatch, resident.embedding)
    assert_input_error(invoke("scan", path, *SCAN), "the embeddings", f"{resident.embedding:,} bytes")
    _free(monkeypatch, math.ceil(resident.embedding * memory.HEADROOM))
    assert_input_error(invoke("scan", path, *SCAN, "--grad"), "the head", f"{resident.head:,} bytes")


def test_cpu_free_memory_is_meminfo_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    7654321 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", fake)
    assert memory.free_memory_bytes(torch.device("cpu")) == 7654321 * 1024
    fake.write_text("MemTotal:       16000000 kB\n")
    assert memory.free_memory_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "absent")
    assert memory.free_memory_bytes(torch.device("cpu")) is None


def test_the_real_probe_reads_this_machine() -> None:
    """On this Linux machine the probe returns /proc/meminfo's MemAvailable."""
    text = Path("/proc/meminfo").read_text()
    kb = int(re.search(r"^MemAvailable:\s+(\d+)", text, re.MULTILINE).group(1))
    assert abs(memory.free_memory_bytes(torch.device("cpu")) - kb * 1024) < 2 ** 30
