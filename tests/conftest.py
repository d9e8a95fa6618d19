"""Session fixtures: tiny checkpoints of every family, built offline with ``transformers`` and saved once."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from tiny_models import FAMILIES, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers() -> None:
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """family -> (directory, reference transformers model), for every family in ``tiny_models.FAMILIES``."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: (root / fam, save_tiny_model(fam, root / fam)) for fam in FAMILIES}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 checkpoint of the test module's own, for tests that copy it and break the copy."""
    path = tmp_path_factory.mktemp("good") / "gpt2"
    save_tiny_model("gpt2", path)
    return path
