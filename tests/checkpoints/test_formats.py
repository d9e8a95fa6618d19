"""Issue 2, item 4: every checkpoint format opens to the same model and the same numbers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from tiny_models import build_tiny_model


def _final_hidden(path: Path | str, **kwargs) -> torch.Tensor:
    model = open_model(path, **kwargs)
    ids = torch.arange(24)[None] % model.cfg.vocab_size
    stream = LayerStream(model, [ids])
    for _ in stream.layers():
        pass
    return stream.final_hidden()[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    root = tmp_path_factory.mktemp("formats")
    model = build_tiny_model("llama")
    model.save_pretrained(root / "single")
    return root, model, _final_hidden(root / "single")


def test_sharded_safetensors(reference, tmp_path: Path) -> None:
    root, model, expected = reference
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_final_hidden(tmp_path), expected, rtol=0, atol=0)


def test_pytorch_bin_single_and_sharded(reference, tmp_path: Path) -> None:
    root, model, expected = reference
    state = {k: v.clone() for k, v in model.state_dict().items()}
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(root / "single" / "config.json", single)
    torch.save(state, single / "pytorch_model.bin")
    torch.testing.assert_close(_final_hidden(single), expected, rtol=0, atol=0)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(root / "single" / "config.json", sharded)
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / fname)
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(_final_hidden(sharded), expected, rtol=0, atol=0)


def test_bare_safetensors_with_overrides(reference) -> None:
    root, model, expected = reference
    cfg = model.config
    overrides = {"n_heads": cfg.num_attention_heads, "norm_eps": cfg.rms_norm_eps,
                 "rope_theta": cfg.rope_parameters["rope_theta"]}
    got = _final_hidden(root / "single" / "model.safetensors", overrides=overrides)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype: torch.dtype, tmp_path: Path) -> None:
    """fp16/bf16 checkpoints load (analysed in float32) and agree with the upcast reference model."""
    model = build_tiny_model("gpt2").to(dtype)
    model.save_pretrained(tmp_path)
    opened = open_model(tmp_path)
    assert set(i.dtype for i in opened.reader.infos.values()) == {"F16" if dtype == torch.float16 else "BF16"}
    ids = torch.arange(24)[None]
    ref = model.float()
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(_final_hidden(tmp_path), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,base_cls", [("gpt2", "GPT2Model"), ("llama", "LlamaModel"),
                                              ("bert", "BertForSequenceClassification")])
def test_prefixes_and_task_heads(family: str, base_cls: str, tmp_path: Path) -> None:
    """Base models store names without the ``transformer.``/``model.`` prefix; task heads add extra tensors."""
    import transformers

    full = build_tiny_model(family)
    other = getattr(transformers, base_cls)(full.config)
    other.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        expected = other(torch.arange(24)[None] % full.config.vocab_size, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(_final_hidden(tmp_path), expected, atol=1e-4, rtol=0)


def test_repo_id_from_local_hub_cache(reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id resolves through ``HF_HUB_CACHE`` (snapshot files are symlinks into ``blobs/``)."""
    root, _, expected = reference
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in (root / "single").iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.testing.assert_close(_final_hidden("tiny-org/tiny-llama"), expected, rtol=0, atol=0)
