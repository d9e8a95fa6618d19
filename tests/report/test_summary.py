"""Terminal summary, findings, JSON and Markdown views (issue 5, item 2): the same digest in three formats, a
100-column terminal, findings that point at the right heads and layers."""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from attnstab_cli.report.digest import build_digest
from attnstab_cli.report.findings import (DOMINANT_FACTOR, NEAR_SWITCH_MARGIN, OVERLOAD_FACTOR, SINK_PARKED,
                                          compute_findings)
from attnstab_cli.report.heatmap import theta_heatmap
from attnstab_cli.report.markdown import render_markdown
from attnstab_cli.report.read import load_report
from attnstab_cli.report.summary import render_summary
from cli.helpers import invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
MANIFEST = {"checkpoint": {"checkpoint": "x", "family": "gpt2", "n_layers": 3, "d_model": 8, "n_heads": 2,
                           "n_kv_heads": 2, "norm": "layernorm", "placement": "pre-norm"},
            "calibration": {"source": "t", "n_sequences": 1, "seq_len": 4, "token_sha256": "ab" * 32, "seed": 0},
            "run": {"theta": {"tol": 1e-6, "slack": 1e-6, "refined_rows": 3, "unrefined_rows": 0}}}


def _head(layer: int, head: int, theta: float, width: float = 0.0, wide: int = 0) -> dict:
    return {"layer": layer, "head": head, "theta_mean": theta, "theta_p05": theta / 2, "pmax_mean": 0.5,
            "theta_width_max": width, "theta_wide_rows": wide}


def _tables(lips=(2.0, 50.0, 3.0), rho=(0.1, 0.9, 0.2)) -> dict:
    heads = [_head(0, 0, 0.9), _head(0, 1, 0.3, 1e-3, 4), _head(1, 0, 0.99), _head(1, 1, 0.5, 1e-5, 1),
             _head(2, 0, 1.0), _head(2, 1, 0.95)]
    layers = [{"layer": i, "lip_layer_calibrated": lip, "rho_ln_bf16": r, "rho_ln_fp16": r / 10,
               "grad_h_in": 4.0 / (i + 1)} for i, (lip, r) in enumerate(zip(lips, rho))]
    return {"layers": layers, "heads": heads, "model": [{}]}


def _by_kind(findings) -> dict:
    return {f.kind: f for f in findings}


def test_findings_point_at_the_right_places() -> None:
    f = _by_kind(compute_findings(MANIFEST, _tables()))
    assert [(i["layer"], i["head"]) for i in f["lowest_theta"].items] == [(0, 1), (1, 1), (0, 0)]
    assert [(i["layer"], i["head"]) for i in f["widest_interval"].items] == [(0, 1), (1, 1)]
    logs = [math.log(2.0), math.log(50.0), math.log(3.0)]
    dom = f["dominant_bound"].items
    assert [i["layer"] for i in dom] == [1] and dom[0]["value"] == pytest.approx(logs[1] / sum(logs))
    assert dom[0]["value"] > DOMINANT_FACTOR / 3
    assert f["low_precision"].severity == "warn" and [i["layer"] for i in f["low_precision"].items] == [1]
    assert f["gradient_profile"].items[0]["value"] == 4.0 and "grows towards the input" in f["gradient_profile"].text
    assert "non_finite" not in f


def test_findings_flag_non_finite_values_and_contractive_stacks() -> None:
    tables = _tables(lips=(0.5, 0.9, 0.99), rho=(0.1, 0.2, 0.3))
    tables["layers"][2]["r_ln_mean"] = float("nan")
    f = _by_kind(compute_findings(MANIFEST, tables))
    assert f["non_finite"].severity == "warn" and "r_ln_mean" in f["non_finite"].text
    assert "does not grow with depth" in f["dominant_bound"].text and "low_precision" not in f
    narrow = _tables()
    for h in narrow["heads"]:
        h["theta_wide_rows"] = 0
    assert "every θ interval is within" in _by_kind(compute_findings(MANIFEST, narrow))["widest_interval"].text


def test_heads_parking_their_mass_on_the_sink_are_named() -> None:
    """``sink_parked`` names the heads with sink_mass_mean > 1/2, largest first, with their values; with sinks but
    none above it the largest is quoted; a model without sinks (every value null) gets no such finding."""
    tables = _tables()
    masses = [0.9, 0.1, 0.51, SINK_PARKED, 0.7, 0.2]
    for row, mass in zip(tables["heads"], masses):
        row["sink_mass_mean"] = mass
    f = _by_kind(compute_findings(MANIFEST, tables))["sink_parked"]
    assert [(i["layer"], i["head"], i["value"]) for i in f.items] == [(0, 0, 0.9), (2, 0, 0.7), (1, 0, 0.51)]
    assert f.text.startswith("3 of 6 heads park most of their attention on the sink") and "L0H0 0.90" in f.text
    for row in tables["heads"]:
        row["sink_mass_mean"] = 0.25 if row["head"] else 0.3
    f = _by_kind(compute_findings(MANIFEST, tables))["sink_parked"]
    assert f.items == () and "largest: L0H0 0.30" in f.text
    for row in tables["heads"]:
        row["sink_mass_mean"] = None
    assert "sink_parked" not in _by_kind(compute_findings(MANIFEST, tables))
    assert "sink_parked" not in _by_kind(compute_findings(MANIFEST, _tables()))


