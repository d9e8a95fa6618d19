"""Learned-position numbering of the BERT-layout encoders (RoBERTa / XLM-R ``learned_pad_offset``, DistilBERT
``learned``) against ``transformers``: float64 layer outputs on inputs that hold the pad id, and the sequence-length
limit the numbering leaves."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from attnstab_cli.arch.registry import infer_spec_from_tensors
from attnstab_cli.errors import InputError
from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream, position_ids
from cli.helpers import invoke

ENCODERS = ("roberta", "xlm_roberta", "distilbert")


def padded_ids(vocab: int, pad: int, t: int = 24) -> torch.Tensor:
    """Rows with the pad id at the start, in the middle, at the end, everywhere, and nowhere."""
    ids = torch.randint(0, vocab, (5, t), generator=torch.Generator().manual_seed(11))
    ids[ids == pad] = (pad + 1) % vocab
    ids[0, :3] = pad
    ids[1, 7:9] = pad
    ids[2, -5:] = pad
    ids[3, :] = pad
    return ids


@pytest.mark.parametrize("family", ["roberta", "xlm_roberta"])
def test_position_ids_follow_the_pad_id(family: str, tiny_checkpoints: dict) -> None:
    """The k-th non-pad token reads row pad + k, a pad token row pad; the transformers numbering is the reference."""
    path, ref = tiny_checkpoints[family]
    cfg = open_model(path).cfg
    pad = ref.config.pad_token_id
    assert cfg.pad_token_id == pad and cfg.position_offset == pad + 1
    ids = padded_ids(cfg.vocab_size, pad)
    expected = ref.roberta.embeddings.create_position_ids_from_input_ids(ids, pad)
    assert torch.equal(position_ids(ids, cfg), expected)
    assert position_ids(ids, cfg)[1, 9] == pad + 8          # 8 real tokens before it: the middle pads shift it


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("masked", [False, True])
def test_float64_layers_match_with_pad_tokens(family: str, masked: bool, tiny_checkpoints: dict) -> None:
    """Every layer's output matches ``transformers`` to 1e-10 relative in float64 on inputs holding the pad id,
    with and without an attention mask over the pad tokens (a row of pads only is left unmasked)."""
    path, ref = tiny_checkpoints[family]
    ref64 = copy.deepcopy(ref).double()
    model = open_model(path)
    ids = padded_ids(model.cfg.vocab_size, ref.config.pad_token_id)
    mask = ids.ne(ref.config.pad_token_id) if masked else None
    if mask is not None:
        mask[3] = True
    with torch.no_grad():
        expected = ref64(ids, attention_mask=None if mask is None else mask.long(), output_hidden_states=True)
    stream = LayerStream(model, [ids], dtype=torch.float64, key_padding_masks=[mask])
    rel = lambda got, want: float((got - want).norm() / want.norm())
    assert rel(stream.embed()[0], expected.hidden_states[0]) < 1e-10
    for trace in stream.layers():
        assert rel(trace.resid_out, expected.hidden_states[trace.layer + 1]) < 1e-10, trace.layer


def test_sequence_length_limit_counts_the_offset(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """66 position rows and pad id 1: sequences of up to 64 tokens; 65 is a usage error (exit 2), not an index error."""
    path, _ = tiny_checkpoints["roberta"]
    cfg = open_model(path).cfg
    assert (cfg.max_positions, cfg.max_seq_len) == (66, 64)
    info = json.loads(invoke("info", path, "--json").stdout)
    assert (info["positions"], info["position_offset"], info["max_seq_len"]) == ("learned_pad_offset", 2, 64)
    args = ("--calib", "random", "--batch-size", "1", "--batches", "1", "--quiet", "--empirical-seqs", "0")
    too_long = invoke("scan", path, *args, "--seq-len", "65", "--out", tmp_path / "a")
    assert too_long.exit_code == 2 and "64" in too_long.stderr
    assert invoke("scan", path, *args, "--seq-len", "64", "--out", tmp_path / "b").exit_code == 0


def test_pad_id_beyond_the_position_table_is_refused(tiny_checkpoints: dict, tmp_path: Path) -> None:
    src, _ = tiny_checkpoints["roberta"]
    dst = tmp_path / "roberta"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["pad_token_id"] = 65
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="pad_token_id"):
        open_model(dst)


def test_distilbert_reads_its_own_config_keys(tiny_checkpoints: dict) -> None:
    path, ref = tiny_checkpoints["distilbert"]
    cfg = open_model(path).cfg
    c = ref.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff) == (c.n_layers, c.dim, c.n_heads, c.hidden_dim)
    assert (cfg.norm_eps, cfg.activation, cfg.position_offset, cfg.type_vocab_size) == (1e-12, c.activation, 0, None)


def test_bare_unprefixed_bert_layout_names_are_ambiguous() -> None:
    """Without a config, BERT and RoBERTa base-model tensors carry the same names: the user must choose."""
    layer = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             *(f"encoder.layer.0.{m}.{p}" for m in layer for p in ("weight", "bias"))]
    with pytest.raises(InputError, match="ambiguous.*bert.*roberta"):
        infer_spec_from_tensors(names)
    assert infer_spec_from_tensors(["roberta." + n for n in names]).name == "roberta"
    assert infer_spec_from_tensors(["bert." + n for n in names]).name == "bert"
