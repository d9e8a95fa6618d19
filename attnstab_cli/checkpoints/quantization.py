"""Block-quantized weights (THEORY §18.9): FP8 (E4M3) tensors with per-block inverse scales, dequantized one tensor
at a time as they are read, and quantization formats attnstab does not read, refused by name before any other check.

A weight ``W`` stored as ``float8_e4m3fn`` with a companion ``W_scale_inv`` (DeepSeek V3's ``weight_scale_inv``;
the companion may sit in any shard) is read as ``W = float32(W_q) * scale``, each scale broadcast over its block of
``weight_block_size`` = ``[b_r, b_c]`` (``quantization_config``, else 128 x 128) of the last two dimensions; edge
blocks are partial when a dimension is not a multiple of the block, so the scale grid is
``[ceil(rows / b_r), ceil(cols / b_c)]`` after any leading (expert) dimensions. A ``weight_block_size`` of null is
one scale per tensor. The product is taken in float32 and rounded once to the compute dtype, as ``transformers``'
fine-grained FP8 dequantization does (``integrations/finegrained_fp8.py``), so the values are bit-equal to its
own.
Scale tensors are consumed here and are not tensors of the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnstab_cli.checkpoints.safetensors_header import TensorInfo
from attnstab_cli.errors import InputError, UnsupportedError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)               # DeepSeek V3's and transformers' default
FP8_METHOD = "fp8"
FP8_WEIGHT_DTYPES = frozenset({"F8_E4M3", "float8_e4m3fn"})      # safetensors tag, torch name (.bin)
SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "float32", "bfloat16", "float16"})
MXFP4_PARTS = ("_blocks", "_scales")     # gpt-oss: packed E2M1 nibbles and E8M0 exponents, both uint8
UINT8_DTYPES = frozenset({"U8", "uint8"})
REFUSED_HINT = "use a release of the model in bf16/fp16/fp32 (or dequantize it first)"


@dataclass(frozen=True)
class BlockScales:
    """The FP8 block quantization of one checkpoint: weight name -> scale name, and the block (None: per tensor)."""

    scales: dict[str, str]
    block: tuple[int, int] | None
    scale_infos: dict[str, TensorInfo]

    def describe(self, infos: dict[str, TensorInfo]) -> dict[str, Any] | None:
        """The manifest's ``quantization`` entry (None for an unquantized checkpoint): the source format, the block,
        the scale dtypes and every quantized tensor by name."""
        if not self.scales:
            return None
        scale_dtypes = sorted({self.scale_infos[s].dtype for s in self.scales.values()})
        return {"method": FP8_METHOD, "format": "float8_e4m3fn block-scaled",
                "weight_block_size": None if self.block is None else list(self.block),
                "scale_dtypes": scale_dtypes, "n_tensors": len(self.scales),
                "n_params": sum(math.prod(infos[w].shape) for w in self.scales),
                "tensors": sorted(self.scales)}


NO_SCALES = BlockScales({}, DEFAULT_BLOCK, {})


def _quant_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    qc = None if config is None else config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise InputError(f"quantization_config is {type(qc).__name__}, not an object")
    return qc


def _block_from_config(qc: dict[str, Any] | None) -> tuple[int, int] | None:
    """``weight_block_size`` of an FP8 config: two positive integers, null (one scale per tensor), or the default."""
    if qc is None or "weight_block_size" not in qc:
        return DEFAULT_BLOCK
    block = qc["weight_block_size"]
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise InputError(f"quantization_config.weight_block_size is {block!r}, not two positive integers")
    return block[0], block[1]


def refuse_unread_formats(config: dict[str, Any] | None, infos: dict[str, TensorInfo]) -> None:
    """An :class:`UnsupportedError` for a checkpoint quantized in a format attnstab does not read: a
    ``quant_method`` other than ``fp8`` (MXFP4, GPTQ, AWQ, ...), or gpt-oss-style MXFP4 tensor pairs."""
    qc = _quant_config(config)
    method = None if qc is None else qc.get("quant_method")
    if method == "mxfp4" or _mxfp4_pair(infos):
        raise UnsupportedError("MXFP4-quantized checkpoint (gpt-oss style *_blocks / *_scales uint8 tensors): a "
                               "format attnstab does not read (it reads FP8 block-scaled weights)", hint=REFUSED_HINT)
    if qc is not None and method != FP8_METHOD:
        raise UnsupportedError(f"quantization_config.quant_method is {method!r}: a format attnstab does not read "
                               "(it reads FP8 block-scaled weights)", hint=REFUSED_HINT)
    if qc is not None and qc.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedError(f"FP8 quantization_config.fmt is {qc.get('fmt')!r}; attnstab reads e4m3 weights only")
    if qc is not None and qc.get("activation_scheme", "dynamic") != "dynamic":
        raise UnsupportedError(f"FP8 quantization_config.activation_scheme is {qc.get('activation_scheme')!r}; "
                               "attnstab reads dynamic-activation checkpoints only (no stored activation scales)")


def _mxfp4_pair(infos: dict[str, TensorInfo]) -> str | None:
    blocks, scales = MXFP4_PARTS
    for name, info in infos.items():
        if name.endswith(blocks) and info.dtype in UINT8_DTYPES:
            partner = infos.get(name.removesuffix(blocks) + scales)
            if partner is not None and partner.dtype in UINT8_DTYPES:
                return name
    return None


def plan_block_scales(config: dict[str, Any] | None, infos: dict[str, TensorInfo]) -> BlockScales:
    """Pair each ``<name>_scale_inv`` with ``<name>`` and check the pair; the scale tensors are removed from
    ``infos``. Errors name the file and the tensor: a scale without its weight, a weight that is not
    ``float8_e4m3fn``, a scale of another dtype or of a shape other than the weight's block grid, and, in a checkpoint
    that is FP8-quantized (by its config or by any scale tensor), an FP8 weight without a scale."""
    refuse_unread_formats(config, infos)
    qc = _quant_config(config)
    block = _block_from_config(qc)
    scale_names = [n for n in infos if n.endswith(SCALE_SUFFIX)]
    if qc is None and not scale_names:
        return NO_SCALES
    scale_infos = {n: infos.pop(n) for n in scale_names}
    scales = {}
    for scale in scale_names:
        weight, sinfo = scale.removesuffix(SCALE_SUFFIX), scale_infos[scale]
        info = infos.get(weight)
        if info is None:
            raise InputError(f"scale tensor {scale!r} has no weight {weight!r}", path=sinfo.file)
        _check_pair(weight, info, scale, sinfo, block)
        scales[weight] = scale
    for name, info in infos.items():
        if info.dtype in FP8_WEIGHT_DTYPES and name not in scales:
            raise InputError(f"FP8 tensor {name!r} has no block scale {name + SCALE_SUFFIX!r} (the checkpoint is "
                             "FP8 block-quantized)", path=info.file)
    return BlockScales(scales, block, scale_infos)


def scale_grid(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The scale shape a weight of ``shape`` needs: leading dims, then the ceil-divided block grid."""
    if block is None:
        return ()
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _check_pair(weight: str, info: TensorInfo, scale: str, sinfo: TensorInfo, block: tuple[int, int] | None) -> None:
    if info.dtype not in FP8_WEIGHT_DTYPES:
        raise InputError(f"tensor {weight!r} has dtype {info.dtype} but a block scale {scale!r}: block scales are "
                         "read for float8_e4m3fn weights only", path=info.file)
    if sinfo.dtype not in SCALE_DTYPES:
        raise InputError(f"scale tensor {scale!r} has dtype {sinfo.dtype}; expected float32, bfloat16 or float16",
                         path=sinfo.file)
    if block is None:
        if math.prod(sinfo.shape) != 1:
            raise InputError(f"scale tensor {scale!r} has shape {list(sinfo.shape)}; a weight_block_size of null "
                             "means one scale per tensor", path=sinfo.file)
        return
    if len(info.shape) < 2:
        raise InputError(f"FP8 tensor {weight!r} has shape {list(info.shape)}; block scales need a matrix",
                         path=info.file)
    grid = scale_grid(info.shape, block)
    if sinfo.shape != grid:
        raise InputError(f"scale tensor {scale!r} has shape {list(sinfo.shape)} but weight {weight!r} of shape "
                         f"{list(info.shape)} in {block[0]}x{block[1]} blocks needs {list(grid)}", path=sinfo.file)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """``float32(weight) * scale`` with each scale over its block, as a new float32 tensor of ``weight``'s shape.

    ``weight``: [..., rows, cols] float8_e4m3fn; ``scale``: [..., ceil(rows/b_r), ceil(cols/b_c)] (one element when
    ``block`` is None). The scales are expanded over rows only and applied to column blocks through views, so no
    second weight-sized tensor is formed.
    """
    w = weight.to(torch.float32)                                        # [..., rows, cols]
    s = scale.to(torch.float32)
    if block is None:
        return w.mul_(s.reshape(()))
    rows, cols = w.shape[-2:]
    full, rem = divmod(cols, block[1])
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :]            # [..., rows, ceil(cols/b_c)]
    w[..., :full * block[1]].unflatten(-1, (full, block[1])).mul_(s[..., :full, None])
    if rem:
        w[..., full * block[1]:].mul_(s[..., full:])                    # the partial last column block
    return w

