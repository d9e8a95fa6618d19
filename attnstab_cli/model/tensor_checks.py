"""Header-only checks at open that every tensor of a checkpoint is accounted for by its family spec.

A scan that silently skips a tensor, or reads a missing one as absent, computes numbers of another model: a Qwen3
read as LLaMA ignores its q/k norms, a GPT-2 without ``wpe`` runs without positions. So every tensor the spec
reads must be present with its expected shape and a floating dtype, and every other tensor must be declared by the
spec as ignorable or as a buffer. No weight data is read here.
"""
from __future__ import annotations

from pathlib import Path

from attnstab_cli.arch.registry import TensorNames
from attnstab_cli.checkpoints.safetensors_header import TensorInfo
from attnstab_cli.errors import AttnstabError, InputError
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.shapes import expected_shapes

FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2",      # safetensors tags
                             "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
UNREAD_SHOWN = 5


def is_floating(dtype: str) -> bool:
    """Whether a stored dtype (a safetensors tag or a torch dtype name) holds floating-point values."""
    return dtype in FLOATING_DTYPES


def check_tensors(cfg: ModelConfig, names: TensorNames, infos: dict[str, TensorInfo], weights: Path) -> None:
    """Required tensors present; every read tensor of the expected shape and floating; no unread tensor.

    ``weights`` is the file named when a required tensor is missing.
    """
    spec = names.spec
    try:
        for role in (*spec.tensors, *spec.head_tensors):
            names.require(role)
        for layer in range(cfg.n_layers):
            for role, expert in names.layer_roles(layer):
                names.require(role, layer, expert)
    except AttnstabError as exc:
        raise exc.at(weights)
    shapes = expected_shapes(cfg)
    for name, (role, _) in names.bound(cfg.n_layers).items():
        info = infos[name]
        if not is_floating(info.dtype):
            raise InputError(f"tensor {name!r} has dtype {info.dtype}; expected a floating-point dtype", path=info.file)
        expected = shapes[role]
        if not expected.accepts(info.shape, cfg.layout.orientation):
            raise InputError(f"tensor {name!r} has shape {list(info.shape)} but the config implies "
                             f"{expected.describe(cfg.layout.orientation)}", path=info.file)
    unread = names.unread(cfg.n_layers)
    if unread:
        shown = ", ".join(unread[:UNREAD_SHOWN]) + (f" (and {len(unread) - UNREAD_SHOWN} more)"
                                                     if len(unread) > UNREAD_SHOWN else "")
        raise InputError(f"{len(unread)} tensor{'s' if len(unread) > 1 else ''} not read by family "
                         f"{spec.name!r}: {shown}", path=infos[unread[0]].file,
                         hint="a scan that ignored them would describe another model; this checkpoint is not of "
                              "that family (or holds extra tensors)")
