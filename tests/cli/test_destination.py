"""Where commands may write: ``--force`` replaces only an attnstab output of the same kind or an empty directory,
never the checkpoint or anything holding it or inside it, and an output that cannot be written is refused before
any work (exit 2, one line), for every command that writes."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cli.helpers import assert_input_error, invoke
from tiny_models import save_tiny_model

FAST = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0")
RULE = ("--no-config", "--rule", "theta_p05 >= 0")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT-2 checkpoint and a scan report of it."""
    root = tmp_path_factory.mktemp("dest")
    save_tiny_model("gpt2", root / "gpt2")
    result = invoke("scan", root / "gpt2", *FAST, "--out", root / "report", "--quiet")
    assert result.exit_code == 0, result.stderr
    return root / "gpt2", root / "report"


@pytest.fixture
def ckpt(built: tuple[Path, Path], tmp_path: Path) -> Path:
    """A fresh copy of the checkpoint in ``tmp_path`` (so a wrong deletion could only hit the copy)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(built[0], dst)
    return dst


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256: the filesystem state to compare before and after."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def writing(command: str, ckpt: Path, out: Path, *extra: str | Path) -> tuple:
    """The arguments of ``command`` writing the scan (or comparison, track) of ``ckpt`` to ``out``."""
    return {"scan": ("scan", ckpt, *FAST, "--out", out),
            "compare": ("compare", ckpt, ckpt, *FAST, "--out", out),
            "compare --save-reports": ("compare", ckpt, ckpt, *FAST, "--save-reports", out),
            "gate": ("gate", ckpt, *RULE, *FAST, "--out", out),
            "track": ("track", ckpt, *FAST, "--out", out)}[command] + extra


COMMANDS = ("scan", "compare", "compare --save-reports", "gate", "track")


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process really cannot create anything in: a 0555 directory, or, for root (who may write
    there regardless of the mode), /sys, where mkdir fails even for root."""
    for candidate in (tmp_path / "read-only", Path("/sys")):
        if candidate.parent == tmp_path:
            candidate.mkdir()
            candidate.chmod(0o555)
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return candidate
    pytest.fail("found no unwritable directory to test with")


@pytest.mark.parametrize("command", COMMANDS)
def test_force_never_replaces_a_directory_of_other_files(command: str, ckpt: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "a" if command == "compare --save-reports" else mine).mkdir(parents=True)
    (mine / "a" / "notes.txt" if command == "compare --save-reports" else mine / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_input_error(invoke(*writing(command, ckpt, mine, "--force")), "refused", "with or without --force")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["scan", "compare", "gate", "track"])
@pytest.mark.parametrize("where", ["itself", "its parent", "an empty directory inside", "a new directory inside"])
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_the_checkpoint_and_what_holds_or_is_inside_it_are_refused(command: str, where: str, force: bool,
                                                                   ckpt: Path, tmp_path: Path) -> None:
    out = {"itself": ckpt, "its parent": tmp_path, "an empty directory inside": ckpt / "empty",
           "a new directory inside": ckpt / "new"}[where]
    if where == "an empty directory inside":
        out.mkdir()
    before = snapshot(tmp_path)
    result = invoke(*writing(command, ckpt, out, *(["--force"] if force else [])))
    relation = {"itself": "is the checkpoint", "its parent": "contains the checkpoint"}.get(where, "is inside")
    assert_input_error(result, relation, str(ckpt))
    assert snapshot(tmp_path) == before and not (ckpt / "new").exists()


