"""One streamed pass over the weight values before any work: every weight finite, every weight the scan reads of a
magnitude the compute can carry.

The pass reads each floating tensor once, as stored, one at a time (memory stays at the largest tensor), so it
costs one extra read of the weights. It covers tensors the scan never reads (an LM head, the final norm under
``--weights-only``, an ignorable classifier): a NaN anywhere means the checkpoint is broken. Buffers the spec
declares (causal masks, rotary caches) are not weights and are skipped; a GPT-NeoX ``masked_bias`` of -1e9 stored in
float16 is legitimately infinite.

Magnitude: a weight must fit the compute dtype (a float32 value of 1e5 is infinite in float16), and must stay below
``FLOAT32_SAFE`` = (float32 max)^(1/4) ~ 4.3e9 whatever the dtype, because an attention logit multiplies four
weight factors (two norm gains, W_Q, W_K) and parts of every scan run in float32 (the tier-3 search, the kernels).
A trained model's weights are many orders of magnitude smaller; values beyond it mean a corrupted or mis-scaled
tensor, and the scan would end in overflow deep inside a metric.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from attnstab_cli.checkpoints.reader import check_all_finite
from attnstab_cli.errors import InputError
from attnstab_cli.model.load import OpenModel
from attnstab_cli.model.tensor_checks import is_floating

FLOAT32_SAFE = torch.finfo(torch.float32).max ** 0.25
FP16_MAX = torch.finfo(torch.float16).max


def _peak(tensor: torch.Tensor) -> float:
    """max |x|, NaN when any value is NaN; float8 tensors are widened, the others are read in place."""
    if tensor.numel() == 0:
        return 0.0
    if tensor.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tensor = tensor.to(torch.float32)
    lo, hi = (float(x) for x in torch.aminmax(tensor))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def check_weight_values(model: OpenModel, compute: torch.dtype) -> list[str]:
    """Refuse non-finite weights and weights the scan reads whose magnitude ``compute`` (or float32) cannot carry;
    return warnings for float16 tensors holding the float16 limit (an overflow clamped in training, usually)."""
    n_layers, reader = model.cfg.n_layers, model.reader
    read = model.names.bound(n_layers)
    warnings = []
    for name in reader.keys():
        info = reader.infos[name]
        if not is_floating(info.dtype) or model.names.is_buffer(name, n_layers):
            continue
        tensor = reader.stored(name)
        peak = _peak(tensor)
        if not math.isfinite(peak):
            check_all_finite(tensor, name, info.file)
        if name in read:
            check_magnitude(name, peak, compute, info.file)
        if tensor.dtype == torch.float16 and peak >= FP16_MAX:
            warnings.append(f"{info.file}: tensor {name!r} holds {peak:g}, the largest float16 value: an overflow "
                            f"may have been clamped there")
        del tensor
    return warnings


def check_magnitude(name: str, peak: float, compute: torch.dtype, path: Path) -> None:
    """An :class:`InputError` when a weight of magnitude ``peak`` does not fit ``compute`` or exceeds FLOAT32_SAFE."""
    largest = torch.finfo(compute).max
    if peak > largest:
        raise InputError(f"tensor {name!r} holds a value of magnitude {peak:.3g}, beyond the range of "
                         f"{str(compute).removeprefix('torch.')} (largest {largest:.6g})", path=path,
                         hint="use --dtype float32 (the default)")
    if peak > FLOAT32_SAFE:
        raise InputError(f"tensor {name!r} holds a value of magnitude {peak:.3g}, beyond the {FLOAT32_SAFE:.2g} "
                         f"attnstab can analyse (products of such weights overflow float32)", path=path,
                         hint="trained weights are far smaller: the tensor looks corrupted or mis-scaled; check or "
                              "re-export the checkpoint")
