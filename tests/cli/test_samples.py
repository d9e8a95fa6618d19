"""Issue 2, item 8: every bundled sample checkpoint is a small trained HF directory that the scan runs on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
NAMES = sorted(p.name for p in SAMPLES.iterdir() if (p / "config.json").is_file())
EXPECTED = {"gpt2-tiny": ("gpt2", "pre-norm"), "gpt2-tiny-step200": ("gpt2", "pre-norm"),
            "gpt2-tiny-step800": ("gpt2", "pre-norm"), "bert-tiny": ("bert", "post-norm"),
            "llama-tiny": ("llama", "pre-norm"), "pythia-tiny": ("gpt_neox", "parallel residual (pre-norm)"),
            "qwen3-tiny": ("qwen3", "pre-norm")}


def test_the_promised_samples_exist() -> None:
    assert set(EXPECTED) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_sample_is_small_trained_and_scans(name: str, tmp_path: Path) -> None:
    path = SAMPLES / name
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / f).is_file(), f
    assert sum(f.stat().st_size for f in path.iterdir()) < 5 * 2**20
    log = json.loads((path / "training_log.json").read_text())
    assert log["step"] >= 200 and log["eval_loss"] < log["unigram_entropy"] < log["initial_loss"], log
    info = json.loads(invoke("info", path, "--json").stdout)
    assert (info["family"], info["placement"]) == EXPECTED[name]
    out = tmp_path / "report"
    result = invoke("scan", path, "--seq-len", "64", "--batch-size", "2", "--batches", "1", "--out", out, "--quiet",
                    "--empirical-seqs", "1" if name == "gpt2-tiny" else "0")   # tier 3 is tested in tests/metrics
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"layers.parquet", "heads.parquet", "model.parquet", "manifest.json",
                                              "tokens.npy"}


def test_steps_of_one_run_differ() -> None:
    a = (SAMPLES / "gpt2-tiny-step200" / "model.safetensors").read_bytes()
    b = (SAMPLES / "gpt2-tiny-step800" / "model.safetensors").read_bytes()
    assert a != b and (SAMPLES / "gpt2-tiny" / "model.safetensors").read_bytes() == b
