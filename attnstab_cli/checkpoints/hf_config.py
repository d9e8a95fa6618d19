"""Parse ``config.json`` ourselves (``transformers`` is never imported at run time)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from attnstab_cli.bounded_json import JsonRefused, loads_strict
from attnstab_cli.errors import InputError


def load_hf_config(path: Path) -> dict[str, Any]:
    """Return the config as a dict; malformed, deeply nested or duplicate-keyed JSON, or a non-object, is an
    :class:`InputError` naming the file."""
    try:
        data = loads_strict(path.read_text(encoding="utf-8"), constants=True)
    except OSError as exc:
        raise InputError(f"cannot read config: {exc.strerror}", path=path) from exc
    except (UnicodeDecodeError, JsonRefused) as exc:
        raise InputError(f"malformed config.json ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise InputError("malformed config.json (not a JSON object)", path=path)
    return data
