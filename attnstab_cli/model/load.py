"""Open a checkpoint for analysis: resolve files, read headers and config, pick the family, build and check the config
and check every tensor against the family (:mod:`~attnstab_cli.model.tensor_checks`).

Nothing here reads weight data; :class:`OpenModel` hands out a :class:`WeightLoader` that does, one layer at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnstab_cli.arch.registry import TensorNames, infer_spec_from_tensors, match_spec, spec_by_name
from attnstab_cli.arch.spec import ArchSpec
from attnstab_cli.checkpoints.hf_config import load_hf_config
from attnstab_cli.checkpoints.reader import TensorReader
from attnstab_cli.checkpoints.resolve import CheckpointFiles, resolve_checkpoint
from attnstab_cli.errors import AttnstabError
from attnstab_cli.model.config import ModelConfig, build_model_config, check_overrides
from attnstab_cli.model.tensor_checks import check_tensors
from attnstab_cli.model.weights import WeightLoader


@dataclass
class OpenModel:
    """A checkpoint ready to stream: its files, raw config, family spec, bound tensor names and model config."""

    files: CheckpointFiles
    hf_config: dict[str, Any] | None
    spec: ArchSpec
    names: TensorNames
    reader: TensorReader
    cfg: ModelConfig

    def loader(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WeightLoader:
        return WeightLoader(self.cfg, self.names, self.reader, device, dtype)

    @property
    def tokenizer_path(self) -> Path | None:
        return self.files.tokenizer_path


def open_model(target: str | Path, arch: str | None = None, overrides: dict[str, Any] | None = None) -> OpenModel:
    """Resolve ``target`` and describe it; any inconsistency is an :class:`InputError` naming the file."""
    check_overrides(overrides)
    files = resolve_checkpoint(target)
    config = load_hf_config(files.config_path) if files.config_path else None
    reader = TensorReader(files, config)
    weights = files.weight_files[0] if len(files.weight_files) == 1 else files.directory or files.weight_files[0]
    where = files.config_path or weights
    try:
        if arch:
            spec = spec_by_name(arch)
        elif config is not None:
            spec = match_spec(config)
        else:
            spec = infer_spec_from_tensors(reader.keys())
        names = TensorNames(spec, reader.keys())
        try:
            names.check_layers_match()
        except AttnstabError as exc:
            raise exc.at(weights)
        cfg = build_model_config(spec, config, names, reader.infos, overrides)
        names.use_layout(cfg.layout, None if cfg.mla is None else cfg.mla.q_lora_rank is not None)
        names.use_moe(cfg.moe.moe_layers if cfg.moe else (False,) * cfg.n_layers,   # every FFN dense
                      cfg.moe.n_experts if cfg.moe else None)
        check_tensors(cfg, names, reader.infos, weights)
    except AttnstabError as exc:
        raise exc.at(where)
    return OpenModel(files, config, spec, names, reader, cfg)
