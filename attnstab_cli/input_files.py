"""Which paths attnstab opens for reading: regular files only, checked before opening.

Opening a FIFO blocks until a writer appears, ``/dev/zero`` never ends, and a directory or socket is no input at all,
so every file the tool reads (weights, configs, tokenizers, token and calibration files, TOML rules, reports) goes
through :func:`require_regular_file` first. ``os.stat`` follows symlinks: a link is judged by what it points to.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from attnstab_cli.errors import InputError

_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def require_regular_file(path: Path, missing: str = "no such file") -> Path:
    """``path`` itself when it is a regular file; otherwise an :class:`InputError` naming it and saying what it is
    (``missing`` is the message for a path that does not exist)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError("is a broken symbolic link" if os.path.islink(path) else missing, path=path) from None
    except ValueError:
        raise InputError("the file name contains a NUL byte", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if not stat.S_ISREG(mode):
        raise InputError(f"is {file_kind(mode)}, not a regular file; attnstab reads only regular files", path=path)
    return path


def regular_file_present(path: Path) -> bool:
    """False when nothing has this name; True for a regular file; an :class:`InputError` for anything else (a FIFO,
    a device, a directory, a broken symlink), so an optional input is refused rather than silently skipped."""
    if not os.path.lexists(path):
        return False
    require_regular_file(path)
    return True


__all__ = ["file_kind", "regular_file_present", "require_regular_file"]
