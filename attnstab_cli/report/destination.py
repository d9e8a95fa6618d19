"""Where a command may write, checked before any work, and what this process has published.

One rule serves every writer (``scan``, ``compare``, ``gate``, ``track`` and its cache, ``plot``):

* the output can be created: it has a name (not ``.`` or ``..``), no existing part of its path is a file, its names
  fit the filesystem (with room for the hidden temporary sibling the atomic write uses), and a real probe, a hidden
  directory made and removed where the output will be created, succeeds (``os.access`` says yes to root on ``/sys``
  and on read-only bind mounts, where the write itself then fails);
* it is not the checkpoint (or any input of the command), does not contain it and is not inside it, whether or not
  it exists, with or without ``--force``;
* an existing output is replaced only with ``--force``, and only when it is an attnstab output of the same kind (its
  ``manifest.json``, ``compare.json`` or ``track.json`` says so; a file carries attnstab's mark) or an empty
  directory. Anything else is refused: its files are not attnstab's to delete.

Everything here uses the standard library only, so the entry point can ask :func:`published` after an interrupt at
any moment.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from attnstab_cli.checkpoints.hub_cache import hub_cache_dir, looks_like_repo_id
from attnstab_cli.errors import UsageError

COMPARE_KIND, TRACK_KIND = "attnstab-compare", "attnstab-track"
WRITER = "attnstab"                    # the name image and page outputs carry in their metadata
# kind -> (the file naming it, what it is called in messages)
DIRECTORY_KINDS = {"report": ("manifest.json", "scan report"), "compare": ("compare.json", "comparison"),
                   "track": ("track.json", "track")}
# file kind (a plot suffix, or junit) -> the bytes near its start that mark a file attnstab wrote
FILE_MARKS = {".png": b"tEXtSoftware\x00" + WRITER.encode(),                 # PNG tEXt chunk "Software"
              ".svg": f"<dc:title>{WRITER}</dc:title>".encode(),              # SVG metadata dc:creator
              ".html": f'<meta name="generator" content="{WRITER}">'.encode(),
              "junit": b'<testsuites name="attnstab gate"'}
MARK_WINDOW = 8192                     # the marks sit in the first bytes of each format
MANIFEST_LIMIT = 64 << 20              # a marker file larger than this is not read (not one attnstab wrote)
# the longest temporary sibling report/write.py makes: ".NAME." + tempfile's 8 random characters + ".replaced"
TEMP_NAME_EXTRA = 2 + 8 + len(".replaced")

_published: list[Path] = []


def record_published(path: Path) -> None:
    """Note that ``path`` now holds a complete output (called by the atomic writers after their rename)."""
    _published.append(path)


def published() -> list[Path]:
    """The complete outputs this process has published since :func:`forget_published`, in order."""
    return list(_published)


def forget_published() -> None:
    _published.clear()


def output_kind(path: Path) -> str | None:
    """``report``, ``compare`` or ``track`` when ``path`` is a directory attnstab wrote (its marker file names it),
    else None. A ``manifest.json`` counts when it is a JSON object from tool ``attnstab`` with a schema version."""
    if path.is_symlink() or not path.is_dir():
        return None
    for kind, (marker, _) in DIRECTORY_KINDS.items():
        doc = _read_marker(path / marker)
        if doc is None:
            continue
        if kind == "report":
            tool = doc.get("tool")
            if isinstance(tool, dict) and tool.get("name") == WRITER and "schema_version" in doc:
                return kind
        elif doc.get("kind") == {"compare": COMPARE_KIND, "track": TRACK_KIND}[kind]:
            return kind
    return None


def check_writable(out: Path) -> None:
    """:class:`UsageError` unless ``out`` (a file or directory to create or replace) can be written (module
    docstring); nothing is left behind."""
    if out.name in ("", ".", ".."):
        raise UsageError("names the current or a parent directory; give the output a name of its own, e.g. report/",
                         path=out)
    target = Path(os.path.abspath(out))
    base, names = target.parent, [target.name]
    while not os.path.lexists(base):
        names.append(base.name)
        base = base.parent
    if not base.is_dir():
        what = "a broken symbolic link" if base.is_symlink() and not base.exists() else "not a directory"
        raise UsageError(f"cannot be created: {base} is {what}", path=out)
    name_max, path_max = _limit(base, "PC_NAME_MAX", 255), _limit(base, "PC_PATH_MAX", 4096)
    for i, name in enumerate(names):
        allowed = name_max - (TEMP_NAME_EXTRA if i == 0 else 0)
        if len(os.fsencode(name)) > allowed:
            raise UsageError(f"the name {name[:40]!r}... is {len(os.fsencode(name))} bytes; at most {allowed} fit "
                             f"here (the atomic write adds a temporary name)", path=out)
    if len(os.fsencode(str(target))) + TEMP_NAME_EXTRA >= path_max:
        raise UsageError(f"the path is too long for this filesystem (at most {path_max - TEMP_NAME_EXTRA} bytes)",
                         path=out)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attnstab-probe-", dir=base))
    except OSError as exc:
        raise UsageError(f"cannot be written: {base} is not writable ({exc.strerror or exc})", path=out) from None


def check_not_input(out: Path, inputs: Iterable[str | Path]) -> None:
    """:class:`UsageError` when ``out`` is, contains or lies inside one of the command's inputs (a checkpoint
    directory or file, a cached repo's folder, an input report), compared both as written and through symlinks."""
    spots = {Path(os.path.abspath(out)), _resolve(out)}
    for given in inputs:
        anchor, places = _input_places(str(given))
        role = "input report" if output_kind(anchor) == "report" else "checkpoint"
        for place in places:
            for spot in spots:
                relation = ("is" if spot == place else "contains" if spot in place.parents else
                            "is inside" if place in spot.parents else None)
                if relation:
                    raise UsageError(f"{relation} the {role} {given}; refused, with or without --force",
                                     path=out, hint="write the output somewhere else, e.g. --out reports/NAME")


