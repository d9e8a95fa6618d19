"""What a streamed scan keeps resident, from tensor headers alone, and the refusal of a model whose resident unit
cannot fit the compute device (THEORY §18.7, "Streaming").

A scan holds one layer at a time: every tensor the layer reads (for a mixture-of-experts layer, all its experts)
converted to the compute dtype. FP8 block-quantized weights count at that dtype, since they are dequantized as read,
not at their stored byte per element. The embeddings (token, position and type tables, the embedding norm) are
resident while the batches are embedded; the head (final norm and a separately stored LM head) when the final
hidden states or the ``--grad`` loss are formed. A tied LM head is the embedding table and counts there.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnstab_cli.errors import UsageError
from attnstab_cli.model.load import OpenModel

# Free memory must cover the resident unit times this factor. The quarter on top holds the activations of the
# calibration batches (hidden states, one layer's attention and FFN intermediates), the one per-expert matrix in
# flight while a layer's experts are stacked, and allocator slack. A calibration set whose activations need more
# than that still fails at run time; the check refuses what cannot work at all before any weight is read.
HEADROOM = 1.25
MEMINFO = Path("/proc/meminfo")
_HEAD_ROLES = ("lm_head.", "norm_final.")


@dataclass(frozen=True)
class ResidentBytes:
    """Bytes resident at ``dtype``: per layer (index = layer), the embeddings and the head."""

    dtype: str
    layers: tuple[int, ...]
    embedding: int
    head: int

    @property
    def largest_layer(self) -> int:
        """The first of the layers with the most resident bytes."""
        return max(range(len(self.layers)), key=lambda i: (self.layers[i], -i))

    @property
    def largest_layer_bytes(self) -> int:
        return self.layers[self.largest_layer] if self.layers else 0

    def largest_unit(self, head: bool = True) -> tuple[str, int]:
        """What the scan holds at its peak of weights: the largest layer, unless the embeddings (or, with ``head``,
        the head) are larger."""
        units = [(f"layer {self.largest_layer}", self.largest_layer_bytes) if self.layers else ("layer", 0),
                 ("the embeddings", self.embedding)] + ([("the head", self.head)] if head else [])
        return max(units, key=lambda u: u[1])

    def describe(self) -> dict[str, Any]:
        """Plain JSON data for ``info`` and the manifest."""
        return {"dtype": self.dtype, "largest_layer": self.largest_layer if self.layers else None,
                "largest_layer_bytes": self.largest_layer_bytes, "embedding_bytes": self.embedding,
                "head_bytes": self.head, "layer_bytes": list(self.layers), "headroom_factor": HEADROOM}


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def compute_resident_bytes(model: OpenModel, dtype: torch.dtype) -> ResidentBytes:
    """Resident bytes of every layer, the embeddings and the head at ``dtype``, from the tensor headers only."""
    size, infos = element_bytes(dtype), model.reader.infos
    layers = [0] * model.cfg.n_layers
    embedding = head = 0
    for name, (role, layer) in model.names.bound(model.cfg.n_layers).items():
        info = infos[name]
        nbytes = math.prod(info.shape) * size if _floating(info.dtype) else info.nbytes
        if layer is not None:
            layers[layer] += nbytes
        elif role.startswith(_HEAD_ROLES):
            head += nbytes
        else:
            embedding += nbytes
    return ResidentBytes(str(dtype).removeprefix("torch."), tuple(layers), embedding, head)


def _floating(stored: str) -> bool:
    """Whether a stored dtype name (safetensors ``F32``, ``BF16``, ``F8_E4M3``; torch ``float32``) is floating."""
    return bool(re.match(r"(?i)(f\d|bf16|float|bfloat)", stored))


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free device memory, or the CPU's available RAM (``MemAvailable`` of
    /proc/meminfo: free pages plus the page cache and buffers the kernel can reclaim); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        text = MEMINFO.read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def check_resident_fits(model: OpenModel, device: torch.device, dtype: torch.dtype,
                        head: bool = False) -> ResidentBytes:
    """Refuse (exit 2, before any weight is read) a model whose largest resident unit, times :data:`HEADROOM`,
    exceeds the free memory of ``device``; ``head``: the scan also loads the LM head (``--grad``). Returns the
    resident bytes."""
    resident = compute_resident_bytes(model, dtype)
    unit, nbytes = resident.largest_unit(head)
    free = free_memory_bytes(device)
    if free is not None and nbytes * HEADROOM > free:
        what = "all its experts, " if unit.startswith("layer") and model.cfg.moe is not None \
            and model.cfg.is_moe(resident.largest_layer) else ""
        raise UsageError(f"the largest resident unit, {unit} ({what}{resident.dtype}), is {nbytes:,} bytes, "
                         f"{math.ceil(nbytes * HEADROOM):,} with the x{HEADROOM:g} headroom for activations, but "
                         f"{device} has {free:,} bytes free",
                         hint="free memory on the device, scan on one with more, or use a narrower --dtype")
    return resident
