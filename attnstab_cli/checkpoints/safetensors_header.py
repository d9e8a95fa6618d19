"""Read and validate a ``.safetensors`` header without touching tensor data.

The format is an 8-byte little-endian header length N, N bytes of JSON, then the data buffer. We validate every
offset against the real file size ourselves, so a truncated file or a header that claims more bytes than exist is
reported precisely (file name and numbers) instead of surfacing as a library error deep inside a scan.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from attnstab_cli.errors import InputError

# bytes per element of each safetensors dtype tag
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype tag, shape and byte range inside the data buffer."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ``(tensors, metadata)`` of one safetensors file, raising :class:`InputError` on any inconsistency."""
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"corrupted safetensors header (invalid JSON: {exc})", path=path) from exc
    if not isinstance(header, dict):
        raise InputError("corrupted safetensors header (not a JSON object)", path=path)
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    tensors = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    return tensors, metadata


def _parse_entry(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    """Validate one header entry: known dtype, shape consistent with its byte range, range inside the file."""
    try:
        dtype, shape, (start, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise InputError(f"corrupted safetensors header entry for tensor {name!r}", path=path) from exc
    if dtype not in DTYPE_SIZES:
        raise InputError(f"tensor {name!r} has unknown dtype {dtype!r}", path=path)
    numel = 1
    for s in shape:
        numel *= s
    if end < start or end - start != numel * DTYPE_SIZES[dtype]:
        raise InputError(f"tensor {name!r}: byte range {start}..{end} does not match shape {list(shape)}", path=path)
    if end > data_size:
        raise InputError(
            f"truncated: tensor {name!r} needs bytes up to {end} but the data section has only {data_size}",
            path=path,
        )
    return TensorInfo(file=path, dtype=dtype, shape=shape, nbytes=end - start)
