"""Calibration sources: text formats, token files used exactly as given, windows, ranges, the bundled corpus."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from attnstab_cli.calibration.build import CalibrationRequest, build_calibration
from attnstab_cli.calibration.sources import read_bundled_corpus, read_text_file
from attnstab_cli.errors import InputError, UsageError

TEXT = "The quick tide turns at dusk. " * 40


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over the test text (ids are word indices, easy to check by hand)."""
    words = sorted(set(TEXT.replace(".", " .").split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_text_formats_agree(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": TEXT}) + "\n\n")
    pq.write_table(pa.table({"text": [TEXT]}), tmp_path / "a.parquet")
    assert read_text_file(tmp_path / "a.txt") == read_text_file(tmp_path / "a.jsonl") == \
        read_text_file(tmp_path / "a.parquet")


@pytest.mark.parametrize("content,needle", [('{"txt": "x"}\n', "no string field 'text'"), ("{oops\n", "line 1")])
def test_bad_jsonl(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(InputError, match=needle):
        read_text_file(tmp_path / "b.jsonl")


def test_parquet_without_text_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="no 'text' column"):
        read_text_file(tmp_path / "c.parquet")


def test_windows_and_batches(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "a.txt").write_text(TEXT)
    req = CalibrationRequest(calib=str(tmp_path / "a.txt"), seq_len=7, batch_size=3, batches=2)
    cal = build_calibration(req, vocab_size=100, max_positions=64, tokenizer_path=tokenizer_path)
    assert [tuple(b.shape) for b in cal.batches] == [(3, 7), (3, 7)]
    ids = Tokenizer.from_file(str(tokenizer_path)).encode(TEXT).ids
    assert torch.cat(cal.batches).flatten().tolist() == ids[:42]      # consecutive, non-overlapping windows


def test_token_file_used_exactly(tmp_path: Path) -> None:
    ids = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    for name in ("ids.pt", "ids.npy"):
        cal = build_calibration(CalibrationRequest(tokens=tmp_path / name, batch_size=2), 50, 64, None)
        assert torch.equal(torch.cat(cal.batches), ids) and cal.seq_len == 9
    torch.save(ids[0], tmp_path / "row.pt")
    cal = build_calibration(CalibrationRequest(tokens=tmp_path / "row.pt"), 50, 64, None)
    assert torch.equal(cal.batches[0], ids[:1])                        # a [seq] array is one sequence


def test_token_file_conflicts_and_limits(tmp_path: Path) -> None:
    torch.save(torch.zeros(2, 9, dtype=torch.long), tmp_path / "ids.pt")
    with pytest.raises(UsageError, match="disagrees"):
        build_calibration(CalibrationRequest(tokens=tmp_path / "ids.pt", seq_len=8), 50, 64, None)
    with pytest.raises(UsageError, match="maximum positions"):
        build_calibration(CalibrationRequest(tokens=tmp_path / "ids.pt"), 50, 8, None)
    with pytest.raises(UsageError, match="not both"):
        build_calibration(CalibrationRequest(tokens=tmp_path / "ids.pt", calib="random"), 50, 64, None)


def test_random_calibration_is_seeded() -> None:
    a = build_calibration(CalibrationRequest(calib="random", seq_len=16, seed=3), 50, 64, None)
    b = build_calibration(CalibrationRequest(calib="random", seq_len=16, seed=3), 50, 64, None)
    c = build_calibration(CalibrationRequest(calib="random", seq_len=16, seed=4), 50, 64, None)
    assert a.token_hash == b.token_hash != c.token_hash
    assert int(torch.cat(a.batches).max()) < 50


def test_too_little_text(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "short.txt").write_text("The quick tide.")
    with pytest.raises(InputError, match="fewer than --seq-len"):
        build_calibration(CalibrationRequest(calib=str(tmp_path / "short.txt"), seq_len=32), 100, 64,
                          tokenizer_path)


def test_bundled_corpus_is_substantial_prose() -> None:
    """Issue 2, item 7: at least 8,000 words of prose on varied subjects, in several files."""
    text = read_bundled_corpus()
    assert len(text.split()) >= 8000
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 60
    assert len(set(text.lower().split())) >= 2500          # varied vocabulary, not a repeated passage
