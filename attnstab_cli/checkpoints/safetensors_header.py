"""The one validator of ``.safetensors`` headers, used by every command that opens a checkpoint (``scan``, ``info``).

The format is an 8-byte little-endian header length N, N bytes of UTF-8 JSON that begin with ``{`` (possibly padded
with trailing whitespace), then the data buffer. The JSON maps each tensor name to exactly ``dtype`` (a known tag),
``shape`` (non-negative integers) and ``data_offsets`` (``[begin, end]`` in the buffer, ``end - begin`` equal to the
element count times the dtype size); an optional ``__metadata__`` maps strings to strings. The tensors' byte ranges
tile the buffer exactly: no gap, no overlap, nothing after the last one. Everything is checked here, against the real
file size, before any tensor is read, so a broken file is one clear message naming it instead of a library error deep
inside a scan, and a header that passes here is one the ``safetensors`` library reads too.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnstab_cli.bounded_json import JsonRefused, loads_strict
from attnstab_cli.errors import InputError
from attnstab_cli.input_files import require_regular_file

# bytes per element of each safetensors dtype tag
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 100_000_000          # the safetensors library's own limit
MAX_HEADER_DEPTH = 3                    # {name: {"shape": [...]}}
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype tag, shape and byte range inside the data buffer."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ``(tensors, metadata)`` of one safetensors file, raising :class:`InputError` on any inconsistency."""
    require_regular_file(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"truncated safetensors file ({size} bytes, no header)", path=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"safetensors header claims {n} bytes but the file has only {size}", path=path)
            raw = fh.read(n)
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror}", path=path) from exc
    tensors, metadata = parse_header(raw, size - 8 - n, path)
    return tensors, metadata


def parse_header(raw: bytes, data_size: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate header bytes ``raw`` for a data buffer of ``data_size`` bytes (module docstring)."""
    if not raw.startswith(b"{"):
        raise InputError("corrupted safetensors header (it does not begin with '{')", path=path)
    try:
        header = loads_strict(raw.decode("utf-8"), MAX_HEADER_DEPTH)
    except UnicodeDecodeError as exc:
        raise InputError(f"corrupted safetensors header (not UTF-8: {exc.reason} at byte {exc.start})",
                         path=path) from None
    except JsonRefused as exc:
        raise InputError(f"corrupted safetensors header (invalid JSON: {exc})", path=path) from None
    if not isinstance(header, dict):
        raise InputError("corrupted safetensors header (not a JSON object)", path=path)
    metadata = _metadata(header.pop(METADATA_KEY, None), path)
    tensors, ranges = {}, []
    for name, entry in header.items():
        info, begin = _parse_entry(path, name, entry, data_size)
        tensors[name] = info
        ranges.append((begin, begin + info.nbytes, name))
    _check_tiling(ranges, data_size, path)
    return tensors, metadata


def _metadata(value: Any, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InputError(f"corrupted safetensors header ({METADATA_KEY} must map strings to strings)", path=path)
    return value


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer (``true`` and ``2.0`` are not)."""
    return type(value) is int and value >= 0


def _parse_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[TensorInfo, int]:
    """One header entry as a :class:`TensorInfo` and its first byte: known dtype, integer shape consistent with its
    byte range, range inside the data buffer."""
    def bad(problem: str) -> InputError:
        return InputError(f"corrupted safetensors header: tensor {name!r} {problem}", path=path)

    if not isinstance(entry, dict):
        raise bad("is not an object")
    if set(entry) != ENTRY_KEYS:
        raise bad(f"has keys {sorted(entry)}, expected {sorted(ENTRY_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"has dtype {dtype!r}, not a string")
    if dtype not in DTYPE_SIZES:
        raise InputError(f"tensor {name!r} has unknown dtype {dtype!r}", path=path)
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if end < begin or end - begin != numel * DTYPE_SIZES[dtype]:
        raise InputError(f"tensor {name!r}: byte range {begin}..{end} does not match shape {shape} of {dtype}",
                         path=path)
    if end > data_size:
        raise InputError(
            f"truncated: tensor {name!r} needs bytes up to {end} but the data section has only {data_size}",
            path=path,
        )
    return TensorInfo(file=path, dtype=dtype, shape=tuple(shape), nbytes=end - begin), begin


def _check_tiling(ranges: list[tuple[int, int, str]], data_size: int, path: Path) -> None:
    """The byte ranges cover ``[0, data_size)`` exactly once, in offset order (empty tensors anywhere inside)."""
    covered, last = 0, None
    for begin, end, name in sorted(ranges):
        if begin < covered:
            raise InputError(f"corrupted safetensors header: tensors {last!r} and {name!r} overlap", path=path)
        if begin > covered:
            raise InputError(f"corrupted safetensors header: data bytes {covered}..{begin} belong to no tensor "
                             f"(a gap before {name!r})", path=path)
        covered, last = end, name
    if covered != data_size:
        raise InputError(f"{data_size - covered} bytes of trailing data after the last tensor "
                         "(the header does not describe them)", path=path)


__all__ = ["DTYPE_SIZES", "MAX_HEADER_BYTES", "TensorInfo", "parse_header", "read_safetensors_header"]
