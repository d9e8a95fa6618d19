"""``attnstab compare``: two steps of the sample run and the pre-LN vs post-LN samples side by side; the attribution
terms sum to the total change (THEORY §12); calibration mismatches and non-reports are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_input_error, invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"


def _scan(name: str, tokens: Path, out: Path, *extra: str) -> Path:
    result = invoke("scan", SAMPLES / name, "--tokens", tokens, "--empirical-seqs", "0", "--grad", "--out", out,
                    "--quiet", *extra)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    ids = torch.randint(5, 1024, (2, 32), generator=torch.Generator().manual_seed(0)).numpy()
    np.save(root / "ids.npy", ids)
    np.save(root / "other.npy", ids[:, ::-1].copy())
    return {name: _scan(name, root / "ids.npy", root / name) for name in ("gpt2-tiny-step200", "gpt2-tiny-step800",
                                                                       "bert-tiny")} | {
        "other": _scan("gpt2-tiny-step800", root / "other.npy", root / "other")}


def test_attribution_terms_sum_to_the_total(reports: dict[str, Path]) -> None:
    result = invoke("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"], "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["layers"]
    assert len(rows) == 4
    for r in rows:
        parts = r["dlog_theta"] + r["dlog_proj"] + 2 * r["dlog_r_ln"] + r["dlog_scale"]
        assert r["dlog_sens_ln"] == pytest.approx(parts, abs=1e-12)
        resid = r["dlog_theta"] + r["dlog_proj"] + 2 * r["dlog_r_resid"] + r["dlog_scale"]
        assert r["dlog_sens_resid"] == pytest.approx(resid, abs=1e-12)
        a = r["sens_proxy_ln_a"]
        assert r["dlog_sens_ln"] == pytest.approx(np.log(r["sens_proxy_ln_b"]) - np.log(a), abs=1e-12)


def test_pre_ln_and_post_ln_gradient_profiles_side_by_side(reports: dict[str, Path]) -> None:
    result = invoke("compare", reports["gpt2-tiny-step800"], reports["bert-tiny"])
    assert result.exit_code == 0, result.stderr
    assert "‖∂L/∂h_l‖" in result.stdout and "side by side" in result.stdout
    data = json.loads(invoke("compare", reports["gpt2-tiny-step800"], reports["bert-tiny"], "--json").stdout)
    assert all(r["grad_h_in_a"] > 0 and r["grad_h_in_b"] > 0 for r in data["layers"])


def test_different_calibration_is_refused_unless_allowed(reports: dict[str, Path]) -> None:
    result = invoke("compare", reports["gpt2-tiny-step800"], reports["other"])
    assert_input_error(result, "different calibration tokens")
    allowed = invoke("compare", reports["gpt2-tiny-step800"], reports["other"], "--allow-different-calibration")
    assert allowed.exit_code == 0 and "calibration tokens differ" in allowed.stdout


def test_a_checkpoint_is_not_a_report() -> None:
    result = invoke("compare", SAMPLES / "gpt2-tiny", SAMPLES / "bert-tiny")
    assert_input_error(result, "not a report directory")
    assert "attnstab scan" in result.stderr
