"""A checkpoint in the Hugging Face cache's own layout scans by repo id (``blobs/<sha256>``, snapshot files as
relative symlinks into ``blobs/``, ``refs/main`` holding the commit), and the layout cannot lead reads out of the
repo's cache folder: a ref must be a commit hash, and every snapshot file must resolve inside ``models--org--name/``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cli.helpers import assert_input_error, invoke

REPO_ID = "tiny-org/tiny-gpt2"
COMMIT = "4f3c2b1a09e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4"
SCAN = ("--calib", "random", "--seq-len", "8", "--batch-size", "1", "--batches", "1", "--quiet")



def build_hub_repo(cache: Path, files: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """``cache/models--org--name`` as ``huggingface_hub`` lays it out; returns the repo folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture
def hub(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with the tiny model under ``REPO_ID``, ``HF_HUB_CACHE`` pointing at it, and a working directory in
    which the repo id is not a local path."""
    cache = tmp_path / "hub"
    repo = build_hub_repo(cache, good)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return repo


def test_scan_by_repo_id_in_hub_layout(hub: Path, tmp_path: Path) -> None:
    snapshot_file = hub / "snapshots" / COMMIT / "model.safetensors"
    assert snapshot_file.is_symlink() and not os.readlink(snapshot_file).startswith("/")
    out = tmp_path / "report"
    result = invoke("scan", REPO_ID, *SCAN, "--out", out)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["n_layers"] == 2
    assert sorted(p.name for p in hub.iterdir()) == ["blobs", "refs", "snapshots"]


def test_repo_id_through_hf_home(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    home.mkdir()
    shutil.move(hub.parent, home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    result = invoke("info", REPO_ID, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["family"] == "gpt2"


def _other_checkpoint(good: Path, where: Path) -> Path:
    """A complete checkpoint outside the cache, so a ref or link that reached it would scan successfully."""
    shutil.copytree(good, where)
    return where


def test_ref_with_relative_path_is_refused(hub: Path, good: Path) -> None:
    _other_checkpoint(good, hub.parent.parent / "elsewhere")     # snapshots/../../../elsewhere
    (hub / "refs" / "main").write_text("../../../elsewhere")
    result = invoke("scan", REPO_ID, *SCAN)
    assert_input_error(result, str(hub / "refs" / "main"), "'../../../elsewhere'", "not a commit hash")


def test_ref_with_absolute_path_is_refused(hub: Path, good: Path, tmp_path: Path) -> None:
    elsewhere = _other_checkpoint(good, tmp_path / "elsewhere")
    (hub / "refs" / "main").write_text(str(elsewhere))
    assert_input_error(invoke("info", REPO_ID), str(hub / "refs" / "main"), "not a commit hash", "refused")


def test_snapshot_file_linked_out_of_the_repo_folder_is_refused(hub: Path, good: Path, tmp_path: Path) -> None:
    outside = _other_checkpoint(good, tmp_path / "elsewhere") / "model.safetensors"
    link = hub / "snapshots" / COMMIT / "model.safetensors"
    link.unlink()
    link.symlink_to(outside)
    result = invoke("scan", REPO_ID, *SCAN)
    assert_input_error(result, str(link), "outside the cached repo folder", "refused")
    assert str(outside) in result.stderr


def test_snapshot_directory_linked_out_of_the_repo_folder_is_refused(hub: Path, good: Path,
                                                                    tmp_path: Path) -> None:
    elsewhere = _other_checkpoint(good, tmp_path / "elsewhere")
    snapshot = hub / "snapshots" / COMMIT
    shutil.rmtree(snapshot)
    snapshot.symlink_to(elsewhere)
    assert_input_error(invoke("info", REPO_ID), str(snapshot), "outside the cached repo folder")


def test_blob_linked_between_repos_is_refused(hub: Path, good: Path) -> None:
    """Another repo's folder is outside this one's, even inside the same cache."""
    other = build_hub_repo(hub.parent, good, "tiny-org/other", "a" * 40)
    link = hub / "snapshots" / COMMIT / "config.json"
    target = os.readlink(other / "snapshots" / ("a" * 40) / "config.json")
    link.unlink()
    link.symlink_to(Path("..") / ".." / ".." / other.name / "blobs" / Path(target).name)
    assert_input_error(invoke("info", REPO_ID), str(link), "outside the cached repo folder")
