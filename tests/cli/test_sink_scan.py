"""A scan end to end through a layout with attention sinks (THEORY §18.4): every value finite or null with a reason,
``sink_mass_mean`` on every head, and the ``sink_parked`` finding on the head whose sink logit dominates.

No shipped family has sinks yet (gpt-oss also needs the MoE FFN), so the test declares one: the LLaMA spec with the
``attn_sinks`` primitive and a ``sinks`` tensor per layer, registered for this test only, and a tiny LLaMA
checkpoint with sink logits added to its file.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from attnstab_cli.arch import registry
from attnstab_cli.arch.spec import parse_spec
from attnstab_cli.report.findings import compute_findings
from attnstab_cli.report.read import load_report
from cli.helpers import invoke
from tiny_models import save_tiny_model

SINKS = (-4.0, 0.0, 2.0, 30.0)    # per query head: negligible ... every row's mass on the sink


@pytest.fixture()
def sink_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = json.loads(resources.files("attnstab_cli.arch").joinpath("specs", "llama.json").read_text("utf-8"))
    data.update(name="llama_sinks", match={"model_types": ["llama_sinks"]})
    data["layout"]["attn_sinks"] = True
    data["layer_tensors"]["sinks"] = "layers.{layer}.self_attn.sinks"
    specs = {**registry.builtin_specs(), "llama_sinks": parse_spec(data)}
    monkeypatch.setattr(registry, "builtin_specs", lambda: specs)
    path = tmp_path / "ckpt"
    model = save_tiny_model("llama", path)
    tensors = load_file(path / "model.safetensors")
    for layer in range(model.config.num_hidden_layers):
        tensors[f"model.layers.{layer}.self_attn.sinks"] = torch.tensor(SINKS)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="llama_sinks", architectures=["LlamaSinksForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_sink_scan_end_to_end(sink_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = invoke("scan", sink_checkpoint, "--calib", "random", "--seq-len", "24", "--batch-size", "2",
                    "--batches", "1", "--out", out, "--json", "--quiet", "--empirical-seqs", "1")
    assert result.exit_code == 0, result.stderr
    reasons = json.loads((out / "manifest.json").read_text())["run"]["null_columns"]
    for name in ("layers", "heads", "model"):      # every value finite, or null with its reason in the manifest
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        for column in rows[0]:
            values = [r[column] for r in rows]
            assert all(math.isfinite(v) for v in values if isinstance(v, float)), (name, column)
            if all(v is None for v in values):
                assert reasons.get(column), (name, column)
    heads = pq.read_table(out / "heads.parquet").to_pylist()
    assert "sink_mass_mean" not in reasons
    assert all(0.0 < r["sink_mass_mean"] < 1.0 for r in heads)
    for r in (r for r in heads if r["head"] == 3):              # m ≈ 0 on every row: θ_sink ≤ m, p_max ≤ m
        assert r["theta_tilde_hi"] <= 2e-6 and r["pmax_max"] < 1e-6
    by_head = {h: [r["sink_mass_mean"] for r in heads if r["head"] == h] for h in range(len(SINKS))}
    assert all(s > 0.999 for s in by_head[3]) and all(s < 0.5 for s in by_head[0])
    layers = pq.read_table(out / "layers.parquet").to_pylist()
    assert all(r["tightness"] is None or r["tightness"] <= 1.0 + 1e-3 for r in layers)   # tier 3 below tier 2
    f = {x.kind: x for x in compute_findings(*_report(out))}["sink_parked"]
    assert {(i["layer"], i["head"]) for i in f.items} >= {(layer, 3) for layer in range(len(layers))}
    assert all(i["value"] > 0.5 for i in f.items)


def _report(out: Path) -> tuple[dict, dict]:
    report = load_report(out)
    return report.manifest, report.tables
