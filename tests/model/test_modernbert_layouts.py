"""ModernBERT layout primitives (THEORY §18.6): bidirectional local windows, per-layer-type RoPE, an identity in
place of layer 0's attention norm, the MLM head under --grad; against ``transformers`` and brute force."""
from __future__ import annotations

import copy
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch

from attnstab_cli.arch.spec import parse_spec
from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.model.load import open_model
from attnstab_cli.model.masks import compute_allowed
from attnstab_cli.reference.row_stats import compute_key_band
from attnstab_cli.scan import ScanOptions, run_scan
from grad_helpers import assert_mlm_gradients_match
from metrics.test_lipschitz_scan import assert_tiers_ordered


def _spec_data() -> dict:
    return json.loads(resources.files("attnstab_cli.arch").joinpath("specs/modernbert.json").read_text())


@pytest.mark.parametrize("local_attention", [2, 7, 8, 128])
def test_bidirectional_window_is_the_models_mask(local_attention: int) -> None:
    """|i - j| <= local_attention // 2 exactly as transformers' bidirectional sliding-window overlay, and the key
    band of every query chunk holds all its allowed keys."""
    from transformers.masking_utils import sliding_window_bidirectional_overlay

    t = 40
    window = local_attention // 2 + 1                       # ModelConfig's window for local_attention
    got = compute_allowed(0, t, t, t, causal=False, window=window, key_padding_mask=None, device="cpu")[0, 0]
    overlay = sliding_window_bidirectional_overlay(local_attention // 2)
    want = torch.tensor([[bool(overlay(0, 0, i, j)) for j in range(t)] for i in range(t)])
    assert torch.equal(got, want)
    causal = compute_allowed(0, t, t, t, causal=True, window=window, key_padding_mask=None, device="cpu")[0, 0]
    assert torch.equal(causal, want & torch.ones(t, t, dtype=torch.bool).tril())   # causal rows: the last keys
    for i0 in range(0, t, 7):
        i1 = min(t, i0 + 7)
        j0, j1 = compute_key_band(i0, i1, t, t, False, window)
        cols = torch.nonzero(got[i0:i1].any(0))[:, 0]
        assert j0 <= int(cols.min()) and int(cols.max()) < j1


def test_layer_types_windows_and_rope_bases(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """5.x config (layer_types, rope_parameters per type) and the older keys (global_attn_every_n_layers,
    global_rope_theta, local_rope_theta, no layer_types) describe the same model."""
    path, ref = tiny_checkpoints["modernbert"]
    cfg = open_model(path).cfg
    assert cfg.layer_types == tuple(ref.config.layer_types) == ("full_attention", "sliding_attention", "full_attention")
    assert cfg.sliding_windows == (None, 5, None)
    assert [cfg.rope_at(i).theta for i in range(3)] == [1000.0, 60.0, 1000.0]
    old = tmp_path / "old"
    shutil.copytree(path, old)
    data = json.loads((old / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        data.pop(key)
    data.update(global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=60.0)
    (old / "config.json").write_text(json.dumps(data))
    legacy = open_model(old).cfg
    assert (legacy.layer_types, legacy.sliding_windows, legacy.rope, legacy.rope_by_type) == \
        (cfg.layer_types, cfg.sliding_windows, cfg.rope, cfg.rope_by_type)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["layout"].update(norm_attn_identity_layers=[1]), "must be \\[0\\]"),
    (lambda d: d["layout"].update(residual="post"), "pre-norm or parallel"),
    (lambda d: d["tensors"].pop("embed_norm.weight"), "needs an embedding norm"),
])
def test_identity_norm_is_validated(edit, needle: str) -> None:
    data = _spec_data()
    edit(data)
    with pytest.raises(ValueError, match=needle):
        parse_spec(data)


def test_layer0_reads_the_embedding_norm_output(tiny_checkpoints: dict) -> None:
    """Layer 0 has no attention norm: L_N1 = 1 (tiers 1 and 2), its MHA radius is the embedding norm's reset bound
    ||gamma_emb||_inf sqrt(d) (bias-free), which bounds the measured input; norm columns of N1 are null there;
    tier ordering holds on every layer, windowed ones included."""
    path, ref = tiny_checkpoints["modernbert"]
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    tables = run_scan(model, CalibrationSet(batches=(ids,), source="test", seq_len=24),
                      ScanOptions(device="cpu", dtype="float64", empirical_seqs=1)).tables
    rows = {r["layer"]: r for r in tables["layers"]}
    gamma = ref.model.embeddings.norm.weight.detach().double()
    assert ref.model.embeddings.norm.bias is None
    assert rows[0]["r2_in_reset"] == pytest.approx(float(gamma.abs().max()) * math.sqrt(64), rel=1e-12)
    assert rows[0]["r2_in"] <= rows[0]["r2_in_reset"]
    assert rows[0]["ln1_lip_global"] == 1.0 and rows[0]["ln1_lip_local"] == 1.0
    assert rows[0]["norm1_gamma_max"] is None and rows[0]["norm1_min_var"] is None
    assert rows[1]["ln1_lip_global"] > 1.0 and rows[1]["norm1_gamma_max"] is not None
    for row in tables["layers"]:
        assert_tiers_ordered(row)


def _save_mask_tokenizer(directory: Path, vocab_size: int) -> int:
    """A word-level tokenizer.json whose token 3 is [MASK] (the MLM loss needs the mask id)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.pop("t3")
    vocab["[MASK]"] = 3
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(directory / "tokenizer.json"))
    return 3


def test_masked_lm_gradients_match_autograd(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """--grad with the MLM head (dense, GELU, bias-free LayerNorm, tied decoder with a bias) against
    ModernBertForMaskedLM itself, float64."""
    path, ref = tiny_checkpoints["modernbert"]
    ck = tmp_path / "mb"
    shutil.copytree(path, ck)
    mask_id = _save_mask_tokenizer(ck, 97)
    model = open_model(ck)
    ids = torch.randint(5, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(8))
    ref64 = copy.deepcopy(ref).double()
    masked, layers = assert_mlm_gradients_match(model, ref64, ids)
    assert bool((masked == mask_id).any())
    for layer, row in enumerate(layers):
        block = ref64.model.layers[layer]
        ffn = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in block.mlp.parameters()))
        assert row["grad_ffn_params"] == pytest.approx(ffn, rel=1e-5)
