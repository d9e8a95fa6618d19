"""Take a ``.safetensors`` file apart into header bytes and data, and put (possibly mutated) parts back together."""
from __future__ import annotations

import struct
from pathlib import Path


def split_file(path: Path) -> tuple[bytes, bytes]:
    """``(header_json_bytes, data_bytes)`` of a well-formed file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


def join_file(path: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    """Write ``header`` and ``data`` with ``length`` (default ``len(header)``) as the 8-byte header length."""
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
