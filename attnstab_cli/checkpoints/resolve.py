"""Turn the user's CHECKPOINT argument into concrete files: config, tokenizer, weight shards.

Accepted: a Hugging Face directory (single ``model.safetensors``, a sharded ``*.safetensors.index.json``, or
``pytorch_model.bin`` / sharded ``.bin``), a bare ``.safetensors`` file (no config: the architecture is inferred from
tensor names), or a repo id found in the local Hugging Face cache. Shard names from an index are refused when they
would leave the checkpoint directory (path traversal).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from attnstab_cli.checkpoints.hub_cache import looks_like_repo_id, resolve_repo_id
from attnstab_cli.errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint. ``weight_files`` is ordered; ``fmt`` is ``safetensors`` or ``bin``."""

    source: str
    directory: Path | None
    config_path: Path | None
    tokenizer_path: Path | None
    weight_files: tuple[Path, ...]
    fmt: str


def resolve_checkpoint(target: str | Path) -> CheckpointFiles:
    """Resolve a directory, a ``.safetensors`` file, an index/config file or a cached repo id."""
    path = Path(target).expanduser()
    if path.is_file():
        if path.name.endswith(".safetensors"):
            return CheckpointFiles(str(target), None, None, None, (path,), "safetensors")
        if path.name in ("config.json", SAFETENSORS_INDEX, BIN_INDEX):
            return _resolve_directory(str(target), path.parent, path.parent)
        raise InputError("not a checkpoint: expected a directory or a .safetensors file", path=path)
    if path.is_dir():
        return _resolve_directory(str(target), path, path)
    if looks_like_repo_id(str(target)):
        snapshot, repo_dir = resolve_repo_id(str(target))
        return _resolve_directory(str(target), snapshot, repo_dir)
    raise InputError("no such file or directory", path=path)


def _resolve_directory(source: str, directory: Path, containment: Path) -> CheckpointFiles:
    """Pick the weight files of a Hugging Face directory, preferring safetensors over pickle-based ``.bin``."""
    config = directory / "config.json"
    if not config.is_file():
        raise InputError(
            "missing config.json", path=directory,
            hint="to infer the architecture from tensor names, pass the .safetensors file itself",
        )
    tokenizer = directory / "tokenizer.json"
    tok = tokenizer if tokenizer.is_file() else None
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = directory / index_name
        if index.is_file():
            shards = _read_index(index, directory, containment)
            return CheckpointFiles(source, directory, config, tok, shards, fmt)
    for single, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (directory / single).is_file():
            return CheckpointFiles(source, directory, config, tok, (directory / single,), fmt)
    loose = sorted(directory.glob("*.safetensors"))
    if len(loose) == 1:
        return CheckpointFiles(source, directory, config, tok, (loose[0],), "safetensors")
    raise InputError("no weights found (model.safetensors, a shard index or pytorch_model.bin)", path=directory)


def _read_index(index: Path, directory: Path, containment: Path) -> tuple[Path, ...]:
    """Shard files named by a ``weight_map``, each checked to stay inside the checkpoint directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError("malformed shard index (expected JSON with a 'weight_map' object)", path=index) from exc
    shards = []
    root = containment.resolve()
    for name in names:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(f"shard index names {name!r}, a path outside the checkpoint directory; refused",
                             path=index)
        shard = directory / name
        if not shard.resolve().is_relative_to(root):
            raise InputError(f"shard {name!r} resolves outside the checkpoint directory; refused", path=index)
        if not shard.is_file():
            raise InputError(f"shard {name!r} named by the index does not exist", path=index)
        shards.append(shard)
    return tuple(shards)
