"""Choose and build the calibration set for a scan from the CLI's ``--calib`` / ``--tokens`` options."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from attnstab_cli.calibration.sources import (
    CalibrationSet, check_seq_len, check_token_range, load_token_file, read_bundled_corpus, read_text_file,
    split_batches, tokenize, windows,
)
from attnstab_cli.errors import InputError, UsageError

DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class CalibrationRequest:
    """What the user asked for; ``calib`` is None (bundled corpus), ``"random"`` or a file path."""

    calib: str | None = None
    tokens: Path | None = None
    seq_len: int | None = None
    batch_size: int = 4
    batches: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        """Counts are checked when the request is made, before any checkpoint is opened (and under
        ``--weights-only``, which builds no tokens, a nonsensical value is still refused, not ignored)."""
        if self.seq_len is not None and self.seq_len < 1:
            raise UsageError(f"--seq-len must be positive, got {self.seq_len}")
        if self.batch_size < 1 or self.batches < 1:
            raise UsageError("--batch-size and --batches must be positive")


def build_calibration(req: CalibrationRequest, vocab_size: int, max_positions: int | None,
                      tokenizer_path: Path | None, checkpoint: str = "checkpoint") -> CalibrationSet:
    """Token batches for the scan, validated against the model's vocabulary and context length."""
    if req.tokens is not None:
        if req.calib is not None:
            raise UsageError("give either --calib or --tokens, not both")
        return _from_token_file(req, vocab_size, max_positions)
    seq_len = req.seq_len if req.seq_len is not None else min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)
    check_seq_len(seq_len, max_positions)
    n_seq = req.batch_size * req.batches
    if req.calib == "random":
        gen = torch.Generator().manual_seed(req.seed)
        seqs = torch.randint(0, vocab_size, (n_seq, seq_len), generator=gen)
        return CalibrationSet(split_batches(seqs, req.batch_size), f"random(seed={req.seed})", seq_len,
                              requested=n_seq)
    if req.calib is None:
        text, source = read_bundled_corpus(), "bundled corpus"
    else:
        path = Path(req.calib)
        text, source = read_text_file(path), str(path)
    if tokenizer_path is None:
        raise InputError("no tokenizer.json, so calibration text cannot be tokenised", path=checkpoint,
                         hint="pass --tokens FILE (.npy/.pt ids) or --calib random")
    seqs = windows(tokenize(text, tokenizer_path), seq_len, n_seq, source)
    check_token_range(seqs, vocab_size, str(tokenizer_path))
    return CalibrationSet(split_batches(seqs, req.batch_size), source, seq_len,
                          hashlib.sha256(text.encode("utf-8")).hexdigest(), requested=n_seq)


def _from_token_file(req: CalibrationRequest, vocab_size: int, max_positions: int | None) -> CalibrationSet:
    arr = load_token_file(req.tokens)
    seqs = arr[None] if arr.ndim == 1 else arr
    if req.seq_len is not None and req.seq_len != seqs.shape[1]:
        raise UsageError(f"--seq-len {req.seq_len} disagrees with the token file's sequence length {seqs.shape[1]}")
    check_seq_len(seqs.shape[1], max_positions)
    check_token_range(seqs, vocab_size, str(req.tokens))
    return CalibrationSet(split_batches(seqs, req.batch_size), str(req.tokens), seqs.shape[1],
                          hashlib.sha256(req.tokens.read_bytes()).hexdigest())
