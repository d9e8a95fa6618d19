"""Gemma 3 multimodal checkpoints (``gemma3``) are read through their language model: the vision tower and the
projector are counted and named as not analysed, never read, and the text model's layers match ``transformers``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from cli.helpers import invoke
from tiny_models import FAMILIES


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    import transformers

    _, _, text = FAMILIES["gemma3"]
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**text).to_dict(),
                                    vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))                      # (1 + w) with w != 0
    path = tmp_path_factory.mktemp("gemma3mm") / "ckpt"
    model.save_pretrained(path)
    return path, model


def test_vision_tower_is_named_and_not_read(multimodal: tuple[Path, torch.nn.Module]) -> None:
    path, ref = multimodal
    data = json.loads(invoke("info", path, "--json").stdout)
    assert data["family"] == "gemma3" and data["model_type"] == "gemma3"
    vision = sum(1 for n, _ in ref.named_parameters() if "vision_tower" in n)
    projector = sum(1 for n, _ in ref.named_parameters() if "multi_modal_projector" in n)
    assert data["ignored_parts"] == {"vision tower": vision, "multimodal projector": projector} and vision > 0
    assert data["n_layers"] == ref.config.text_config.num_hidden_layers
    assert data["qk_norm"] == "per_head" and data["norm_weight"] == "one_plus"
    text = invoke("info", path).stdout
    assert "vision tower" in text and "not analysed" in text


def test_language_model_layers_match(multimodal: tuple[Path, torch.nn.Module]) -> None:
    """The streamed text layers equal the reference's language-model hidden states (float32)."""
    path, ref = multimodal
    model = open_model(path)
    ids = torch.randint(5, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states
    stream = LayerStream(model, [ids])
    for trace in stream.layers():
        if trace.layer + 1 < model.cfg.n_layers:
            torch.testing.assert_close(trace.resid_out, want[trace.layer + 1], rtol=1e-4, atol=1e-4)


def test_scan_summary_says_what_was_not_analysed(multimodal: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = multimodal
    result = invoke("scan", path, "--calib", "random", "--seq-len", "16", "--batches", "1", "--out", tmp_path / "r",
                    "--empirical-seqs", "0")
    assert result.exit_code == 0, result.stderr
    assert "vision tower not analysed" in result.stdout
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["checkpoint"]["ignored_parts"]["vision tower"] > 0