def check_destination(out: Path, kind: str, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """The whole rule for a directory output replaced in one rename (``report`` or ``compare``): writable, clear of
    the inputs, and an existing ``out`` replaced only with ``force`` and only if it is that kind or empty."""
    check_writable(out)
    check_not_input(out, inputs)
    if not os.path.lexists(out):
        return
    name = DIRECTORY_KINDS[kind][1]
    if out.is_symlink():
        raise UsageError("is a symbolic link; refused", path=out, hint="name the directory itself, or another one")
    if not out.is_dir():
        raise UsageError(f"exists and is not a directory (not an attnstab {name}); refused", path=out)
    found = output_kind(out)
    if found != kind and not _is_empty(out):
        what = f"an attnstab {DIRECTORY_KINDS[found][1]}" if found else f"neither an attnstab {name} nor empty"
        raise UsageError(f"exists and is {what}; refused, with or without --force (only an attnstab {name} or an "
                         f"empty directory is replaced)", path=out, hint="choose another output directory")
    if not force:
        raise UsageError("already exists", path=out, hint="pass --force to replace it")


def check_file_destination(out: Path, kind: str, force: bool) -> None:
    """The rule for a file output (``kind``: a plot suffix or ``junit``): writable, and an existing file replaced
    only with ``force`` and only if attnstab wrote it (:data:`FILE_MARKS`)."""
    check_writable(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_file():
        raise UsageError("exists and is not a regular file; refused", path=out)
    if not _has_mark(out, FILE_MARKS[kind]):
        raise UsageError("exists and was not written by attnstab; refused, with or without --force", path=out,
                         hint="choose another file name, or remove the file yourself")
    if not force:
        raise UsageError("already exists", path=out, hint="pass --force to replace it")


def _input_places(given: str) -> tuple[Path, set[Path]]:
    """An input's anchor (a directory, a weights file, or a cached repo's folder; a ``config.json`` or index file
    stands for its directory) and the places it occupies: the anchor as written and resolved, and the targets of the
    symlinks directly inside it (the hub links snapshot files into ``blobs/``)."""
    path = Path(given).expanduser()
    if os.path.lexists(path):
        anchor = path.parent if path.is_file() and path.suffix == ".json" else path
    elif looks_like_repo_id(given):
        anchor = hub_cache_dir() / ("models--" + given.replace("/", "--"))
    else:
        return path, set()
    places = {Path(os.path.abspath(anchor)), _resolve(anchor)}
    if anchor.is_dir():
        try:
            places |= {_resolve(entry) for entry in anchor.iterdir() if entry.is_symlink()}
        except OSError:
            pass
    return anchor, places


def _resolve(path: Path) -> Path:
    """``path`` through its symlinks; as written (absolute) when they loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _is_empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def _read_marker(path: Path) -> dict | None:
    """A marker file as a JSON object, or None when it is missing, not a regular file, too large or not JSON."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MANIFEST_LIMIT:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _has_mark(path: Path, mark: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return mark in fh.read(MARK_WINDOW)
    except OSError:
        return False


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default