def test_local_and_global_layers_are_reported_apart() -> None:
    """A model alternating windowed and global layers gets one finding naming both groups with their own figures;
    a model with one kind gets none."""
    tables = _tables()
    for r, window, theta in zip(tables["layers"], (4, None, 4), (0.2, 0.8, 0.4)):
        r["attn_window"], r["theta_bar"] = window, theta
    f = _by_kind(compute_findings(MANIFEST, tables))["local_global"]
    assert [i["layer"] for i in f.items] == [0, 2]
    assert "2 local layers (window 4): mean θ̄ 0.300, largest tier-2 bound 3" in f.text
    assert "1 global layers: mean θ̄ 0.800, largest tier-2 bound 50" in f.text
    assert "local_global" not in _by_kind(compute_findings(MANIFEST, _tables()))


def test_no_magnitude_barrier_is_reported_from_the_manifest() -> None:
    """A checkpoint whose attention reads the residual stream unnormalized (manifest ``attn_input_normalized``
    false, THEORY §18.3) gets a finding naming the first and last tier-1 radii; one with a norm there, or an older
    report without the field, gets none."""
    tables = _tables()
    for r, radius in zip(tables["layers"], (1.5, 20.0, 38.5)):
        r["r2_in_reset"] = radius
    unnormalized = {**MANIFEST, "checkpoint": {**MANIFEST["checkpoint"], "attn_input_normalized": False}}
    f = _by_kind(compute_findings(unnormalized, tables))["no_magnitude_barrier"]
    assert [(i["layer"], i["value"]) for i in f.items] == [(0, 1.5), (2, 38.5)]
    assert "Lemma 3.3 does not apply" in f.text and "from 1.5 at layer 0 to 38.5 at layer 2" in f.text
    normalized = {**MANIFEST, "checkpoint": {**MANIFEST["checkpoint"], "attn_input_normalized": True}}
    for manifest in (MANIFEST, normalized):
        assert "no_magnitude_barrier" not in _by_kind(compute_findings(manifest, tables))


def test_expert_findings_name_dead_and_overloaded_experts_and_near_switch_layers() -> None:
    """THEORY §18.7: a dead expert (no token-slot), an expert with >= OVERLOAD_FACTOR / E of the slots, and a layer
    whose smallest router margin is below NEAR_SWITCH_MARGIN; a dense model has none of these findings."""
    slots = {0: [0, 10, 10, 20], 1: [10, 10, 10, 10]}                 # layer 0: expert 0 dead, expert 3 at 50%
    experts = [{"layer": layer, "expert": e, "token_slots": n, "load_share": n / sum(counts)}
               for layer, counts in slots.items() for e, n in enumerate(counts)]
    tables = _tables()
    tables["experts"] = experts
    tables["layers"][0]["router_margin_min"] = NEAR_SWITCH_MARGIN / 10
    tables["layers"][1]["router_margin_min"] = NEAR_SWITCH_MARGIN * 10
    f = _by_kind(compute_findings(MANIFEST, tables))
    assert [(i["layer"], i["expert"]) for i in f["dead_experts"].items] == [(0, 0)] and "L0E0" in f["dead_experts"].text
    heavy = [(i["layer"], i["expert"]) for i in f["overloaded_experts"].items]
    assert heavy == [(0, 3)] and 20 / 40 >= OVERLOAD_FACTOR / 4 > 10 / 40
    assert [i["layer"] for i in f["near_switch"].items] == [0]
    assert not {"dead_experts", "overloaded_experts", "near_switch"} & set(_by_kind(compute_findings(MANIFEST,
                                                                                                    _tables())))


