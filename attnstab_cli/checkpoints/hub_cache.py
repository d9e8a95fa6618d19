"""Resolve a Hugging Face repo id (``gpt2``, ``org/name``) to a snapshot in the local cache, never the network.

The cache layout is ``<cache>/models--<org>--<name>/{refs/main, snapshots/<commit>/...}`` where snapshot files are
symlinks into ``blobs/``. The cache root is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.
A ref must hold a commit hash (40 hex digits), and the snapshot it names, like every file read from it, must resolve
inside the repo's folder (:class:`~attnstab_cli.checkpoints.containment.CheckpointFolder`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from attnstab_cli.checkpoints.containment import CheckpointFolder
from attnstab_cli.errors import InputError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
REPO_FOLDER_LABEL = "the cached repo folder"


def looks_like_repo_id(text: str) -> bool:
    """True for ``name`` or ``org/name`` strings that could be a hub id rather than a local path."""
    return bool(_REPO_ID.match(text)) and not text.endswith((".safetensors", ".bin", ".json"))


def hub_cache_dir() -> Path:
    """The local hub cache directory as Hugging Face tools define it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_repo_id(repo_id: str, revision: str = "main") -> tuple[Path, Path]:
    """Return ``(snapshot_dir, repo_dir)`` for a cached repo; raise a clear error when it is not cached, or when its
    ref is not a commit hash or leads outside the repo's folder."""
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        raise InputError(
            f"{repo_id!r} is not a local path and is not in the Hugging Face cache at {cache}",
            hint="attnstab never downloads; fetch it first (e.g. `hf download`) or pass a directory",
        )
    folder = CheckpointFolder.at(repo_dir, REPO_FOLDER_LABEL)
    ref = repo_dir / "refs" / revision
    snapshots = repo_dir / "snapshots"
    if ref.exists() or ref.is_symlink():
        commit = _read_ref(folder.file(ref))
        snap = snapshots / commit
    else:
        candidates = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
        if len(candidates) != 1:
            raise InputError(f"cached repo {repo_id!r} has no refs/{revision} and {len(candidates)} snapshots",
                             path=repo_dir)
        snap = candidates[0]
    folder.inside(snap)
    if not snap.is_dir():
        raise InputError(f"cached repo {repo_id!r}: snapshot {snap.name} is missing", path=repo_dir)
    return snap, repo_dir


def _read_ref(ref: Path) -> str:
    """The commit hash a ref file holds; anything but 40 hex digits (a path, say) is an :class:`InputError`."""
    try:
        text = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"unreadable ref ({exc})", path=ref) from None
    if not _COMMIT.fullmatch(text):
        raise InputError(f"ref holds {text[:60]!r}, not a commit hash (40 hex digits); refused", path=ref)
    return text
