"""Parse ``config.json`` ourselves (``transformers`` is never imported at run time)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attnstab_cli.errors import InputError


def load_hf_config(path: Path) -> dict[str, Any]:
    """Return the config as a dict; malformed JSON or a non-object is an :class:`InputError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read config: {exc.strerror}", path=path) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"malformed config.json ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise InputError("malformed config.json (not a JSON object)", path=path)
    return data