def test_moe_scan_findings_match_the_experts_table(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """End to end on the tiny Qwen2-MoE: the dead experts the summary names are the experts.parquet rows with no
    token-slot (the overloaded ones those with >= OVERLOAD_FACTOR / E of them), and show names them."""
    out = tmp_path / "moe"
    result = invoke("scan", tiny_checkpoints["qwen2_moe"][0], "--calib", "random", "--seq-len", "16", "--batches",
                    "1", "--batch-size", "2", "--empirical-seqs", "0", "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    found = {f["kind"]: f for f in printed["summary"]["findings"]}
    experts = load_report(out).tables["experts"]
    dead = [(r["layer"], r["expert"]) for r in experts if r["token_slots"] == 0]
    assert [(i["layer"], i["expert"]) for i in found.get("dead_experts", {"items": []})["items"]] == dead
    heavy = {(r["layer"], r["expert"]) for r in experts if r["load_share"] >= OVERLOAD_FACTOR / 6}
    assert {(i["layer"], i["expert"]) for i in found.get("overloaded_experts", {"items": []})["items"]} == heavy
    shown = " ".join(invoke("show", out).stdout.split())
    assert ("overloaded experts" in shown) == bool(heavy) and ("received no token" in shown) == bool(dead)


def test_olmo2_scan_summary_says_the_radius_grows(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """End to end on the tiny OLMo 2: the scan's findings carry the no-barrier sentence with the report's own first
    and last r2_in_reset; a pre-norm family's do not."""
    for family, expected in (("olmo2", True), ("llama", False)):
        out = tmp_path / family
        result = invoke("scan", tiny_checkpoints[family][0], "--calib", "random", "--seq-len", "16", "--batches", "1",
                        "--batch-size", "1", "--empirical-seqs", "0", "--out", out, "--quiet", "--json")
        assert result.exit_code == 0, result.stderr
        printed = json.loads(result.stdout)
        found = {f["kind"]: f for f in printed["summary"]["findings"]}
        assert ("no_magnitude_barrier" in found) == expected, family
        if expected:
            radii = [r["r2_in_reset"] for r in printed["layers"]]
            assert radii == sorted(radii) and radii[0] < radii[-1]
            assert [i["value"] for i in found["no_magnitude_barrier"]["items"]] == [radii[0], radii[-1]]
            shown = invoke("show", out)
            assert "no structural magnitude barrier" in " ".join(shown.stdout.split())


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("summary") / "r"
    result = invoke("scan", SAMPLES / "llama-tiny", "--seq-len", "32", "--batches", "1", "--batch-size", "2",
                    "--empirical-seqs", "1", "--grad", "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_show_reprints_what_scan_printed(scanned: tuple[Path, dict]) -> None:
    out, printed = scanned
    shown = invoke("show", out, "--json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout) == printed
    digest = printed["summary"]
    assert [r["layer"] for r in digest["layers"]] == [r["layer"] for r in printed["layers"]]
    for row, layer in zip(digest["layers"], printed["layers"]):
        assert row["lip_layer_empirical"] == layer["lip_layer_empirical"] and row["grad_h_in"] == layer["grad_h_in"]
        pmax = [h["pmax_mean"] for h in printed["heads"] if h["layer"] == layer["layer"]]
        assert row["pmax_mean"] == pytest.approx(sum(pmax) / len(pmax), rel=1e-12)
    assert digest["theta_mean"][1][2] == next(h["theta_mean"] for h in printed["heads"]
                                              if (h["layer"], h["head"]) == (1, 2))
    assert {f["kind"] for f in digest["findings"]} >= {"lowest_theta", "dominant_bound", "gradient_profile"}


def test_rich_summary_fits_100_columns(scanned: tuple[Path, dict]) -> None:
    report = load_report(scanned[0])
    buf = io.StringIO()
    render_summary(Console(file=buf, width=100, color_system=None), report.manifest, report.tables, detail=True)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100
    for needle in ("per layer", "tier 1", "tier 2", "tier 3", "‖∂L/∂h‖", "theta_mean by layer x head", "findings",
                   "lowest mean θ", "Lipschitz bounds per layer"):
        assert needle in text, needle


def test_heatmap_of_many_heads_fits_100_columns() -> None:
    heads = [_head(layer, h, (h % 10) / 10) for layer in range(3) for h in range(40)]
    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None).print(theta_heatmap(heads))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 100 and "first" not in lines[0]     # 40 heads as colour blocks


def test_markdown_table_matches_the_digest(scanned: tuple[Path, dict]) -> None:
    report = load_report(scanned[0])
    shown = invoke("show", scanned[0], "--format", "markdown")
    assert shown.exit_code == 0 and shown.stdout == render_markdown(report.manifest, report.tables)
    digest = build_digest(report.manifest, report.tables)
    rows = [ln for ln in shown.stdout.splitlines() if re.match(r"^\| \d+ \|", ln)]
    n_cols = len(digest["layer_columns"]) + 1
    layer_rows = [r for r in rows if len(re.split(r"(?<!\\)\|", r)) - 2 == n_cols]
    assert len(layer_rows) == len(digest["layers"])
    first = [c.strip() for c in re.split(r"(?<!\\)\|", layer_rows[0])[1:-1]]
    assert float(first[1]) == pytest.approx(digest["layers"][0]["theta_bar"], rel=1e-3)
    assert "### Findings" in shown.stdout and "\\|h\\|" in shown.stdout


def test_unknown_format_is_a_usage_error(scanned: tuple[Path, dict]) -> None:
    result = invoke("show", scanned[0], "--format", "html")
    assert result.exit_code == 2 and "--format must be rich, json or markdown" in result.stderr
