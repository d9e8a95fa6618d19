"""The README documents every report column (issue 5, item 1): each column name appears in backticks."""
from __future__ import annotations

from pathlib import Path

from attnstab_cli.report.schema import ALL_TABLES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_column_is_documented() -> None:
    text = README.read_text(encoding="utf-8")
    missing = {t: [c.name for c in cols if f"`{c.name}`" not in text] for t, cols in ALL_TABLES.items()}
    assert not any(missing.values()), missing
