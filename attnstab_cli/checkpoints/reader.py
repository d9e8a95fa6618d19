"""Lazy, one-tensor-at-a-time access to checkpoint weights (STYLE.md, "Checkpoint access").

Safetensors shards are memory-mapped through ``safe_open`` and read per tensor; ``.bin`` files are opened only with
``torch.load(weights_only=True, mmap=True)`` so no pickle code can run and no data page is read until used. The
reader counts the bytes of the tensors it has handed out that are still alive, so tests can show that a scan keeps
one layer resident at a time. FP8 block-quantized weights are dequantized as they are read
(:mod:`~attnstab_cli.checkpoints.quantization`); their scale tensors are not among the reader's tensors.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from attnstab_cli.checkpoints.file_format import load_torch_file
from attnstab_cli.checkpoints.quantization import BlockScales, dequantize_fp8, plan_block_scales
from attnstab_cli.checkpoints.resolve import CheckpointFiles
from attnstab_cli.checkpoints.safetensors_header import TensorInfo, read_safetensors_header
from attnstab_cli.errors import AttnstabError, InputError


class TensorReader:
    """Name -> tensor access over all shards of one checkpoint; headers are read eagerly, data lazily.

    ``config`` (the parsed ``config.json``, if any) gives the FP8 block size and refuses quantization formats that
    are not read; ``infos`` describe the tensors as stored (an FP8 weight keeps its ``F8_E4M3`` dtype).
    """

    def __init__(self, files: CheckpointFiles, config: dict[str, Any] | None = None) -> None:
        self.files = files
        self._handles: dict[Path, Any] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for path in files.weight_files:
            infos = self._read_safetensors(path) if files.fmt == "safetensors" else self._read_bin(path)
            for name, info in infos.items():
                if name in self.infos:
                    raise InputError(f"tensor {name!r} appears in two shards", path=path)
                self.infos[name] = info
        try:
            self.block_scales: BlockScales = plan_block_scales(config, self.infos)
        except AttnstabError as exc:
            raise exc.at(files.config_path or files.weight_files[0])
        self.live_bytes = 0
        self.peak_live_bytes = 0

    def _read_safetensors(self, path: Path) -> dict[str, TensorInfo]:
        infos, meta = read_safetensors_header(path)
        self.metadata.update(meta)
        return infos

    def _read_bin(self, path: Path) -> dict[str, TensorInfo]:
        state = load_bin_state_dict(path)
        self._bin[path] = state
        return {
            name: TensorInfo(path, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())
            for name, t in state.items()
        }

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def stored(self, name: str) -> torch.Tensor:
        """One tensor as the model holds it, on the CPU, not counted as resident: for a pass over every tensor. It
        keeps its stored dtype, except an FP8 block-quantized weight, which comes dequantized in float32."""
        quant = self.block_scales
        scale = quant.scales.get(name)
        if scale is None:
            return self._raw(name, self.infos[name])
        return dequantize_fp8(self._raw(name, self.infos[name]), self._raw(scale, quant.scale_infos[scale]),
                              quant.block)

    def _raw(self, name: str, info: TensorInfo) -> torch.Tensor:
        if info.file in self._bin:
            return self._bin[info.file][name]
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise InputError(f"cannot read tensor {name!r}: {exc}", path=info.file) from exc

    def load(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             check_finite: bool = True) -> torch.Tensor:
        """Read one tensor, convert it to ``dtype`` on ``device``; non-finite values are an :class:`InputError`."""
        fresh = name in self.block_scales.scales                 # dequantized: already a tensor of its own
        tensor = self.stored(name).to(device=device, dtype=dtype, copy=not fresh)
        if check_finite and tensor.is_floating_point():
            check_all_finite(tensor, name, self.infos[name].file)
        self.track(tensor)
        return tensor

    def track(self, tensor: torch.Tensor) -> None:
        """Count a handed-out tensor (or one built from handed-out tensors) as resident until it is garbage
        collected."""
        nbytes = tensor.numel() * tensor.element_size()
        self.live_bytes += nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def check_all_finite(tensor: torch.Tensor, name: str, path: Path) -> None:
    """An :class:`InputError` naming the tensor and how many of its values are NaN or infinite, if any are."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise InputError(f"tensor {name!r} contains {bad} NaN/Inf values", path=path,
                         hint="the checkpoint is numerically broken; attnstab reports it instead of scanning")


def load_bin_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Open a pickle-based ``.bin`` safely (:func:`~attnstab_cli.checkpoints.file_format.load_torch_file`:
    ``weights_only=True``, so no object that would run code is ever built)."""
    state = load_torch_file(path, "torch checkpoint")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("a .bin checkpoint must hold a dict of tensors", path=path)
    return state
