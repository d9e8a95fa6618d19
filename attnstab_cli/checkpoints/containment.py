"""The one rule for which checkpoint files may be read: those that resolve inside the checkpoint's folder.

The folder is the checkpoint directory, or, for a repo id in the Hugging Face cache, that repo's cache folder
(``models--org--name/``), so the hub's own layout (``snapshots/<commit>/file -> ../../blobs/<sha>``) is inside and a
symlink anywhere else is not. The same rule serves the files a directory holds by convention (``config.json``,
``tokenizer.json``, weights), the shards a shard index names and the snapshot a cache ref names; files that pass are
also checked to be regular files (:func:`attnstab_cli.input_files.require_regular_file`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attnstab_cli.errors import InputError
from attnstab_cli.input_files import require_regular_file


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:   # RuntimeError: a symlink loop; ValueError: a NUL byte
        raise InputError(f"cannot resolve the path ({exc})", path=path) from None


@dataclass(frozen=True)
class CheckpointFolder:
    """The folder whose files a checkpoint may read; ``label`` names it in messages."""

    root: Path
    label: str

    @classmethod
    def at(cls, folder: Path, label: str) -> CheckpointFolder:
        return cls(_resolve(folder), label)

    def contains(self, path: Path) -> bool:
        """True when ``path``, with every symlink followed, lies inside the folder."""
        return _resolve(path).is_relative_to(self.root)

    def inside(self, path: Path) -> Path:
        """``path`` when it resolves inside the folder; otherwise an :class:`InputError` naming it."""
        if not self.contains(path):
            raise InputError(f"resolves to {_resolve(path)}, outside {self.label} {self.root}; refused", path=path)
        return path

    def file(self, path: Path) -> Path:
        """``path`` when it resolves inside the folder and is a regular file; otherwise an :class:`InputError`."""
        return require_regular_file(self.inside(path))


__all__ = ["CheckpointFolder"]
