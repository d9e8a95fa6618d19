"""FP8 block quantization of saved tiny models, written here independently of the reader (THEORY §18.9, T41).

Each layer matrix is split into ``block`` tiles (partial tiles at the edges), each tile scaled by 448 / max|tile| into
``float8_e4m3fn``; the inverse scales are stored as ``<name>_scale_inv`` (DeepSeek V3's layout). Embeddings, norms
and the LM head stay unquantized, as in DeepSeek V3's release.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` of a [..., rows, cols] tensor: q float8_e4m3fn of w's shape, scale_inv float32
    [..., ceil(rows/b_r), ceil(cols/b_c)], by zero-padding to whole tiles."""
    *lead, rows, cols = w.shape
    gr, gc = -(-rows // block[0]), -(-cols // block[1])
    pad = torch.zeros(*lead, gr * block[0], gc * block[1])
    pad[..., :rows, :cols] = w.float()
    tiles = pad.reshape(*lead, gr, block[0], gc, block[1])
    amax = tiles.abs().amax(dim=(-3, -1))                                     # [..., gr, gc]
    inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(pad.shape)[..., :rows, :cols].contiguous(), inv


def dequantize_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Brute force: every scale repeated over its whole tile, cropped to the weight, one float32 product."""
    rows, cols = q.shape[-2:]
    full = scale_inv.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return q.float() * full[..., :rows, :cols]


def quantized_state(state: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``state`` with every layer matrix FP8 block-quantized and its ``_scale_inv`` added after it."""
    out = {}
    for name, w in state.items():
        if w.ndim >= 2 and ".layers." in name:
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(w, block)
        else:
            out[name] = w
    return out


def write_sharded(state: dict[str, torch.Tensor], directory: Path, n_shards: int = 3) -> dict[str, str]:
    """Write ``state`` as ``n_shards`` safetensors shards with a ``model.safetensors.index.json``: tensors round
    robin, and every other scale in the shard after its weight's (so scales sit in other shards); returns the map."""
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map: dict[str, str] = {}
    k = 0
    for name in state:
        if name.endswith("_scale_inv"):
            continue
        weight_map[name] = files[k % n_shards]
        scale = name + "_scale_inv"
        if scale in state:
            weight_map[scale] = files[(k + k % 2) % n_shards]
        k += 1
    for file in files:
        shard = {n: state[n] for n, f in weight_map.items() if f == file}
        save_file(shard, directory / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def save_fp8_checkpoint(src: Path, dst: Path, block: tuple[int, int], *, config_block: bool = True) -> dict[str, str]:
    """An FP8 block-quantized, sharded copy of the single-file checkpoint ``src`` at ``dst``; the config gains a
    DeepSeek-V3-style ``quantization_config`` (``weight_block_size`` only when ``config_block``). Returns the
    index's weight map."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name not in ("model.safetensors", "config.json"):
            shutil.copy(item, dst / item.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     **({"weight_block_size": list(block)} if config_block else {})}
    (dst / "config.json").write_text(json.dumps(config))
    return write_sharded(quantized_state(load_file(src / "model.safetensors"), block), dst)


def load_sharded(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, as stored."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("model-*.safetensors")):
        out.update(load_file(path))
    return out
