"""The explicit package list in pyproject.toml matches the source tree, so wheel and editable installs ship every
subpackage (a package left off the list installs nothing and fails only at import time)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def listed_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M)
    assert block, "pyproject.toml has no packages = [...] list"
    return set(re.findall(r'"([\w.]+)"', block.group(1)))


def test_every_package_directory_is_listed() -> None:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "attnstab_cli").rglob("__init__.py")}
    found |= {"attnstab_kernels"} if (ROOT / "kernels" / "__init__.py").is_file() else set()
    assert listed_packages() == found


def test_kernels_install_under_a_private_name() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"attnstab_kernels" = "kernels"' in text and '"kernels"' not in listed_packages()