@pytest.mark.parametrize("where", ["itself", "a new directory inside"])
def test_compare_save_reports_never_go_into_the_checkpoint(where: str, ckpt: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = invoke(*writing("compare --save-reports", ckpt, ckpt if where == "itself" else ckpt / "new", "--force"))
    assert_input_error(result, "is inside the checkpoint", str(ckpt))
    assert snapshot(tmp_path) == before and not (ckpt / "new").exists()


def test_the_checkpoint_is_protected_through_a_symlink_and_as_a_weights_file(ckpt: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    before = snapshot(ckpt)
    assert_input_error(invoke("scan", ckpt, *FAST, "--out", link, "--force"), "is the checkpoint")
    assert_input_error(invoke("scan", ckpt / "model.safetensors", "--n-heads", "2", *FAST, "--out", ckpt,
                              "--force"), "contains the checkpoint")
    assert snapshot(ckpt) == before


def test_force_replaces_an_empty_directory_and_an_output_of_the_same_kind_only(built: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    ckpt, report = built
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("scan", ckpt, *FAST, "--out", empty, "--force", "--quiet").exit_code == 0
    assert (empty / "manifest.json").is_file()
    before = snapshot(empty)
    result = invoke("compare", report, report, "--out", empty, "--force")     # a scan report is no comparison
    assert_input_error(result, "is an attnstab scan report", "refused")
    assert snapshot(empty) == before
    comparison = tmp_path / "comparison"
    assert invoke("compare", report, report, "--out", comparison, "--quiet").exit_code == 0
    assert invoke("compare", report, report, "--out", comparison, "--force", "--quiet").exit_code == 0
    assert_input_error(invoke("scan", ckpt, *FAST, "--out", comparison, "--force"), "is an attnstab comparison")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison", "empty"]      # nothing hidden left


@pytest.mark.parametrize("case", ["below a regular file", "read-only directory", "name too long",
                                  "no room for the temporary name", "the current directory"])
def test_an_unwritable_out_is_refused_before_the_scan(case: str, ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "file").write_text("x")
    out = {"below a regular file": lambda: tmp_path / "file" / "report",
           "read-only directory": lambda: unwritable_directory(tmp_path) / "report",
           "name too long": lambda: tmp_path / ("r" * 300),
           "no room for the temporary name": lambda: tmp_path / ("r" * 250),
           "the current directory": lambda: Path(".")}[case]()
    if case == "the current directory":
        (tmp_path / "cwd").mkdir()
        monkeypatch.chdir(tmp_path / "cwd")
    before = snapshot(tmp_path)
    result = invoke("scan", ckpt, *FAST, "--out", out, "--force")        # not --quiet: a scan would print progress
    assert_input_error(result, {"below a regular file": "is not a directory", "read-only directory": "not writable",
                                "the current directory": "current or a parent directory"}.get(case, "bytes"))
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file", "ckpt"] + (["read-only"] if case == "read-only directory" else [])
        + (["cwd"] if case == "the current directory" else []))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_an_unwritable_out_before_any_work(command: str, ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_input_error(invoke(*writing(command, ckpt, tmp_path / "file" / "out")), "is not a directory")


def test_gate_refuses_an_unwritable_junit_file_and_another_program_s_file(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for junit, needle in ((tmp_path / "file" / "gate.xml", "is not a directory"),
                          (unwritable_directory(tmp_path) / "gate.xml", "not writable"),
                          (tmp_path / "file", "not written by attnstab")):
        assert_input_error(invoke("gate", ckpt, *RULE, *FAST, "--junit-xml", junit), needle)
    assert (tmp_path / "file").read_text() == "x"
    junit = tmp_path / "gate.xml"
    for _ in range(2):                                  # a rerun replaces the gate's own JUnit file
        result = invoke("gate", ckpt, *RULE, *FAST, "--junit-xml", junit, "--quiet")
        assert result.exit_code == 0, result.stderr
        assert "<testsuites" in junit.read_text()


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_plot_force_replaces_only_a_plot_it_wrote(suffix: str, built: tuple[Path, Path], tmp_path: Path) -> None:
    report = built[1]
    theirs = tmp_path / f"photo{suffix}"
    theirs.write_bytes(b"not a plot of ours")
    assert_input_error(invoke("plot", report, "--out", theirs, "--force"), "not written by attnstab", "refused")
    assert theirs.read_bytes() == b"not a plot of ours"
    ours = tmp_path / f"plot{suffix}"
    assert invoke("plot", report, "--out", ours, "--quiet").exit_code == 0
    assert_input_error(invoke("plot", report, "--out", ours), "already exists")
    assert invoke("plot", report, "--out", ours, "--force", "--quiet").exit_code == 0


@pytest.mark.parametrize("where", ["read-only directory", "below a regular file"])
def test_plot_into_an_unwritable_place_is_refused(where: str, built: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    parent = unwritable_directory(tmp_path) if where == "read-only directory" else tmp_path / "file"
    assert_input_error(invoke("plot", built[1], "--out", parent / "plot.png"),
                       "not writable" if where == "read-only directory" else "is not a directory")
