"""The shared scan flags: declared once, accepted by every command that may scan, and reaching the scan."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer

from attnstab_cli.cli.app import app
from attnstab_cli.cli.scan_flags import FLAG_PARAMETERS
from cli.helpers import assert_input_error, invoke

FAST = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0",
        "--quiet")
SCANNING = ("scan", "compare", "gate", "track")


def _command_args(command: str, ckpt: Path, tmp: Path) -> tuple:
    return {"scan": ("scan", ckpt),
            "compare": ("compare", ckpt, ckpt),
            "gate": ("gate", ckpt, "--no-config", "--rule", "theta_p05 >= 0"),
            "track": ("track", ckpt, "--out", tmp / "track")}[command]


@pytest.fixture(scope="module")
def bare(tiny_checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 checkpoint's weights alone: no config.json beside them (4 heads, LayerNorm eps 1e-5)."""
    out = tmp_path_factory.mktemp("bare") / "gpt2.safetensors"
    shutil.copy(tiny_checkpoints["gpt2"][0] / "model.safetensors", out)
    return out


def test_every_scanning_command_declares_the_same_flags() -> None:
    """scan, compare, gate and track take every shared flag, with the same option names and defaults."""
    click_app = typer.main.get_command(app)
    expected = {p.name for p in FLAG_PARAMETERS}
    options = {}
    for name in SCANNING:
        params = {p.name: p for p in click_app.commands[name].params}
        assert expected <= set(params), (name, expected - set(params))
        options[name] = {n: (tuple(params[n].opts), params[n].default) for n in expected}
    assert all(options[name] == options["scan"] for name in SCANNING)


@pytest.mark.parametrize("command", SCANNING)
def test_a_bare_safetensors_scans_with_arch_and_config_flags(command: str, bare: Path, tmp_path: Path) -> None:
    """Every command scans weights without a config when --arch and the missing config values are given, and
    without them exits 2 naming what is missing: the flags reach the scan."""
    args = _command_args(command, bare, tmp_path)
    result = invoke(*args, *FAST, "--arch", "gpt2", "--n-heads", "4", "--norm-eps", "1e-5")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert_input_error(invoke(*_command_args(command, bare, tmp_path / "again"), *FAST, "--arch", "gpt2"), "n_heads")


@pytest.mark.parametrize("command", SCANNING)
def test_theta_flags_reach_every_command(command: str, bare: Path, tmp_path: Path) -> None:
    """A θ flag out of range is refused by every scanning command, before any work."""
    args = _command_args(command, bare, tmp_path)
    result = invoke(*args, *FAST, "--arch", "gpt2", "--n-heads", "4", "--norm-eps", "1e-5", "--theta-rows", "-3")
    assert_input_error(result, "--theta-rows")
