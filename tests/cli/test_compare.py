"""``attnstab compare``: two steps of the sample run and the pre-LN vs post-LN samples side by side; the attribution
terms sum to the total change (THEORY §12); calibration mismatches and non-reports are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pyarrow.parquet as pq

from attnstab_cli.compare import compare_reports
from attnstab_cli.report.read import load_report
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


SMALL = ("--seq-len", "32", "--batches", "1", "--batch-size", "2", "--empirical-seqs", "0", "--quiet")


def test_per_head_deltas_and_their_log_split(reports: dict[str, Path]) -> None:
    data = json.loads(invoke("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"], "--json").stdout)
    heads_a = {(r["layer"], r["head"]): r for r in load_report(reports["gpt2-tiny-step200"]).heads}
    heads_b = {(r["layer"], r["head"]): r for r in load_report(reports["gpt2-tiny-step800"]).heads}
    assert len(data["heads"]) == len(heads_a) == 16
    for r in data["heads"]:
        ha, hb = heads_a[r["layer"], r["head"]], heads_b[r["layer"], r["head"]]
        for m in ("theta_mean", "theta_p05", "pmax_mean", "entropy_mean", "proj_product"):
            assert (r[f"{m}_a"], r[f"{m}_b"]) == (ha[m], hb[m])
            assert r[f"{m}_delta"] == pytest.approx(hb[m] - ha[m], abs=1e-15)
        assert r["dlog_proj"] == pytest.approx(np.log(hb["proj_product"] / ha["proj_product"]), rel=1e-12)
        assert r["dlog_theta_proj"] == pytest.approx(r["dlog_theta"] + r["dlog_proj"], abs=1e-15)


def test_rich_output_lists_the_largest_movers_first(reports: dict[str, Path]) -> None:
    result = invoke("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"], "--top", "3")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(invoke("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"],
                             "--json").stdout)["layers"]
    order = [r["layer"] for r in sorted(rows, key=lambda r: -abs(r["dlog_sens_ln"]))]
    section = result.stdout.split("largest first")[1].split("heads that moved most")[0]
    shown = [int(line.split()[0]) for line in section.splitlines() if line.strip()[:1].isdigit()]
    assert shown == order
    assert "heads that moved most" in result.stdout


def test_out_writes_parquet_atomically_and_refuses_to_overwrite(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"], "--out", out, "--quiet")
    assert invoke(*args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "heads.parquet", "layers.parquet"]
    meta = json.loads((out / "compare.json").read_text())
    assert meta["kind"] == "attnstab-compare" and meta["a"]["token_sha256"] == meta["b"]["token_sha256"]
    layers = pq.read_table(out / "layers.parquet")
    data = json.loads(invoke("compare", *args[1:3], "--json").stdout)
    assert layers.to_pylist() == data["layers"] and pq.read_table(out / "heads.parquet").to_pylist() == data["heads"]
    assert b"B - A" in layers.schema.field("proj_product_layer_delta").metadata[b"description"].replace("−".encode(),
                                                                                                       b"-")
    assert_input_error(invoke(*args), "already exists")
    assert invoke(*args, "--force").exit_code == 0


def test_checkpoints_are_scanned_on_identical_tokens(reports: dict[str, Path], tmp_path: Path) -> None:
    """Two checkpoints: both scanned on A's tokens; a report and a checkpoint: the checkpoint on the report's."""
    saved = tmp_path / "saved"
    both = invoke("compare", SAMPLES / "gpt2-tiny-step200", SAMPLES / "gpt2-tiny-step800", *SMALL, "--json",
                  "--save-reports", saved)
    assert both.exit_code == 0, both.stderr
    data = json.loads(both.stdout)
    assert data["a"]["token_sha256"] == data["b"]["token_sha256"]
    assert load_report(saved / "b").manifest["calibration"]["token_sha256"] == data["a"]["token_sha256"]
    mixed = invoke("compare", reports["gpt2-tiny-step200"], SAMPLES / "gpt2-tiny-step800", "--json", "--quiet",
                   "--empirical-seqs", "0", "--grad")
    assert mixed.exit_code == 0, mixed.stderr
    via_reports = json.loads(invoke("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"],
                                    "--json").stdout)
    got = json.loads(mixed.stdout)
    assert got["b"]["token_sha256"] == via_reports["b"]["token_sha256"]
    for r, ref in zip(got["layers"], via_reports["layers"]):
        assert r["dlog_sens_ln"] == pytest.approx(ref["dlog_sens_ln"], rel=1e-9, abs=1e-12)
        assert r["grad_h_in_b"] == pytest.approx(ref["grad_h_in_b"], rel=1e-9)


def test_shape_mismatch_compares_what_both_share(reports: dict[str, Path]) -> None:
    a, b = load_report(reports["gpt2-tiny-step200"]), load_report(reports["gpt2-tiny-step800"])
    b.tables["layers"] = [r for r in b.layers if r["layer"] < 3]
    b.manifest["checkpoint"]["n_heads"] = 8
    comp = compare_reports(a, b)
    assert [r["layer"] for r in comp.layers] == [0, 1, 2] and comp.heads == []
    assert comp.notes == ["A has 4 layers, B has 3: comparing the 3 both share",
                          "A has 4 heads per layer, B has 8: heads are not aligned, comparing per layer only"]


def test_a_missing_target_is_an_input_error(tmp_path: Path) -> None:
    assert_input_error(invoke("compare", tmp_path / "nope", tmp_path / "nope2", *SMALL), "nope")


def test_loss_taylor_account_of_the_two_sample_steps(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = invoke("compare", SAMPLES / "gpt2-tiny-step200", SAMPLES / "gpt2-tiny-step800", "--seq-len", "16",
                    "--batches", "1", "--batch-size", "1", "--empirical-seqs", "0", "--quiet", "--loss", "--json",
                    "--out", out)
    assert result.exit_code == 0, result.stderr
    loss = json.loads(result.stdout)["loss"]
    totals, blocks = loss["totals"], loss["blocks"]
    for p in ("first_order", "second_order", "symmetric"):
        assert sum(b[p] for b in blocks) == pytest.approx(totals[p], rel=1e-12)
        assert totals[f"residual_{p}"] == pytest.approx(totals["delta_loss_layers"] - totals[p], abs=1e-15)
    assert totals["delta_loss"] == pytest.approx(totals["delta_loss_layers"] + totals["embeddings_and_head"])
    assert pq.read_table(out / "loss.parquet").to_pylist() == blocks
    assert json.loads((out / "compare.json").read_text())["loss"]["totals"] == totals
    refused = invoke("compare", reports["gpt2-tiny-step200"], reports["gpt2-tiny-step800"], "--loss")
    assert_input_error(refused, "--loss needs A and B as checkpoints")
