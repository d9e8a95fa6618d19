"""Gate rules from TOML: ``[gate]`` in ``attnstab.toml`` or ``[tool.attnstab.gate]`` in ``pyproject.toml``.

Format (the same keys in either table; ``pyproject.toml`` only ``[tool.attnstab.gate]``)::

    [tool.attnstab.gate]
    rules = ["theta_p05 >= 0.2", "layers.lip_layer_calibrated <= 1e4", "sens_proxy_ln growth <= 20%"]

    [[tool.attnstab.gate.relative]]
    column = "sens_proxy_ln"      # level = "layers" is optional, as in a rule string
    max_growth = 0.20             # and/or max_drop = 0.05 (fractions of the baseline value)

Without ``--config`` the current directory is searched: ``attnstab.toml`` (its ``[gate]``), then ``pyproject.toml``
(its ``[tool.attnstab.gate]``); the first that has a gate table is used. Unknown keys are errors, so a misspelt key
never silently drops a rule.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from attnstab_cli.errors import InputError, UsageError
from attnstab_cli.gate.rules import Rule, parse_rule, relative_rule
from attnstab_cli.input_files import regular_file_present, require_regular_file

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAMES = ("attnstab.toml", "pyproject.toml")
GATE_KEYS = {"rules", "relative"}
RELATIVE_KEYS = {"column", "level", "max_growth", "max_drop"}
MAX_TOML_DEPTH = 32


def collect_rules(flags: list[str], config: Path | None, directory: Path,
                  discover: bool = True) -> tuple[list[Rule], Path | None]:
    """``--rule`` flags plus the rules of ``config`` (or, when not given and ``discover``, of the config found in
    ``directory``); returns them and the config file used."""
    rules = [parse_rule(text, "--rule") for text in flags]
    path = config if config is not None else (find_config(directory) if discover else None)
    return rules + (load_config(path) if path is not None else []), path


def find_config(directory: Path) -> Path | None:
    """The first of ``attnstab.toml`` / ``pyproject.toml`` in ``directory`` that holds a gate table, else None."""
    for name in CONFIG_NAMES:
        path = directory / name
        if regular_file_present(path) and _gate_table(_read_toml(path), path, required=False) is not None:
            return path
    return None


def load_config(path: Path) -> list[Rule]:
    """Every rule of the gate table in ``path`` (``[tool.attnstab.gate]``, else top-level ``[gate]``)."""
    require_regular_file(path, missing="no such config file")
    table = _gate_table(_read_toml(path), path, required=True)
    assert table is not None
    unknown = sorted(set(table) - GATE_KEYS)
    if unknown:
        raise InputError(f"unknown key(s) {unknown} in the gate table; allowed: rules, relative", path=path)
    rules = table.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise InputError("gate 'rules' must be a list of strings such as \"theta_p05 >= 0.2\"", path=path)
    out = [_in_file(parse_rule, path, r, str(path)) for r in rules]
    relative = table.get("relative", [])
    if not isinstance(relative, list) or not all(isinstance(r, dict) for r in relative):
        raise InputError("gate 'relative' must be an array of tables ([[...gate.relative]])", path=path)
    for entry in relative:
        out += _relative(entry, path)
    return out


def _relative(entry: dict[str, Any], path: Path) -> list[Rule]:
    unknown = sorted(set(entry) - RELATIVE_KEYS)
    if unknown:
        raise InputError(f"unknown key(s) {unknown} in a gate.relative entry; allowed: {sorted(RELATIVE_KEYS)}",
                         path=path)
    column, level = entry.get("column"), entry.get("level")
    if not isinstance(column, str) or (level is not None and not isinstance(level, str)):
        raise InputError("a gate.relative entry needs column = \"NAME\" (and optionally level = \"layers\")",
                         path=path)
    kinds = [k for k in ("growth", "drop") if f"max_{k}" in entry]
    if not kinds:
        raise InputError(f"the gate.relative entry for {column!r} needs max_growth or max_drop", path=path)
    return [_in_file(relative_rule, path, column, level, k, entry[f"max_{k}"], str(path)) for k in kinds]


def _in_file(make: Callable[..., Rule], path: Path, *args: Any) -> Rule:
    """``make(*args)``; a usage error in a config file becomes an input error about that file (still exit 2)."""
    try:
        return make(*args)
    except UsageError as exc:
        raise InputError(exc.detail, hint=exc.hint, path=path) from None


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML document of ``path``, nested at most :data:`MAX_TOML_DEPTH` deep (tomllib recurses once per level
    of arrays and inline tables, and a gate table needs four)."""
    require_regular_file(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"malformed TOML ({exc})", path=path) from None
    except RecursionError:
        raise InputError(f"TOML nested too deeply (more than {MAX_TOML_DEPTH} levels)", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"unreadable config file ({exc})", path=path) from None
    if _depth(doc) > MAX_TOML_DEPTH:
        raise InputError(f"TOML nested too deeply (more than {MAX_TOML_DEPTH} levels)", path=path)
    return doc


def _depth(doc: Any) -> int:
    """How deeply tables and arrays nest in ``doc`` (iteratively: the document may be deep)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level <= MAX_TOML_DEPTH:             # deeper than the cap is refused whatever lies below
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _gate_table(doc: dict[str, Any], path: Path, required: bool) -> dict[str, Any] | None:
    """``[tool.attnstab.gate]``; outside a ``pyproject.toml`` a top-level ``[gate]`` too."""
    tool = doc.get("tool")
    attnstab = tool.get("attnstab") if isinstance(tool, dict) else None
    table = attnstab.get("gate") if isinstance(attnstab, dict) else None
    if table is None and path.name != "pyproject.toml":
        table = doc.get("gate")
    if table is None:
        if required:
            raise InputError("no [tool.attnstab.gate] or [gate] table", path=path,
                             hint="see the Gate section of the README for the format")
        return None
    if not isinstance(table, dict):
        raise InputError("the gate entry must be a table", path=path)
    return table


__all__ = ["CONFIG_NAMES", "collect_rules", "find_config", "load_config"]
