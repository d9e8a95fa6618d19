"""Turn the user's CHECKPOINT argument into concrete files: config, tokenizer, weight shards.

Accepted: a Hugging Face directory (single ``model.safetensors``, a sharded ``*.safetensors.index.json``, or
``pytorch_model.bin`` / sharded ``.bin``), a bare ``.safetensors`` file (no config: the architecture is inferred from
tensor names), or a repo id found in the local Hugging Face cache. Every file taken from a directory, whether by its
conventional name or named by a shard index, must resolve inside the checkpoint's folder and be a regular file
(:class:`~attnstab_cli.checkpoints.containment.CheckpointFolder`). Weights in formats attnstab does not read (GGUF,
CTranslate2, anything that is not a ``torch.save`` file) are named by their magic bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from attnstab_cli.bounded_json import JsonRefused, loads_strict
from attnstab_cli.checkpoints.containment import CheckpointFolder
from attnstab_cli.checkpoints.file_format import describe_format, sniff_format
from attnstab_cli.checkpoints.hub_cache import REPO_FOLDER_LABEL, looks_like_repo_id, resolve_repo_id
from attnstab_cli.errors import InputError
from attnstab_cli.input_files import require_regular_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DIRECTORY_LABEL = "the checkpoint directory"
MAX_INDEX_BYTES = 64 << 20
WEIGHT_SUFFIXES = (".gguf", ".bin", ".pt", ".pth", ".ckpt", ".safetensors")
READ_FORMATS = ("safetensors", "torch-zip", "torch-pickle")
_SNIFFED_FILES = 8


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint. ``weight_files`` is ordered; ``fmt`` is ``safetensors`` or ``bin``."""

    source: str
    directory: Path | None
    config_path: Path | None
    tokenizer_path: Path | None
    weight_files: tuple[Path, ...]
    fmt: str


def _present(path: Path) -> bool:
    """True when anything (even a broken symlink, a FIFO or a device) has this name."""
    return os.path.lexists(path)


def resolve_checkpoint(target: str | Path) -> CheckpointFiles:
    """Resolve a directory, a ``.safetensors`` file, an index/config file or a cached repo id."""
    path = Path(target).expanduser()
    if _present(path):
        if path.is_dir():
            return _resolve_directory(str(target), path, CheckpointFolder.at(path, DIRECTORY_LABEL))
        require_regular_file(path)
        if path.name.endswith(".safetensors"):
            return CheckpointFiles(str(target), None, None, None, (path,), "safetensors")
        if path.name in ("config.json", SAFETENSORS_INDEX, BIN_INDEX):
            return _resolve_directory(str(target), path.parent, CheckpointFolder.at(path.parent, DIRECTORY_LABEL))
        raise InputError(_not_a_checkpoint(path), path=path)
    if looks_like_repo_id(str(target)):
        snapshot, repo_dir = resolve_repo_id(str(target))
        return _resolve_directory(str(target), snapshot, CheckpointFolder.at(repo_dir, REPO_FOLDER_LABEL))
    raise InputError("no such file or directory", path=path)


def _not_a_checkpoint(path: Path) -> str:
    """Why a regular file given as the checkpoint is not one, naming its format."""
    fmt = sniff_format(path)
    if fmt == "gguf":
        return "is a GGUF file, a format attnstab does not read (it reads safetensors and torch.save checkpoints)"
    if fmt in ("torch-zip", "torch-pickle"):
        return f"is {describe_format(fmt)}; pass the directory that holds it and its config.json"
    return f"not a checkpoint: expected a directory or a .safetensors file (this is {describe_format(fmt)})"


def _resolve_directory(source: str, directory: Path, folder: CheckpointFolder) -> CheckpointFiles:
    """Pick the weight files of a Hugging Face directory, preferring safetensors over pickle-based ``.bin``."""
    config = directory / "config.json"
    if not _present(config):
        unread = _unread_weights(directory, folder)
        raise InputError(
            "missing config.json" + (f"; {unread}" if unread else ""), path=directory,
            hint=None if unread else "to infer the architecture from tensor names, pass the .safetensors file itself",
        )
    folder.file(config)
    tokenizer = directory / "tokenizer.json"
    tok = folder.file(tokenizer) if _present(tokenizer) else None
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = directory / index_name
        if _present(index):
            shards = _read_index(folder.file(index), directory, folder)
            return CheckpointFiles(source, directory, config, tok, shards, fmt)
    for single, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if _present(directory / single):
            return CheckpointFiles(source, directory, config, tok, (folder.file(directory / single),), fmt)
    loose = sorted(directory.glob("*.safetensors"))
    if len(loose) == 1:
        return CheckpointFiles(source, directory, config, tok, (folder.file(loose[0]),), "safetensors")
    unread = _unread_weights(directory, folder)
    raise InputError("no weights found (model.safetensors, a shard index or pytorch_model.bin)"
                     + (f"; {unread}" if unread else ""), path=directory)


def _unread_weights(directory: Path, folder: CheckpointFolder) -> str | None:
    """A phrase naming the weight-like files of ``directory`` whose format attnstab does not read (by magic bytes),
    e.g. ``model.gguf is a GGUF file``; None when there are none. Only regular files inside the folder are sniffed."""
    found = []
    for path in sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)[:_SNIFFED_FILES]:
        try:
            folder.file(path)
        except InputError:
            continue
        fmt = sniff_format(path)
        if fmt not in READ_FORMATS:
            found.append(f"{path.name} is {describe_format(fmt)}")
    if not found:
        return None
    return ", ".join(found) + ": a format attnstab does not read (it reads safetensors and torch.save checkpoints)"


def _read_index(index: Path, directory: Path, folder: CheckpointFolder) -> tuple[Path, ...]:
    """Shard files named by a ``weight_map``, each checked by the folder's containment rule."""
    malformed = "malformed shard index (expected JSON with a 'weight_map' object of tensor name -> file name)"
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise InputError(f"shard index is larger than {MAX_INDEX_BYTES >> 20} MiB", path=index)
        doc = loads_strict(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, JsonRefused) as exc:
        raise InputError(f"{malformed}: {exc}", path=index) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(malformed, path=index)
    for tensor, name in weight_map.items():
        if "\0" in tensor:
            raise InputError(f"shard index names tensor {tensor!r}, with a NUL byte", path=index)
        if not isinstance(name, str) or not name or "\0" in name:
            raise InputError(f"shard index maps {tensor!r} to {name!r}, not a file name", path=index)
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = directory / name
        try:
            folder.inside(shard)
        except InputError as exc:
            raise InputError(f"shard {name!r} {exc.detail}", path=index) from None
        if not _present(shard):
            raise InputError(f"shard {name!r} named by the index does not exist", path=index)
        shards.append(folder.file(shard))
    return tuple(shards)
