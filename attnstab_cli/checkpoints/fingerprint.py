"""A fingerprint of a checkpoint's weights, cheap by default (issue 5, item 1).

``sampled`` (default): SHA-256 over, per weight file in order, its name, its size, its first 1 MiB (for safetensors
the whole header: names, dtypes, shapes and offsets of every tensor) and 64 blocks of 64 KiB at evenly spaced offsets,
plus its last 1 MiB — about 6 MiB read per file whatever its size. Two checkpoints with different tensor layouts
always differ; two with the same layout differ unless every changed byte falls outside the sampled blocks, which a
training step (which moves nearly every weight) never achieves but a single flipped byte can. ``full`` hashes every
byte (``--hash full``): slower, exact. The fingerprint keys the scan cache of ``attnstab track``, so a cache hit also
requires the same mode.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

HashMode = Literal["sampled", "full"]
HEAD_BYTES = 1 << 20
BLOCK_BYTES = 1 << 16
N_BLOCKS = 64
CHUNK = 1 << 22


def compute_fingerprint(files: tuple[Path, ...] | list[Path], mode: HashMode = "sampled") -> str:
    """``sha256:<hex>`` (full) or ``sampled-sha256:<hex>`` of the weight files' bytes, as the module docstring says."""
    if mode not in ("sampled", "full"):
        raise ValueError(f"unknown hash mode {mode!r}")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if mode == "full" or size <= 2 * HEAD_BYTES + N_BLOCKS * BLOCK_BYTES:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                continue
            h.update(f.read(HEAD_BYTES))
            span = size - 2 * HEAD_BYTES - BLOCK_BYTES
            for i in range(N_BLOCKS):
                f.seek(HEAD_BYTES + span * i // (N_BLOCKS - 1))
                h.update(f.read(BLOCK_BYTES))
            f.seek(size - HEAD_BYTES)
            h.update(f.read(HEAD_BYTES))
    return ("sha256:" if mode == "full" else "sampled-sha256:") + h.hexdigest()
