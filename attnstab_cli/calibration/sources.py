"""Calibration input: the bundled corpus, a user text file, a token file used exactly as given, or random ids.

Text is tokenised with the checkpoint's own ``tokenizer.json`` (``tokenizers`` library, no special tokens added) and
cut into non-overlapping windows of ``seq_len`` tokens. Every source ends as a :class:`CalibrationSet` whose id is the
SHA-256 of the token ids, so two scans are comparable exactly when their ids agree.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from attnstab_cli.checkpoints.file_format import describe_format, load_torch_file, sniff_format
from attnstab_cli.errors import InputError, UsageError
from attnstab_cli.input_files import require_regular_file


@dataclass(frozen=True)
class CalibrationSet:
    """Token batches ``[B, T]`` plus a description of where they came from."""

    batches: tuple[torch.Tensor, ...]
    source: str
    seq_len: int
    source_hash: str | None = None      # sha256 of the text or token file read (None for random ids)
    requested: int | None = None        # sequences asked for (None: a token file, used as given)

    @property
    def n_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    @property
    def n_sequences(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    @property
    def token_hash(self) -> str:
        h = hashlib.sha256()
        for b in self.batches:
            h.update(b.to(torch.int64).cpu().numpy().tobytes())
        return h.hexdigest()


def read_bundled_corpus() -> str:
    """The prose corpus shipped with attnstab (``calibration/corpus/*.txt``, in name order)."""
    folder = resources.files("attnstab_cli.calibration").joinpath("corpus")
    parts = [e.read_text(encoding="utf-8") for e in sorted(folder.iterdir(), key=lambda e: e.name)
             if e.name.endswith(".txt")]
    return "\n\n".join(parts)


def read_text_file(path: Path) -> str:
    """Text from ``.txt``, ``.jsonl`` (field ``text``) or ``.parquet`` (column ``text``); empty is an error."""
    require_regular_file(path, missing="calibration file not found")
    try:
        if path.suffix == ".jsonl":
            text = "\n\n".join(_jsonl_texts(path))
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise InputError(f"no 'text' column (columns: {', '.join(table.column_names)})", path=path)
            text = "\n\n".join(str(t) for t in table.column("text").to_pylist() if t)
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read calibration text: {exc}", path=path) from exc
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise InputError(f"cannot read calibration file: {type(exc).__name__}: {exc}", path=path) from exc
    if not text.strip():
        raise InputError("calibration file is empty", path=path)
    return text


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {n} is not valid JSON ({exc.msg})", path=path) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"line {n} has no string field 'text'", path=path)
        texts.append(record["text"])
    return texts


def tokenize(text: str, tokenizer_path: Path) -> torch.Tensor:
    """Token ids ``[N]`` of ``text`` with the checkpoint's tokenizer (no special tokens). The tokenizer.json's own
    truncation and padding are switched off: they serve the model's inference inputs (sentence-transformers truncate
    to 128 or 256 tokens), while calibration needs the whole text, cut into windows afterwards."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise InputError(f"cannot load tokenizer: {exc}", path=tokenizer_path) from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.int64)


def load_token_file(path: Path) -> torch.Tensor:
    """An integer array ``[batch, seq]`` or ``[seq]`` from ``.npy`` (no pickle) or ``.pt`` (``weights_only``)."""
    require_regular_file(path, missing="token file not found")
    if path.suffix == ".npy":
        arr = _load_npy(path)
    elif path.suffix == ".pt":
        arr = load_torch_file(path, "token file")
    else:
        raise InputError("token file must be .npy or .pt", path=path)
    if not isinstance(arr, torch.Tensor) or arr.is_floating_point() or arr.is_complex() or arr.dtype == torch.bool:
        raise InputError("token file must hold one integer array", path=path)
    if arr.ndim not in (1, 2) or arr.numel() == 0:
        raise InputError(f"token array must be non-empty with shape [batch, seq] or [seq], got {list(arr.shape)}",
                         path=path)
    return arr.to(torch.int64)


def _load_npy(path: Path) -> torch.Tensor:
    """A ``.npy`` array, never unpickled: a file without the NumPy header or holding Python objects is refused in
    our own words (numpy's suggest loading it unsafely)."""
    fmt = sniff_format(path)
    if fmt != "numpy":
        raise InputError(f"is {describe_format(fmt)}, not a NumPy .npy array", path=path)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "allow_pickle" in str(exc):
            raise InputError("refused: this .npy holds Python objects, not an integer array; attnstab never "
                             "unpickles", path=path) from None
        raise InputError(f"corrupt .npy file ({str(exc).splitlines()[0]})", path=path) from None
    except (OSError, EOFError) as exc:
        raise InputError(f"corrupt .npy file ({exc})", path=path) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise InputError("token file must hold one integer array", path=path)
    return torch.from_numpy(arr.astype(np.int64))


def windows(ids: torch.Tensor, seq_len: int, n_sequences: int, source: str) -> torch.Tensor:
    """Up to ``n_sequences`` non-overlapping windows ``[n, seq_len]`` of a 1-D id stream."""
    n = min(n_sequences, ids.numel() // seq_len)
    if n == 0:
        raise InputError(f"{source} gives {ids.numel()} tokens, fewer than --seq-len {seq_len}",
                         hint="lower --seq-len or give more text")
    return ids[: n * seq_len].view(n, seq_len)


def split_batches(seqs: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    return tuple(seqs[i: i + batch_size] for i in range(0, seqs.shape[0], batch_size))


def check_token_range(seqs: torch.Tensor, vocab_size: int, where: str) -> None:
    """Every id must index the embedding matrix."""
    lo, hi = int(seqs.min()), int(seqs.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size})",
                         path=where)


def check_seq_len(seq_len: int, max_positions: int | None) -> None:
    if seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise UsageError(f"sequence length {seq_len} exceeds the model's maximum positions ({max_positions})")
